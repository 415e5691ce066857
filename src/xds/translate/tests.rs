//! The readers against Envoy's validation rules: each malformed field is an `Err` naming
//! the resource, the field and the rule; the valid forms around it still read.

use super::*;
use envoy_types::pb::envoy::config::endpoint::v3::{
    Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, ListenerFilter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use prost::Message;

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn secs(seconds: i64) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos: 0 })
}

fn socket(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

const NAME: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

fn good_cluster() -> cds::Cluster {
    cds::Cluster {
        name: NAME.into(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::Eds as i32,
        )),
        connect_timeout: secs(10),
        ..Default::default()
    }
}

fn cluster_error(c: &cds::Cluster) -> String {
    match cluster(&any(CLUSTER, c)) {
        Ok(_) => panic!("{c:?} was accepted"),
        Err(e) => e,
    }
}

fn good_cla() -> eds::ClusterLoadAssignment {
    eds::ClusterLoadAssignment {
        cluster_name: NAME.into(),
        endpoints: vec![LocalityLbEndpoints {
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                    address: Some(socket("10.0.0.1", 9080)),
                    ..Default::default()
                })),
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn cla_error(cla: &eds::ClusterLoadAssignment) -> String {
    match endpoints(&any(ENDPOINTS, cla)) {
        Ok(_) => panic!("{cla:?} was accepted"),
        Err(e) => e,
    }
}

fn proxy_filter(p: &tcp::TcpProxy) -> Filter {
    Filter {
        name: TCP_PROXY.into(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, p))),
    }
}

fn good_proxy() -> tcp::TcpProxy {
    tcp::TcpProxy {
        stat_prefix: NAME.into(),
        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(NAME.into())),
        ..Default::default()
    }
}

fn good_listener(proxies: &[tcp::TcpProxy]) -> lds::Listener {
    lds::Listener {
        name: "0.0.0.0_15443".into(),
        address: Some(socket("0.0.0.0", 15443)),
        listener_filters: vec![ListenerFilter {
            name: TLS_INSPECTOR.into(),
            ..Default::default()
        }],
        filter_chains: proxies
            .iter()
            .enumerate()
            .map(|(i, p)| FilterChain {
                name: format!("chain{i}"),
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![format!("outbound_.9080_._.s{i}.default.svc.cluster.local")],
                    ..Default::default()
                }),
                filters: vec![proxy_filter(p)],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn listener_problems(l: &lds::Listener) -> (Vec<String>, usize) {
    let (_, read) = listener(&any(LISTENER, l)).unwrap_or_else(|e| panic!("rejected: {e}"));
    let Listener::Served(served) = read.value else {
        panic!("not served")
    };
    (read.problems, served.chains.len())
}

#[test]
fn a_valid_cluster_reads() {
    let (name, read) = cluster(&any(CLUSTER, &good_cluster())).expect("valid");
    assert_eq!(name, NAME);
    assert_eq!(
        read.value.policy.connect_timeout,
        Some(Duration::from_secs(10))
    );
}

#[test]
fn connect_timeout_must_be_positive() {
    let e = cluster_error(&cds::Cluster {
        connect_timeout: secs(0),
        ..good_cluster()
    });
    assert_eq!(
        e,
        format!("cluster {NAME}: connect_timeout: must be greater than 0s (Envoy: duration gt 0)")
    );
    // Negative: Envoy's check of every duration answers first.
    for (bad, shown) in [
        (secs(-1), "-1s"),
        (
            Some(PbDuration {
                seconds: 0,
                nanos: -5,
            }),
            "0s-5ns",
        ),
    ] {
        let e = cluster_error(&cds::Cluster {
            connect_timeout: bad,
            ..good_cluster()
        });
        assert_eq!(
            e,
            format!(
                "cluster {NAME}: connect_timeout: {shown} is negative (Envoy: Expected positive duration)"
            )
        );
    }
    // Unset: Envoy's default of 5 s.
    let (_, read) = cluster(&any(
        CLUSTER,
        &cds::Cluster {
            connect_timeout: None,
            ..good_cluster()
        },
    ))
    .expect("valid");
    assert_eq!(
        read.value.policy.connect_timeout,
        Some(Duration::from_secs(5))
    );
}

#[test]
fn durations_out_of_range_are_rejected() {
    let e = cluster_error(&cds::Cluster {
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 1_000_000_000,
        }),
        ..good_cluster()
    });
    assert!(
        e.contains("connect_timeout: 1s+1000000000ns is out of range"),
        "{e}"
    );
}

#[test]
fn percentages_and_outlier_settings_keep_their_bounds() {
    use cds::cluster::CommonLbConfig;
    let panic = |value: f64| cds::Cluster {
        common_lb_config: Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value }),
            ..Default::default()
        }),
        outlier_detection: Some(cds::OutlierDetection::default()),
        ..good_cluster()
    };
    for bad in [100.5, -1.0, f64::NAN] {
        let e = cluster_error(&panic(bad));
        assert!(
            e.contains("common_lb_config.healthy_panic_threshold:")
                && e.contains("Percent double gte 0 lte 100"),
            "{e}"
        );
    }
    let (_, read) = cluster(&any(CLUSTER, &panic(100.0))).expect("100 % is valid");
    assert_eq!(
        read.value.policy.outlier.map(|o| o.min_health_percent),
        Some(100)
    );

    let outlier = |o: cds::OutlierDetection| cds::Cluster {
        outlier_detection: Some(o),
        ..good_cluster()
    };
    let e = cluster_error(&outlier(cds::OutlierDetection {
        max_ejection_percent: Some(UInt32Value { value: 101 }),
        ..Default::default()
    }));
    assert!(
        e.contains(
            "outlier_detection.max_ejection_percent: 101 is above 100 (Envoy: uint32 lte 100)"
        ),
        "{e}"
    );
    for field in ["interval", "base_ejection_time"] {
        let mut o = cds::OutlierDetection::default();
        match field {
            "interval" => o.interval = secs(0),
            _ => o.base_ejection_time = secs(-3),
        }
        let e = cluster_error(&outlier(o));
        assert!(e.contains(&format!("outlier_detection.{field}: ")), "{e}");
    }
}

#[test]
fn undefined_enums_are_rejected() {
    let e = cluster_error(&cds::Cluster {
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(42)),
        ..good_cluster()
    });
    assert!(
        e.contains("type: 42 is not a defined value (Envoy: enum defined_only)"),
        "{e}"
    );
    let e = cluster_error(&cds::Cluster {
        circuit_breakers: Some(cds::CircuitBreakers {
            thresholds: vec![cds::circuit_breakers::Thresholds {
                priority: 7,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..good_cluster()
    });
    assert!(
        e.contains("circuit_breakers.thresholds[0].priority: 7"),
        "{e}"
    );
}

#[test]
fn a_valid_cla_reads() {
    let (name, read) = endpoints(&any(ENDPOINTS, &good_cla())).expect("valid");
    assert_eq!(name, NAME);
    assert_eq!(read.value.endpoints.len(), 1);
    assert_eq!(read.value.endpoints[0].port, 9080);
}

#[test]
fn endpoint_fields_keep_their_bounds() {
    let mut port = good_cla();
    if let Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) =
        &mut port.endpoints[0].lb_endpoints[0].host_identifier
    {
        ep.address = Some(socket("10.0.0.1", 70000));
    }
    let e = cla_error(&port);
    assert_eq!(
        e,
        format!(
            "ClusterLoadAssignment {NAME}: endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: 70000 is above 65535 (Envoy: uint32 lte 65535)"
        )
    );

    let mut weight = good_cla();
    weight.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let e = cla_error(&weight);
    assert!(e.ends_with("endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1, not 0 (Envoy: uint32 gte 1)"), "{e}");

    let mut locality = good_cla();
    locality.endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let e = cla_error(&locality);
    assert!(
        e.ends_with(
            "endpoints[0].load_balancing_weight: must be at least 1, not 0 (Envoy: uint32 gte 1)"
        ),
        "{e}"
    );

    let mut priority = good_cla();
    priority.endpoints[0].priority = 129;
    assert!(cla_error(&priority).contains("endpoints[0].priority: 129 is above 128"));

    let mut host = good_cla();
    if let Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) =
        &mut host.endpoints[0].lb_endpoints[0].host_identifier
    {
        ep.address = Some(socket("", 9080));
    }
    assert!(
        cla_error(&host)
            .contains("socket_address.address: must not be empty (Envoy: string min_len 1)")
    );

    let e = cla_error(&eds::ClusterLoadAssignment {
        cluster_name: String::new(),
        ..good_cla()
    });
    assert!(
        e.contains("cluster_name: must not be empty (Envoy: string min_len 1)"),
        "{e}"
    );

    // Unset weights are valid: 1 for an endpoint, none for a locality.
    let mut unset = good_cla();
    unset.endpoints[0].load_balancing_weight = None;
    unset.endpoints[0].lb_endpoints[0].load_balancing_weight = None;
    let (_, read) = endpoints(&any(ENDPOINTS, &unset)).expect("valid");
    assert_eq!(read.value.endpoints[0].weight, 1);
    assert_eq!(read.value.endpoints[0].locality_weight, Some(0));
}

#[test]
fn an_inline_load_assignment_is_checked_like_eds() {
    let mut cla = good_cla();
    cla.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let e = cluster_error(&cds::Cluster {
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::StrictDns as i32,
        )),
        load_assignment: Some(cla),
        ..good_cluster()
    });
    assert!(
        e.starts_with(&format!(
            "cluster {NAME}: load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight:"
        )),
        "{e}"
    );
}

#[test]
fn a_listener_needs_a_valid_address() {
    let e = match listener(&any(
        LISTENER,
        &lds::Listener {
            address: None,
            ..good_listener(&[good_proxy()])
        },
    )) {
        Err(e) => e,
        Ok(_) => panic!("accepted"),
    };
    assert!(
        e.starts_with("listener 0.0.0.0_15443: address: is required"),
        "{e}"
    );
    let e = match listener(&any(
        LISTENER,
        &lds::Listener {
            address: Some(socket("0.0.0.0", 65536)),
            ..good_listener(&[good_proxy()])
        },
    )) {
        Err(e) => e,
        Ok(_) => panic!("accepted"),
    };
    assert!(
        e.contains("address.socket_address.port_value: 65536 is above 65535"),
        "{e}"
    );
    // An internal listener has no address, and is not one strait binds.
    let (_, read) = listener(&any(
        LISTENER,
        &lds::Listener {
            address: None,
            listener_specifier: Some(lds::listener::ListenerSpecifier::InternalListener(
                Default::default(),
            )),
            ..good_listener(&[good_proxy()])
        },
    ))
    .expect("valid");
    assert!(matches!(read.value, Listener::NotServed(_)));
}

#[test]
fn a_malformed_tcp_proxy_takes_out_its_chain_and_says_why() {
    use tcp::tcp_proxy::{ClusterSpecifier, WeightedCluster, weighted_cluster::ClusterWeight};
    let weighted = |clusters: Vec<(&str, u32)>| tcp::TcpProxy {
        cluster_specifier: Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: clusters
                .into_iter()
                .map(|(name, weight)| ClusterWeight {
                    name: name.into(),
                    weight,
                    ..Default::default()
                })
                .collect(),
        })),
        ..good_proxy()
    };
    let cases: Vec<(tcp::TcpProxy, &str)> = vec![
        (
            tcp::TcpProxy {
                stat_prefix: String::new(),
                ..good_proxy()
            },
            "tcp_proxy stat_prefix: must not be empty (Envoy: string min_len 1)",
        ),
        (
            tcp::TcpProxy {
                cluster_specifier: None,
                ..good_proxy()
            },
            "tcp_proxy cluster_specifier: cluster or weighted_clusters is required (Envoy: oneof cluster_specifier required)",
        ),
        (
            weighted(vec![]),
            "tcp_proxy weighted_clusters.clusters: must not be empty (Envoy: repeated min_items 1)",
        ),
        (
            weighted(vec![(NAME, 1), ("", 1)]),
            "tcp_proxy weighted_clusters.clusters[1].name: must not be empty (Envoy: string min_len 1)",
        ),
        (
            weighted(vec![(NAME, 0)]),
            "tcp_proxy weighted_clusters.clusters[0].weight: must be at least 1, not 0 (Envoy: uint32 gte 1)",
        ),
        (
            tcp::TcpProxy {
                idle_timeout: secs(-1),
                ..good_proxy()
            },
            "tcp_proxy idle_timeout: -1s is negative (Envoy: Expected positive duration)",
        ),
        (
            tcp::TcpProxy {
                max_downstream_connection_duration: Some(PbDuration {
                    seconds: 0,
                    nanos: 999_999,
                }),
                ..good_proxy()
            },
            "tcp_proxy max_downstream_connection_duration: must be at least 1ms, not 0s+999999ns (Envoy: duration gte 1ms)",
        ),
    ];
    for (bad, want) in cases {
        let (problems, served) = listener_problems(&good_listener(&[good_proxy(), bad]));
        assert_eq!(
            problems,
            [format!(
                "listener 0.0.0.0_15443 filter chain chain1: {want}"
            )]
        );
        // The valid chain beside it is served.
        assert_eq!(served, 1);
    }
    // idle_timeout 0s disables the timeout in Envoy: valid.
    let (problems, served) = listener_problems(&good_listener(&[tcp::TcpProxy {
        idle_timeout: secs(0),
        ..good_proxy()
    }]));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(served, 1);
}

#[test]
fn filters_need_names() {
    let mut l = good_listener(&[good_proxy(), good_proxy()]);
    l.filter_chains[1].filters[0].name = String::new();
    let (problems, served) = listener_problems(&l);
    assert_eq!(
        problems,
        [
            "listener 0.0.0.0_15443 filter chain chain1: filters[0].name: must not be empty (Envoy: string min_len 1)"
        ]
    );
    assert_eq!(served, 1);
    let mut l = good_listener(&[good_proxy()]);
    l.listener_filters.push(ListenerFilter::default());
    let Err(e) = listener(&any(LISTENER, &l)) else {
        panic!("accepted")
    };
    assert!(
        e.contains("listener_filters[1].name: must not be empty"),
        "{e}"
    );
}

fn mutual_socket(sans: Vec<tls::SubjectAltNameMatcher>) -> core::TransportSocket {
    use tls::common_tls_context::{CombinedCertificateValidationContext, ValidationContextType};
    let sds = |name: &str| tls::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    };
    let ctx = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(SDS_CERTIFICATE)],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(tls::CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(SDS_ROOT)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
            value: true,
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            TLS_SOCKET_TYPE,
            &ctx,
        ))),
    }
}

#[test]
fn subject_alt_name_matchers_follow_envoys_rules() {
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        StringMatcher, string_matcher::MatchPattern,
    };
    use rbac::RbacError::{Invalid, Unevaluable};
    use tls::subject_alt_name_matcher::SanType;
    let san = |san_type: i32, pattern: Option<MatchPattern>| tls::SubjectAltNameMatcher {
        san_type,
        matcher: pattern.map(|p| StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        }),
        ..Default::default()
    };
    let spiffe = || Some(MatchPattern::Prefix("spiffe://cluster.local/".into()));
    assert!(matches!(
        mutual_tls(&mutual_socket(vec![san(SanType::Uri as i32, spiffe())])),
        Ok(Some(_))
    ));
    let invalid = |sans, want: &str| match mutual_tls(&mutual_socket(sans)) {
        Err(Invalid(e)) => assert!(e.contains(want), "{e} lacks {want}"),
        other => panic!("{other:?}, where {want} was expected"),
    };
    invalid(
        vec![san(SanType::Unspecified as i32, spiffe())],
        "match_typed_subject_alt_names[0].san_type: 0 is not a defined SAN type",
    );
    invalid(
        vec![san(SanType::Uri as i32, spiffe()), san(42, spiffe())],
        "match_typed_subject_alt_names[1].san_type: 42",
    );
    invalid(
        vec![san(SanType::Uri as i32, None)],
        "match_typed_subject_alt_names[0].matcher: is required (Envoy: message required)",
    );
    invalid(
        vec![san(
            SanType::Uri as i32,
            Some(MatchPattern::Prefix(String::new())),
        )],
        "match_typed_subject_alt_names[0].matcher: prefix: must not be empty (Envoy: string min_bytes 1)",
    );
    // Valid for Envoy, but not what a SPIFFE peer is known by here: not served, no NACK.
    assert!(matches!(
        mutual_tls(&mutual_socket(vec![san(SanType::Dns as i32, spiffe())])),
        Err(Unevaluable(_))
    ));
}
