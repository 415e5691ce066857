//! Arbitrary SNI strings through the Istio subset-key parser: no panic, and every accepted
//! key is exactly what `build_subset_key` produces for its parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait::route::sni::{build_subset_key, parse_subset_key};

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
});
