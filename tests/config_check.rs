//! The configuration loader through the library's public API, as `strait check` uses it.

use std::path::{Path, PathBuf};

use strait::config::{ConfigError, Severity, load_paths, load_str};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[test]
fn each_example_loads_and_lists_the_file_it_read() {
    for name in [
        "passthrough.yaml",
        "istio-mutual.yaml",
        "bridge.yaml",
        "expose-istiod.yaml",
    ] {
        let path = examples().join(name);
        let loaded =
            load_paths(std::slice::from_ref(&path)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded.files, [path]);
        assert!(
            loaded.diagnostics.is_empty(),
            "{name}: {:?}",
            loaded.diagnostics
        );
    }
}

#[test]
fn check_output_lines_for_a_broken_file() {
    let err = load_str(
        "broken.yaml",
        "apiVersion: networking.istio.io/v1\n\
         kind: DestinationRule\n\
         metadata: {name: r}\n\
         spec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      tcp: {connectTimeout: soon}\n  colour: blue\n",
    )
    .unwrap_err();
    let ConfigError::Invalid { diagnostics } = err else {
        panic!("expected diagnostics")
    };
    let lines: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        lines,
        [
            "broken.yaml:5:9: warning: DestinationRule default/r: host reviews.default.svc.cluster.local matches no ServiceEntry host; ignored",
            "broken.yaml:8:29: error: spec.trafficPolicy.connectionPool.tcp.connectTimeout: invalid duration \"soon\"; expected a number and a unit (ns, us, ms, s, m, h), e.g. \"1h30m\"",
            "broken.yaml:9:3: warning: unknown field spec.colour; ignored",
        ]
    );
    assert_eq!(diagnostics[1].severity, Severity::Error);
    assert_eq!((diagnostics[1].line, diagnostics[1].col), (8, 29));
}

#[test]
#[ignore = "timing probe: STRAIT_BIG_CONFIG=FILE cargo test --test config_check -- --ignored --nocapture"]
fn large_configuration_timing() {
    let Some(path) = std::env::var_os("STRAIT_BIG_CONFIG") else {
        return;
    };
    let start = std::time::Instant::now();
    let loaded = load_paths(&[PathBuf::from(path)]).unwrap();
    eprintln!(
        "{} services in {:?}",
        loaded.snapshot.services.len(),
        start.elapsed()
    );
}
