//! Arbitrary SNI strings through the Istio subset-key parser: no panic, and every accepted
//! key is exactly what `build_subset_key` produces for its parts. The name lower-cased
//! the way the data path does it (`lower_case`, on the stack) is the name lower-cased
//! by the standard library, and parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::route::sni::{build_subset_key, lower_case, parse_subset_key};

fuzz_target!(|data: &[u8]| {
    let Ok(sni) = std::str::from_utf8(data) else {
        return;
    };
    match parse_subset_key(sni) {
        Ok(key) => {
            assert!(key.port > 0 && !key.host.is_empty());
            assert_eq!(build_subset_key(key.port, key.subset, key.host), sni);
        }
        Err(miss) => assert!(!miss.reason().is_empty()),
    }
    let folded = lower_case(sni);
    let lower = sni.to_ascii_lowercase();
    assert_eq!(&*folded, lower.as_str());
    assert_eq!(parse_subset_key(&folded), parse_subset_key(&lower));
});
