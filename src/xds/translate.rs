//! xDS resources → the pieces of a [`Snapshot`]: what istiod sends a `router` proxy for an
//! AUTO_PASSTHROUGH Gateway (one filter chain per SNI subset key, SNI-DNAT clusters named
//! like the SNI, their ClusterLoadAssignments), read into strait's own types.
//!
//! Each resource is read on its own ([`listener`], [`cluster`], [`endpoints`]) into a
//! compact form with no protobuf kept; a resource that cannot be served safely is an
//! `Err` with the reason (a NACK), one that is served in part carries its problems.
//! Every field read is first checked as Envoy validates it (the protoc-gen-validate
//! annotations of its protos, and the few checks its code adds): what Envoy rejects is
//! rejected here too, the reason naming the resource, the field and the rule.
//! [`assemble`] then joins the held resources into listeners and services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value, value::Kind};

use super::any::decode;
use super::rbac;
use crate::model::{
    DefaultRoute, Destination, Endpoint, EndpointAddress, HostMatch, HostSet, L4Route, LbPolicy,
    ListenerSpec, Locality, OutlierDetection, RbacAction, RbacFilter, RbacPermission, RbacPolicy,
    RbacPrincipal, Resolution, ServerSpec, ServerTlsMode, ServiceKey, ServicePort, Services,
    SourceRoutes, Subset, TLS_MODE_LABEL, TrafficPolicy, TunnelTarget, VipRoute,
};
use crate::route::sni::parse_subset_key;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// Endpoint metadata istiod sets on mTLS-capable endpoints.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// A listener strait serves: SNI filter chains ending in `tcp_proxy`.
#[derive(Debug, Clone, PartialEq)]
pub struct XListener {
    pub addr: SocketAddr,
    pub chains: Vec<Chain>,
    /// Network filters in front of `tcp_proxy` that strait does not run (telemetry,
    /// metadata exchange), by name, for `config_dump`.
    pub ignored_filters: BTreeSet<String>,
    /// Filter chains not served, with why.
    pub skipped_chains: Vec<String>,
    /// PASSTHROUGH chains: any name, or names that are not subset keys, to clusters.
    pub tls_chains: Vec<TlsChain>,
    /// ISTIO_MUTUAL chains: the gateway's mTLS terminated, then to clusters; their names
    /// are the server's hosts.
    pub mutual_chains: Vec<TlsChain>,
}

/// A filter chain of a PASSTHROUGH server (istiod's `buildGatewayNetworkFiltersFromTLSRoutes`):
/// its `server_names` are a VirtualService's `sniHosts` (none for `*`), and `tcp_proxy`
/// sends to `outbound|<port>|<subset>|<host>` clusters, weighted when several.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsChain {
    pub server_names: Vec<String>,
    /// `(cluster, weight)`; every weight is at least 1.
    pub clusters: Vec<(String, u32)>,
    pub idle_timeout: Option<Duration>,
    pub max_duration: Option<Duration>,
    /// RBAC filters in front of `tcp_proxy`, in order.
    pub rbac: Vec<RbacFilter>,
}

/// One filter chain: the SNIs and ALPNs it matches and where `tcp_proxy` sends them.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub server_names: Vec<String>,
    pub alpn: Vec<String>,
    pub cluster: String,
    pub idle_timeout: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub rbac: Vec<RbacFilter>,
}

/// A listener as read: served (SNI chains of the router stream; the 15008 listener and
/// authority map of the waypoint stream), or acknowledged but not served, with why (an
/// HTTP listener, Envoy plumbing…).
#[derive(Debug, Clone, PartialEq)]
pub enum Listener {
    Served(XListener),
    NotServed(String),
    /// `connect_terminate` (waypoint stream): ambient's double HBONE on 15008.
    Hbone(waypoint::HboneListener),
    /// `main_internal` (waypoint stream): the `:authority` → cluster map behind it.
    Authorities(waypoint::AuthorityMap),
}

/// A cluster, with its endpoints inline (DNS, STATIC) or named for EDS.
#[derive(Debug, Clone, PartialEq)]
pub struct XCluster {
    /// The EDS `service_name` to subscribe to; `None` when endpoints are inline.
    pub eds_name: Option<String>,
    pub inline: Vec<Endpoint>,
    pub resolution: Resolution,
    pub policy: TrafficPolicy,
    /// `common_lb_config.locality_weighted_lb_config`: the endpoints' locality weights
    /// apply.
    pub locality_weighted: bool,
    /// The internal listener its endpoints name (`envoy_internal_address`), if any: where
    /// the waypoint stream's `main_internal` cluster leads.
    pub internal_listener: Option<String>,
    /// Settings read with a fallback, for the log and `config_dump`.
    pub notes: Vec<String>,
}

/// The endpoints of one ClusterLoadAssignment that may be dialled (HEALTHY or UNKNOWN).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct XEndpoints {
    pub endpoints: Vec<Endpoint>,
    /// Endpoints sent but not dialled (unhealthy, draining, not an IP address).
    pub left_out: usize,
}

/// A resource read, with what was wrong in the parts left out (each makes a NACK).
pub struct Read<T> {
    pub value: T,
    pub problems: Vec<String>,
}

// ---- Envoy's validation of the fields read here
//
// Envoy validates every resource against the protoc-gen-validate annotations of its
// protos before using it, and adds a few checks of its own; a resource that fails is
// rejected. strait rejects the same resources, each reason naming the field and the rule
// it breaks (the annotation, as `(Envoy: …)`), so a NACK from strait reads like Envoy's.

/// The longest `google.protobuf.Duration` there is (duration.proto: about 10,000 years).
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

fn show_duration(d: &PbDuration) -> String {
    if d.nanos == 0 {
        format!("{}s", d.seconds)
    } else {
        format!("{}s{:+}ns", d.seconds, d.nanos)
    }
}

/// Any `google.protobuf.Duration`, as Envoy takes it with or without an annotation: it
/// checks every duration of a resource before its annotations ("Invalid duration:
/// Expected positive duration", "Duration out-of-range"), so a negative one or one out of
/// duration.proto's range is rejected, never read as unset.
fn duration(field: &str, d: &Option<PbDuration>) -> Result<Option<Duration>, String> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(format!(
            "{field}: {} is negative (Envoy: Expected positive duration)",
            show_duration(d)
        ));
    }
    if d.nanos > 999_999_999 || d.seconds > MAX_DURATION_SECONDS {
        return Err(format!(
            "{field}: {} is out of range (Envoy: Duration out-of-range)",
            show_duration(d)
        ));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// A duration annotated `(validate.rules).duration = {gt {}}`. A negative one fails
/// Envoy's check of every duration first, and is reported as such.
fn positive_duration(field: &str, d: &Option<PbDuration>) -> Result<Option<Duration>, String> {
    match duration(field, d)? {
        Some(v) if v.is_zero() => Err(format!(
            "{field}: must be greater than 0s (Envoy: duration gt 0)"
        )),
        v => Ok(v),
    }
}

/// A duration annotated `(validate.rules).duration = {gte {nanos: 1000000}}`.
fn duration_at_least_1ms(field: &str, d: &Option<PbDuration>) -> Result<Option<Duration>, String> {
    match (duration(field, d)?, d) {
        (Some(v), Some(pb)) if v < Duration::from_millis(1) => Err(format!(
            "{field}: must be at least 1ms, not {} (Envoy: duration gte 1ms)",
            show_duration(pb)
        )),
        (v, _) => Ok(v),
    }
}

/// A string annotated `(validate.rules).string = {min_len: 1}`.
fn non_empty(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!(
            "{field}: must not be empty (Envoy: string min_len 1)"
        ));
    }
    Ok(())
}

/// A `google.protobuf.UInt32Value` annotated `(validate.rules).uint32 = {gte: 1}`: a
/// weight, at least 1 when set.
fn weight(field: &str, w: &Option<UInt32Value>) -> Result<Option<u32>, String> {
    match w {
        Some(w) if w.value == 0 => Err(format!(
            "{field}: must be at least 1, not 0 (Envoy: uint32 gte 1)"
        )),
        w => Ok(w.as_ref().map(|w| w.value)),
    }
}

/// An integer annotated `(validate.rules).uint32 = {lte: max}`.
fn at_most(field: &str, value: u32, max: u32) -> Result<u32, String> {
    if value > max {
        return Err(format!(
            "{field}: {value} is above {max} (Envoy: uint32 lte {max})"
        ));
    }
    Ok(value)
}

/// An `envoy.type.v3.Percent` (percent.proto: `double value` gte 0, lte 100).
fn percent(field: &str, p: &Option<Percent>) -> Result<Option<f64>, String> {
    let Some(p) = p else { return Ok(None) };
    // NaN fails both bounds, as in the generated validator.
    if !(0.0..=100.0).contains(&p.value) {
        return Err(format!(
            "{field}: {} is not within [0, 100] (Envoy: Percent double gte 0 lte 100)",
            p.value
        ));
    }
    Ok(Some(p.value))
}

/// An enum annotated `(validate.rules).enum = {defined_only: true}`.
fn defined<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, String> {
    E::try_from(value)
        .map_err(|_| format!("{field}: {value} is not a defined value (Envoy: enum defined_only)"))
}

/// What a valid `core.v3.Address` is to strait: a TCP socket, or something else it
/// does not dial or bind (with why).
enum Addr {
    Tcp(String, u16),
    Other(String),
}

/// A `core.v3.Address` as address.proto constrains it: the `address` oneof is required;
/// a `SocketAddress` has a defined `protocol`, a non-empty `address` (min_len 1) and a
/// `port_specifier` (oneof required) whose `port_value` is at most 65535; a `Pipe` has a
/// non-empty `path`; an `EnvoyInternalAddress` names its listener (oneof required).
fn address(field: &str, a: &core::Address) -> Result<Addr, String> {
    use core::address::Address as A;
    use core::socket_address::{PortSpecifier, Protocol};
    match &a.address {
        Some(A::SocketAddress(s)) => {
            let protocol: Protocol =
                defined(&format!("{field}.socket_address.protocol"), s.protocol)?;
            non_empty(&format!("{field}.socket_address.address"), &s.address)?;
            match &s.port_specifier {
                Some(PortSpecifier::PortValue(p)) => {
                    let port = at_most(&format!("{field}.socket_address.port_value"), *p, 65535)?;
                    if protocol == Protocol::Udp {
                        return Ok(Addr::Other(format!("{} is a UDP address", s.address)));
                    }
                    Ok(Addr::Tcp(s.address.clone(), port as u16))
                }
                Some(PortSpecifier::NamedPort(n)) => Ok(Addr::Other(format!(
                    "{} has a named port ({n}), which only a custom resolver knows",
                    s.address
                ))),
                None => Err(format!(
                    "{field}.socket_address: port_value or named_port is required (Envoy: oneof port_specifier required)"
                )),
            }
        }
        Some(A::Pipe(p)) => {
            non_empty(&format!("{field}.pipe.path"), &p.path)?;
            Ok(Addr::Other(format!(
                "a pipe ({}) is not a TCP address",
                p.path
            )))
        }
        Some(A::EnvoyInternalAddress(i)) => match &i.address_name_specifier {
            Some(_) => Ok(Addr::Other("an Envoy internal address".to_string())),
            None => Err(format!(
                "{field}.envoy_internal_address: server_listener_name is required (Envoy: oneof address_name_specifier required)"
            )),
        },
        None => Err(format!(
            "{field}: socket_address, pipe or envoy_internal_address is required (Envoy: oneof address required)"
        )),
    }
}

/// Reads one LDS resource.
pub fn listener(any: &Any) -> Result<(String, Read<Listener>), String> {
    let l: lds::Listener = decode(any, LISTENER)?;
    let name = l.name.clone();
    if name.is_empty() {
        return Err("a listener without a name".into());
    }
    let not_served = |why: String| {
        Ok((
            name.clone(),
            Read {
                value: Listener::NotServed(why),
                problems: Vec::new(),
            },
        ))
    };
    // Envoy requires an address of every listener but an API or internal one (its listener
    // manager: "address is necessary").
    let Some(addr) = &l.address else {
        if l.api_listener.is_some() || l.listener_specifier.is_some() {
            return not_served("an API or internal listener: not a socket strait binds".into());
        }
        return Err(format!(
            "listener {name}: address: is required of a listener that is neither an api_listener nor an internal_listener (Envoy: address is necessary)"
        ));
    };
    let (ip, port) = match address("address", addr) {
        Ok(Addr::Tcp(ip, port)) => (ip, port),
        Ok(Addr::Other(why)) => return not_served(format!("{why}: not a socket strait binds")),
        Err(e) => return Err(format!("listener {name}: {e}")),
    };
    for (i, f) in l.listener_filters.iter().enumerate() {
        non_empty(&format!("listener_filters[{i}].name"), &f.name)
            .map_err(|e| format!("listener {name}: {e}"))?;
    }
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return Err(format!(
            "listener {name}: address {ip:?} is not an IP address"
        ));
    };
    if !l
        .listener_filters
        .iter()
        .any(|f| f.name == TLS_INSPECTOR || f.name.ends_with("tls_inspector"))
    {
        return not_served("no tls_inspector: not an SNI-routed listener".into());
    }
    let mut out = XListener {
        addr: SocketAddr::new(ip, port),
        chains: Vec::new(),
        ignored_filters: BTreeSet::new(),
        skipped_chains: Vec::new(),
        tls_chains: Vec::new(),
        mutual_chains: Vec::new(),
    };
    let mut problems = Vec::new();
    let mut seen: HashMap<(String, Vec<String>), usize> = HashMap::new();
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let label = if fc.name.is_empty() {
            format!("filter chain {i}")
        } else {
            format!("filter chain {}", fc.name)
        };
        // A chain that terminates TLS is an ISTIO_MUTUAL server; its SAN matchers become
        // an RBAC filter on the verified peer's identity, in front of the others.
        let mut rbac = Vec::new();
        let terminates = fc.transport_socket.is_some();
        if let Some(ts) = &fc.transport_socket {
            match mutual_tls(ts) {
                Ok(san) => rbac.extend(san),
                Err(rbac::RbacError::Invalid(e)) => {
                    problems.push(format!("listener {name} {label}: {e}"));
                    continue;
                }
                Err(rbac::RbacError::Unevaluable(why)) => {
                    out.skipped_chains.push(format!("{label}: {why}"));
                    continue;
                }
            }
        }
        let m = fc.filter_chain_match.clone().unwrap_or_default();
        if let Some(e) = fc
            .filters
            .iter()
            .enumerate()
            .find_map(|(j, f)| non_empty(&format!("filters[{j}].name"), &f.name).err())
        {
            problems.push(format!("listener {name} {label}: {e}"));
            continue;
        }
        let Some(last) = fc.filters.last() else {
            out.skipped_chains.push(format!("{label}: no filters"));
            continue;
        };
        let is_tcp_proxy = last.name == TCP_PROXY
            || matches!(&last.config_type, Some(lds::filter::ConfigType::TypedConfig(a)) if a.type_url == TCP_PROXY_TYPE);
        if !is_tcp_proxy {
            out.skipped_chains
                .push(format!("{label}: ends in {}, not tcp_proxy", last.name));
            continue;
        }
        let (mut invalid, mut unevaluable) = (None, None);
        for f in &fc.filters[..fc.filters.len() - 1] {
            let typed = match &f.config_type {
                Some(lds::filter::ConfigType::TypedConfig(a)) => Some(a),
                _ => None,
            };
            if f.name != rbac::RBAC && typed.is_none_or(|a| a.type_url != rbac::RBAC_TYPE) {
                out.ignored_filters.insert(f.name.clone());
                continue;
            }
            let read = typed
                .ok_or_else(|| {
                    rbac::RbacError::Invalid("an RBAC filter without typed_config".into())
                })
                .and_then(rbac::filter);
            match read {
                Ok(filter) => rbac.push(filter),
                Err(rbac::RbacError::Invalid(e)) => {
                    invalid = Some(e);
                    break;
                }
                Err(rbac::RbacError::Unevaluable(e)) => {
                    unevaluable = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = invalid {
            problems.push(format!("listener {name} {label}: {e}"));
            continue;
        }
        if let Some(e) = unevaluable {
            // Fail closed: what istiod denies must not get through a filter left out.
            out.skipped_chains.push(format!(
                "{label}: {e}; not served, as a policy that cannot be evaluated must not let connections through"
            ));
            continue;
        }
        let proxy: tcp::TcpProxy = match &last.config_type {
            Some(lds::filter::ConfigType::TypedConfig(a)) => match decode(a, TCP_PROXY_TYPE) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(format!("listener {name} {label}: tcp_proxy {e}"));
                    continue;
                }
            },
            _ => {
                problems.push(format!(
                    "listener {name} {label}: tcp_proxy without typed_config"
                ));
                continue;
            }
        };
        let ProxyRead {
            clusters: weighted,
            idle_timeout,
            max_duration,
        } = match tcp_proxy(&proxy) {
            Ok(read) => read,
            Err(e) => {
                problems.push(format!("listener {name} {label}: tcp_proxy {e}"));
                continue;
            }
        };
        let Some((cluster, _)) = weighted.iter().max_by_key(|(_, w)| *w).cloned() else {
            // `weighted_clusters` has at least one cluster, checked above.
            continue;
        };
        // An ISTIO_MUTUAL server's names are its hosts (none for `*`); its one route is
        // the chain's cluster or weighted clusters.
        if terminates {
            match weighted.iter().find(|(c, _)| outbound_cluster(c).is_none()) {
                Some((c, _)) => out.skipped_chains.push(format!(
                    "{label}: terminates TLS and sends to {c}, which is not an outbound|<port>|<subset>|<host> cluster"
                )),
                None => out.mutual_chains.push(TlsChain {
                    server_names: m.server_names.iter().map(|s| s.to_ascii_lowercase()).collect(),
                    clusters: weighted,
                    idle_timeout,
                    max_duration,
                    rbac,
                }),
            }
            continue;
        }
        // Names that are not subset keys (or none: any name) are a PASSTHROUGH server's
        // routes to `outbound|…` clusters.
        let plain: Vec<String> = m
            .server_names
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .filter(|s| parse_subset_key(s).is_err())
            .collect();
        let only_plain = plain.len() == m.server_names.len();
        if m.server_names.is_empty() || !plain.is_empty() {
            match weighted.iter().find(|(c, _)| outbound_cluster(c).is_none()) {
                Some((c, _)) => out.skipped_chains.push(format!(
                    "{label}: routes names that are not subset keys to {c}, which is not an outbound|<port>|<subset>|<host> cluster"
                )),
                None => out.tls_chains.push(TlsChain {
                    server_names: plain,
                    clusters: weighted.clone(),
                    idle_timeout,
                    max_duration,
                    rbac: rbac.clone(),
                }),
            }
            if only_plain {
                continue;
            }
        }
        if weighted.len() > 1 {
            problems.push(format!(
                "listener {name} {label}: an SNI subset key names one cluster; weighted_clusters served by its heaviest cluster {cluster} only"
            ));
        }
        let mut names = Vec::new();
        for sni in &m.server_names {
            let sni = sni.to_ascii_lowercase();
            if parse_subset_key(&sni).is_err() {
                // Served above as a PASSTHROUGH route.
                continue;
            }
            let mut alpn = m.application_protocols.clone();
            alpn.sort();
            match seen.get(&(sni.clone(), alpn.clone())) {
                Some(first) => problems.push(format!(
                    "listener {name}: {label} has the same match (server name {sni}) as filter chain {first}; the first is kept"
                )),
                None => {
                    seen.insert((sni.clone(), alpn), i);
                    names.push(sni);
                }
            }
        }
        if names.is_empty() {
            continue;
        }
        out.chains.push(Chain {
            server_names: names,
            alpn: m.application_protocols.clone(),
            cluster,
            idle_timeout,
            max_duration,
            rbac,
        });
    }
    Ok((
        name,
        Read {
            value: Listener::Served(out),
            problems,
        },
    ))
}

/// Where a `tcp_proxy` sends connections (`(cluster, weight)`, one cluster weighing 1)
/// and its timeouts, checked as tcp_proxy.proto constrains them: `stat_prefix` min_len 1;
/// the `cluster_specifier` oneof required; `weighted_clusters.clusters` min_items 1, each
/// `name` min_len 1 and `weight` gte 1; `max_downstream_connection_duration` gte 1ms.
fn tcp_proxy(proxy: &tcp::TcpProxy) -> Result<ProxyRead, String> {
    non_empty("stat_prefix", &proxy.stat_prefix)?;
    let weighted = match &proxy.cluster_specifier {
        Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
        Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
            if w.clusters.is_empty() {
                return Err(
                    "weighted_clusters.clusters: must not be empty (Envoy: repeated min_items 1)"
                        .into(),
                );
            }
            let mut out = Vec::with_capacity(w.clusters.len());
            for (i, c) in w.clusters.iter().enumerate() {
                let field = format!("weighted_clusters.clusters[{i}]");
                non_empty(&format!("{field}.name"), &c.name)?;
                if c.weight == 0 {
                    return Err(format!(
                        "{field}.weight: must be at least 1, not 0 (Envoy: uint32 gte 1)"
                    ));
                }
                out.push((c.name.clone(), c.weight));
            }
            out
        }
        None => {
            return Err(
                "cluster_specifier: cluster or weighted_clusters is required (Envoy: oneof cluster_specifier required)"
                    .into(),
            );
        }
    };
    let idle_timeout = duration("idle_timeout", &proxy.idle_timeout)?;
    let max_duration = duration_at_least_1ms(
        "max_downstream_connection_duration",
        &proxy.max_downstream_connection_duration,
    )?;
    Ok(ProxyRead {
        clusters: weighted,
        idle_timeout,
        max_duration,
    })
}

/// What strait takes from a `tcp_proxy`.
struct ProxyRead {
    /// `(cluster, weight)`, one cluster weighing 1.
    clusters: Vec<(String, u32)>,
    idle_timeout: Option<Duration>,
    max_duration: Option<Duration>,
}

const TLS_SOCKET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// The SDS names of the workload certificate and the mesh root, which pilot-agent serves
/// an Istio gateway; strait's are its own SVID and roots (files or the mesh CA).
const SDS_CERTIFICATE: &str = "default";
const SDS_ROOT: &str = "ROOTCA";

/// Reads a filter chain's transport socket as the ISTIO_MUTUAL termination istiod builds
/// (`BuildListenerTLSContext`): the workload certificate and mesh root over SDS, a client
/// certificate required. SAN matchers (`server.tls.subjectAltNames`) come back as an
/// ALLOW filter on the peer's URI SAN. Anything else (SIMPLE or MUTUAL with a
/// `credentialName`, inline certificates) is an `Err` saying why it is not served.
fn mutual_tls(ts: &core::TransportSocket) -> Result<Option<RbacFilter>, rbac::RbacError> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use rbac::RbacError::{Invalid, Unevaluable};
    use tls::common_tls_context::ValidationContextType as V;
    let any = match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => a,
        None => {
            return Err(Unevaluable(format!(
                "transport socket {} without typed_config",
                ts.name
            )));
        }
    };
    let ctx: tls::DownstreamTlsContext = decode(any, TLS_SOCKET_TYPE).map_err(|e| {
        Unevaluable(format!(
            "terminates TLS with transport socket {}: {e}",
            ts.name
        ))
    })?;
    if !ctx
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value)
    {
        return Err(Unevaluable("terminates TLS without requiring a client certificate (SIMPLE): only ISTIO_MUTUAL is served".into()));
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    let certs: Vec<&str> = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    if !common.tls_certificates.is_empty() || certs != [SDS_CERTIFICATE] {
        return Err(Unevaluable(format!(
            "terminates TLS with certificate {}: only ISTIO_MUTUAL (SDS {SDS_CERTIFICATE:?}, the gateway's own SVID) is served",
            if certs.is_empty() {
                "given inline".to_string()
            } else {
                format!("{certs:?} from SDS")
            }
        )));
    }
    let (defaults, root) = match &common.validation_context_type {
        Some(V::CombinedValidationContext(c)) => (
            c.default_validation_context.clone(),
            c.validation_context_sds_secret_config
                .as_ref()
                .map(|s| s.name.clone()),
        ),
        Some(V::ValidationContextSdsSecretConfig(s)) => (None, Some(s.name.clone())),
        _ => (None, None),
    };
    if root.as_deref() != Some(SDS_ROOT) {
        return Err(Unevaluable(format!(
            "verifies clients against {}: only ISTIO_MUTUAL (SDS {SDS_ROOT:?}, the mesh root) is served",
            root.map_or("no SDS root".to_string(), |r| format!("SDS {r:?}"))
        )));
    }
    let defaults = defaults.unwrap_or_default();
    let mut sans = Vec::new();
    // A matcher Envoy rejects (string.proto) is a NACK; a valid one strait cannot
    // evaluate leaves the chain out.
    let invalid = |field: String| move |e: String| Invalid(format!("{field}: {e}"));
    #[allow(deprecated)]
    for (i, m) in defaults.match_subject_alt_names.iter().enumerate() {
        sans.push(rbac::string_match(m).map_err(invalid(format!("match_subject_alt_names[{i}]")))?);
    }
    // common.proto: a SubjectAltNameMatcher's `san_type` is defined and not
    // SAN_TYPE_UNSPECIFIED, its `matcher` required.
    for (i, m) in defaults.match_typed_subject_alt_names.iter().enumerate() {
        use tls::subject_alt_name_matcher::SanType;
        let field = format!("match_typed_subject_alt_names[{i}]");
        match SanType::try_from(m.san_type) {
            Ok(SanType::Uri) => {}
            Ok(SanType::Unspecified) | Err(_) => {
                return Err(Invalid(format!(
                    "{field}.san_type: {} is not a defined SAN type other than SAN_TYPE_UNSPECIFIED (Envoy: enum defined_only, not_in 0)",
                    m.san_type
                )));
            }
            Ok(other) => {
                return Err(Unevaluable(format!(
                    "matches client SANs of type {}: only URI SANs (SPIFFE IDs) are known to this gateway",
                    other.as_str_name()
                )));
            }
        }
        let Some(value) = &m.matcher else {
            return Err(Invalid(format!(
                "{field}.matcher: is required (Envoy: message required)"
            )));
        };
        sans.push(rbac::string_match(value).map_err(invalid(format!("{field}.matcher")))?);
    }
    if sans.is_empty() {
        return Ok(None);
    }
    Ok(Some(RbacFilter {
        name: "subjectAltNames".into(),
        action: RbacAction::Allow,
        policies: Some(vec![RbacPolicy {
            name: "subjectAltNames".into(),
            permissions: vec![RbacPermission::Any],
            principals: sans
                .into_iter()
                .map(|m| RbacPrincipal::Authenticated(Some(m)))
                .collect(),
        }]),
    }))
}

/// `outbound|<port>|<subset>|<host>`: the service port and subset of a cluster istiod
/// builds for a VirtualService destination.
pub fn outbound_cluster(name: &str) -> Option<(ServiceKey, Option<String>)> {
    let mut parts = name.splitn(4, '|');
    let (Some("outbound"), Some(port), Some(subset), Some(host)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() {
        return None;
    }
    Some((
        ServiceKey::new(host, port),
        (!subset.is_empty()).then(|| subset.to_ascii_lowercase()),
    ))
}

/// Reads one CDS resource.
pub fn cluster(any: &Any) -> Result<(String, Read<XCluster>), String> {
    let c: cds::Cluster = decode(any, CLUSTER)?;
    let name = c.name.clone();
    if name.is_empty() {
        return Err("a cluster: name: must not be empty (Envoy: string min_len 1)".into());
    }
    let value = read_cluster(&c).map_err(|e| format!("cluster {name}: {e}"))?;
    Ok((
        name,
        Read {
            value,
            problems: Vec::new(),
        },
    ))
}

/// A cluster's fields, checked as cluster.proto, circuit_breaker.proto and
/// outlier_detection.proto constrain them; the error names the field.
fn read_cluster(c: &cds::Cluster) -> Result<XCluster, String> {
    use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as Lb};
    let kind = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => defined::<DiscoveryType>("type", *t)?,
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(format!("custom cluster type {} is not supported", ct.name));
        }
        None => DiscoveryType::Static,
    };
    let mut notes = filters_not_run(c);
    let connect_timeout =
        positive_duration("connect_timeout", &c.connect_timeout)?.unwrap_or(Duration::from_secs(5)); // Envoy's default
    let lb = match Lb::try_from(c.lb_policy) {
        Ok(Lb::LeastRequest) => LbPolicy::LeastRequest,
        Ok(Lb::RoundRobin) => LbPolicy::RoundRobin,
        Ok(Lb::Random) => LbPolicy::Random,
        other => {
            notes.push(format!(
                "lb_policy {} is not supported; LEAST_REQUEST is used",
                other
                    .map(|p| p.as_str_name().to_string())
                    .unwrap_or_else(|_| c.lb_policy.to_string())
            ));
            LbPolicy::LeastRequest
        }
    };
    let mut max_connections = None;
    if let Some(cb) = &c.circuit_breakers {
        for (i, t) in cb.thresholds.iter().enumerate() {
            defined::<core::RoutingPriority>(
                &format!("circuit_breakers.thresholds[{i}].priority"),
                t.priority,
            )?;
        }
        // The first thresholds of the DEFAULT priority count, as in Envoy.
        max_connections = cb
            .thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
            .and_then(|t| t.max_connections.as_ref())
            .map(|v| v.value)
            .filter(|v| *v != u32::MAX);
    }
    let panic = match &c.common_lb_config {
        Some(l) => percent(
            "common_lb_config.healthy_panic_threshold",
            &l.healthy_panic_threshold,
        )?,
        None => None,
    };
    let outlier = match &c.outlier_detection {
        Some(o) => {
            let d = OutlierDetection::default();
            let field = |f: &str| format!("outlier_detection.{f}");
            Some(OutlierDetection {
                consecutive_errors: o
                    .consecutive_5xx
                    .as_ref()
                    .map(|v| v.value)
                    .or_else(|| o.consecutive_gateway_failure.as_ref().map(|v| v.value))
                    .unwrap_or(d.consecutive_errors),
                interval: positive_duration(&field("interval"), &o.interval)?.unwrap_or(d.interval),
                base_ejection_time: positive_duration(
                    &field("base_ejection_time"),
                    &o.base_ejection_time,
                )?
                .unwrap_or(d.base_ejection_time),
                max_ejection_percent: match &o.max_ejection_percent {
                    Some(v) => at_most(&field("max_ejection_percent"), v.value, 100)?,
                    None => d.max_ejection_percent,
                },
                // Envoy truncates the threshold to a whole percent; it defaults to 50 %.
                min_health_percent: panic.map_or(50, |p| p as u32),
            })
        }
        None => None,
    };
    use cds::cluster::common_lb_config::LocalityConfigSpecifier;
    let locality_weighted = c.common_lb_config.as_ref().is_some_and(|l| {
        matches!(
            l.locality_config_specifier,
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        )
    });
    let policy = TrafficPolicy {
        lb,
        connect_timeout: Some(connect_timeout),
        max_connections,
        outlier,
        ..TrafficPolicy::default()
    };
    // An inline load_assignment is validated as an EDS one, whatever the type.
    let inline = match &c.load_assignment {
        Some(cla) => {
            let dns = matches!(kind, DiscoveryType::StrictDns | DiscoveryType::LogicalDns);
            Some(read_endpoints(cla, dns).map_err(|e| format!("load_assignment.{e}"))?)
        }
        None => None,
    };
    let (eds_name, inline, resolution) = match kind {
        DiscoveryType::Eds => {
            let service = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone());
            (Some(service), Vec::new(), Resolution::Static)
        }
        DiscoveryType::StrictDns | DiscoveryType::LogicalDns | DiscoveryType::Static => {
            let read = inline.unwrap_or_default();
            if read.left_out > 0 {
                notes.push(format!(
                    "{} inline endpoints not dialled (unhealthy or not an address)",
                    read.left_out
                ));
            }
            let resolution = if kind == DiscoveryType::Static {
                Resolution::Static
            } else {
                Resolution::Dns
            };
            (None, read.endpoints, resolution)
        }
        // istiod's HBONE plumbing with ambient on (`connect_originate` for a router,
        // `forward_inner_connect` for the ambient east-west gateway): Envoy dials the
        // address a connection or endpoint carries. Nothing strait serves routes to one;
        // a route that did would find no endpoint.
        DiscoveryType::OriginalDst => {
            notes.push(
                "ORIGINAL_DST: dials the address each connection carries; no endpoints here (strait dials HBONE endpoints itself)".into(),
            );
            (None, Vec::new(), Resolution::Static)
        }
    };
    Ok(XCluster {
        eds_name,
        inline,
        resolution,
        policy,
        locality_weighted,
        internal_listener: c.load_assignment.as_ref().and_then(internal_listener),
        notes,
    })
}

/// The internal listener the first `envoy_internal_address` of `cla` names.
fn internal_listener(cla: &eds::ClusterLoadAssignment) -> Option<String> {
    use core::envoy_internal_address::AddressNameSpecifier;
    cla.endpoints
        .iter()
        .flat_map(|g| &g.lb_endpoints)
        .find_map(|lb| match &lb.host_identifier {
            Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                match ep.address.as_ref()?.address.as_ref()? {
                    core::address::Address::EnvoyInternalAddress(i) => {
                        match i.address_name_specifier.as_ref()? {
                            AddressNameSpecifier::ServerListenerName(n) => Some(n.clone()),
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        })
}

/// Upstream network filters (`Cluster.filters`) are acknowledged and not run: istiod
/// puts istio-proxy's `istio.metadata_exchange` on every cluster, which prefixes the
/// upstream bytes with the gateway's peer metadata when the upstream negotiates ALPN
/// `istio-peer-exchange`; strait splices the client's bytes unchanged instead.
fn filters_not_run(c: &cds::Cluster) -> Vec<String> {
    c.filters
        .iter()
        .map(|f| format!("upstream filter {} is acknowledged and not run", f.name))
        .collect()
}

/// Reads one EDS resource; the name is its `cluster_name`.
pub fn endpoints(any: &Any) -> Result<(String, Read<XEndpoints>), String> {
    let cla: eds::ClusterLoadAssignment = decode(any, ENDPOINTS)?;
    if cla.cluster_name.is_empty() {
        return Err(
            "a ClusterLoadAssignment: cluster_name: must not be empty (Envoy: string min_len 1)"
                .into(),
        );
    }
    let value = read_endpoints(&cla, false)
        .map_err(|e| format!("ClusterLoadAssignment {}: {e}", cla.cluster_name))?;
    Ok((
        cla.cluster_name.clone(),
        Read {
            value,
            problems: Vec::new(),
        },
    ))
}

/// The endpoints of a ClusterLoadAssignment, checked as endpoint.proto and
/// endpoint_components.proto constrain them: `cluster_name` min_len 1; a locality's
/// `load_balancing_weight` gte 1 and `priority` lte 128; an endpoint's
/// `load_balancing_weight` gte 1 and its address (see [`address`]), an IP address unless
/// the cluster resolves names (Envoy: "malformed IP address"). The error names the field.
fn read_endpoints(cla: &eds::ClusterLoadAssignment, dns: bool) -> Result<XEndpoints, String> {
    non_empty("cluster_name", &cla.cluster_name)?;
    let mut out = XEndpoints::default();
    for (g, group) in cla.endpoints.iter().enumerate() {
        let at = format!("endpoints[{g}]");
        let locality_weight = weight(
            &format!("{at}.load_balancing_weight"),
            &group.load_balancing_weight,
        )?;
        at_most(&format!("{at}.priority"), group.priority, 128)?;
        let locality = group
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.sub_zone.clone(),
            })
            .unwrap_or_default();
        for (e, lb) in group.lb_endpoints.iter().enumerate() {
            let at = format!("{at}.lb_endpoints[{e}]");
            let endpoint_weight = weight(
                &format!("{at}.load_balancing_weight"),
                &lb.load_balancing_weight,
            )?;
            let target = match &lb.host_identifier {
                Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) => match &ep.address {
                    Some(a) => match address(&format!("{at}.endpoint.address"), a)? {
                        Addr::Tcp(host, port) => Some((host, port)),
                        Addr::Other(_) => None,
                    },
                    None => None,
                },
                _ => None,
            };
            let Some((host, port)) = target else {
                out.left_out += 1;
                continue;
            };
            let address = match host.parse::<IpAddr>() {
                Ok(ip) => EndpointAddress::Ip(ip),
                Err(_) if dns => EndpointAddress::Hostname(host.to_ascii_lowercase()),
                Err(_) => {
                    return Err(format!(
                        "{at}.endpoint.address.socket_address.address: {host:?} is not an IP address (Envoy: malformed IP address)"
                    ));
                }
            };
            // UNKNOWN (0) and HEALTHY (1) take traffic; UNHEALTHY, DRAINING, TIMEOUT and
            // DEGRADED are left to the connections they already carry.
            if lb.health_status > 1 {
                out.left_out += 1;
                continue;
            }
            let tls_mode = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH))
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                });
            let mut labels = BTreeMap::new();
            if let Some(mode) = &tls_mode {
                labels.insert(TLS_MODE_LABEL.to_string(), mode.clone());
            }
            out.endpoints.push(Endpoint {
                address,
                port,
                tls_disabled: tls_mode.as_deref() == Some("disabled"),
                reach: crate::model::Reach::Any,
                labels,
                locality: locality.clone(),
                network: String::new(),
                weight: endpoint_weight.unwrap_or(1),
                service_account: None,
                priority: Some(group.priority),
                // Unset: the locality takes no load where locality weights apply.
                locality_weight: Some(locality_weight.unwrap_or(0)),
            });
        }
    }
    Ok(out)
}

/// Resources held, by name.
#[derive(Debug, Default, Clone)]
pub struct Held {
    pub listeners: BTreeMap<String, Listener>,
    pub clusters: BTreeMap<String, XCluster>,
    /// By EDS service name.
    pub endpoints: BTreeMap<String, XEndpoints>,
}

/// The served part of the held resources, kept up to date as they change: a change of
/// listeners or clusters rebuilds it (every route may move), a change of endpoints
/// rebuilds only the service ports whose routes use those endpoints, so one EDS update
/// costs in proportion to its cluster, not to the mesh.
#[derive(Debug, Default)]
pub struct Assembly {
    pub listeners: Vec<ListenerSpec>,
    pub services: Services,
    /// Clusters a served chain names that CDS has not sent.
    pub missing_clusters: BTreeSet<String>,
    /// Filter chains whose SNI another chain already sent to a different cluster.
    pub conflicts: Vec<String>,
    /// The routes of each service port: the service-level one and its subsets'.
    routes: HashMap<ServiceKey, Vec<Route>>,
    /// EDS name → the service ports whose routes use its endpoints.
    keys_of_eds: HashMap<String, BTreeSet<ServiceKey>>,
}

/// One SNI's route: the subset (none for the service-level name), its cluster, and the
/// policy of the chain and cluster together.
#[derive(Debug, Clone)]
struct Route {
    subset: Option<String>,
    cluster: String,
    policy: TrafficPolicy,
}

impl Held {
    /// The EDS names of the clusters a served listener sends traffic to. istiod also
    /// sends a router the sidecar-style `outbound|…` clusters of every service; nothing
    /// routes to them here, so their endpoints are never asked for.
    pub fn eds_names(&self) -> BTreeSet<String> {
        let sni = self
            .listeners
            .values()
            .filter_map(|l| match l {
                Listener::Served(l) => Some(l),
                _ => None,
            })
            .flat_map(|l| {
                l.chains.iter().map(|c| &c.cluster).chain(
                    l.tls_chains
                        .iter()
                        .chain(&l.mutual_chains)
                        .flat_map(|t| t.clusters.iter().map(|(c, _)| c)),
                )
            });
        let hbone = self
            .listeners
            .values()
            .filter_map(|l| match l {
                Listener::Hbone(h) => self.authorities_of(h),
                _ => None,
            })
            .flat_map(|m| m.routes.values().map(|r| &r.cluster));
        sni.chain(hbone)
            .filter_map(|c| self.clusters.get(c))
            .filter_map(|c| c.eds_name.clone())
            .collect()
    }

    /// The authority map behind an HBONE listener: the internal listener its `CONNECT`
    /// route's cluster leads to (istiod names cluster and listener `main_internal`).
    fn authorities_of(&self, h: &waypoint::HboneListener) -> Option<&waypoint::AuthorityMap> {
        let target = self
            .clusters
            .get(&h.cluster)
            .and_then(|c| c.internal_listener.as_deref())
            .unwrap_or(&h.cluster);
        match self.listeners.get(target) {
            Some(Listener::Authorities(m)) => Some(m),
            _ => None,
        }
    }
}

impl Assembly {
    /// EDS names a served route needs whose endpoints have not arrived.
    pub fn awaiting_endpoints(&self, held: &Held) -> BTreeSet<String> {
        self.keys_of_eds
            .keys()
            .filter(|e| !held.endpoints.contains_key(*e))
            .cloned()
            .collect()
    }

    /// Rebuilds everything from the held listeners, clusters and endpoints.
    pub fn rebuild(&mut self, held: &Held) {
        self.missing_clusters.clear();
        self.conflicts.clear();
        self.routes.clear();
        self.keys_of_eds.clear();
        self.listeners.clear();
        // The cluster already taking each (service port, subset), for conflicts.
        let mut taken: HashMap<(ServiceKey, Option<String>), String> = HashMap::new();
        for (lname, l) in &held.listeners {
            let Listener::Served(l) = l else { continue };
            // One server per distinct ALPN list and RBAC, each allowing exactly its
            // chains' hosts.
            let mut servers: Vec<(Vec<String>, &[RbacFilter], BTreeSet<String>)> = Vec::new();
            for chain in &l.chains {
                let Some(cluster) = held.clusters.get(&chain.cluster) else {
                    self.missing_clusters.insert(chain.cluster.clone());
                    continue;
                };
                let mut policy = cluster.policy.clone();
                policy.idle_timeout = chain.idle_timeout;
                policy.max_connection_duration = chain.max_duration;
                for sni in &chain.server_names {
                    let Ok(key) = parse_subset_key(sni) else {
                        continue;
                    };
                    let skey = ServiceKey::new(key.host, key.port);
                    let subset = key.subset.map(str::to_string);
                    let route = Route {
                        subset,
                        cluster: chain.cluster.clone(),
                        policy: policy.clone(),
                    };
                    if let Err(first) = self.take(&mut taken, &skey, route, cluster) {
                        self.conflicts.push(format!(
                            "listener {lname}: {sni} routes to {} but another chain already sends it to {first}; the first is kept",
                            chain.cluster
                        ));
                    }
                    let mut alpn = chain.alpn.clone();
                    alpn.sort();
                    let host = skey.host.clone();
                    match servers
                        .iter_mut()
                        .find(|(a, r, _)| *a == alpn && *r == chain.rbac.as_slice())
                    {
                        Some((_, _, hosts)) => {
                            hosts.insert(host);
                        }
                        None => servers.push((alpn, &chain.rbac, BTreeSet::from([host]))),
                    }
                }
            }
            let mut specs: Vec<ServerSpec> = servers
                .into_iter()
                .enumerate()
                .map(|(i, (alpn, rbac, hosts))| ServerSpec {
                    name: format!("xds/{lname}/{i}"),
                    mode: ServerTlsMode::AutoPassthrough,
                    hosts: HostSet::new(hosts.into_iter().map(HostMatch::Exact).collect()),
                    alpn: Some(alpn),
                    routes: Vec::new(),
                    rbac: rbac.to_vec(),
                    vips: Vec::new(),
                    http2: Default::default(),
                    sources: Default::default(),
                })
                .collect();
            // ISTIO_MUTUAL servers: each chain is one, its hosts the chain's names.
            for (i, chain) in l.mutual_chains.iter().enumerate() {
                let Some(mut route) = self.chain_route(lname, chain, held, &mut taken) else {
                    continue;
                };
                // The chain's names are the server's hosts; its route takes every
                // connection the server admits.
                let hosts = std::mem::take(&mut route.sni_hosts);
                specs.push(ServerSpec {
                    name: format!("xds/{lname}/mutual/{i}"),
                    mode: ServerTlsMode::IstioMutual,
                    hosts: HostSet::new(hosts),
                    alpn: None,
                    routes: vec![route],
                    rbac: chain.rbac.clone(),
                    vips: Vec::new(),
                    http2: Default::default(),
                    sources: Default::default(),
                });
            }
            // PASSTHROUGH routes, one server per distinct RBAC.
            let mut passthrough: Vec<(&[RbacFilter], Vec<L4Route>)> = Vec::new();
            for chain in &l.tls_chains {
                let Some(route) = self.chain_route(lname, chain, held, &mut taken) else {
                    continue;
                };
                match passthrough
                    .iter_mut()
                    .find(|(r, _)| *r == chain.rbac.as_slice())
                {
                    Some((_, routes)) => routes.push(route),
                    None => passthrough.push((&chain.rbac, vec![route])),
                }
            }
            let several = passthrough.len() > 1;
            for (i, (rbac, routes)) in passthrough.into_iter().enumerate() {
                specs.push(ServerSpec {
                    name: if several {
                        format!("xds/{lname}/passthrough/{i}")
                    } else {
                        format!("xds/{lname}/passthrough")
                    },
                    mode: ServerTlsMode::Passthrough,
                    hosts: HostSet::new(vec![HostMatch::Any]),
                    alpn: None,
                    routes,
                    rbac: rbac.to_vec(),
                    vips: Vec::new(),
                    http2: Default::default(),
                    sources: Default::default(),
                });
            }
            if specs.is_empty() {
                continue;
            }
            self.listeners.push(ListenerSpec {
                addr: l.addr,
                servers: specs,
            });
        }
        // HBONE listeners (the waypoint stream): one HBONE server whose hosts are the
        // authority map's, each `<host>:<port>` the route of its service port.
        for (lname, l) in &held.listeners {
            let Listener::Hbone(h) = l else { continue };
            let mut hosts = BTreeSet::new();
            let map = held.authorities_of(h);
            let mut served = BTreeSet::new();
            for (key, r) in map.map(|m| &m.routes).into_iter().flatten() {
                let Some(cluster) = held.clusters.get(&r.cluster) else {
                    self.missing_clusters.insert(r.cluster.clone());
                    continue;
                };
                let mut policy = cluster.policy.clone();
                policy.idle_timeout = r.idle_timeout;
                policy.max_connection_duration = r.max_duration;
                let route = Route {
                    subset: None,
                    cluster: r.cluster.clone(),
                    policy,
                };
                if let Err(first) = self.take(&mut taken, key, route, cluster) {
                    self.conflicts.push(format!(
                        "listener {lname}: {}:{} routes to {} but {first} already takes it; the first is kept",
                        key.host, key.port, r.cluster
                    ));
                }
                served.insert(key);
            }
            // The names: each a served chain's, or dispatched on the tunnel's source.
            let names = map.map(|m| &m.names).into_iter().flatten();
            for key in names {
                let dispatched = map.is_some_and(|m| m.sources.contains_key(key));
                if dispatched || served.contains(key) {
                    hosts.insert(key.host.clone());
                }
            }
            // A source dispatch reads the header connect_terminate copies into the
            // filter state it matches on.
            let with_header = |r: &SourceRoutes| {
                Arc::new(SourceRoutes {
                    header: h.state_headers.get(&r.state_key).cloned(),
                    ..r.clone()
                })
            };
            let sources = map
                .map(|m| &m.sources)
                .into_iter()
                .flatten()
                .map(|(k, r)| (k.clone(), with_header(r)))
                .collect();
            // A VIP reaches what its service port's name reaches, or nothing.
            let vips = map
                .map(|m| &m.vips)
                .into_iter()
                .flatten()
                .filter_map(|v| match &v.target {
                    TunnelTarget::Service(k) => served.contains(k).then(|| v.clone()),
                    TunnelTarget::BySource(r) => Some(VipRoute {
                        target: TunnelTarget::BySource(with_header(r)),
                        ..v.clone()
                    }),
                })
                .collect();
            self.listeners.push(ListenerSpec {
                addr: h.addr,
                servers: vec![ServerSpec {
                    name: format!("xds/{lname}"),
                    mode: ServerTlsMode::Hbone,
                    hosts: HostSet::new(hosts.into_iter().map(HostMatch::Exact).collect()),
                    alpn: None,
                    routes: Vec::new(),
                    rbac: h.rbac.clone(),
                    vips,
                    http2: h.http2,
                    sources,
                }],
            });
        }
        self.services = self
            .routes
            .iter()
            .map(|(key, routes)| (key.clone(), Arc::new(service(key, routes, held))))
            .collect();
    }

    /// Makes `route` the route of its service port and subset unless another cluster
    /// already took them (returned as the error); a route to the same cluster again is
    /// kept once.
    fn take(
        &mut self,
        taken: &mut HashMap<(ServiceKey, Option<String>), String>,
        skey: &ServiceKey,
        route: Route,
        cluster: &XCluster,
    ) -> Result<(), String> {
        let slot = (skey.clone(), route.subset.clone());
        match taken.get(&slot) {
            Some(first) if *first != route.cluster => return Err(first.clone()),
            Some(_) => return Ok(()),
            None => {}
        }
        taken.insert(slot, route.cluster.clone());
        if let Some(eds) = &cluster.eds_name {
            self.keys_of_eds
                .entry(eds.clone())
                .or_default()
                .insert(skey.clone());
        }
        self.routes.entry(skey.clone()).or_default().push(route);
        Ok(())
    }

    /// The route of a PASSTHROUGH or ISTIO_MUTUAL chain: each `outbound|…` cluster it
    /// sends to becomes a route of its service port (and subset), as an SNI key's cluster
    /// does, and a weighted destination.
    fn chain_route(
        &mut self,
        lname: &str,
        chain: &TlsChain,
        held: &Held,
        taken: &mut HashMap<(ServiceKey, Option<String>), String>,
    ) -> Option<L4Route> {
        let mut destinations = Vec::new();
        for (name, weight) in &chain.clusters {
            let Some((skey, subset)) = outbound_cluster(name) else {
                continue;
            };
            let Some(cluster) = held.clusters.get(name) else {
                self.missing_clusters.insert(name.clone());
                continue;
            };
            let mut policy = cluster.policy.clone();
            policy.idle_timeout = chain.idle_timeout;
            policy.max_connection_duration = chain.max_duration;
            let route = Route {
                subset: subset.clone(),
                cluster: name.clone(),
                policy,
            };
            if let Err(first) = self.take(taken, &skey, route, cluster) {
                self.conflicts.push(format!(
                    "listener {lname}: {name} is the service port of {first}, which is kept"
                ));
            }
            destinations.push(Destination {
                service: skey,
                subset,
                weight: *weight,
            });
        }
        if destinations.is_empty() {
            return None;
        }
        Some(L4Route {
            virtual_service: format!("xds/{lname}"),
            sni_hosts: if chain.server_names.is_empty() {
                vec![HostMatch::Any]
            } else {
                chain
                    .server_names
                    .iter()
                    .map(|n| HostMatch::parse(n))
                    .collect()
            },
            destinations,
        })
    }

    /// Rebuilds the service ports that use the endpoints of `eds`; returns them.
    pub fn update_endpoints(
        &mut self,
        held: &Held,
        eds: &BTreeSet<String>,
    ) -> BTreeSet<ServiceKey> {
        let keys: BTreeSet<ServiceKey> = eds
            .iter()
            .filter_map(|e| self.keys_of_eds.get(e))
            .flatten()
            .cloned()
            .collect();
        for key in &keys {
            if let Some(routes) = self.routes.get(key) {
                self.services
                    .insert(key.clone(), Arc::new(service(key, routes, held)));
            }
        }
        keys
    }
}

/// One service port from its routes and the endpoints they use.
fn service(key: &ServiceKey, routes: &[Route], held: &Held) -> ServicePort {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut base = None;
    let mut subsets = BTreeMap::new();
    let mut resolution = Resolution::Static;
    for route in routes {
        let Some(cluster) = held.clusters.get(&route.cluster) else {
            continue;
        };
        resolution = cluster.resolution;
        let members: &[Endpoint] = match &cluster.eds_name {
            Some(eds) => held
                .endpoints
                .get(eds)
                .map(|e| e.endpoints.as_slice())
                .unwrap_or(&[]),
            None => &cluster.inline,
        };
        let start = endpoints.len();
        // Locality weights count only where the cluster says so, as in Envoy.
        endpoints.extend(members.iter().map(|e| Endpoint {
            locality_weight: e.locality_weight.filter(|_| cluster.locality_weighted),
            ..e.clone()
        }));
        let indexes: Vec<usize> = (start..endpoints.len()).collect();
        match &route.subset {
            None => base = Some((indexes, route.policy.clone())),
            Some(name) => {
                subsets.insert(
                    name.clone(),
                    Subset {
                        name: name.clone(),
                        labels: BTreeMap::new(),
                        endpoints: indexes,
                        policy: route.policy.clone(),
                    },
                );
            }
        }
    }
    let (default_route, policy) = match base {
        Some((indexes, policy)) => (DefaultRoute::Endpoints(indexes), policy),
        None => (DefaultRoute::NotListed, TrafficPolicy::default()),
    };
    // `<name>.<namespace>.svc.<domain>`: Kubernetes services carry their namespace.
    let namespace = match key.host.split('.').collect::<Vec<_>>().as_slice() {
        [_, ns, "svc", ..] => ns.to_string(),
        _ => String::new(),
    };
    ServicePort {
        host: key.host.clone(),
        namespace,
        port: key.port,
        port_name: String::new(),
        endpoints,
        // One stream's service port is one cluster: a waypoint stream's is the
        // `inbound-vip` cluster the tunnels use, with its `tcp_proxy`'s timeouts.
        tunnel_policy: policy.clone(),
        policy,
        subsets,
        resolution,
        default_route,
    }
}

pub mod waypoint;

#[cfg(test)]
mod tests;
