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
        "ambient.yaml",
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

/// The Gateway API Gateway of Istio's ambient east-west gateway: what strait does not
/// serve is named, not silently dropped.
#[test]
fn check_names_what_an_east_west_gateway_api_gateway_asks_and_strait_does_not_serve() {
    let loaded = load_str(
        "ambient.yaml",
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ew, namespace: istio-system}
spec:
  gatewayClassName: istio-east-west
  addresses: [{type: IPAddress, value: 192.0.2.1}]
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    tls:
      mode: Terminate
      certificateRefs: [{name: cert}]
      options: {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL, colour: blue}
  - name: tls
    port: 15443
    protocol: TLS
    tls: {mode: Passthrough}
  - name: plain
    port: 15009
    protocol: HBONE
    tls: {mode: Terminate}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
",
    )
    .unwrap();
    let lines: Vec<String> = loaded.diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        lines,
        [
            "ambient.yaml:6:3: warning: field spec.addresses is not used by strait; ignored",
            "ambient.yaml:13:7: warning: field spec.listeners[0].tls.certificateRefs is not used by strait; ignored",
            "ambient.yaml:14:68: warning: unknown field spec.listeners[0].tls.options.colour; ignored",
            "ambient.yaml:17:15: warning: spec.listeners[1].protocol TLS is not served by strait on a Gateway API Gateway (only HBONE); listener skipped",
            "ambient.yaml:22:10: warning: spec.listeners[2].tls has no options {gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL}; strait terminates HBONE only with Istio's mutual TLS; listener skipped",
            "ambient.yaml:28:21: warning: gatewayClassName istio is not served by strait (only istio-east-west); Gateway default/web skipped",
        ]
    );
    let listeners = &loaded.snapshot.listeners;
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0].addr.to_string(), "0.0.0.0:15008");
    assert_eq!(listeners[0].servers[0].name, "istio-system/ew/mesh");
    assert_eq!(
        listeners[0].servers[0].mode,
        strait::model::ServerTlsMode::Hbone
    );
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
