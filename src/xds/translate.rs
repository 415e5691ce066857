//! xDS resources → the pieces of a [`Snapshot`]: what istiod sends a `router` proxy for an
//! AUTO_PASSTHROUGH Gateway (one filter chain per SNI subset key, SNI-DNAT clusters named
//! like the SNI, their ClusterLoadAssignments), read into strait's own types.
//!
//! Each resource is read on its own ([`listener`], [`cluster`], [`endpoints`]) into a
//! compact form with no protobuf kept; a resource that cannot be served safely is an
//! `Err` with the reason (a NACK), one that is served in part carries its problems.
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
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, value::Kind};
use prost::Message;

use super::rbac;
use crate::model::{
    DefaultRoute, Destination, Endpoint, EndpointAddress, HostMatch, HostSet, L4Route, LbPolicy,
    ListenerSpec, Locality, OutlierDetection, RbacAction, RbacFilter, RbacPermission, RbacPolicy,
    RbacPrincipal, Resolution, ServerSpec, ServerTlsMode, ServiceKey, ServicePort, Services,
    Subset, TLS_MODE_LABEL, TrafficPolicy,
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
    /// `(cluster, weight)`, weight 0 left out.
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

/// Why a listener is acknowledged but not served (an HTTP listener, an internal one…).
#[derive(Debug, Clone, PartialEq)]
pub enum Listener {
    Served(XListener),
    NotServed(String),
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

pub(super) fn decode<M: Message + Default>(any: &Any, want: &str) -> Result<M, String> {
    if any.type_url != want {
        return Err(format!("type {} where {want} was expected", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}

fn duration(d: &Option<PbDuration>) -> Option<Duration> {
    let d = d.as_ref()?;
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn socket_addr(a: &Option<core::Address>) -> Result<(String, u16), String> {
    use core::address::Address as A;
    use core::socket_address::PortSpecifier;
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(A::SocketAddress(s)) => match s.port_specifier {
            Some(PortSpecifier::PortValue(p)) if p <= u16::MAX as u32 => {
                Ok((s.address.clone(), p as u16))
            }
            _ => Err(format!("address {} has no port number", s.address)),
        },
        Some(A::Pipe(p)) => Err(format!("a pipe ({}) is not a TCP address", p.path)),
        Some(A::EnvoyInternalAddress(_)) => Err("an Envoy internal address".to_string()),
        None => Err("no address".to_string()),
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
    let (ip, port) = match socket_addr(&l.address) {
        Ok(a) => a,
        Err(why) => return not_served(format!("{why}: not a socket strait binds")),
    };
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
                Err(why) => {
                    out.skipped_chains.push(format!("{label}: {why}"));
                    continue;
                }
            }
        }
        let m = fc.filter_chain_match.clone().unwrap_or_default();
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
        let weighted: Vec<(String, u32)> = match &proxy.cluster_specifier {
            Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
            Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .filter(|c| c.weight > 0)
                .map(|c| (c.name.clone(), c.weight))
                .collect(),
            None => {
                problems.push(format!(
                    "listener {name} {label}: tcp_proxy names no cluster"
                ));
                continue;
            }
        };
        let Some((cluster, _)) = weighted.iter().max_by_key(|(_, w)| *w).cloned() else {
            problems.push(format!(
                "listener {name} {label}: weighted_clusters with no weight"
            ));
            continue;
        };
        let idle_timeout = duration(&proxy.idle_timeout);
        let max_duration = duration(&proxy.max_downstream_connection_duration);
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
fn mutual_tls(ts: &core::TransportSocket) -> Result<Option<RbacFilter>, String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use tls::common_tls_context::ValidationContextType as V;
    let any = match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => a,
        None => return Err(format!("transport socket {} without typed_config", ts.name)),
    };
    let ctx: tls::DownstreamTlsContext = decode(any, TLS_SOCKET_TYPE)
        .map_err(|e| format!("terminates TLS with transport socket {}: {e}", ts.name))?;
    if !ctx
        .require_client_certificate
        .as_ref()
        .is_some_and(|b| b.value)
    {
        return Err("terminates TLS without requiring a client certificate (SIMPLE): only ISTIO_MUTUAL is served".into());
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    let certs: Vec<&str> = common
        .tls_certificate_sds_secret_configs
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    if !common.tls_certificates.is_empty() || certs != [SDS_CERTIFICATE] {
        return Err(format!(
            "terminates TLS with certificate {}: only ISTIO_MUTUAL (SDS {SDS_CERTIFICATE:?}, the gateway's own SVID) is served",
            if certs.is_empty() {
                "given inline".to_string()
            } else {
                format!("{certs:?} from SDS")
            }
        ));
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
        return Err(format!(
            "verifies clients against {}: only ISTIO_MUTUAL (SDS {SDS_ROOT:?}, the mesh root) is served",
            root.map_or("no SDS root".to_string(), |r| format!("SDS {r:?}"))
        ));
    }
    let defaults = defaults.unwrap_or_default();
    let mut sans = Vec::new();
    #[allow(deprecated)]
    for m in &defaults.match_subject_alt_names {
        sans.push(rbac::string_match(m).map_err(|e| format!("subject alt name matcher: {e}"))?);
    }
    for m in &defaults.match_typed_subject_alt_names {
        use tls::subject_alt_name_matcher::SanType;
        if SanType::try_from(m.san_type) != Ok(SanType::Uri) {
            return Err(format!(
                "matches client SANs of type {}: only URI SANs (SPIFFE IDs) are known to this gateway",
                SanType::try_from(m.san_type).map_or("unknown", |t| t.as_str_name())
            ));
        }
        let Some(value) = &m.matcher else {
            return Err("a subject alt name matcher without a value".into());
        };
        sans.push(rbac::string_match(value).map_err(|e| format!("subject alt name matcher: {e}"))?);
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
        return Err("a cluster without a name".into());
    }
    use cds::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as Lb};
    let kind = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t).ok(),
        Some(ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(format!(
                "cluster {name}: custom cluster type {} is not supported",
                ct.name
            ));
        }
        None => Some(DiscoveryType::Static),
    };
    let mut notes = filters_not_run(&c);
    let connect_timeout = match duration(&c.connect_timeout) {
        Some(d) if d.is_zero() => {
            return Err(format!(
                "cluster {name}: connect_timeout must be greater than 0s"
            ));
        }
        Some(d) => d,
        None => Duration::from_secs(5), // Envoy's default
    };
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
    let max_connections = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
        .and_then(|t| t.max_connections.as_ref())
        .map(|v| v.value)
        .filter(|v| *v != u32::MAX);
    let panic = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map(|p| p.value.clamp(0.0, 100.0) as u32);
    let outlier = c.outlier_detection.as_ref().map(|o| {
        let d = OutlierDetection::default();
        OutlierDetection {
            consecutive_errors: o
                .consecutive_5xx
                .as_ref()
                .map(|v| v.value)
                .or_else(|| o.consecutive_gateway_failure.as_ref().map(|v| v.value))
                .unwrap_or(d.consecutive_errors),
            interval: duration(&o.interval).unwrap_or(d.interval),
            base_ejection_time: duration(&o.base_ejection_time).unwrap_or(d.base_ejection_time),
            max_ejection_percent: o
                .max_ejection_percent
                .as_ref()
                .map(|v| v.value)
                .unwrap_or(d.max_ejection_percent),
            // Envoy's healthy panic threshold defaults to 50 %.
            min_health_percent: panic.unwrap_or(50),
        }
    });
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
    let (eds_name, inline, resolution) = match kind {
        Some(DiscoveryType::Eds) => {
            let service = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| name.clone());
            (Some(service), Vec::new(), Resolution::Static)
        }
        Some(
            t @ (DiscoveryType::StrictDns | DiscoveryType::LogicalDns | DiscoveryType::Static),
        ) => {
            let dns = t != DiscoveryType::Static;
            let cla = c.load_assignment.clone().unwrap_or_default();
            let read = read_endpoints(&cla, dns);
            if read.left_out > 0 {
                notes.push(format!(
                    "{} inline endpoints not dialled (unhealthy or not an address)",
                    read.left_out
                ));
            }
            let resolution = if dns {
                Resolution::Dns
            } else {
                Resolution::Static
            };
            (None, read.endpoints, resolution)
        }
        Some(DiscoveryType::OriginalDst) | None => {
            return Err(format!(
                "cluster {name}: discovery type {} cannot be served by a gateway",
                c.cluster_discovery_type
                    .as_ref()
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_default()
            ));
        }
    };
    Ok((
        name,
        Read {
            value: XCluster {
                eds_name,
                inline,
                resolution,
                policy,
                locality_weighted,
                notes,
            },
            problems: Vec::new(),
        },
    ))
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
        return Err("a ClusterLoadAssignment without cluster_name".into());
    }
    Ok((
        cla.cluster_name.clone(),
        Read {
            value: read_endpoints(&cla, false),
            problems: Vec::new(),
        },
    ))
}

fn read_endpoints(cla: &eds::ClusterLoadAssignment, dns: bool) -> XEndpoints {
    let mut out = XEndpoints::default();
    for group in &cla.endpoints {
        let locality = group
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.sub_zone.clone(),
            })
            .unwrap_or_default();
        for lb in &group.lb_endpoints {
            // UNKNOWN (0) and HEALTHY (1) take traffic; UNHEALTHY, DRAINING, TIMEOUT and
            // DEGRADED are left to the connections they already carry.
            if lb.health_status > 1 {
                out.left_out += 1;
                continue;
            }
            let Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                out.left_out += 1;
                continue;
            };
            let Ok((host, port)) = socket_addr(&ep.address) else {
                out.left_out += 1;
                continue;
            };
            let address = match host.parse::<IpAddr>() {
                Ok(ip) => EndpointAddress::Ip(ip),
                Err(_) if dns && !host.is_empty() => {
                    EndpointAddress::Hostname(host.to_ascii_lowercase())
                }
                Err(_) => {
                    out.left_out += 1;
                    continue;
                }
            };
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
                labels,
                locality: locality.clone(),
                network: String::new(),
                weight: lb
                    .load_balancing_weight
                    .as_ref()
                    .map(|w| w.value)
                    .unwrap_or(1)
                    .max(1),
                service_account: None,
                priority: Some(group.priority),
                locality_weight: Some(group.load_balancing_weight.as_ref().map_or(0, |w| w.value)),
            });
        }
    }
    out
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
        self.listeners
            .values()
            .filter_map(|l| match l {
                Listener::Served(l) => Some(l),
                Listener::NotServed(_) => None,
            })
            .flat_map(|l| {
                l.chains.iter().map(|c| &c.cluster).chain(
                    l.tls_chains
                        .iter()
                        .chain(&l.mutual_chains)
                        .flat_map(|t| t.clusters.iter().map(|(c, _)| c)),
                )
            })
            .filter_map(|c| self.clusters.get(c))
            .filter_map(|c| c.eds_name.clone())
            .collect()
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
        policy,
        subsets,
        resolution,
        default_route,
    }
}
