//! What istiod sends the ambient east-west gateway (the `waypoint` stream,
//! docs/ambient-xds.md), read into the same HBONE listener and services the files
//! produce (a Gateway API `istio-east-west` Gateway):
//!
//! - `connect_terminate` (mTLS 1.3, ALPN `h2`, HTTP/2 `CONNECT` into the cluster
//!   `main_internal`) → [`HboneListener`]: the 15008 listener, its client SAN matchers an
//!   RBAC filter as on an ISTIO_MUTUAL chain;
//! - `main_internal` (an internal listener whose `filter_chain_matcher` maps the
//!   `:authority` `<host>:<service port>` to a chain, each a `tcp_proxy` to
//!   `inbound-vip|<port>|tcp|<host>`, and failing that the Service VIP and port to the
//!   same chains) → [`AuthorityMap`];
//! - each `inbound-vip|…` cluster's EDS → the service port's HBONE endpoints: the internal
//!   addresses whose `envoy.filters.listener.original_dst` metadata says `local:
//!   <pod IP>:<target port>`, labelled as accepting HBONE, so the data path dials
//!   `<pod IP>:15008`. A plain socket address (a pod that does not take HBONE) and an
//!   endpoint that is not `HEALTHY` are never candidates.
//!
//! The Envoy plumbing between those steps (`forward_inner_connect`, the `main_internal`
//! and `encap` clusters, `BlackHoleCluster`, Istio-only HTTP filters) is acknowledged and
//! maps to nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as envoy_core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::config::route::v3 as rds;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{Any, value::Kind};

use super::super::any::decode;
use super::super::rbac::RbacError;
use super::{
    Addr, ENDPOINTS, LISTENER, Listener, Read, TCP_PROXY, TCP_PROXY_TYPE, TLS_SOCKET_TYPE,
    XCluster, XEndpoints, address, mutual_tls, non_empty, read_endpoints, tcp_proxy, weight,
};
use crate::model::{
    Cidr, Endpoint, EndpointAddress, Http2Settings, Locality, RbacFilter, Reach, ServiceKey,
    SourceRoutes, TUNNEL_LABEL, TunnelTarget, VipRoute,
};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// The endpoint metadata that carries an HBONE endpoint's `<pod IP>:<target port>`.
const ORIGINAL_DST: &str = "envoy.filters.listener.original_dst";
/// `connect_terminate`: the outer mTLS and HTTP/2 `CONNECT` on 15008.
#[derive(Debug, Clone, PartialEq)]
pub struct HboneListener {
    pub addr: SocketAddr,
    /// The cluster the `CONNECT` route sends streams to (istiod: `main_internal`).
    pub cluster: String,
    /// The client SAN matchers of the TLS context, as an ALLOW filter.
    pub rbac: Vec<RbacFilter>,
    /// HTTP filters strait does not run (Istio's peer metadata, filter state, the router).
    pub ignored_filters: BTreeSet<String>,
    /// The HTTP connection manager's `http2_protocol_options`, as served.
    pub http2: Http2Settings,
    /// Filter state keys a `set_filter_state` filter sets from one request header
    /// (`%REQ(<header>)%`), key → header: what a matcher behind the listener can read of
    /// the `CONNECT` (istiod: `io.istio.source` ← `x-istio-source`).
    pub state_headers: BTreeMap<String, String>,
    /// Settings read where strait serves its own, for `config_dump`.
    pub notes: Vec<String>,
}

/// `main_internal`: the exact map from `:authority` to the cluster of its service port.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthorityMap {
    /// The service port of each chain served → its `tcp_proxy`: the chains the exact map
    /// names, keyed by their `<host>:<port>`, and those a source dispatch names, keyed by
    /// their cluster `inbound-vip|<port>|tcp|<host>` unless a name already keys them.
    pub routes: BTreeMap<ServiceKey, AuthorityRoute>,
    /// The `<host>:<port>` names of the exact map.
    pub names: BTreeSet<ServiceKey>,
    /// The names dispatched on the tunnel's source (a Service with a waypoint), with the
    /// filter state key read; `header` is filled in once the HBONE listener is known.
    pub sources: BTreeMap<ServiceKey, SourceRoutes>,
    /// The fallback on the destination address (`on_no_match`): `<VIP>:<port>` to the
    /// service port of the chain it names, most specific range first.
    pub vips: Vec<VipRoute>,
    /// Entries and chains left out, with why.
    pub skipped: Vec<String>,
}

/// `xds.type.matcher.v3.IPMatcher` (cncf/xds `ip.proto`), which envoy-types does not carry.
#[derive(Clone, PartialEq, prost::Message)]
struct IpMatcher {
    #[prost(message, repeated, tag = "1")]
    range_matchers: Vec<IpRangeMatcher>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct IpRangeMatcher {
    #[prost(message, repeated, tag = "1")]
    ranges: Vec<envoy_types::pb::xds::core::v3::CidrRange>,
    #[prost(message, optional, tag = "2")]
    on_match: Option<envoy_types::pb::xds::r#type::matcher::v3::matcher::OnMatch>,
    #[prost(bool, tag = "3")]
    exclusive: bool,
}

const IP_MATCHER: &str = "type.googleapis.com/xds.type.matcher.v3.IPMatcher";
const FILTER_STATE_INPUT: &str =
    "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput";
const SET_FILTER_STATE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config";
const DESTINATION_IP: &str =
    "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput";
const DESTINATION_PORT: &str =
    "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput";

#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityRoute {
    pub cluster: String,
    pub idle_timeout: Option<Duration>,
    pub max_duration: Option<Duration>,
}

/// Reads one LDS resource of the waypoint stream.
pub fn listener(any: &Any) -> Result<(String, Read<Listener>), String> {
    let l: lds::Listener = decode(any, LISTENER)?;
    let name = l.name.clone();
    if name.is_empty() {
        return Err("a listener without a name".into());
    }
    let read = |value| {
        Ok((
            name.clone(),
            Read {
                value,
                problems: Vec::new(),
            },
        ))
    };
    match &l.address {
        None if l.listener_specifier.is_some() => {
            if l.filter_chain_matcher.is_some() {
                return authority_map(&l)
                    .map(|m| {
                        (
                            name.clone(),
                            Read {
                                value: Listener::Authorities(m),
                                problems: Vec::new(),
                            },
                        )
                    })
                    .map_err(|e| format!("listener {name}: {e}"));
            }
            read(Listener::NotServed(
                "an internal listener without an authority map: Envoy plumbing, nothing to serve"
                    .into(),
            ))
        }
        None if l.api_listener.is_some() => read(Listener::NotServed(
            "an API listener: not a socket strait binds".into(),
        )),
        None => Err(format!(
            "listener {name}: address: is required of a listener that is neither an api_listener nor an internal_listener (Envoy: address is necessary)"
        )),
        Some(a) => {
            let (ip, port) = match address("address", a) {
                Ok(Addr::Tcp(ip, port)) => (ip, port),
                Ok(Addr::Other(why)) => {
                    return read(Listener::NotServed(format!(
                        "{why}: not a socket strait binds"
                    )));
                }
                Err(e) => return Err(format!("listener {name}: {e}")),
            };
            let Ok(ip) = ip.parse::<IpAddr>() else {
                return Err(format!(
                    "listener {name}: address {ip:?} is not an IP address"
                ));
            };
            match connect_terminate(&l, SocketAddr::new(ip, port)) {
                Ok(Some(h)) => read(Listener::Hbone(h)),
                Ok(None) => read(Listener::NotServed(
                    "no filter chain terminates HTTP/2 CONNECT: not the ambient east-west gateway's 15008".into(),
                )),
                Err(Served::Invalid(e)) => Err(format!("listener {name}: {e}")),
                Err(Served::Not(why)) => read(Listener::NotServed(why)),
            }
        }
    }
}

/// Why a `connect_terminate` is not taken: invalid (a NACK) or not servable as asked.
enum Served {
    Invalid(String),
    Not(String),
}

/// The HBONE listener of a listener with a socket address: its one filter chain ending
/// in an HTTP connection manager whose route terminates `CONNECT` into a cluster.
/// `Ok(None)` when no chain does.
fn connect_terminate(l: &lds::Listener, addr: SocketAddr) -> Result<Option<HboneListener>, Served> {
    let Some((i, fc, last)) = l.filter_chains.iter().enumerate().find_map(|(i, fc)| {
        let last = fc.filters.last()?;
        let is_hcm = last.name == HCM
            || matches!(&last.config_type, Some(lds::filter::ConfigType::TypedConfig(a)) if a.type_url == HCM_TYPE);
        is_hcm.then_some((i, fc, last))
    }) else {
        return Ok(None);
    };
    let chain = format!("filter_chains[{i}]");
    for (j, f) in fc.filters.iter().enumerate() {
        non_empty(&format!("{chain}.filters[{j}].name"), &f.name).map_err(Served::Invalid)?;
    }
    let Some(ts) = &fc.transport_socket else {
        return Err(Served::Not(format!(
            "{chain} does not terminate TLS: HBONE is served with mutual TLS only"
        )));
    };
    let rbac = match mutual_tls(ts) {
        Ok(san) => san.into_iter().collect::<Vec<_>>(),
        Err(RbacError::Invalid(e)) => return Err(Served::Invalid(format!("{chain}: {e}"))),
        Err(RbacError::Unevaluable(why)) => return Err(Served::Not(format!("{chain}: {why}"))),
    };
    let mut notes = Vec::new();
    // mutual_tls decoded the same context: it cannot fail here.
    if let Some(core_ts) = &ts.config_type {
        let envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a) =
            core_ts;
        if let Ok(ctx) = decode::<tls::DownstreamTlsContext>(a, TLS_SOCKET_TYPE) {
            let common = ctx.common_tls_context.unwrap_or_default();
            if !common.alpn_protocols.is_empty() && !common.alpn_protocols.iter().any(|p| p == "h2")
            {
                return Err(Served::Not(format!(
                    "{chain}: ALPN {:?} without h2: HBONE is HTTP/2",
                    common.alpn_protocols
                )));
            }
            let params = common.tls_params.unwrap_or_default();
            let v13 = tls::tls_parameters::TlsProtocol::TlSv13 as i32;
            let auto = tls::tls_parameters::TlsProtocol::TlsAuto as i32;
            if params.tls_maximum_protocol_version != auto
                && params.tls_maximum_protocol_version < v13
            {
                return Err(Served::Not(format!(
                    "{chain}: tls_params.tls_maximum_protocol_version below TLS 1.3: strait serves HBONE with TLS 1.3 only"
                )));
            }
            if params.tls_minimum_protocol_version != v13 {
                notes.push("TLS versions below 1.3 allowed by istiod: strait serves HBONE with TLS 1.3 only".into());
            }
        }
    }
    let Some(lds::filter::ConfigType::TypedConfig(any)) = &last.config_type else {
        return Err(Served::Invalid(format!(
            "{chain}: {} without typed_config",
            last.name
        )));
    };
    let manager: hcm::HttpConnectionManager =
        decode(any, HCM_TYPE).map_err(|e| Served::Invalid(format!("{chain}: {HCM} {e}")))?;
    let mut ignored: BTreeSet<String> = fc.filters[..fc.filters.len() - 1]
        .iter()
        .map(|f| f.name.clone())
        .collect();
    ignored.extend(manager.http_filters.iter().map(|f| f.name.clone()));
    let state_headers =
        state_headers(&manager).map_err(|e| Served::Invalid(format!("{chain}: {e}")))?;
    if !manager
        .upgrade_configs
        .iter()
        .any(|u| u.upgrade_type.eq_ignore_ascii_case("CONNECT"))
        && !manager
            .http2_protocol_options
            .as_ref()
            .is_some_and(|o| o.allow_connect)
    {
        return Err(Served::Not(format!(
            "{chain}: the HTTP connection manager does not take CONNECT"
        )));
    }
    let http2 = http2_settings(manager.http2_protocol_options.as_ref())
        .map_err(|e| Served::Invalid(format!("{chain}: {HCM} {e}")))?;
    if manager
        .http2_protocol_options
        .as_ref()
        .and_then(|o| o.connection_keepalive.as_ref())
        .is_some_and(|k| k.interval_jitter.is_some() || k.connection_idle_interval.is_some())
    {
        notes.push(format!(
            "http2_protocol_options.connection_keepalive: interval_jitter and connection_idle_interval not applied; strait pings every {:?}",
            http2.keepalive_interval
        ));
    }
    let routes = match &manager.route_specifier {
        Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => rc,
        _ => {
            return Err(Served::Not(format!(
                "{chain}: routes not inline (RDS or scoped routes are not read on 15008)"
            )));
        }
    };
    let cluster = routes
        .virtual_hosts
        .iter()
        .flat_map(|v| &v.routes)
        .find_map(|r| {
            let m = r.r#match.as_ref()?;
            if !matches!(
                m.path_specifier,
                Some(rds::route_match::PathSpecifier::ConnectMatcher(_))
            ) {
                return None;
            }
            match &r.action {
                Some(rds::route::Action::Route(a)) => match &a.cluster_specifier {
                    Some(rds::route_action::ClusterSpecifier::Cluster(c)) => Some(c.clone()),
                    _ => None,
                },
                _ => None,
            }
        });
    let Some(cluster) = cluster else {
        return Err(Served::Not(format!(
            "{chain}: no route matches CONNECT into one cluster"
        )));
    };
    non_empty(&format!("{chain}: route cluster"), &cluster).map_err(Served::Invalid)?;
    if l.filter_chains.len() > 1 {
        notes.push(format!(
            "{} other filter chain(s) not served: 15008 serves one",
            l.filter_chains.len() - 1
        ));
    }
    Ok(Some(HboneListener {
        addr,
        cluster,
        rbac,
        ignored_filters: ignored,
        http2,
        state_headers,
        notes,
    }))
}

/// The HTTP/2 settings an `http2_protocol_options` asks for, each within the range
/// Envoy's validation allows (a value outside makes the listener invalid, naming the
/// field); a setting left out keeps strait's default ([`Http2Settings::default`]).
fn http2_settings(
    options: Option<&envoy_core::Http2ProtocolOptions>,
) -> Result<Http2Settings, String> {
    let mut out = Http2Settings::default();
    let Some(o) = options else {
        return Ok(out);
    };
    // Envoy's `(validate.rules).uint32 = {lte: 2147483647 gte: MIN}`.
    let ranged = |field: &str, value: Option<u32>, min: u32| match value {
        Some(n) if n < min || n > i32::MAX as u32 => Err(format!(
            "http2_protocol_options.{field}: {n} is outside [{min}, 2147483647] (Envoy: value must be inside range)"
        )),
        v => Ok(v),
    };
    let value =
        |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| v.as_ref().map(|v| v.value);
    if let Some(n) = ranged(
        "max_concurrent_streams",
        value(&o.max_concurrent_streams),
        1,
    )? {
        out.max_concurrent_streams = n;
    }
    if let Some(n) = ranged(
        "initial_stream_window_size",
        value(&o.initial_stream_window_size),
        65535,
    )? {
        out.initial_stream_window_size = n;
    }
    if let Some(n) = ranged(
        "initial_connection_window_size",
        value(&o.initial_connection_window_size),
        65535,
    )? {
        out.initial_connection_window_size = n;
    }
    if let Some(k) = &o.connection_keepalive {
        // Envoy's `(validate.rules).duration = {gte {nanos: 1000000}}`.
        let duration = |field: &str,
                        d: &Option<envoy_types::pb::google::protobuf::Duration>|
         -> Result<Option<Duration>, String> {
            let Some(d) = d else { return Ok(None) };
            let valid = d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos);
            let value = Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
            if !valid || value < Duration::from_millis(1) {
                return Err(format!(
                    "http2_protocol_options.connection_keepalive.{field}: {}s {}ns is below 1ms (Envoy: value must be greater than or equal to 1ms)",
                    d.seconds, d.nanos
                ));
            }
            Ok(Some(value))
        };
        let Some(timeout) = duration("timeout", &k.timeout)? else {
            return Err(
                "http2_protocol_options.connection_keepalive.timeout: required (Envoy: value is required)"
                    .into(),
            );
        };
        out.keepalive_timeout = timeout;
        if let Some(interval) = duration("interval", &k.interval)? {
            out.keepalive_interval = interval;
        }
    }
    Ok(out)
}

/// The filter state keys the connection manager's `set_filter_state` filters set from
/// exactly one request header (`%REQ(<header>)%`), key → header (lower case). A filter
/// that does not decode is rejected, as Envoy rejects it.
fn state_headers(manager: &hcm::HttpConnectionManager) -> Result<BTreeMap<String, String>, String> {
    use envoy_types::pb::envoy::config::core::v3::{data_source, substitution_format_string};
    use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3::filter_state_value;
    use envoy_types::pb::envoy::extensions::filters::http::set_filter_state::v3 as sfs;
    let mut out = BTreeMap::new();
    for (i, f) in manager.http_filters.iter().enumerate() {
        let Some(hcm::http_filter::ConfigType::TypedConfig(a)) = &f.config_type else {
            continue;
        };
        if a.type_url != SET_FILTER_STATE {
            continue;
        }
        let config: sfs::Config = decode(a, SET_FILTER_STATE)
            .map_err(|e| format!("http_filters[{i}] ({}): {e}", f.name))?;
        for v in &config.on_request_headers {
            let Some(filter_state_value::Key::ObjectKey(key)) = &v.key else {
                continue;
            };
            let Some(filter_state_value::Value::FormatString(fs)) = &v.value else {
                continue;
            };
            #[allow(deprecated)]
            let text = match &fs.format {
                Some(substitution_format_string::Format::TextFormat(t)) => t.as_str(),
                Some(substitution_format_string::Format::TextFormatSource(d)) => match &d.specifier
                {
                    Some(data_source::Specifier::InlineString(t)) => t.as_str(),
                    _ => continue,
                },
                _ => continue,
            };
            let Some(header) = text
                .strip_prefix("%REQ(")
                .and_then(|t| t.strip_suffix(")%"))
                .filter(|h| !h.is_empty() && !h.contains([')', '%', '?', ':']))
            else {
                continue;
            };
            out.insert(key.clone(), header.to_ascii_lowercase());
        }
    }
    Ok(out)
}

/// The authority map of an internal listener: the exact map of its
/// `filter_chain_matcher`, each entry's action naming a filter chain that ends in a
/// `tcp_proxy`; then its fallback on the destination address ([`vip_routes`]).
fn authority_map(l: &lds::Listener) -> Result<AuthorityMap, String> {
    use envoy_types::pb::xds::r#type::matcher::v3::matcher::{
        MatcherType, matcher_tree::TreeType, on_match::OnMatch,
    };
    let mut out = AuthorityMap::default();
    // Chains by name: what the matcher's actions name.
    let mut chains = BTreeMap::new();
    for (i, fc) in l.filter_chains.iter().enumerate() {
        for (j, f) in fc.filters.iter().enumerate() {
            non_empty(&format!("filter_chains[{i}].filters[{j}].name"), &f.name)?;
        }
        chains.insert(fc.name.clone(), (i, fc));
    }
    let matcher = l.filter_chain_matcher.as_ref();
    let tree = match matcher.and_then(|m| m.matcher_type.as_ref()) {
        Some(MatcherType::MatcherTree(t)) => t,
        _ => {
            out.skipped
                .push("filter_chain_matcher is not a matcher tree: no authority is served".into());
            return Ok(out);
        }
    };
    let map = match &tree.tree_type {
        Some(TreeType::ExactMatchMap(m)) => &m.map,
        _ => {
            out.skipped
                .push("filter_chain_matcher is not an exact map: no authority is served".into());
            return Ok(out);
        }
    };
    // The service port each served chain routes to, for the VIP fallback.
    let mut chain_keys: BTreeMap<String, ServiceKey> = BTreeMap::new();
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    // Names whose entry is a matcher: read once every plain name keys its chain.
    let mut dispatched = Vec::new();
    for key in keys {
        let on_match = &map[key];
        let chain_name = match &on_match.on_match {
            Some(OnMatch::Action(a)) => a.name.clone(),
            Some(OnMatch::Matcher(m)) => {
                dispatched.push((key, m));
                continue;
            }
            None => {
                return Err(format!(
                    "filter_chain_matcher: {key}: on_match is required (Envoy: oneof on_match)"
                ));
            }
        };
        let Some((i, fc)) = chains.get(&chain_name) else {
            // Envoy rejects a matcher that names a chain the listener does not have.
            return Err(format!(
                "filter_chain_matcher: {key} names filter chain {chain_name:?}, which the listener does not have"
            ));
        };
        let Some((host, port)) = host_port(key) else {
            out.skipped.push(format!("{key}: not <host>:<port>"));
            continue;
        };
        let Some(last) = fc.filters.last() else {
            out.skipped
                .push(format!("{key}: filter chain {chain_name} has no filters"));
            continue;
        };
        let is_tcp_proxy = last.name == TCP_PROXY
            || matches!(&last.config_type, Some(lds::filter::ConfigType::TypedConfig(a)) if a.type_url == TCP_PROXY_TYPE);
        if !is_tcp_proxy {
            out.skipped.push(format!(
                "{key}: filter chain {chain_name} ends in {}, not tcp_proxy",
                last.name
            ));
            continue;
        }
        let Some((route, several)) = chain_proxy(*i, fc, &chain_name)? else {
            continue;
        };
        if several {
            out.skipped.push(format!(
                "{key}: weighted_clusters served by its heaviest cluster {} only",
                route.cluster
            ));
        }
        let service = ServiceKey::new(&host.to_ascii_lowercase(), port);
        chain_keys.insert(chain_name.clone(), service.clone());
        out.names.insert(service.clone());
        out.routes.insert(service, route);
    }
    for (key, m) in dispatched {
        let at = format!("filter_chain_matcher.matcher_tree.exact_match_map.map[{key}].matcher");
        let Some((host, port)) = host_port(key) else {
            return Err(format!(
                "{at}: {key:?} is not <host>:<port>: strait dispatches on the source only for a service port's name"
            ));
        };
        let routes = source_routes(m, &at, &chains, &mut chain_keys, &mut out)?;
        let service = ServiceKey::new(&host.to_ascii_lowercase(), port);
        out.names.insert(service.clone());
        out.sources.insert(service, routes);
    }
    if let Some(no_match) = matcher.and_then(|m| m.on_no_match.as_ref()) {
        vip_routes(no_match, &chains, &mut chain_keys, &mut out)?;
    }
    Ok(out)
}

/// `<host>:<port>` of an exact map key.
fn host_port(key: &str) -> Option<(&str, u16)> {
    key.rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p != 0)?)))
        .filter(|(h, _)| !h.is_empty())
}

/// The `tcp_proxy` ending chain `i` (`None` when it names no cluster), and whether it
/// splits over several clusters (served by the heaviest).
fn chain_proxy(
    i: usize,
    fc: &lds::FilterChain,
    chain_name: &str,
) -> Result<Option<(AuthorityRoute, bool)>, String> {
    let Some(lds::filter::ConfigType::TypedConfig(a)) =
        fc.filters.last().and_then(|f| f.config_type.as_ref())
    else {
        return Err(format!(
            "filter_chains[{i}]: tcp_proxy without typed_config"
        ));
    };
    let proxy = decode(a, TCP_PROXY_TYPE)
        .and_then(|p| tcp_proxy(&p))
        .map_err(|e| format!("filter_chains[{i}] ({chain_name}): tcp_proxy {e}"))?;
    let Some((cluster, _)) = proxy.clusters.iter().max_by_key(|(_, w)| *w).cloned() else {
        return Ok(None);
    };
    Ok(Some((
        AuthorityRoute {
            cluster,
            idle_timeout: proxy.idle_timeout,
            max_duration: proxy.max_duration,
        },
        proxy.clusters.len() > 1,
    )))
}

/// istiod's dispatch of a Service with a waypoint (`main_internal`'s entry for its name
/// or its VIP port): a matcher tree on a filter state (`io.istio.source`, which
/// `connect_terminate` sets from `x-istio-source`), an exact (or prefix) map of values to
/// chains, and `on_no_match` to the waypoint's chain. Each chain named is served under its
/// service port. A shape Envoy would reject, or one strait does not serve (another input,
/// a custom or nested matcher, a chain that is not a `tcp_proxy` to
/// `inbound-vip|<port>|tcp|<host>`), is rejected naming the field.
fn source_routes(
    m: &envoy_types::pb::xds::r#type::matcher::v3::Matcher,
    at: &str,
    chains: &BTreeMap<String, (usize, &lds::FilterChain)>,
    chain_keys: &mut BTreeMap<String, ServiceKey>,
    out: &mut AuthorityMap,
) -> Result<SourceRoutes, String> {
    use envoy_types::pb::envoy::extensions::matching::common_inputs::network::v3::FilterStateInput;
    use envoy_types::pb::xds::r#type::matcher::v3::matcher::{
        MatcherType, OnMatch as OnMatchMsg, matcher_tree::TreeType, on_match::OnMatch,
    };
    let tree = match &m.matcher_type {
        Some(MatcherType::MatcherTree(t)) => t,
        Some(MatcherType::MatcherList(_)) => {
            return Err(format!(
                "{at}.matcher_list: not served: strait dispatches a tunnel on its source with a matcher_tree on a filter state"
            ));
        }
        None => return Err(format!("{at}: matcher_type is required (Envoy: oneof)")),
    };
    let input = tree
        .input
        .as_ref()
        .ok_or_else(|| format!("{at}.matcher_tree.input: is required"))?;
    let Some(ty) = input.typed_config.as_ref() else {
        return Err(format!(
            "{at}.matcher_tree.input ({}): typed_config is required",
            input.name
        ));
    };
    if ty.type_url != FILTER_STATE_INPUT {
        return Err(format!(
            "{at}.matcher_tree.input: {} not served: strait dispatches a tunnel only on a filter state set from a request header",
            ty.type_url
        ));
    }
    let state: FilterStateInput =
        decode(ty, FILTER_STATE_INPUT).map_err(|e| format!("{at}.matcher_tree.input: {e}"))?;
    if state.key.is_empty() {
        return Err(format!(
            "{at}.matcher_tree.input.key: must not be empty (Envoy: string min_len 1)"
        ));
    }
    if !state.field.is_empty() {
        return Err(format!(
            "{at}.matcher_tree.input.field {:?}: not served: strait matches a filter state set from a header as a whole",
            state.field
        ));
    }
    let mut target = |on: &OnMatchMsg, field: &str| -> Result<ServiceKey, String> {
        match &on.on_match {
            Some(OnMatch::Action(a)) => {
                source_target(&a.name, &format!("{at}.{field}"), chains, chain_keys, out)
            }
            Some(OnMatch::Matcher(_)) => Err(format!(
                "{at}.{field}.matcher: a nested matcher: not served: each source value names a filter chain"
            )),
            None => Err(format!("{at}.{field}: on_match is required (Envoy: oneof)")),
        }
    };
    let mut routes = SourceRoutes {
        header: None,
        state_key: state.key.clone(),
        exact: BTreeMap::new(),
        prefix: Vec::new(),
        otherwise: None,
    };
    match &tree.tree_type {
        Some(TreeType::ExactMatchMap(map)) => {
            let mut values: Vec<&String> = map.map.keys().collect();
            values.sort();
            for v in values {
                let k = target(
                    &map.map[v],
                    &format!("matcher_tree.exact_match_map.map[{v}]"),
                )?;
                routes.exact.insert(v.clone(), k);
            }
        }
        Some(TreeType::PrefixMatchMap(map)) => {
            let mut values: Vec<&String> = map.map.keys().collect();
            values.sort();
            for v in values {
                let k = target(
                    &map.map[v],
                    &format!("matcher_tree.prefix_match_map.map[{v}]"),
                )?;
                routes.prefix.push((v.clone(), k));
            }
        }
        Some(TreeType::CustomMatch(c)) => {
            return Err(format!(
                "{at}.matcher_tree.custom_match ({}): not served: strait reads an exact or prefix map of source values",
                c.name
            ));
        }
        None => {
            return Err(format!(
                "{at}.matcher_tree: tree_type is required (Envoy: oneof)"
            ));
        }
    }
    if let Some(no_match) = &m.on_no_match {
        routes.otherwise = Some(target(no_match, "on_no_match")?);
    }
    Ok(routes)
}

/// The service port of chain `name`, which a source dispatch sends to: the name that
/// already keys it, or else its `tcp_proxy`'s cluster `inbound-vip|<port>|<proto>|<host>`
/// (istiod names the waypoint's chain so), whose route is added.
fn source_target(
    name: &str,
    at: &str,
    chains: &BTreeMap<String, (usize, &lds::FilterChain)>,
    chain_keys: &mut BTreeMap<String, ServiceKey>,
    out: &mut AuthorityMap,
) -> Result<ServiceKey, String> {
    let Some((i, fc)) = chains.get(name) else {
        return Err(format!(
            "{at} names filter chain {name:?}, which the listener does not have"
        ));
    };
    if let Some(k) = chain_keys.get(name) {
        return Ok(k.clone());
    }
    let last = fc.filters.last().ok_or_else(|| {
        format!("{at}: filter chain {name} has no filters: strait sends a tunnel to a tcp_proxy")
    })?;
    let is_tcp_proxy = last.name == TCP_PROXY
        || matches!(&last.config_type, Some(lds::filter::ConfigType::TypedConfig(a)) if a.type_url == TCP_PROXY_TYPE);
    if !is_tcp_proxy {
        return Err(format!(
            "{at}: filter chain {name} ends in {}: not served: strait sends a tunnel to a tcp_proxy",
            last.name
        ));
    }
    let Some((route, several)) = chain_proxy(*i, fc, name)? else {
        return Err(format!(
            "{at}: filter chain {name}: its tcp_proxy names no cluster"
        ));
    };
    if several {
        return Err(format!(
            "{at}: filter chain {name}: weighted_clusters not served behind a source dispatch"
        ));
    }
    let key = inbound_vip_key(&route.cluster).ok_or_else(|| {
        format!(
            "{at}: filter chain {name} sends to cluster {}, not inbound-vip|<port>|<protocol>|<host>: strait cannot tell its service port",
            route.cluster
        )
    })?;
    if let Some(other) = out.routes.get(&key)
        && other.cluster != route.cluster
    {
        return Err(format!(
            "{at}: filter chain {name}: service port {}:{} already goes to {}",
            key.host, key.port, other.cluster
        ));
    }
    out.routes.entry(key.clone()).or_insert(route);
    chain_keys.insert(name.to_string(), key.clone());
    Ok(key)
}

/// `inbound-vip|<port>|<protocol>|<host>` → `<host>:<port>`.
fn inbound_vip_key(cluster: &str) -> Option<ServiceKey> {
    let mut parts = cluster.splitn(4, '|');
    if parts.next()? != "inbound-vip" {
        return None;
    }
    let port = parts.next()?.parse::<u16>().ok().filter(|p| *p != 0)?;
    let _protocol = parts.next()?;
    let host = parts.next().filter(|h| !h.is_empty() && !h.contains('|'))?;
    Some(ServiceKey::new(host, port))
}

/// istiod's fallback after the exact map (`filter_chain_matcher.on_no_match`): a matcher
/// on the destination IP (an `IPMatcher` of each Service's VIPs), each range then on the
/// destination port, to the chain of that service port. Envoy takes the destination from
/// the `:authority` (`envoy.filters.listener.original_dst.local_ip`), so an `:authority`
/// of `<VIP>:<port>` reaches the chain `<host>:<port>` does. Read into [`VipRoute`]s for
/// the chains the exact map serves; what has another shape is skipped with why, and a
/// range that is not an address or an action naming a chain the listener does not have
/// is rejected, as Envoy rejects them.
fn vip_routes(
    no_match: &envoy_types::pb::xds::r#type::matcher::v3::matcher::OnMatch,
    chains: &BTreeMap<String, (usize, &lds::FilterChain)>,
    chain_keys: &mut BTreeMap<String, ServiceKey>,
    out: &mut AuthorityMap,
) -> Result<(), String> {
    use envoy_types::pb::xds::r#type::matcher::v3::matcher::{
        MatcherType, matcher_tree::TreeType, on_match::OnMatch,
    };
    const AT: &str = "filter_chain_matcher.on_no_match";
    let tree = match &no_match.on_match {
        Some(OnMatch::Matcher(m)) => match &m.matcher_type {
            Some(MatcherType::MatcherTree(t)) => Some(t),
            _ => None,
        },
        _ => None,
    };
    let input = |t: &envoy_types::pb::xds::r#type::matcher::v3::matcher::MatcherTree| {
        t.input
            .as_ref()
            .and_then(|i| i.typed_config.as_ref())
            .map(|a| a.type_url.clone())
            .unwrap_or_default()
    };
    let Some(tree) = tree.filter(|t| input(t) == DESTINATION_IP) else {
        out.skipped.push(format!(
            "{AT}: not a matcher on the destination IP: no VIP is served"
        ));
        return Ok(());
    };
    let Some(TreeType::CustomMatch(custom)) = &tree.tree_type else {
        out.skipped
            .push(format!("{AT}: not an IP range matcher: no VIP is served"));
        return Ok(());
    };
    let ip: IpMatcher = match custom.typed_config.as_ref() {
        Some(a) if a.type_url == IP_MATCHER => {
            decode(a, IP_MATCHER).map_err(|e| format!("{AT}: {e}"))?
        }
        other => {
            out.skipped.push(format!(
                "{AT}: custom_match {}: not an IPMatcher: no VIP is served",
                other.map_or("without typed_config", |a| a.type_url.as_str())
            ));
            return Ok(());
        }
    };
    let mut vips = Vec::new();
    for (r, rm) in ip.range_matchers.iter().enumerate() {
        let at = format!("{AT}: range_matchers[{r}]");
        let mut ranges = Vec::new();
        for (k, c) in rm.ranges.iter().enumerate() {
            let addr: IpAddr = c.address_prefix.parse().map_err(|_| {
                format!(
                    "{at}.ranges[{k}]: {:?} is not an IP address",
                    c.address_prefix
                )
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len = c.prefix_len.as_ref().map_or(0, |l| l.value);
            if len > max {
                return Err(format!(
                    "{at}.ranges[{k}]: prefix length {len} is too long for {addr}"
                ));
            }
            ranges.push(Cidr {
                addr,
                len: len as u8,
            });
        }
        if rm.exclusive {
            out.skipped
                .push(format!("{at}: exclusive: read as a non-exclusive range"));
        }
        let ports = match rm.on_match.as_ref().and_then(|m| m.on_match.as_ref()) {
            Some(OnMatch::Matcher(m)) => match &m.matcher_type {
                Some(MatcherType::MatcherTree(t)) if input(t) == DESTINATION_PORT => {
                    match &t.tree_type {
                        Some(TreeType::ExactMatchMap(m)) => Some(&m.map),
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        };
        let Some(ports) = ports else {
            out.skipped.push(format!(
                "{at}: not an exact map on the destination port: skipped"
            ));
            continue;
        };
        let mut keys: Vec<&String> = ports.keys().collect();
        keys.sort();
        for port in keys {
            let chain = match &ports[port].on_match {
                Some(OnMatch::Action(a)) => &a.name,
                Some(OnMatch::Matcher(m)) => {
                    // A Service with a waypoint: its VIP port dispatches on the source as
                    // its name does.
                    let Ok(p) = port.parse::<u16>() else {
                        out.skipped.push(format!("{at}: {port:?} is not a port"));
                        continue;
                    };
                    let routes = std::sync::Arc::new(source_routes(
                        m,
                        &format!(
                            "{at}.on_match.matcher.matcher_tree.exact_match_map.map[{port}].matcher"
                        ),
                        chains,
                        chain_keys,
                        out,
                    )?);
                    vips.extend(ranges.iter().map(|range| VipRoute {
                        range: *range,
                        port: p,
                        target: TunnelTarget::BySource(routes.clone()),
                    }));
                    continue;
                }
                None => {
                    out.skipped.push(format!(
                        "{at}: port {port}: not an action naming a filter chain"
                    ));
                    continue;
                }
            };
            if !chains.contains_key(chain) {
                return Err(format!(
                    "{at}: port {port} names filter chain {chain:?}, which the listener does not have"
                ));
            }
            let Ok(port) = port.parse::<u16>() else {
                out.skipped.push(format!("{at}: {port:?} is not a port"));
                continue;
            };
            let Some(service) = chain_keys.get(chain) else {
                out.skipped.push(format!(
                    "{at}: port {port}: chain {chain} is served under no <host>:<port>"
                ));
                continue;
            };
            vips.extend(ranges.iter().map(|range| VipRoute {
                range: *range,
                port,
                target: TunnelTarget::Service(service.clone()),
            }));
        }
    }
    // The most specific range first, as Envoy's trie picks it.
    vips.sort_by_key(|v| std::cmp::Reverse(v.range.len));
    out.vips = vips;
    Ok(())
}

/// Reads one CDS resource of the waypoint stream: as the router's (an `ORIGINAL_DST`
/// cluster such as `forward_inner_connect` is acknowledged and has no endpoints).
pub fn cluster(any: &Any) -> Result<(String, Read<XCluster>), String> {
    super::cluster(any)
}

/// Reads one EDS resource of the waypoint stream: validated as the router's, then only
/// the HEALTHY internal addresses that carry `original_dst.local` become endpoints.
pub fn endpoints(any: &Any) -> Result<(String, Read<XEndpoints>), String> {
    let cla: eds::ClusterLoadAssignment = decode(any, ENDPOINTS)?;
    if cla.cluster_name.is_empty() {
        return Err(
            "a ClusterLoadAssignment: cluster_name: must not be empty (Envoy: string min_len 1)"
                .into(),
        );
    }
    let at = |e: String| format!("ClusterLoadAssignment {}: {e}", cla.cluster_name);
    // Everything Envoy checks of the resource, as on the router stream.
    read_endpoints(&cla, false).map_err(at)?;
    let mut out = XEndpoints::default();
    for (g, group) in cla.endpoints.iter().enumerate() {
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
            let field = format!("endpoints[{g}].lb_endpoints[{e}]");
            let internal = match &lb.host_identifier {
                Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) => matches!(
                    ep.address.as_ref().and_then(|a| a.address.as_ref()),
                    Some(envoy_types::pb::envoy::config::core::v3::address::Address::EnvoyInternalAddress(_))
                ),
                _ => false,
            };
            // A socket address is a pod that does not take HBONE (its application
            // port): never a tunnel's destination. Only HEALTHY endpoints are dialled.
            let healthy = lb.health_status
                == envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy as i32;
            if !internal || !healthy {
                out.left_out += 1;
                continue;
            }
            let local = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(ORIGINAL_DST))
                .and_then(|s| s.fields.get("local"))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.as_str()),
                    _ => None,
                });
            let Some(local) = local else {
                out.left_out += 1;
                continue;
            };
            let Ok(target) = local.parse::<SocketAddr>() else {
                return Err(at(format!(
                    "{field}.metadata.filter_metadata[{ORIGINAL_DST}].local: {local:?} is not <ip>:<port>"
                )));
            };
            let endpoint_weight = weight(
                &format!("{field}.load_balancing_weight"),
                &lb.load_balancing_weight,
            )
            .map_err(at)?;
            out.endpoints.push(Endpoint {
                address: EndpointAddress::Ip(target.ip()),
                port: target.port(),
                tls_disabled: false,
                // Listed for the ambient east-west gateway only: a tunnel destination.
                reach: Reach::Tunnels,
                labels: BTreeMap::from([(TUNNEL_LABEL.to_string(), "http".to_string())]),
                locality: locality.clone(),
                network: String::new(),
                weight: endpoint_weight.unwrap_or(1),
                service_account: None,
                priority: Some(group.priority),
                locality_weight: None,
            });
        }
    }
    Ok((
        cla.cluster_name.clone(),
        Read {
            value: out,
            problems: Vec::new(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::super::CLUSTER;
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3 as cds;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::google::protobuf::{Struct, Value as PbValue};
    use prost::Message;

    fn any<M: Message>(url: &str, m: &M) -> Any {
        Any {
            type_url: url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn internal(ip_port: &str, health: core::HealthStatus, with_meta: bool) -> eds::LbEndpoint {
        let meta = with_meta.then(|| core::Metadata {
            filter_metadata: [(
                ORIGINAL_DST.to_string(),
                Struct {
                    fields: [(
                        "local".to_string(),
                        PbValue {
                            kind: Some(Kind::StringValue(ip_port.into())),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        });
        eds::LbEndpoint {
            host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::EnvoyInternalAddress(
                        core::EnvoyInternalAddress {
                            address_name_specifier: Some(
                                core::envoy_internal_address::AddressNameSpecifier::ServerListenerName(
                                    "forward_inner_connect".into(),
                                ),
                            ),
                            endpoint_id: ip_port.into(),
                        },
                    )),
                }),
                ..Default::default()
            })),
            health_status: health as i32,
            metadata: meta,
            ..Default::default()
        }
    }

    fn socket(ip: &str, port: u32) -> eds::LbEndpoint {
        eds::LbEndpoint {
            host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: core::HealthStatus::Healthy as i32,
            ..Default::default()
        }
    }

    #[test]
    fn only_healthy_internal_addresses_with_their_pod_address_are_hbone_endpoints() {
        let cla = eds::ClusterLoadAssignment {
            cluster_name: "inbound-vip|80|tcp|echo.echo.svc.cluster.local".into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![
                    internal("10.0.0.21:8080", core::HealthStatus::Healthy, true),
                    socket("10.0.0.22", 8080),
                    internal("10.0.0.23:8080", core::HealthStatus::Healthy, true),
                    internal("10.0.0.25:8080", core::HealthStatus::Unhealthy, true),
                    internal("10.0.0.26:8080", core::HealthStatus::Unknown, true),
                    internal("10.0.0.27:8080", core::HealthStatus::Healthy, false),
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (name, read) = endpoints(&any(ENDPOINTS, &cla)).expect("valid");
        assert_eq!(name, cla.cluster_name);
        let got: Vec<String> = read.value.endpoints.iter().map(|e| e.authority()).collect();
        assert_eq!(got, ["10.0.0.21:8080", "10.0.0.23:8080"]);
        assert!(read.value.endpoints.iter().all(|e| e.accepts_hbone()));
        assert_eq!(read.value.left_out, 4);

        let mut bad = cla.clone();
        bad.endpoints[0].lb_endpoints = vec![internal("pod-a", core::HealthStatus::Healthy, true)];
        let e = endpoints(&any(ENDPOINTS, &bad)).err().expect("rejected");
        assert!(
            e.contains("inbound-vip|80|tcp|echo.echo.svc.cluster.local")
                && e.contains("original_dst")
                && e.contains("\"pod-a\""),
            "{e}"
        );
    }

    #[test]
    fn an_original_dst_cluster_is_acknowledged_without_endpoints() {
        let c = cds::Cluster {
            name: "forward_inner_connect".into(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::OriginalDst as i32,
            )),
            ..Default::default()
        };
        let (_, read) = cluster(&any(CLUSTER, &c)).expect("acknowledged");
        assert!(read.value.eds_name.is_none() && read.value.inline.is_empty());
        assert!(read.value.notes.iter().any(|n| n.contains("ORIGINAL_DST")));
    }

    const VIP: &str = "inbound-vip|80|tcp|echo.echo.svc.cluster.local";

    fn typed(url: &str, m: &impl Message) -> Option<lds::filter::ConfigType> {
        Some(lds::filter::ConfigType::TypedConfig(any(url, m)))
    }

    /// `connect_terminate` as istiod builds it (docs/ambient-xds.md), with `alpn`.
    fn connect_terminate(alpn: &[&str]) -> lds::Listener {
        use envoy_types::pb::envoy::r#type::matcher::v3::{
            StringMatcher, string_matcher::MatchPattern,
        };
        use tls::common_tls_context::{
            CombinedCertificateValidationContext, ValidationContextType,
        };
        let sds = |name: &str| tls::SdsSecretConfig {
            name: name.into(),
            ..Default::default()
        };
        let ctx = tls::DownstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
                tls_params: Some(tls::TlsParameters {
                    tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
                    tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
                    ..Default::default()
                }),
                tls_certificate_sds_secret_configs: vec![sds("default")],
                validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(tls::CertificateValidationContext {
                            match_typed_subject_alt_names: vec![tls::SubjectAltNameMatcher {
                                san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(MatchPattern::Prefix(
                                        "spiffe://cluster.local/".into(),
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
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
        let route = rds::Route {
            r#match: Some(rds::RouteMatch {
                path_specifier: Some(rds::route_match::PathSpecifier::ConnectMatcher(
                    Default::default(),
                )),
                ..Default::default()
            }),
            action: Some(rds::route::Action::Route(rds::RouteAction {
                cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(
                    "main_internal".into(),
                )),
                ..Default::default()
            })),
            ..Default::default()
        };
        let manager = hcm::HttpConnectionManager {
            stat_prefix: "connect_terminate".into(),
            upgrade_configs: vec![hcm::http_connection_manager::UpgradeConfig {
                upgrade_type: "CONNECT".into(),
                ..Default::default()
            }],
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
                rds::RouteConfiguration {
                    virtual_hosts: vec![rds::VirtualHost {
                        name: "default".into(),
                        domains: vec!["*".into()],
                        routes: vec![route],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            http_filters: vec![hcm::HttpFilter {
                name: "connect_authority".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        lds::Listener {
            name: "connect_terminate".into(),
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(15008)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![lds::FilterChain {
                transport_socket: Some(core::TransportSocket {
                    name: "tls".into(),
                    config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
                        TLS_SOCKET_TYPE,
                        &ctx,
                    ))),
                }),
                filters: vec![lds::Filter {
                    name: HCM.into(),
                    config_type: typed(HCM_TYPE, &manager),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// `main_internal`: `echo...:80` → chain `chain` (a tcp_proxy to [`VIP`]).
    fn main_internal(chain: &str) -> lds::Listener {
        use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
        use envoy_types::pb::xds::r#type::matcher::v3::{Matcher, matcher};
        let action = matcher::OnMatch {
            on_match: Some(matcher::on_match::OnMatch::Action(
                envoy_types::pb::xds::core::v3::TypedExtensionConfig {
                    name: chain.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let proxy = tcp::TcpProxy {
            stat_prefix: VIP.into(),
            cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(VIP.into())),
            ..Default::default()
        };
        lds::Listener {
            name: "main_internal".into(),
            listener_specifier: Some(lds::listener::ListenerSpecifier::InternalListener(
                Default::default(),
            )),
            filter_chain_matcher: Some(Matcher {
                matcher_type: Some(matcher::MatcherType::MatcherTree(matcher::MatcherTree {
                    tree_type: Some(matcher::matcher_tree::TreeType::ExactMatchMap(
                        matcher::matcher_tree::MatchMap {
                            map: [("echo.echo.svc.cluster.local:80".to_string(), action)].into(),
                        },
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            filter_chains: vec![lds::FilterChain {
                name: VIP.into(),
                filters: vec![lds::Filter {
                    name: TCP_PROXY.into(),
                    config_type: typed(TCP_PROXY_TYPE, &proxy),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// `listener` with istiod's fallback on the destination address: each of `ranges`
    /// and `port` to `chain`.
    fn with_vips(
        mut l: lds::Listener,
        ranges: &[(&str, u32)],
        port: &str,
        chain: &str,
    ) -> lds::Listener {
        use envoy_types::pb::xds::core::v3::{CidrRange, TypedExtensionConfig};
        use envoy_types::pb::xds::r#type::matcher::v3::{Matcher, matcher};
        let input = |url: &str| TypedExtensionConfig {
            name: "input".into(),
            typed_config: Some(Any {
                type_url: url.into(),
                value: Vec::new(),
            }),
        };
        let to_chain = matcher::OnMatch {
            on_match: Some(matcher::on_match::OnMatch::Action(TypedExtensionConfig {
                name: chain.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let ports = Matcher {
            matcher_type: Some(matcher::MatcherType::MatcherTree(matcher::MatcherTree {
                input: Some(input(DESTINATION_PORT)),
                tree_type: Some(matcher::matcher_tree::TreeType::ExactMatchMap(
                    matcher::matcher_tree::MatchMap {
                        map: [(port.to_string(), to_chain)].into(),
                    },
                )),
            })),
            ..Default::default()
        };
        let ip = IpMatcher {
            range_matchers: vec![IpRangeMatcher {
                ranges: ranges
                    .iter()
                    .map(|(a, len)| CidrRange {
                        address_prefix: a.to_string(),
                        prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value {
                            value: *len,
                        }),
                    })
                    .collect(),
                on_match: Some(matcher::OnMatch {
                    on_match: Some(matcher::on_match::OnMatch::Matcher(Box::new(ports))),
                    ..Default::default()
                }),
                exclusive: false,
            }],
        };
        let by_ip = Matcher {
            matcher_type: Some(matcher::MatcherType::MatcherTree(matcher::MatcherTree {
                input: Some(input(DESTINATION_IP)),
                tree_type: Some(matcher::matcher_tree::TreeType::CustomMatch(
                    TypedExtensionConfig {
                        name: "ip".into(),
                        typed_config: Some(any(IP_MATCHER, &ip)),
                    },
                )),
            })),
            ..Default::default()
        };
        if let Some(m) = l.filter_chain_matcher.as_mut() {
            m.on_no_match = Some(Box::new(matcher::OnMatch {
                on_match: Some(matcher::on_match::OnMatch::Matcher(Box::new(by_ip))),
                ..Default::default()
            }));
        }
        l
    }

    /// The fallback on the destination address: `<VIP>:<port>` to the service port whose
    /// chain the range names; a range that is no address, or a chain the listener lacks,
    /// is rejected as Envoy rejects it.
    #[test]
    fn the_vip_fallback_routes_a_services_vip_and_port_to_its_service_port() {
        let l = with_vips(
            main_internal(VIP),
            &[("10.96.0.10", 32), ("fd00::10", 128)],
            "80",
            VIP,
        );
        let (_, read) = listener(&any(LISTENER, &l)).expect("valid");
        let Listener::Authorities(m) = read.value else {
            panic!("{:?}", read.value)
        };
        let echo = ServiceKey::new("echo.echo.svc.cluster.local", 80);
        let route = |addr: &str, len| VipRoute {
            range: Cidr {
                addr: addr.parse().unwrap(),
                len,
            },
            port: 80,
            target: TunnelTarget::Service(echo.clone()),
        };
        // The most specific range first.
        assert_eq!(m.vips, [route("fd00::10", 128), route("10.96.0.10", 32)]);
        assert!(m.skipped.is_empty(), "{:?}", m.skipped);

        let e = listener(&any(
            LISTENER,
            &with_vips(main_internal(VIP), &[("10.96.0.10", 32)], "80", "nope"),
        ))
        .err()
        .expect("rejected");
        assert!(e.contains("on_no_match") && e.contains("\"nope\""), "{e}");
        let e = listener(&any(
            LISTENER,
            &with_vips(main_internal(VIP), &[("10.96.0", 32)], "80", VIP),
        ))
        .err()
        .expect("rejected");
        assert!(
            e.contains("ranges[0]") && e.contains("not an IP address"),
            "{e}"
        );
    }

    /// connect_terminate and main_internal make one HBONE server whose hosts are the
    /// map's, and the `inbound-vip` cluster's HBONE endpoints the service port's.
    #[test]
    fn connect_terminate_and_the_authority_map_make_the_hbone_listener() {
        use super::super::{Assembly, Held};
        use crate::model::{HostMatch, ServerTlsMode};
        let mut held = Held::default();
        let vip = with_vips(main_internal(VIP), &[("10.96.0.10", 32)], "80", VIP);
        for l in [connect_terminate(&["h2"]), vip] {
            let (name, read) = listener(&any(LISTENER, &l)).expect("valid");
            assert!(read.problems.is_empty(), "{:?}", read.problems);
            held.listeners.insert(name, read.value);
        }
        let Some(Listener::Hbone(h)) = held.listeners.get("connect_terminate") else {
            panic!("{:?}", held.listeners)
        };
        assert_eq!(h.cluster, "main_internal");
        assert_eq!(h.rbac.len(), 1, "the SAN prefix is an ALLOW filter");
        assert!(h.ignored_filters.contains("connect_authority"));
        let eds_cluster = cds::Cluster {
            name: VIP.into(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        };
        let (name, read) = cluster(&any(CLUSTER, &eds_cluster)).expect("valid");
        held.clusters.insert(name, read.value);
        assert_eq!(held.eds_names(), [VIP.to_string()].into());
        let cla = eds::ClusterLoadAssignment {
            cluster_name: VIP.into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: vec![
                    internal("10.0.0.21:8080", core::HealthStatus::Healthy, true),
                    socket("10.0.0.22", 8080),
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (name, read) = endpoints(&any(ENDPOINTS, &cla)).expect("valid");
        held.endpoints.insert(name, read.value);

        let mut assembly = Assembly::default();
        assembly.rebuild(&held);
        assert_eq!(assembly.listeners.len(), 1);
        let l = &assembly.listeners[0];
        assert_eq!(l.addr.to_string(), "0.0.0.0:15008");
        assert_eq!(l.servers.len(), 1);
        assert_eq!(l.servers[0].mode, ServerTlsMode::Hbone);
        assert_eq!(
            l.servers[0].hosts.iter().cloned().collect::<Vec<_>>(),
            [HostMatch::Exact("echo.echo.svc.cluster.local".into())]
        );
        let vips: Vec<(String, u16, &str)> = l.servers[0]
            .vips
            .iter()
            .map(|v| match &v.target {
                TunnelTarget::Service(k) => (v.range.addr.to_string(), v.port, k.host.as_str()),
                TunnelTarget::BySource(_) => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(
            vips,
            [("10.96.0.10".to_string(), 80, "echo.echo.svc.cluster.local")]
        );
        let service = &assembly.services[&ServiceKey::new("echo.echo.svc.cluster.local", 80)];
        let dialled: Vec<String> = service.endpoints.iter().map(|e| e.authority()).collect();
        assert_eq!(dialled, ["10.0.0.21:8080"]);
        assert!(assembly.awaiting_endpoints(&held).is_empty());
    }

    /// `connect_terminate` with `options` as its `http2_protocol_options`.
    fn with_http2(options: envoy_core::Http2ProtocolOptions) -> lds::Listener {
        let mut l = connect_terminate(&["h2"]);
        let chain = &mut l.filter_chains[0];
        let Some(lds::filter::ConfigType::TypedConfig(a)) = &chain.filters[0].config_type else {
            unreachable!("built above")
        };
        let mut manager: hcm::HttpConnectionManager = decode(a, HCM_TYPE).unwrap();
        manager.http2_protocol_options = Some(options);
        chain.filters[0].config_type = typed(HCM_TYPE, &manager);
        l
    }

    fn keepalive(
        interval: Option<(i64, i32)>,
        timeout: Option<(i64, i32)>,
    ) -> envoy_core::KeepaliveSettings {
        let pb = |(seconds, nanos)| envoy_types::pb::google::protobuf::Duration { seconds, nanos };
        envoy_core::KeepaliveSettings {
            interval: interval.map(pb),
            timeout: timeout.map(pb),
            ..Default::default()
        }
    }

    #[test]
    fn istiods_http2_options_are_the_hbone_servers_and_left_out_ones_strait_defaults() {
        use envoy_types::pb::google::protobuf::UInt32Value;
        let read = |options| match listener(&any(LISTENER, &with_http2(options))) {
            Ok((
                _,
                Read {
                    value: Listener::Hbone(h),
                    ..
                },
            )) => Ok(h.http2),
            Ok((_, other)) => panic!("{:?}", other.value),
            Err(e) => Err(e),
        };
        // What istiod sends (listener_waypoint.go): 100 streams, keep-alive 10 s / 20 s.
        let istiods = envoy_core::Http2ProtocolOptions {
            allow_connect: true,
            max_concurrent_streams: Some(UInt32Value { value: 100 }),
            connection_keepalive: Some(keepalive(Some((10, 0)), Some((20, 0)))),
            ..Default::default()
        };
        assert_eq!(read(istiods.clone()), Ok(Http2Settings::default()));
        let other = envoy_core::Http2ProtocolOptions {
            max_concurrent_streams: Some(UInt32Value { value: 7 }),
            initial_stream_window_size: Some(UInt32Value { value: 65535 }),
            initial_connection_window_size: Some(UInt32Value {
                value: i32::MAX as u32,
            }),
            connection_keepalive: Some(keepalive(None, Some((0, 1_000_000)))),
            ..istiods.clone()
        };
        assert_eq!(
            read(other),
            Ok(Http2Settings {
                max_concurrent_streams: 7,
                initial_stream_window_size: 65535,
                initial_connection_window_size: i32::MAX as u32,
                keepalive_interval: Http2Settings::default().keepalive_interval,
                keepalive_timeout: Duration::from_millis(1),
            })
        );
        assert_eq!(
            read(envoy_core::Http2ProtocolOptions {
                allow_connect: true,
                ..Default::default()
            }),
            Ok(Http2Settings::default())
        );
        // Envoy's validation rules, each refused naming its field.
        let u = |value| Some(UInt32Value { value });
        let refused = [
            (
                envoy_core::Http2ProtocolOptions {
                    max_concurrent_streams: u(0),
                    ..istiods.clone()
                },
                "http2_protocol_options.max_concurrent_streams: 0 is outside [1, 2147483647]",
            ),
            (
                envoy_core::Http2ProtocolOptions {
                    max_concurrent_streams: u(1 << 31),
                    ..istiods.clone()
                },
                "http2_protocol_options.max_concurrent_streams: 2147483648 is outside",
            ),
            (
                envoy_core::Http2ProtocolOptions {
                    initial_stream_window_size: u(65534),
                    ..istiods.clone()
                },
                "http2_protocol_options.initial_stream_window_size: 65534 is outside [65535, 2147483647]",
            ),
            (
                envoy_core::Http2ProtocolOptions {
                    initial_connection_window_size: u(u32::MAX),
                    ..istiods.clone()
                },
                "http2_protocol_options.initial_connection_window_size: 4294967295 is outside",
            ),
            (
                envoy_core::Http2ProtocolOptions {
                    connection_keepalive: Some(keepalive(Some((10, 0)), None)),
                    ..istiods.clone()
                },
                "http2_protocol_options.connection_keepalive.timeout: required",
            ),
            (
                envoy_core::Http2ProtocolOptions {
                    connection_keepalive: Some(keepalive(Some((10, 0)), Some((0, 999_999)))),
                    ..istiods.clone()
                },
                "http2_protocol_options.connection_keepalive.timeout: 0s 999999ns is below 1ms",
            ),
            (
                envoy_core::Http2ProtocolOptions {
                    connection_keepalive: Some(keepalive(Some((-1, 0)), Some((20, 0)))),
                    ..istiods.clone()
                },
                "http2_protocol_options.connection_keepalive.interval: -1s 0ns is below 1ms",
            ),
        ];
        for (options, why) in refused {
            let e = read(options).expect_err(why);
            assert!(
                e.starts_with("listener connect_terminate: filter_chains[0]: "),
                "{e}"
            );
            assert!(e.contains(why), "{e}\nwanted: {why}");
        }
    }

    #[test]
    fn what_the_hbone_listener_cannot_serve_is_named() {
        // ALPN without h2: acknowledged, not served, with why.
        let (_, read) = listener(&any(LISTENER, &connect_terminate(&["http/1.1"]))).expect("valid");
        match read.value {
            Listener::NotServed(why) => assert!(why.contains("without h2"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A map entry naming a chain the listener lacks: rejected, as Envoy rejects it.
        let e = listener(&any(LISTENER, &main_internal("no-such-chain")))
            .err()
            .expect("rejected");
        assert!(
            e.contains("main_internal")
                && e.contains("filter_chain_matcher")
                && e.contains("no-such-chain"),
            "{e}"
        );
    }

    const WP: &str = "inbound-vip|15008|tcp|waypoint.echo.svc.cluster.local";

    /// istiod's entry for a Service with a waypoint: a matcher on the filter state
    /// `io.istio.source`, `waypoint` and `gateway` to the Service's chain, anything else to
    /// the waypoint's (`wp_cluster` its tcp_proxy's cluster).
    fn by_source(
        input: &str,
        values: &[(&str, &str)],
        otherwise: &str,
    ) -> envoy_types::pb::xds::r#type::matcher::v3::Matcher {
        use envoy_types::pb::envoy::extensions::matching::common_inputs::network::v3::FilterStateInput;
        use envoy_types::pb::xds::core::v3::TypedExtensionConfig;
        use envoy_types::pb::xds::r#type::matcher::v3::{Matcher, matcher};
        let to = |chain: &str| matcher::OnMatch {
            on_match: Some(matcher::on_match::OnMatch::Action(TypedExtensionConfig {
                name: chain.into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        Matcher {
            matcher_type: Some(matcher::MatcherType::MatcherTree(matcher::MatcherTree {
                input: Some(TypedExtensionConfig {
                    name: "request-source-filter-state".into(),
                    typed_config: Some(any(
                        input,
                        &FilterStateInput {
                            key: "io.istio.source".into(),
                            field: String::new(),
                        },
                    )),
                }),
                tree_type: Some(matcher::matcher_tree::TreeType::ExactMatchMap(
                    matcher::matcher_tree::MatchMap {
                        map: values.iter().map(|(v, c)| (v.to_string(), to(c))).collect(),
                    },
                )),
            })),
            on_no_match: Some(Box::new(to(otherwise))),
        }
    }

    /// [`main_internal`] whose entry for echo is `m`, with the waypoint's chain (a
    /// tcp_proxy to `wp_cluster`) beside echo's.
    fn dispatched(
        m: envoy_types::pb::xds::r#type::matcher::v3::Matcher,
        wp_cluster: &str,
    ) -> lds::Listener {
        use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
        use envoy_types::pb::xds::r#type::matcher::v3::matcher;
        let mut l = main_internal(VIP);
        if let Some(matcher::MatcherType::MatcherTree(t)) = l
            .filter_chain_matcher
            .as_mut()
            .and_then(|f| f.matcher_type.as_mut())
            && let Some(matcher::matcher_tree::TreeType::ExactMatchMap(map)) = t.tree_type.as_mut()
        {
            map.map.insert(
                "echo.echo.svc.cluster.local:80".into(),
                matcher::OnMatch {
                    on_match: Some(matcher::on_match::OnMatch::Matcher(Box::new(m))),
                    ..Default::default()
                },
            );
        }
        let proxy = tcp::TcpProxy {
            stat_prefix: WP.into(),
            cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(wp_cluster.into())),
            ..Default::default()
        };
        l.filter_chains.push(lds::FilterChain {
            name: WP.into(),
            filters: vec![lds::Filter {
                name: TCP_PROXY.into(),
                config_type: typed(TCP_PROXY_TYPE, &proxy),
            }],
            ..Default::default()
        });
        l
    }

    /// A Service with a waypoint: its name dispatches on the source, each value to the
    /// service port of the chain it names (the waypoint's keyed by its cluster); the
    /// shapes Envoy rejects, and those strait does not serve, are rejected naming the field.
    #[test]
    fn a_source_dispatch_is_read_and_other_shapes_are_rejected_by_name() {
        let echo = ServiceKey::new("echo.echo.svc.cluster.local", 80);
        let waypoint = ServiceKey::new("waypoint.echo.svc.cluster.local", 15008);
        let istiod = by_source(
            FILTER_STATE_INPUT,
            &[("waypoint", VIP), ("gateway", VIP)],
            WP,
        );
        let (_, read) = listener(&any(LISTENER, &dispatched(istiod.clone(), WP))).expect("valid");
        let Listener::Authorities(m) = read.value else {
            panic!("{:?}", read.value)
        };
        let routes = &m.sources[&echo];
        assert_eq!(routes.state_key, "io.istio.source");
        assert_eq!(
            routes.exact,
            BTreeMap::from([
                ("gateway".to_string(), echo.clone()),
                ("waypoint".to_string(), echo.clone())
            ])
        );
        assert_eq!(routes.otherwise, Some(waypoint.clone()));
        assert_eq!(m.names, BTreeSet::from([echo.clone()]));
        let clusters: Vec<(&ServiceKey, &str)> = m
            .routes
            .iter()
            .map(|(k, r)| (k, r.cluster.as_str()))
            .collect();
        assert_eq!(clusters, [(&echo, VIP), (&waypoint, WP)]);

        let reject = |l: lds::Listener, words: &[&str]| {
            let e = listener(&any(LISTENER, &l)).err().expect("rejected");
            assert!(words.iter().all(|w| e.contains(w)), "{words:?}: {e}");
        };
        let at = "map[echo.echo.svc.cluster.local:80].matcher";
        // Another input: valid, not served.
        reject(
            dispatched(by_source(DESTINATION_PORT, &[("waypoint", VIP)], WP), WP),
            &[
                at,
                "matcher_tree.input",
                "DestinationPortInput",
                "not served",
            ],
        );
        // A chain the listener lacks: Envoy rejects it.
        reject(
            dispatched(
                by_source(FILTER_STATE_INPUT, &[("waypoint", "nope")], WP),
                WP,
            ),
            &[at, "exact_match_map.map[waypoint]", "\"nope\""],
        );
        // A chain whose service port strait cannot tell.
        reject(
            dispatched(istiod.clone(), "outbound|15008||waypoint"),
            &[
                at,
                "on_no_match",
                "outbound|15008||waypoint",
                "service port",
            ],
        );
        // A custom match and a matcher list: not served.
        let mut custom = istiod.clone();
        if let Some(envoy_types::pb::xds::r#type::matcher::v3::matcher::MatcherType::MatcherTree(
            t,
        )) = custom.matcher_type.as_mut()
        {
            t.tree_type = Some(
                envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_tree::TreeType::CustomMatch(
                    envoy_types::pb::xds::core::v3::TypedExtensionConfig {
                        name: "trie".into(),
                        ..Default::default()
                    },
                ),
            );
        }
        reject(dispatched(custom, WP), &[at, "custom_match", "not served"]);
        let mut list = istiod;
        list.matcher_type = Some(
            envoy_types::pb::xds::r#type::matcher::v3::matcher::MatcherType::MatcherList(
                Default::default(),
            ),
        );
        reject(dispatched(list, WP), &[at, "matcher_list", "not served"]);
    }

    /// The filter state a `set_filter_state` filter of `connect_terminate` sets from a
    /// request header is the one a source dispatch reads.
    #[test]
    fn connect_terminate_names_the_header_behind_each_filter_state() {
        use envoy_types::pb::envoy::config::core::v3::{
            DataSource, SubstitutionFormatString, data_source, substitution_format_string,
        };
        use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3::{
            FilterStateValue, filter_state_value,
        };
        use envoy_types::pb::envoy::extensions::filters::http::set_filter_state::v3 as sfs;
        let value = |key: &str, format: &str| FilterStateValue {
            key: Some(filter_state_value::Key::ObjectKey(key.into())),
            value: Some(filter_state_value::Value::FormatString(
                SubstitutionFormatString {
                    format: Some(substitution_format_string::Format::TextFormatSource(
                        DataSource {
                            specifier: Some(data_source::Specifier::InlineString(format.into())),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                },
            )),
            factory_key: "istio.hashable_string".into(),
            ..Default::default()
        };
        let config = sfs::Config {
            on_request_headers: vec![
                value("io.istio.source", "%REQ(x-istio-source)%"),
                value("io.istio.connect_authority", "%REQ(:AUTHORITY)%"),
                value("io.istio.peer_principal", "%DOWNSTREAM_PEER_URI_SAN%"),
            ],
            ..Default::default()
        };
        let manager = hcm::HttpConnectionManager {
            http_filters: vec![hcm::HttpFilter {
                name: "request_source".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    SET_FILTER_STATE,
                    &config,
                ))),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            state_headers(&manager).expect("valid"),
            BTreeMap::from([("io.istio.source".to_string(), "x-istio-source".to_string())])
        );
        let mut bad = manager;
        if let Some(hcm::http_filter::ConfigType::TypedConfig(a)) =
            &mut bad.http_filters[0].config_type
        {
            a.value = vec![0xff];
        }
        let e = state_headers(&bad).expect_err("rejected");
        assert!(e.contains("http_filters[0] (request_source)"), "{e}");
    }
}
