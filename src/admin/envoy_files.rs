//! The listeners, clusters and endpoints istiod would send a gateway for the file
//! configuration strait serves, built as Envoy resources for `config_dump` (see
//! [`super::envoy_dump`]). The shapes are istiod's for an east-west gateway: one
//! listener per bound address (`0.0.0.0_15443`), on an AUTO_PASSTHROUGH server one
//! filter chain per SNI subset key (matched with the server's ALPN values) whose
//! `tcp_proxy` sends to the cluster of that name; on PASSTHROUGH and ISTIO_MUTUAL
//! servers the VirtualService routes to `outbound|<port>|<subset>|<host>` clusters;
//! clusters are EDS (STRICT_DNS for `resolution: DNS`) and carry istiod's `istio`
//! metadata (the service, the subset, the DestinationRule); endpoints are those of
//! the gateway's own network, the only ones strait dials.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{
    Any, Duration as PbDuration, ListValue, Struct, UInt32Value, Value, value::Kind,
};
use prost::{Message, Name};

use crate::model::{
    Destination, Endpoint, EndpointAddress, LbPolicy, ListenerSpec, ServerSpec, ServerTlsMode,
    ServicePort, Snapshot, TrafficPolicy,
};
use crate::route::sni::build_subset_key;
use crate::xds::translate::{CLUSTER, ENDPOINTS, LISTENER};

/// Per type URL, each resource's name and encoding.
pub type Encoded = Vec<(&'static str, Vec<(String, Vec<u8>)>)>;

/// What istiod would send for `snapshot`.
pub fn resources(snapshot: &Snapshot) -> Encoded {
    let mut clusters: BTreeMap<String, Cluster> = BTreeMap::new();
    let mut endpoints: BTreeMap<String, ClusterLoadAssignment> = BTreeMap::new();
    let listeners: Vec<Listener> = snapshot
        .listeners
        .iter()
        .map(|l| listener(snapshot, l, &mut clusters, &mut endpoints))
        .collect();
    vec![
        (
            LISTENER,
            listeners
                .iter()
                .map(|l| (l.name.clone(), l.encode_to_vec()))
                .collect(),
        ),
        (
            CLUSTER,
            clusters
                .iter()
                .map(|(n, c)| (n.clone(), c.encode_to_vec()))
                .collect(),
        ),
        (
            ENDPOINTS,
            endpoints
                .iter()
                .map(|(n, e)| (n.clone(), e.encode_to_vec()))
                .collect(),
        ),
    ]
}

fn any<M: Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn socket(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn listener(
    snapshot: &Snapshot,
    spec: &ListenerSpec,
    clusters: &mut BTreeMap<String, Cluster>,
    endpoints: &mut BTreeMap<String, ClusterLoadAssignment>,
) -> Listener {
    let mut chains = Vec::new();
    for server in &spec.servers {
        chains.extend(server_chains(snapshot, server, clusters, endpoints));
    }
    Listener {
        name: format!("{}_{}", spec.addr.ip(), spec.addr.port()),
        address: Some(socket(&spec.addr.ip().to_string(), spec.addr.port().into())),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        traffic_direction: core::TrafficDirection::Outbound as i32,
        filter_chains: chains,
        ..Default::default()
    }
}

fn server_chains(
    snapshot: &Snapshot,
    server: &ServerSpec,
    clusters: &mut BTreeMap<String, Cluster>,
    endpoints: &mut BTreeMap<String, ClusterLoadAssignment>,
) -> Vec<FilterChain> {
    let mut chains = Vec::new();
    let mutual = server.mode == ServerTlsMode::IstioMutual;
    let transport = mutual.then(downstream_mtls);
    // A route applies to every connection of an ISTIO_MUTUAL server (its `tcp` route), or
    // to the names it matches on a PASSTHROUGH server (its `tls` routes).
    for route in &server.routes {
        let names = route.sni_hosts.iter().map(|h| h.to_string()).collect();
        let dests: Vec<(String, u32)> = route
            .destinations
            .iter()
            .map(|d| (sidecar_cluster(snapshot, d, clusters, endpoints), d.weight))
            .collect();
        chains.push(FilterChain {
            filter_chain_match: (!mutual).then(|| FilterChainMatch {
                server_names: names,
                ..Default::default()
            }),
            filters: vec![tcp_proxy(&route.virtual_service, &dests)],
            transport_socket: transport.clone(),
            ..Default::default()
        });
        if mutual {
            return chains;
        }
    }
    // An HBONE listener routes each stream by its `:authority`, not a connection by SNI:
    // it has no SNI chains to show (Istio's own shape, `connect_terminate` feeding an
    // internal listener, is not written here).
    if matches!(
        server.mode,
        ServerTlsMode::Passthrough | ServerTlsMode::Hbone
    ) {
        return chains;
    }
    // AUTO_PASSTHROUGH, or ISTIO_MUTUAL without a route: one chain per subset key of
    // every service the server's hosts take.
    let alpn = server
        .alpn
        .clone()
        .unwrap_or_else(|| snapshot.settings.passthrough_alpn.clone());
    let mut services: Vec<&ServicePort> = snapshot
        .services
        .values()
        .map(|s| s.as_ref())
        .filter(|s| server.hosts.matches(&s.host))
        .collect();
    services.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    for svc in services {
        let subsets = std::iter::once(None).chain(svc.subsets.keys().map(|s| Some(s.as_str())));
        for subset in subsets {
            let key = build_subset_key(svc.port, subset, &svc.host);
            add_cluster(snapshot, svc, subset, &key, clusters, endpoints);
            chains.push(FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![key.clone()],
                    application_protocols: alpn.clone(),
                    ..Default::default()
                }),
                filters: vec![tcp_proxy(&key, &[(key.clone(), 1)])],
                transport_socket: transport.clone(),
                ..Default::default()
            });
        }
    }
    chains
}

fn tcp_proxy(stat_prefix: &str, dests: &[(String, u32)]) -> Filter {
    let cluster = match dests {
        [(one, _)] => tcp_proxy::ClusterSpecifier::Cluster(one.clone()),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .map(
                    |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                        name: name.clone(),
                        weight: *weight,
                        ..Default::default()
                    },
                )
                .collect(),
        }),
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(cluster),
            ..Default::default()
        }))),
    }
}

/// The ISTIO_MUTUAL server side: the gateway's SVID (`default`) and the mesh roots
/// (`ROOTCA`), a client certificate required.
fn downstream_mtls() -> core::TransportSocket {
    let sds = |name: &str| tls::SdsSecretConfig {
        name: name.to_string(),
        ..Default::default()
    };
    let ctx = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            alpn_protocols: crate::tls::material::SERVER_ALPNS
                .iter()
                .map(|a| a.to_string())
                .collect(),
            tls_certificate_sds_secret_configs: vec![sds("default")],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(Default::default()),
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
            value: true,
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(&ctx))),
    }
}

/// The `outbound|<port>|<subset>|<host>` cluster a route destination names.
fn sidecar_cluster(
    snapshot: &Snapshot,
    d: &Destination,
    clusters: &mut BTreeMap<String, Cluster>,
    endpoints: &mut BTreeMap<String, ClusterLoadAssignment>,
) -> String {
    let name = format!(
        "outbound|{}|{}|{}",
        d.service.port,
        d.subset.as_deref().unwrap_or(""),
        d.service.host
    );
    if let Some(svc) = snapshot.services.get(&d.service) {
        add_cluster(
            snapshot,
            svc,
            d.subset.as_deref(),
            &name,
            clusters,
            endpoints,
        );
    }
    name
}

fn add_cluster(
    snapshot: &Snapshot,
    svc: &ServicePort,
    subset: Option<&str>,
    name: &str,
    clusters: &mut BTreeMap<String, Cluster>,
    endpoints: &mut BTreeMap<String, ClusterLoadAssignment>,
) {
    if clusters.contains_key(name) {
        return;
    }
    let policy: &TrafficPolicy = subset
        .and_then(|s| svc.subsets.get(s))
        .map_or(&svc.policy, |s| &s.policy);
    let members: Vec<&Endpoint> = match subset.and_then(|s| svc.subsets.get(s)) {
        Some(s) => s
            .endpoints
            .iter()
            .filter_map(|i| svc.endpoints.get(*i))
            .collect(),
        None => svc.endpoints.iter().collect(),
    };
    let own = &snapshot.settings.network;
    let local: Vec<&Endpoint> = members
        .into_iter()
        .filter(|e| e.network.is_empty() || &e.network == own)
        .collect();
    let assignment = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: locality_groups(&local),
        ..Default::default()
    };
    let dns = matches!(svc.resolution, crate::model::Resolution::Dns);
    let timeout = policy
        .connect_timeout
        .unwrap_or(snapshot.settings.connect_timeout);
    let mut cluster = Cluster {
        name: name.to_string(),
        alt_stat_name: format!("{name};"),
        connect_timeout: Some(PbDuration {
            seconds: timeout.as_secs() as i64,
            nanos: timeout.subsec_nanos() as i32,
        }),
        lb_policy: match policy.lb {
            LbPolicy::RoundRobin => cluster::LbPolicy::RoundRobin,
            LbPolicy::LeastRequest => cluster::LbPolicy::LeastRequest,
            LbPolicy::Random => cluster::LbPolicy::Random,
        } as i32,
        metadata: Some(istio_metadata(svc, subset, policy)),
        ..Default::default()
    };
    if dns {
        cluster.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32,
        ));
        cluster.load_assignment = Some(assignment);
    } else {
        cluster.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        ));
        cluster.eds_cluster_config = Some(cluster::EdsClusterConfig {
            eds_config: Some(core::ConfigSource {
                config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
                    Default::default(),
                )),
                resource_api_version: core::ApiVersion::V3 as i32,
                ..Default::default()
            }),
            service_name: name.to_string(),
        });
        endpoints.insert(name.to_string(), assignment);
    }
    clusters.insert(name.to_string(), cluster);
}

/// Endpoints grouped by locality, in the order their localities first appear.
fn locality_groups(members: &[&Endpoint]) -> Vec<LocalityLbEndpoints> {
    let mut groups: Vec<LocalityLbEndpoints> = Vec::new();
    for e in members {
        let locality = core::Locality {
            region: e.locality.region.clone(),
            zone: e.locality.zone.clone(),
            sub_zone: e.locality.subzone.clone(),
        };
        let lb = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
                address: Some(socket(
                    &match &e.address {
                        EndpointAddress::Ip(ip) => ip.to_string(),
                        EndpointAddress::Hostname(h) => h.clone(),
                    },
                    e.port.into(),
                )),
                ..Default::default()
            })),
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            ..Default::default()
        };
        match groups
            .iter_mut()
            .find(|g| g.locality.as_ref() == Some(&locality))
        {
            Some(g) => g.lb_endpoints.push(lb),
            None => groups.push(LocalityLbEndpoints {
                locality: Some(locality),
                lb_endpoints: vec![lb],
                load_balancing_weight: Some(UInt32Value { value: 1 }),
                ..Default::default()
            }),
        }
    }
    groups
}

/// istiod's `istio` cluster metadata: the service, the subset, and the DestinationRule
/// that configured it (what `istioctl proxy-config cluster` shows).
fn istio_metadata(
    svc: &ServicePort,
    subset: Option<&str>,
    policy: &TrafficPolicy,
) -> core::Metadata {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let object = |fields: Vec<(&str, Value)>| Value {
        kind: Some(Kind::StructValue(Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })),
    };
    let mut fields = vec![(
        "services",
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![object(vec![
                    ("host", string(&svc.host)),
                    ("name", string(&svc.host)),
                    ("namespace", string(&svc.namespace)),
                ])],
            })),
        },
    )];
    if let Some(dr) = &policy.destination_rule {
        let (ns, name) = dr.split_once('/').unwrap_or(("", dr));
        fields.push((
            "config",
            string(&format!(
                "/apis/networking.istio.io/v1/namespaces/{ns}/destination-rule/{name}"
            )),
        ));
    }
    if let Some(s) = subset {
        fields.push(("subset", string(s)));
    }
    let Some(Kind::StructValue(istio)) = object(fields).kind else {
        return core::Metadata::default();
    };
    core::Metadata {
        filter_metadata: [("istio".to_string(), istio)].into(),
        ..Default::default()
    }
}
