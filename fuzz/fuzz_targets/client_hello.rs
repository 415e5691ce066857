//! Arbitrary client bytes through the ClientHello inspector: no panic, answers within the
//! buffer, and a complete answer is stable under truncation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::tls::client_hello::{HelloParse, MAX_CLIENT_HELLO_BYTES, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    let HelloParse::Complete(hello) = parse_client_hello(data) else {
        return;
    };
    let used = hello.record_bytes();
    assert!(used <= data.len() && used <= MAX_CLIENT_HELLO_BYTES);
    assert!(hello.body().len() < used);
    if let Some(sni) = hello.sni() {
        assert!(!sni.is_empty());
        assert!(
            sni.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(&c))
        );
    }
    assert!(hello.alpn().all(|p| !p.is_empty()));
    assert_eq!(hello.alpn_offered(), hello.alpn().next().is_some());
    let _ = hello.alpn_display();

    // The records alone give the same answer; one byte fewer is still incomplete.
    let again = parse_client_hello(&data[..used]);
    assert_eq!(again, HelloParse::Complete(hello.clone()));
    assert_eq!(parse_client_hello(&data[..used - 1]), HelloParse::NeedMore);
});
