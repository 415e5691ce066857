//! `src/admin/envoy.pb`, the schemas `config_dump` prints with, is what protox compiles
//! from the roots below (Envoy's API as `envoy-types` ships it, and `proto/istio`).
//! `STRAIT_WRITE_DESCRIPTORS=1` rewrites the file instead of comparing.

use std::path::{Path, PathBuf};

use prost::Message;

/// The resources and config dumps strait prints; protox adds what they import.
const ROOTS: &[&str] = &[
    "envoy/admin/v3/config_dump.proto",
    "envoy/admin/v3/clusters.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto",
    "envoy/extensions/transport_sockets/internal_upstream/v3/internal_upstream.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/network/rbac/v3/rbac.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/upstreams/tcp/v3/tcp_protocol_options.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/stats/config.proto",
    "envoy/config/filter/network/metadata_exchange/metadata_exchange.proto",
];

/// Where cargo unpacked `envoy-types` (its `proto/` folder is the API): the version
/// `Cargo.lock` pins, under the registry sources of `CARGO_HOME`.
fn envoy_types_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lock = std::fs::read_to_string(here.join("Cargo.lock")).expect("Cargo.lock");
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"envoy-types\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .expect("envoy-types in Cargo.lock");
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let sources = home.join("registry/src");
    std::fs::read_dir(&sources)
        .unwrap_or_else(|e| panic!("{}: {e}", sources.display()))
        .flatten()
        .map(|index| index.path().join(format!("envoy-types-{version}")))
        .find(|dir| dir.join("proto").is_dir())
        .unwrap_or_else(|| {
            panic!(
                "envoy-types {version} is not unpacked under {}",
                sources.display()
            )
        })
}

#[test]
fn the_descriptor_set_in_the_tree_is_what_the_protos_compile_to() {
    let proto = envoy_types_dir().join("proto");
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let includes = [
        here.join("proto/istio"),
        proto.join("data-plane-api"),
        proto.join("xds"),
        proto.join("protoc-gen-validate"),
        proto.join("googleapis"),
    ];
    let mut set = protox::compile(ROOTS, includes).expect("the protos compile");
    for file in &mut set.file {
        file.source_code_info = None;
    }
    let bytes = set.encode_to_vec();
    let path = here.join("src/admin/envoy.pb");
    if std::env::var_os("STRAIT_WRITE_DESCRIPTORS").is_some() {
        std::fs::write(&path, &bytes).expect("write the descriptor set");
        return;
    }
    let held = std::fs::read(&path).expect("src/admin/envoy.pb");
    assert!(
        held == bytes,
        "src/admin/envoy.pb ({} bytes) is not what the protos compile to ({} bytes): \
         run STRAIT_WRITE_DESCRIPTORS=1 cargo test --test descriptors",
        held.len(),
        bytes.len()
    );
}
