//! Whole-load tests: YAML in, snapshot or diagnostics out, asserted as a user sees them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::model::*;

fn load_ok(yaml: &str) -> Loaded {
    match load_str("t.yaml", yaml) {
        Ok(l) => l,
        Err(e) => panic!("load failed: {e}\n{}", lines_of(&e)),
    }
}

fn lines_of(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid { diagnostics } => diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// Every diagnostic line of a load that must fail.
fn load_err(yaml: &str) -> Vec<String> {
    match load_str("t.yaml", yaml) {
        Ok(l) => panic!("load succeeded; warnings: {:?}", warnings_of(&l)),
        Err(e @ ConfigError::Invalid { .. }) => lines_of(&e).lines().map(String::from).collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn warnings_of(l: &Loaded) -> Vec<String> {
    l.diagnostics.iter().map(|d| d.to_string()).collect()
}

fn warnings(yaml: &str) -> Vec<String> {
    warnings_of(&load_ok(yaml))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn svc<'a>(l: &'a Loaded, host: &str, port: u16) -> &'a ServicePort {
    l.snapshot
        .services
        .get(&ServiceKey::new(host, port))
        .unwrap_or_else(|| panic!("no service {host}:{port}"))
}

const GATEWAY: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: cross-network-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15443, name: tls, protocol: TLS}
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: [\"*.local\"]
";

const REVIEWS: &str = "\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports:
  - {number: 9080, name: tcp-reviews, protocol: TCP}
  resolution: STATIC
  endpoints:
  - address: 10.0.0.1
    labels: {version: v1, security.istio.io/tlsMode: istio}
  - address: 10.0.0.2
    labels: {version: v2, security.istio.io/tlsMode: istio}
    weight: 3
";

// ---------------------------------------------------------------------------------------------
// Examples

#[test]
fn every_example_in_config_loads_without_errors_or_warnings() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            seen += 1;
            let loaded = match load_paths(std::slice::from_ref(&path)) {
                Ok(l) => l,
                Err(e) => panic!("{}: {}", path.display(), lines_of(&e)),
            };
            assert_eq!(
                warnings_of(&loaded),
                Vec::<String>::new(),
                "{}",
                path.display()
            );
            assert_eq!(loaded.files, vec![path.clone()]);
        }
    }
    assert!(
        seen >= 3,
        "expected the three examples in {}",
        dir.display()
    );
}

#[test]
fn passthrough_example_builds_the_expected_snapshot() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/passthrough.yaml");
    let l = load_paths(&[path]).unwrap();
    let s = &l.snapshot;
    assert_eq!(s.listeners.len(), 1);
    assert_eq!(
        s.listeners[0].addr,
        "0.0.0.0:15443".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        s.settings.labels.get("istio").map(String::as_str),
        Some("eastwestgateway")
    );
    let reviews = svc(&l, "reviews.default.svc.cluster.local", 9080);
    assert_eq!(reviews.endpoints.len(), 2);
    assert_eq!(
        reviews.endpoints.iter().map(|e| e.port).collect::<Vec<_>>(),
        [19081, 19082]
    );
    assert_eq!(reviews.subsets["v1"].endpoints, [0]);
    assert_eq!(reviews.subsets["v2"].endpoints, [1]);
    assert_eq!(reviews.policy.lb, LbPolicy::LeastRequest);
    assert_eq!(reviews.subsets["v2"].policy.lb, LbPolicy::RoundRobin);
    // The subset did not set connectionPool, so the service's applies.
    assert_eq!(reviews.subsets["v2"].policy.max_connections, Some(1000));
    let ratings = svc(&l, "ratings.default.svc.cluster.local", 9080);
    assert_eq!(ratings.endpoints.len(), 1);
    assert_eq!(ratings.endpoints[0].port, 19090);
    assert_eq!(
        ratings.endpoints[0].service_account.as_deref(),
        Some("ratings")
    );
}

// ---------------------------------------------------------------------------------------------
// Documents

#[test]
fn unknown_kinds_and_api_versions_are_warnings_naming_them() {
    let w = warnings(
        "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: x}
spec: {}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: y}
",
    );
    assert_eq!(
        w,
        [
            "t.yaml:2:7: warning: kind Sidecar (networking.istio.io/v1) is not used by strait; ignored",
            "t.yaml:7:7: warning: kind HTTPRoute (gateway.networking.k8s.io/v1) is not used by strait; ignored",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// VirtualService

const ISTIOD_SE: &str = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: istiod, namespace: istio-system}
spec:
  hosts: [istiod.istio-system.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 15012, name: grpc}, {number: 443, name: https}]
  endpoints: [{address: 10.0.0.20}]
";

fn passthrough_gateway(vs: &str) -> String {
    passthrough_gateway_with_hosts("\"*\"", vs)
}

/// istio-system/istiod-gateway: one PASSTHROUGH server on 15012 with `hosts: [<hosts>]`,
/// istiod's ServiceEntry, then `vs`.
fn passthrough_gateway_with_hosts(hosts: &str, vs: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: istiod-gateway, namespace: istio-system}}
spec:
  servers:
  - port: {{number: 15012, name: tls, protocol: tls}}
    tls: {{mode: PASSTHROUGH}}
    hosts: [{hosts}]
{ISTIOD_SE}{vs}"
    )
}

#[test]
fn a_name_routed_twice_on_a_port_is_reported_at_both_places_and_the_first_kept() {
    let vs = |name: &str, port: u16| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: istio-system}}
spec:
  hosts: [\"*\"]
  gateways: [istio-system/istiod-gateway]
  tls:
  - match: [{{sniHosts: [istiod.istio-system.svc]}}]
    route: [{{destination: {{host: istiod.istio-system.svc.cluster.local, port: {{number: {port}}}}}}}]
"
        )
    };
    let text = passthrough_gateway(&format!("{}{}", vs("first", 15012), vs("second", 443)));
    let l = load_ok(&text);
    assert_eq!(
        l.diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        [
            "t.yaml:26:25: warning: VirtualService istio-system/first: sniHost istiod.istio-system.svc on port 15012 is routed again by VirtualService istio-system/second (line 36); this first route is kept",
            "t.yaml:36:25: warning: VirtualService istio-system/second: sniHost istiod.istio-system.svc on port 15012 is already routed by VirtualService istio-system/first (line 26); this match is skipped, the first route is kept",
        ]
    );
    let routes = &l.snapshot.listeners[0].servers[0].routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].virtual_service, "istio-system/first");
    assert_eq!(routes[0].destinations[0].service.port, 15012);
}

#[test]
fn virtual_services_bind_by_gateway_and_port_and_drop_zero_weights() {
    let l = load_ok(&passthrough_gateway(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: elsewhere, namespace: default}
spec:
  hosts: [\"*\"]
  gateways: [istiod-gateway]
  tls:
  - match: [{sniHosts: [\"*\"]}]
    route: [{destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 15012}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bound, namespace: istio-system}
spec:
  hosts: [\"*.svc\"]
  gateways: [istiod-gateway]
  tls:
  - match: [{port: 9999, sniHosts: [other.svc]}]
    route: [{destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 15012}}}]
  - match: [{sniHosts: [\"*.svc\"], sourceLabels: {app: x}}]
    route:
    - destination: {host: istiod, port: {number: 15012}}
      weight: 90
    - destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 443}}
      weight: 0
    - destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 443}}
      weight: 10
",
    ));
    assert!(l.diagnostics.is_empty(), "{:?}", warnings_of(&l));
    let routes = &l.snapshot.listeners[0].servers[0].routes;
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].virtual_service, "istio-system/bound");
    assert_eq!(routes[0].sni_hosts, [HostMatch::Suffix(".svc".into())]);
    let d: Vec<(u16, u32)> = routes[0]
        .destinations
        .iter()
        .map(|d| (d.service.port, d.weight))
        .collect();
    assert_eq!(d, [(15012, 90), (443, 10)]);
    assert_eq!(
        routes[0].destinations[0].service.host, "istiod.istio-system.svc.cluster.local",
        "a short name is a service of the VirtualService's namespace"
    );
}

#[test]
fn a_namespaced_gateway_host_admits_virtual_services_of_that_namespace_only() {
    let vss = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other-team, namespace: default}
spec:
  hosts: [\"*\"]
  gateways: [istio-system/istiod-gateway]
  tls:
  - match: [{sniHosts: [other.example.com]}]
    route: [{destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 15012}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: own, namespace: istio-system}
spec:
  hosts: [\"*\"]
  gateways: [istiod-gateway]
  tls:
  - match: [{sniHosts: [istiod.istio-system.svc]}]
    route: [{destination: {host: istiod.istio-system.svc.cluster.local, port: {number: 15012}}}]
";
    let bound = |hosts: &str| -> Vec<String> {
        let l = load_ok(&passthrough_gateway_with_hosts(hosts, vss));
        l.snapshot.listeners[0].servers[0]
            .routes
            .iter()
            .map(|r| r.virtual_service.clone())
            .collect()
    };
    // `ns/host` and `./host` (the Gateway's namespace) admit only that namespace's;
    // no prefix and `*/host` admit any.
    assert_eq!(bound("\"istio-system/*\""), ["istio-system/own"]);
    assert_eq!(bound("\"./*\""), ["istio-system/own"]);
    assert_eq!(bound("\"default/*\""), ["default/other-team"]);
    for any in ["\"*\"", "\"*/*\""] {
        assert_eq!(
            bound(any),
            ["default/other-team", "istio-system/own"],
            "{any}"
        );
    }
}

#[test]
fn destinations_that_name_nothing_declared_are_errors() {
    let e = load_err(&passthrough_gateway(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: istio-system}
spec:
  hosts: [\"*\"]
  gateways: [istiod-gateway]
  tls:
  - match: [{sniHosts: [\"*\"]}]
    route:
    - destination: {host: istiod.istio-system.svc.cluster.local}
      weight: 50
    - destination: {host: nowhere.istio-system.svc.cluster.local, port: {number: 1}}
      weight: 50
",
    ));
    assert_eq!(
        e,
        [
            "t.yaml:28:7: error: VirtualService istio-system/bad: destination istiod.istio-system.svc.cluster.local needs a port number; its declared ports are 15012, 443",
            "t.yaml:30:7: error: VirtualService istio-system/bad: destination host nowhere.istio-system.svc.cluster.local is not declared by a ServiceEntry; declare it, or connections routed here are refused",
        ]
    );
}

#[test]
fn empty_documents_and_empty_input_are_fine() {
    let l = load_ok("");
    assert!(l.snapshot.services.is_empty());
    let l = load_ok("---\n# only a comment\n---\n...\n---\n");
    assert!(l.diagnostics.is_empty());
}

#[test]
fn a_document_without_kind_is_an_error() {
    assert_eq!(
        load_err("metadata: {name: x}\nspec: {}\n"),
        [
            "t.yaml:1:1: error: document has no apiVersion and kind; every document needs both, e.g. apiVersion: networking.istio.io/v1 and kind: ServiceEntry"
        ]
    );
}

#[test]
fn missing_name_is_an_error() {
    assert_eq!(
        load_err("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec: {}\n"),
        ["t.yaml:2:7: error: metadata.name is required"]
    );
}

#[test]
fn yaml_syntax_error_has_its_position() {
    let e = load_err("apiVersion: v1\nkind: [unclosed\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("t.yaml:3:1: error: YAML syntax error: "),
        "{e:?}"
    );
}

#[test]
fn kubernetes_list_items_are_read() {
    let yaml = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        REVIEWS
            .replacen("apiVersion", "- apiVersion", 1)
            .lines()
            .map(|l| if l.starts_with("- ") {
                l.to_string()
            } else {
                format!("  {l}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    );
    let l = load_ok(&yaml);
    assert_eq!(
        svc(&l, "reviews.default.svc.cluster.local", 9080)
            .endpoints
            .len(),
        2
    );
}

#[test]
fn unknown_fields_are_warnings_with_their_path() {
    let w = warnings(&format!(
        "{REVIEWS}  colour: blue
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  trafficPolicy:
    foo: 1
    connectionPool:
      http: {{http2MaxRequests: 10}}
    tls: {{mode: ISTIO_MUTUAL, sni: x.example}}
"
    ));
    assert_eq!(
        w,
        [
            "t.yaml:15:3: warning: unknown field spec.colour; ignored",
            "t.yaml:23:5: warning: unknown field spec.trafficPolicy.foo; ignored",
            "t.yaml:25:7: warning: field spec.trafficPolicy.connectionPool.http is not used by strait; ignored",
            "t.yaml:26:31: warning: field spec.trafficPolicy.tls.sni is not used by strait; ignored",
        ]
    );
}

#[test]
fn wrong_types_are_errors_at_the_value() {
    let e = load_err(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: x}
spec:
  hosts: x.example.com
  ports:
  - number: \"http\"
    name: http
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:5:10: error: spec.hosts: expected a list, found string \"x.example.com\"",
            "t.yaml:7:13: error: spec.ports[0].number: expected a port number, found string \"http\"",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Gateway

#[test]
fn gateway_server_becomes_a_listener() {
    let l = load_ok(GATEWAY);
    let s = &l.snapshot;
    assert_eq!(s.listeners.len(), 1);
    let listener = &s.listeners[0];
    assert_eq!(listener.addr, SocketAddr::from(([0, 0, 0, 0], 15443)));
    assert_eq!(listener.servers.len(), 1);
    assert_eq!(
        listener.servers[0].name,
        "istio-system/cross-network-gateway/0"
    );
    assert_eq!(listener.servers[0].mode, ServerTlsMode::AutoPassthrough);
    assert_eq!(
        listener.servers[0].hosts,
        [HostMatch::Suffix(".local".into())]
    );
    assert!(l.diagnostics.is_empty());
}

#[test]
fn servers_group_by_bind_address_and_hosts_drop_namespaces() {
    let l = load_ok(
        "apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 15443}
    bind: 127.0.0.1
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: [\"*.local\"]
  - port: {number: 15443}
    bind: 127.0.0.1
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: [\"ns1/reviews.ns1.svc.cluster.local\"]
  - port: {number: 15443}
    bind: 127.0.0.2
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*\"]
",
    );
    let ls = &l.snapshot.listeners;
    assert_eq!(ls.len(), 2);
    assert_eq!(ls[0].servers.len(), 2);
    assert_eq!(
        ls[0].servers[1].hosts,
        [HostMatch::Exact("reviews.ns1.svc.cluster.local".into())]
    );
    assert_eq!(ls[1].addr, "127.0.0.2:15443".parse::<SocketAddr>().unwrap());
    assert_eq!(ls[1].servers[0].mode, ServerTlsMode::IstioMutual);
    assert_eq!(ls[1].servers[0].hosts, [HostMatch::Any]);
}

#[test]
fn same_address_with_two_tls_modes_is_an_error_at_the_second() {
    let e = load_err(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  servers:
  - port: {number: 15443}
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: [\"*.local\"]
  - port: {number: 15443}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*.local\"]
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:10:17: error: server istio-system/gw/1 (ISTIO_MUTUAL) conflicts with server istio-system/gw/0 (AUTO_PASSTHROUGH) on 0.0.0.0:15443; one address serves one TLS mode, use another port or bind"
        ]
    );
}

#[test]
fn unsupported_server_modes_are_skipped_with_a_warning() {
    let l = load_ok(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 443}
    tls: {mode: SIMPLE, credentialName: cert}
    hosts: [\"*\"]
  - port: {number: 80, protocol: HTTP}
    hosts: [\"*\"]
",
    );
    assert!(l.snapshot.listeners.is_empty());
    assert_eq!(
        warnings_of(&l),
        [
            "t.yaml:7:17: warning: spec.servers[0].tls.mode SIMPLE is not supported by strait (AUTO_PASSTHROUGH, ISTIO_MUTUAL or PASSTHROUGH); server skipped",
            "t.yaml:7:25: warning: field spec.servers[0].tls.credentialName is not used by strait; ignored",
            "t.yaml:9:5: warning: spec.servers[1] has no tls.mode; strait serves only AUTO_PASSTHROUGH, ISTIO_MUTUAL and PASSTHROUGH servers; server skipped",
        ]
    );
}

#[test]
fn unknown_tls_mode_and_bad_bind_are_errors() {
    let e = load_err(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 15443}
    bind: localhost
    tls: {mode: AUTOPASSTHROUGH}
    hosts: []
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:6:5: error: spec.servers[0].hosts is empty; list the service hosts this server admits, e.g. \"*.local\"",
            "t.yaml:7:11: error: spec.servers[0].bind: \"localhost\" is not an IP address",
            "t.yaml:8:17: error: spec.servers[0].tls.mode: unknown value \"AUTOPASSTHROUGH\"; expected one of AUTO_PASSTHROUGH, ISTIO_MUTUAL, PASSTHROUGH, SIMPLE, MUTUAL, OPTIONAL_MUTUAL",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry and WorkloadEntry

#[test]
fn service_entry_gives_one_service_port_per_host_and_port() {
    let l = load_ok(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: multi, namespace: shop}
spec:
  hosts: [a.shop.svc.cluster.local, B.shop.svc.cluster.local]
  ports:
  - {number: 80, name: http, targetPort: 8080}
  - {number: 9090, name: grpc}
  endpoints:
  - address: 10.1.0.1
    ports: {grpc: 19090}
    locality: eu-west1/eu-west1-a/rack1
    network: net2
    serviceAccount: shop-sa
  - address: 10.1.0.2
    labels: {security.istio.io/tlsMode: disabled}
",
    );
    assert_eq!(l.snapshot.services.len(), 4);
    let http = svc(&l, "b.shop.svc.cluster.local", 80);
    assert_eq!(http.host, "b.shop.svc.cluster.local");
    assert_eq!(http.namespace, "shop");
    assert_eq!(http.port_name, "http");
    assert_eq!(http.resolution, Resolution::Static);
    // Port by name, else targetPort, else the service port.
    assert_eq!(http.endpoints[0].port, 8080);
    let grpc = svc(&l, "a.shop.svc.cluster.local", 9090);
    assert_eq!(grpc.endpoints[0].port, 19090);
    assert_eq!(grpc.endpoints[1].port, 9090);
    let e = &grpc.endpoints[0];
    assert_eq!(
        e.address,
        EndpointAddress::Ip("10.1.0.1".parse::<IpAddr>().unwrap())
    );
    assert_eq!(e.locality, Locality::parse("eu-west1/eu-west1-a/rack1"));
    assert_eq!(e.network, "net2");
    assert_eq!(e.weight, 1);
    assert_eq!(e.service_account.as_deref(), Some("shop-sa"));
    assert!(!e.tls_disabled);
    assert!(grpc.endpoints[1].tls_disabled);
    assert_eq!(e.authority(), "10.1.0.1:19090");
}

#[test]
fn dns_resolution_keeps_host_names_and_static_refuses_them() {
    let l = load_ok(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [ext.example.com]
  ports: [{number: 443, name: tls}]
  resolution: DNS
  endpoints: [{address: Backend.Example.com, weight: 5}]
",
    );
    let s = svc(&l, "ext.example.com", 443);
    assert_eq!(s.resolution, Resolution::Dns);
    assert_eq!(
        s.endpoints[0].address,
        EndpointAddress::Hostname("backend.example.com".into())
    );
    assert_eq!(s.endpoints[0].weight, 5);
    assert_eq!(s.endpoints[0].authority(), "backend.example.com:443");

    let e = load_err(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [ext.example.com]
  ports: [{number: 443, name: tls}]
  resolution: STATIC
  endpoints: [{address: backend.example.com}]
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:8:25: error: spec.endpoints[0].address: \"backend.example.com\" is not an IP address; resolution STATIC needs IP addresses (use resolution: DNS for host names)"
        ]
    );
}

#[test]
fn endpoint_port_name_must_be_declared() {
    let e = load_err(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: x}
spec:
  hosts: [x.default.svc.cluster.local]
  ports: [{number: 80, name: http}]
  endpoints:
  - address: 10.0.0.1
    ports:
      htp: 8080
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:10:7: error: spec.endpoints[0].ports: unknown port name \"htp\"; the ServiceEntry declares http"
        ]
    );
}

#[test]
fn resolution_none_is_a_warning_and_skips_the_entry() {
    let l = load_ok(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: x}
spec:
  hosts: [x.example.com]
  ports: [{number: 80, name: http}]
  resolution: NONE
",
    );
    assert!(l.snapshot.services.is_empty());
    assert_eq!(
        warnings_of(&l),
        [
            "t.yaml:7:15: warning: spec.resolution NONE forwards to the original destination, which a gateway does not know; ServiceEntry default/x skipped (use STATIC or DNS)"
        ]
    );
}

#[test]
fn duplicate_host_and_port_is_an_error_at_the_second_entry() {
    let e = load_err(&format!(
        "{REVIEWS}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews-again, namespace: other}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{{number: 9080, name: tcp}}]
  endpoints: [{{address: 10.9.9.9}}]
"
    ));
    assert_eq!(
        e,
        [
            "t.yaml:20:11: error: service reviews.default.svc.cluster.local:9080 is already declared by ServiceEntry default/reviews; each host and port may be declared once"
        ]
    );
}

#[test]
fn workload_selector_picks_workload_entries_of_the_same_namespace() {
    let l = load_ok(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: tcp, targetPort: 9999}]
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1, namespace: default}
spec: {address: 10.0.0.1, labels: {app: ratings, version: v1}, ports: {tcp: 7000}, weight: 2, network: n2, locality: r/z}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm2, namespace: default}
spec: {address: 10.0.0.2, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm3, namespace: other}
spec: {address: 10.0.0.3, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm4, namespace: default}
spec: {address: 10.0.0.4, labels: {app: details}}
",
    );
    let s = svc(&l, "ratings.default.svc.cluster.local", 9080);
    let got: Vec<String> = s.endpoints.iter().map(Endpoint::authority).collect();
    assert_eq!(got, ["10.0.0.1:7000", "10.0.0.2:9999"]);
    assert_eq!(s.endpoints[0].weight, 2);
    assert_eq!(s.endpoints[0].network, "n2");
    assert_eq!(s.endpoints[0].locality.zone, "z");
}

#[test]
fn endpoints_and_workload_selector_together_are_an_error() {
    let e = load_err(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: x}
spec:
  hosts: [x.example.com]
  ports: [{number: 80, name: http}]
  endpoints: [{address: 10.0.0.1}]
  workloadSelector: {labels: {app: x}}
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:8:3: error: spec.workloadSelector and spec.endpoints are both set; a ServiceEntry takes one or the other"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

fn with_dr(dr_spec: &str) -> String {
    format!(
        "{REVIEWS}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
{dr_spec}"
    )
}

#[test]
fn destination_rule_short_host_subsets_and_policy() {
    let l = load_ok(&with_dr(
        "  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: LEAST_CONN
      localityLbSetting:
        distribute:
        - from: us-west/zone1/*
          to: {\"us-west/zone1/*\": 80, \"us-west/zone2/*\": 20}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms, idleTimeout: 1h30m, maxConnectionDuration: 10m}
    outlierDetection:
      consecutiveGatewayErrors: 7
      interval: 5s
      baseEjectionTime: 1m
      maxEjectionPercent: 30
      minHealthPercent: 20
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
",
    ));
    assert!(l.diagnostics.is_empty(), "{:?}", warnings_of(&l));
    let s = svc(&l, "reviews.default.svc.cluster.local", 9080);
    let p = &s.policy;
    assert_eq!(p.lb, LbPolicy::LeastRequest);
    let loc = p.locality_lb.as_ref().unwrap();
    assert!(loc.enabled);
    assert_eq!(
        loc.distribute,
        [(
            "us-west/zone1/*".to_string(),
            vec![
                ("us-west/zone1/*".to_string(), 80),
                ("us-west/zone2/*".to_string(), 20)
            ]
        )]
    );
    assert_eq!(p.max_connections, Some(100));
    assert_eq!(p.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(p.idle_timeout, Some(Duration::from_secs(5400)));
    assert_eq!(p.max_connection_duration, Some(Duration::from_secs(600)));
    assert_eq!(
        p.outlier,
        Some(OutlierDetection {
            consecutive_errors: 7,
            interval: Duration::from_secs(5),
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 30,
            min_health_percent: 20,
        })
    );
    assert_eq!(p.tls, UpstreamTls::IstioMutual);
    assert_eq!(s.subsets["v1"].labels, labels(&[("version", "v1")]));
    assert_eq!(s.subsets["v1"].endpoints, [0]);
    assert_eq!(s.subsets["v2"].endpoints, [1]);
    assert_eq!(&s.subsets["v1"].policy, p);
}

#[test]
fn subset_policy_wins_section_by_section_and_port_level_overrides() {
    let l = load_ok(&with_dr(
        "  host: reviews.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 10}}
    portLevelSettings:
    - port: {number: 9080}
      connectionPool: {tcp: {connectTimeout: 1s}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      outlierDetection: {consecutive5xxErrors: 2}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 9080}
        tls: {mode: ISTIO_MUTUAL}
",
    ));
    let s = svc(&l, "reviews.default.svc.cluster.local", 9080);
    // Port-level connectionPool replaces the top-level one for 9080.
    assert_eq!(s.policy.lb, LbPolicy::Random);
    assert_eq!(s.policy.max_connections, None);
    assert_eq!(s.policy.connect_timeout, Some(Duration::from_secs(1)));
    let v1 = &s.subsets["v1"].policy;
    assert_eq!(v1.lb, LbPolicy::RoundRobin);
    assert_eq!(v1.connect_timeout, Some(Duration::from_secs(1)));
    assert_eq!(v1.outlier.as_ref().map(|o| o.consecutive_errors), Some(2));
    assert_eq!(
        v1.outlier.as_ref().map(|o| o.base_ejection_time),
        Some(Duration::from_secs(30))
    );
    let v2 = &s.subsets["v2"].policy;
    assert_eq!(v2.lb, LbPolicy::Random);
    assert_eq!(v2.tls, UpstreamTls::IstioMutual);
    assert_eq!(s.policy.tls, UpstreamTls::Plaintext);
}

#[test]
fn subset_matching_no_endpoint_is_a_warning() {
    let w = warnings(&with_dr(
        "  host: reviews
  subsets:
  - name: v3
    labels: {version: v3}
",
    ));
    assert_eq!(
        w,
        [
            "t.yaml:22:11: warning: subset v3 of reviews.default.svc.cluster.local matches no endpoint (labels version=v3)"
        ]
    );
}

#[test]
fn destination_rule_for_an_unknown_host_is_a_warning() {
    let w = warnings(&with_dr("  host: details\n"));
    assert_eq!(
        w,
        [
            "t.yaml:20:9: warning: DestinationRule default/reviews: host details.default.svc.cluster.local matches no ServiceEntry host; ignored"
        ]
    );
}

#[test]
fn wildcard_destination_rule_applies_to_matching_services() {
    let l = load_ok(&format!(
        "{REVIEWS}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: all, namespace: istio-system}}
spec:
  host: \"*.local\"
  trafficPolicy: {{loadBalancer: {{simple: RANDOM}}}}
"
    ));
    assert_eq!(
        svc(&l, "reviews.default.svc.cluster.local", 9080).policy.lb,
        LbPolicy::Random
    );
}

#[test]
fn destination_rule_value_problems() {
    let e = load_err(&with_dr(
        "  host: reviews
  trafficPolicy:
    loadBalancer: {simple: FASTEST}
    connectionPool: {tcp: {connectTimeout: 5}}
    outlierDetection: {maxEjectionPercent: 150, interval: -1s}
  subsets:
  - name: V_1
    labels: {version: v1}
",
    ));
    assert_eq!(
        e,
        [
            "t.yaml:22:28: error: spec.trafficPolicy.loadBalancer.simple: unknown value \"FASTEST\"; expected one of UNSPECIFIED, ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, PASSTHROUGH",
            "t.yaml:23:44: error: spec.trafficPolicy.connectionPool.tcp.connectTimeout: missing unit in duration \"5\"; add one of ns, us, ms, s, m, h, e.g. \"5s\"",
            "t.yaml:24:44: error: spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is out of range (0 to 100)",
            "t.yaml:24:59: error: spec.trafficPolicy.outlierDetection.interval: negative duration \"-1s\"; durations must be zero or positive",
            "t.yaml:26:11: error: spec.subsets[0].name: subset name \"V_1\" must be a DNS label (lower-case letters, digits and '-')",
        ]
    );
}

#[test]
fn passthrough_lb_and_simple_upstream_tls_are_warnings() {
    let w = warnings(&with_dr(
        "  host: reviews
  trafficPolicy:
    loadBalancer: {simple: PASSTHROUGH}
    tls: {mode: SIMPLE}
",
    ));
    assert_eq!(
        w,
        [
            "t.yaml:22:28: warning: spec.trafficPolicy.loadBalancer.simple PASSTHROUGH is not supported by strait; ROUND_ROBIN used",
            "t.yaml:23:17: warning: spec.trafficPolicy.tls.mode SIMPLE is not supported by strait (DISABLE or ISTIO_MUTUAL); ignored",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Policies

const POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: elsewhere, namespace: default}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: root-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [legacy]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selected, namespace: gateways}
spec:
  selector: {matchLabels: {istio: eastwestgateway}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/a/sa/b], notNamespaces: [x]}
    to:
    - operation: {ports: [\"15443\", 15444]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-workload, namespace: gateways}
spec:
  selector: {matchLabels: {app: something-else}}
  action: DENY
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide, namespace: default}
spec: {action: DENY}
";

/// Three servers, one per TLS mode, after the policies: istiod puts the RBAC on the
/// ISTIO_MUTUAL and PASSTHROUGH servers only.
const THREE_SERVERS: &str = "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  servers:
  - port: {number: 15443, name: tls, protocol: TLS}
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: [\"*.local\"]
  - port: {number: 15444, name: mutual, protocol: TLS}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*.local\"]
  - port: {number: 15445, name: passthrough, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [\"*.local\"]
";

/// The RBAC filters of the server on `port`.
fn rbac_on(l: &Loaded, port: u16) -> &[RbacFilter] {
    let server = l
        .snapshot
        .listeners
        .iter()
        .find(|s| s.addr.port() == port)
        .and_then(|s| s.servers.first())
        .unwrap_or_else(|| panic!("no server on {port}"));
    &server.rbac
}

/// (action, policy names) of each filter.
fn rbac_names(filters: &[RbacFilter]) -> Vec<(RbacAction, Vec<&str>)> {
    filters
        .iter()
        .map(|f| {
            let names = f
                .policies
                .iter()
                .flatten()
                .map(|p| p.name.as_str())
                .collect();
            (f.action, names)
        })
        .collect()
}

/// A principal made only of `authenticated` with a regex, or its negation: the pattern.
fn regexes(p: &RbacPrincipal) -> Vec<String> {
    match p {
        RbacPrincipal::And(xs) | RbacPrincipal::Or(xs) => xs.iter().flat_map(regexes).collect(),
        RbacPrincipal::Not(x) => regexes(x).into_iter().map(|r| format!("not {r}")).collect(),
        RbacPrincipal::Authenticated(Some(m)) => vec![match m.kind() {
            StringMatchKind::Regex(r) => r.as_str().to_string(),
            StringMatchKind::Exact(e) => e.clone(),
            other => format!("{other:?}"),
        }],
        other => vec![format!("{other:?}")],
    }
}

#[test]
fn policies_apply_from_the_root_namespace_or_by_selector() {
    let bootstrap = "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {name: b}
spec: {labels: {istio: eastwestgateway, app: x}}
---
";
    let l = load_ok(&format!("{bootstrap}{POLICIES}{THREE_SERVERS}"));
    let s = &l.snapshot;
    assert_eq!(s.peer_authentication, Some(PeerAuthMode::Permissive));
    let rbac = rbac_on(&l, 15444);
    assert_eq!(
        rbac_names(rbac),
        [
            (
                RbacAction::Deny,
                vec!["ns[istio-system]-policy[root-deny]-rule[0]"]
            ),
            (
                RbacAction::Allow,
                vec!["ns[gateways]-policy[selected]-rule[0]"]
            ),
        ]
    );
    let deny = &rbac[0].policies.as_ref().unwrap()[0];
    assert_eq!(regexes(&deny.principals[0]), ["^(?:.*/ns/legacy/.*)$"]);
    let selected = &rbac[1].policies.as_ref().unwrap()[0];
    assert_eq!(
        selected.permissions,
        [RbacPermission::And(vec![RbacPermission::Or(vec![
            RbacPermission::DestinationPort(15443),
            RbacPermission::DestinationPort(15444)
        ])])]
    );
    assert_eq!(
        regexes(&selected.principals[0]),
        ["spiffe://cluster.local/ns/a/sa/b", "not ^(?:.*/ns/x/.*)$"]
    );
    assert_eq!(rbac_on(&l, 15445), rbac, "PASSTHROUGH has the same RBAC");
    assert!(rbac_on(&l, 15443).is_empty(), "AUTO_PASSTHROUGH has none");

    // Without the labels, only the root-namespace policy applies; another root namespace
    // leaves none.
    let l = load_ok(&format!("{POLICIES}{THREE_SERVERS}"));
    assert_eq!(rbac_on(&l, 15444).len(), 1);
    let l = load_ok(&format!(
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: b}}\nspec: {{rootNamespace: mesh-root}}\n---\n{POLICIES}{THREE_SERVERS}"
    ));
    assert!(rbac_on(&l, 15444).is_empty());
    assert_eq!(l.snapshot.peer_authentication, None);
}

#[test]
fn workload_peer_authentication_overrides_the_mesh_one() {
    let l = load_ok(
        "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {name: b}
spec: {labels: {istio: eastwestgateway}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: gw, namespace: istio-system}
spec: {selector: {matchLabels: {istio: eastwestgateway}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
",
    );
    assert_eq!(l.snapshot.peer_authentication, Some(PeerAuthMode::Strict));
}

#[test]
fn authorization_conditions_strait_cannot_evaluate() {
    let l = load_ok(&format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: http-only, namespace: istio-system}}
spec:
  rules:
  - to: [{{operation: {{methods: [GET]}}}}]
  - from: [{{source: {{namespaces: [a]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-jwt, namespace: istio-system}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{requestPrincipals: [x/y], namespaces: [b]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: istio-system}}
spec: {{action: CUSTOM, provider: {{name: opa}}}}
{THREE_SERVERS}"
    ));
    assert_eq!(
        warnings_of(&l)[..4],
        [
            "t.yaml:6:23: warning: spec.rules[0].to[0].operation.methods is not evaluated by strait on TCP connections; this ALLOW rule can never match and is dropped",
            "t.yaml:15:22: warning: spec.rules[0].from[0].source.requestPrincipals is not evaluated by strait on TCP connections; the condition is dropped, so this DENY rule matches more",
            "t.yaml:20:16: warning: spec.action CUSTOM is not supported by strait (ALLOW or DENY); policy istio-system/ext ignored",
            "t.yaml:20:24: warning: field spec.provider is not used by strait; ignored",
        ]
    );
    let rbac = rbac_on(&l, 15444);
    assert_eq!(
        rbac_names(rbac),
        [
            (
                RbacAction::Deny,
                vec!["ns[istio-system]-policy[deny-jwt]-rule[0]"]
            ),
            (
                RbacAction::Allow,
                vec!["ns[istio-system]-policy[http-only]-rule[1]"]
            ),
        ]
    );
    let deny = &rbac[0].policies.as_ref().unwrap()[0];
    assert_eq!(regexes(&deny.principals[0]), ["^(?:.*/ns/b/.*)$"]);
    let allow = &rbac[1].policies.as_ref().unwrap()[0];
    assert_eq!(regexes(&allow.principals[0]), ["^(?:.*/ns/a/.*)$"]);
}

#[test]
fn when_conditions_on_tcp_keys_are_read_and_others_warned_about() {
    let l = load_ok(&format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: conditions, namespace: istio-system}}
spec:
  rules:
  - when: [{{key: \"request.headers[x-user]\", values: [a]}}]
  - when: [{{key: destination.port, values: [\"15444\"]}}]
{THREE_SERVERS}"
    ));
    assert_eq!(
        warnings_of(&l)[0],
        "t.yaml:6:18: warning: spec.rules[0].when[0].key request.headers[x-user] is not evaluated by strait on TCP connections; this ALLOW rule can never match and is dropped"
    );
    let policies = rbac_on(&l, 15444)[0].policies.as_ref().unwrap();
    assert_eq!(policies.len(), 1);
    assert_eq!(
        policies[0].name,
        "ns[istio-system]-policy[conditions]-rule[1]"
    );
    assert_eq!(
        policies[0].permissions,
        [RbacPermission::And(vec![RbacPermission::Or(vec![
            RbacPermission::DestinationPort(15444)
        ])])]
    );
    assert_eq!(
        load_err(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: istio-system}
spec:
  rules:
  - when: [{key: destination.port, values: [http]}]
"
        ),
        [
            "t.yaml:6:45: error: spec.rules[0].when[0]: \"http\" is not a valid value for destination.port"
        ]
    );
}

#[test]
fn source_ip_blocks_are_read_and_bad_ones_refused() {
    let l = load_ok(&format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: by-address, namespace: istio-system}}
spec:
  rules:
  - from: [{{source: {{ipBlocks: [10.0.0.0/24], notRemoteIpBlocks: [\"10.0.0.62\", \"fd00::/8\"]}}}}]
{THREE_SERVERS}"
    ));
    let policy = &rbac_on(&l, 15444)[0].policies.as_ref().unwrap()[0];
    let cidr = |a: &str, len| {
        RbacPrincipal::RemoteIp(Cidr {
            addr: a.parse().unwrap(),
            len,
        })
    };
    assert_eq!(
        policy.principals,
        [RbacPrincipal::And(vec![
            RbacPrincipal::Not(Box::new(RbacPrincipal::Or(vec![
                cidr("10.0.0.62", 32),
                cidr("fd00::", 8)
            ]))),
            RbacPrincipal::Or(vec![cidr("10.0.0.0", 24)]),
        ])]
    );
    assert_eq!(
        load_err(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: istio-system}
spec:
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/33, not-an-ip]}}]
"
        ),
        [
            "t.yaml:6:33: error: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR range",
            "t.yaml:6:46: error: spec.rules[0].from[0].source.ipBlocks[1]: \"not-an-ip\" is not an IP address or CIDR range",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Bootstrap and Bridge

#[test]
fn bootstrap_defaults_match_istio() {
    let s = load_ok("").snapshot.settings;
    assert_eq!(s.trust_domain, "cluster.local");
    assert_eq!(s.status_addr, SocketAddr::from(([0, 0, 0, 0], 15021)));
    assert_eq!(s.metrics_addr, SocketAddr::from(([0, 0, 0, 0], 15090)));
    assert_eq!(s.admin_addr, SocketAddr::from(([127, 0, 0, 1], 15000)));
    assert_eq!(s.drain_duration, Duration::from_secs(45));
    assert_eq!(s.passthrough_alpn.len(), 5);
    assert_eq!(s.root_namespace, "istio-system");
}

#[test]
fn bootstrap_reads_every_field() {
    let s = load_ok(
        "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {name: b}
spec:
  cluster: c2
  network: n2
  locality: us-east1/us-east1-b
  trustDomain: example.org
  trustDomainAliases: [old.example.org]
  trustBundles: {partner.example: /etc/partner/root.pem}
  meshNetworks:
    networks:
      n1:
        endpoints: [{fromRegistry: c1}]
        gateways: [{address: 192.0.2.1, port: 15443}, {address: gw.n1.example}]
  certificates: {dir: /var/run/certs}
  status: 127.0.0.1:25021
  metrics: \"[::1]:25090\"
  admin: 127.0.0.1:25000
  drainDuration: 5s
  clientHelloTimeout: 2s
  connectTimeout: 3s
  idleTimeout: 10m
  maxConnections: 50000
  passthroughAlpn: []
  accessLog: /var/log/strait.log
  labels: {istio: eastwestgateway}
  rootNamespace: mesh
  workers: 4
  certExpiryWarning: 72h
",
    )
    .snapshot
    .settings;
    assert_eq!(s.cluster, "c2");
    assert_eq!(s.network, "n2");
    assert_eq!(s.locality.to_string(), "us-east1/us-east1-b");
    assert_eq!(s.trust_domain, "example.org");
    assert_eq!(s.trust_domain_aliases, ["old.example.org"]);
    assert_eq!(
        s.trust_bundles["partner.example"],
        std::path::PathBuf::from("/etc/partner/root.pem")
    );
    assert_eq!(
        s.mesh_networks["n1"],
        [
            NetworkGateway {
                address: "192.0.2.1".into(),
                port: 15443
            },
            NetworkGateway {
                address: "gw.n1.example".into(),
                port: 15443
            },
        ]
    );
    assert_eq!(s.cert_dir, std::path::PathBuf::from("/var/run/certs"));
    assert_eq!(s.status_addr.port(), 25021);
    assert_eq!(s.metrics_addr, "[::1]:25090".parse::<SocketAddr>().unwrap());
    assert_eq!(s.admin_addr.port(), 25000);
    assert_eq!(s.drain_duration, Duration::from_secs(5));
    assert_eq!(s.client_hello_timeout, Duration::from_secs(2));
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert_eq!(s.idle_timeout, Duration::from_secs(600));
    assert_eq!(s.max_connections, Some(50000));
    assert!(s.passthrough_alpn.is_empty());
    assert_eq!(
        s.access_log,
        AccessLogTarget::File("/var/log/strait.log".into())
    );
    assert_eq!(s.labels, labels(&[("istio", "eastwestgateway")]));
    assert_eq!(s.root_namespace, "mesh");
    assert_eq!(s.workers, Some(4));
    assert_eq!(s.cert_expiry_warning, Duration::from_secs(72 * 3600));
}

#[test]
fn bootstrap_errors() {
    let e = load_err(
        "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {name: one}
spec:
  admin: localhost:15000
  drainDuration: 45
  idleTimeout: 1d
---
apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {name: two}
",
    );
    assert_eq!(
        e,
        [
            "t.yaml:5:10: error: spec.admin: \"localhost:15000\" is not an IP:PORT address; write e.g. \"127.0.0.1:15000\" or \"[::1]:15000\"",
            "t.yaml:6:18: error: spec.drainDuration: missing unit in duration \"45\"; add one of ns, us, ms, s, m, h, e.g. \"45s\"",
            "t.yaml:7:16: error: spec.idleTimeout: unknown unit \"d\" in duration \"1d\"; use ns, us, ms, s, m or h",
            "t.yaml:10:7: error: a second Bootstrap document; only one is allowed (the first is one); merge them into one",
        ]
    );
}

#[test]
fn listening_addresses_that_cannot_coexist_are_errors() {
    let e = load_err(&format!(
        "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {{name: b}}
spec: {{metrics: 127.0.0.1:15443}}
---
{GATEWAY}"
    ));
    assert_eq!(
        e,
        [
            "t.yaml:13:17: error: Gateway server istio-system/cross-network-gateway/0 (0.0.0.0:15443) cannot be bound together with Bootstrap metrics (127.0.0.1:15443); give one of them another port"
        ]
    );
}

#[test]
fn bridge_names_a_declared_service_port_and_subset() {
    let yaml = with_dr("  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}]\n");
    let bridge = |spec: &str| {
        format!(
            "{yaml}---\napiVersion: strait.dev/v1alpha1\nkind: Bridge\nmetadata: {{name: reviews}}\nspec:\n{spec}"
        )
    };
    let l = load_ok(&bridge(
        "  listen: \"127.0.0.1:9080\"\n  host: reviews\n  port: 9080\n  subset: v1\n  identity: spiffe://cluster.local/ns/default/sa/reviews\n",
    ));
    let b = &l.snapshot.bridges[0];
    assert_eq!(b.name, "reviews");
    assert_eq!(b.listen, "127.0.0.1:9080".parse::<SocketAddr>().unwrap());
    assert_eq!(b.host, "reviews.default.svc.cluster.local");
    assert_eq!(b.port, 9080);
    assert_eq!(b.subset.as_deref(), Some("v1"));
    assert_eq!(
        b.identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/reviews")
    );

    assert_eq!(
        load_err(&bridge(
            "  listen: 127.0.0.1:9080\n  host: reviews\n  port: 9081\n"
        )),
        [
            "t.yaml:28:9: error: Bridge reviews: no ServiceEntry declares reviews.default.svc.cluster.local:9081; name a host and service port a ServiceEntry declares"
        ]
    );
    assert_eq!(
        load_err(&bridge(
            "  listen: 127.0.0.1:9080\n  host: reviews\n  port: 9080\n  subset: v9\n"
        )),
        [
            "t.yaml:30:11: error: Bridge reviews: reviews.default.svc.cluster.local has no subset \"v9\" (declared subsets: v1)"
        ]
    );
    assert_eq!(
        load_err(&bridge(
            "  listen: 9080\n  host: reviews\n  port: 9080\n  identity: reviews\n"
        )),
        [
            "t.yaml:27:11: error: spec.listen: \"9080\" is not an IP:PORT address; write e.g. \"127.0.0.1:15000\" or \"[::1]:15000\"",
            "t.yaml:30:13: error: spec.identity: \"reviews\" is not a SPIFFE ID; write e.g. spiffe://cluster.local/ns/default/sa/reviews",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Files

#[test]
fn load_paths_reads_directories_sorted_and_names_unreadable_files() {
    let dir = std::env::temp_dir().join(format!("strait-config-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    std::fs::write(dir.join("b.yml"), REVIEWS).unwrap();
    std::fs::write(dir.join("a.yaml"), GATEWAY).unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
    std::fs::write(dir.join("nested/c.yaml"), "kind: [broken").unwrap();
    let l = load_paths(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(l.files, [dir.join("a.yaml"), dir.join("b.yml")]);
    assert_eq!(l.snapshot.listeners.len(), 1);
    assert_eq!(l.snapshot.services.len(), 1);

    // Diagnostics name the file they come from.
    std::fs::write(dir.join("b.yml"), format!("{REVIEWS}  extra: 1\n")).unwrap();
    let l = load_paths(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(
        warnings_of(&l),
        [format!(
            "{}:15:3: warning: unknown field spec.extra; ignored",
            dir.join("b.yml").display()
        )]
    );

    let missing = dir.join("missing.yaml");
    let err = load_paths(std::slice::from_ref(&missing)).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}: ", missing.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_error_message_summarises() {
    let err = load_str(
        "t.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\n",
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: t.yaml:2:7: error: metadata.name is required"
    );
}

#[test]
fn many_services_load_quickly() {
    use std::fmt::Write;
    let mut yaml = String::new();
    for i in 0..5_000 {
        let _ = write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.default.svc.cluster.local]\n  ports: [{{number: 80, name: http}}]\n  workloadSelector: {{labels: {{app: s{i}}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i}}}\nspec: {{address: 10.0.{}.{}, labels: {{app: s{i}}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: s{i}}}\nspec: {{host: s{i}, subsets: [{{name: v1, labels: {{app: s{i}}}}}]}}\n",
            i / 256,
            i % 256
        );
    }
    let start = std::time::Instant::now();
    let l = load_ok(&yaml);
    assert_eq!(l.snapshot.services.len(), 5_000);
    assert!(
        l.snapshot
            .services
            .values()
            .all(|s| s.endpoints.len() == 1 && s.subsets["v1"].endpoints == [0])
    );
    // Linear work: a quadratic walk over 5,000 × 5,000 would take far longer than this.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
        let _ = load_str("fuzz.yaml", &s);
    }

    #[test]
    fn yaml_shaped_text_never_panics(
        lines in proptest::collection::vec(
            "( {0,4})(apiVersion|kind|metadata|spec|hosts|ports|number|name|- |endpoints|address|subsets|servers|tls|mode)(: ?)([a-zA-Z0-9.*/\\[\\]{},:\"-]{0,12})",
            0..30,
        )
    ) {
        let _ = load_str("fuzz.yaml", &lines.join("\n"));
    }

    #[test]
    fn truncated_examples_never_panic(cut in 0usize..4000) {
        let src = include_str!("../../config/passthrough.yaml");
        let mut end = cut.min(src.len());
        while !src.is_char_boundary(end) {
            end -= 1;
        }
        let _ = load_str("fuzz.yaml", &src[..end]);
    }
}

#[test]
fn deeply_nested_input_is_refused_not_a_crash() {
    for depth in [200, 5_000, 100_000] {
        let flow = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let block = "a:\n".to_string() + &"- ".repeat(depth) + "x\n";
        for src in [flow, block] {
            let e = load_err(&src);
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].contains("error: YAML syntax error: "), "{e:?}");
        }
    }
    let e = load_err(&format!("a: {}{}\n", "[".repeat(70), "]".repeat(70)));
    assert_eq!(
        e,
        ["t.yaml:1:67: error: YAML syntax error: nesting deeper than 64 levels; refused"]
    );
}

#[test]
fn alias_bombs_are_refused() {
    let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = i - 1;
        src.push_str(&format!("a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"));
    }
    let e = load_err(&src);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].ends_with("YAML syntax error: aliases expand to more than 100000 nodes; refused"),
        "{e:?}"
    );
}
