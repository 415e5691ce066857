//! Arbitrary strings through the SPIFFE ID parser: no panic, and every accepted ID splits
//! back into its trust domain and path, round-trips through Display, and is within the
//! specification's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::tls::spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match SpiffeId::parse(s) {
        Ok(id) => {
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
            assert!(s.len() <= 2048);
            let td = id.trust_domain();
            assert!(!td.is_empty() && td.len() <= 255);
            assert_eq!(format!("spiffe://{td}{}", id.path()), s);
            assert!(
                id.path().is_empty() || (id.path().starts_with('/') && !id.path().ends_with('/'))
            );
            assert_eq!(id.principal(), &s["spiffe://".len()..]);
            if let (Some(ns), Some(sa)) = (id.namespace(), id.service_account()) {
                assert_eq!(id.path(), format!("/ns/{ns}/sa/{sa}"));
            }
            assert_eq!(SpiffeId::parse(id.as_str()), Ok(id.clone()));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
