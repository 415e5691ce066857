//! VirtualService: the `tls` and `tcp` routes of Istio's gateways (istio/istio
//! `pilot/pkg/networking/core/gateway.go`, `buildGatewayNetworkFiltersFromTLSRoutes`):
//! reading the document, binding it to Gateway servers, and resolving its destinations.
//!
//! Rules, as istiod applies them on a gateway:
//! - a VirtualService applies to a server when its `gateways` name the Gateway
//!   (`<namespace>/<name>`, or a bare name in the VirtualService's own namespace) and its
//!   `hosts` intersect the server's `hosts`;
//! - only `match.port` (compared with the server's port) and `match.gateways` are
//!   evaluated; `sourceLabels`, `destinationSubnets` and `sourceNamespace` are ignored on a
//!   gateway. Several `match` entries are OR-ed; an empty list matches;
//! - on a PASSTHROUGH server each `tls[].match[]` is its own route on its `sniHosts` (at
//!   run time the most specific match wins, as Envoy matches `server_names`); a second
//!   route for an SNI already taken on the port is skipped with a warning;
//! - on an ISTIO_MUTUAL server only `tcp` rules apply, and the first that matches wins;
//! - weights of 0 are dropped; a single destination without a weight takes everything.

use std::collections::{BTreeMap, HashMap};

use crate::model::{Destination, HostMatch, L4Route, ServerTlsMode, ServiceKey, ServicePort};

use super::diagnostics::{Loc, Sink};
use super::document::Meta;
use super::fields::{self, Fields, Path};
use super::yaml::Node;

#[derive(Debug)]
pub(crate) struct VirtualServiceDoc {
    pub meta: Meta,
    pub hosts: Vec<HostMatch>,
    /// As written: `<namespace>/<name>`, a bare name, or `mesh`.
    pub gateways: Vec<String>,
    pub tls: Vec<RuleDoc>,
    pub tcp: Vec<RuleDoc>,
}

/// One `tls[]` or `tcp[]` rule.
#[derive(Debug)]
pub(crate) struct RuleDoc {
    pub matches: Vec<MatchDoc>,
    pub route: Vec<RouteDoc>,
}

#[derive(Debug)]
pub(crate) struct MatchDoc {
    pub sni_hosts: Vec<(String, Loc)>,
    pub port: Option<u16>,
    pub gateways: Vec<String>,
}

/// One `route[]` entry: `destination` and `weight`.
#[derive(Debug)]
pub(crate) struct RouteDoc {
    pub host: String,
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: Option<u32>,
    pub loc: Loc,
}

/// Match fields that select by the client, which a gateway does not evaluate.
const IGNORED_ON_GATEWAYS: [&str; 3] = ["sourceLabels", "destinationSubnets", "sourceNamespace"];

pub(crate) fn read(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<VirtualServiceDoc> {
    let root = *spec.path();
    let hosts = match spec.get("hosts") {
        Some(n) => fields::strings(sink, n, &root.key("hosts"))
            .iter()
            .map(|h| HostMatch::parse(&qualified(h, &meta.namespace)))
            .collect(),
        None => Vec::new(),
    };
    let gateways = match spec.get("gateways") {
        Some(n) => fields::strings(sink, n, &root.key("gateways")),
        None => Vec::new(),
    };
    let tls = rules(sink, &mut spec, &root, "tls");
    let tcp = rules(sink, &mut spec, &root, "tcp");
    spec.accept(&["exportTo"]);
    spec.not_used(sink, &["http"]);
    spec.finish(sink);
    Some(VirtualServiceDoc {
        meta,
        hosts,
        gateways,
        tls,
        tcp,
    })
}

fn rules(sink: &mut Sink, spec: &mut Fields<'_, '_>, root: &Path<'_>, key: &str) -> Vec<RuleDoc> {
    let Some(list) = spec.get(key) else {
        return Vec::new();
    };
    let p = root.key(key);
    let mut out = Vec::new();
    for (i, item) in fields::seq(sink, list, &p).iter().enumerate() {
        let ip = p.index(i);
        let Some(mut f) = Fields::of(sink, item, ip) else {
            continue;
        };
        let mut matches = Vec::new();
        if let Some(ms) = f.get("match") {
            let mp = ip.key("match");
            for (j, m) in fields::seq(sink, ms, &mp).iter().enumerate() {
                let jp = mp.index(j);
                let Some(mut mf) = Fields::of(sink, m, jp) else {
                    continue;
                };
                // `sniHosts` belongs to TLS matches; in a tcp match it is an unknown field.
                let sni_hosts = if key == "tls" {
                    mf.get("sniHosts")
                        .map(|n| fields::strings_at(sink, n, &jp.key("sniHosts")))
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let port = mf
                    .get("port")
                    .and_then(|n| fields::port(sink, n, &jp.key("port")));
                let gateways = mf
                    .get("gateways")
                    .map(|n| fields::strings(sink, n, &jp.key("gateways")))
                    .unwrap_or_default();
                if key == "tls" && sni_hosts.is_empty() {
                    sink.error(
                        m.loc,
                        format!("{jp}.sniHosts is required on a tls route; list the server names it takes, e.g. [\"*\"]"),
                    );
                }
                mf.accept(&IGNORED_ON_GATEWAYS);
                mf.finish(sink);
                matches.push(MatchDoc {
                    sni_hosts,
                    port,
                    gateways,
                });
            }
        }
        let mut route = Vec::new();
        if let Some(rs) = f.get("route") {
            let rp = ip.key("route");
            for (j, r) in fields::seq(sink, rs, &rp).iter().enumerate() {
                if let Some(d) = destination(sink, r, &rp.index(j)) {
                    route.push(d);
                }
            }
        }
        if route.is_empty() {
            sink.error(
                item.loc,
                format!("{ip}.route is empty; name at least one destination"),
            );
        }
        f.finish(sink);
        out.push(RuleDoc { matches, route });
    }
    out
}

fn destination(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<RouteDoc> {
    let mut f = Fields::of(sink, node, *path)?;
    let weight = f
        .get("weight")
        .and_then(|n| fields::u32_(sink, n, &path.key("weight")));
    let mut host = None;
    let mut port = None;
    let mut subset = None;
    match f.get("destination") {
        Some(d) => {
            let dp = path.key("destination");
            if let Some(mut df) = Fields::of(sink, d, dp) {
                match df.get("host") {
                    Some(n) => host = fields::string(sink, n, &dp.key("host")),
                    None => sink.error(d.loc, format!("{dp}.host is required")),
                }
                if let Some(pn) = df.get("port") {
                    let pp = dp.key("port");
                    if let Some(mut pf) = Fields::of(sink, pn, pp) {
                        port = pf
                            .get("number")
                            .and_then(|n| fields::port(sink, n, &pp.key("number")));
                        pf.finish(sink);
                    }
                }
                subset = df
                    .get("subset")
                    .and_then(|n| fields::string(sink, n, &dp.key("subset")));
                df.finish(sink);
            }
        }
        None => sink.error(node.loc, format!("{path}.destination is required")),
    }
    f.finish(sink);
    Some(RouteDoc {
        host: host?.to_ascii_lowercase(),
        port,
        subset,
        weight,
        loc: node.loc,
    })
}

/// A short name is a Kubernetes service in the VirtualService's namespace, as Istio
/// resolves `hosts` and destination hosts.
fn qualified(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_ascii_lowercase()
    } else {
        format!(
            "{}.{namespace}.svc.cluster.local",
            host.to_ascii_lowercase()
        )
    }
}

/// What the routes need to know about one Gateway server.
pub(crate) struct ServerRef<'a> {
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    pub port: u16,
    pub mode: ServerTlsMode,
    pub hosts: &'a [HostMatch],
    /// Per host, the one namespace whose VirtualServices it admits (`None`: any).
    pub host_namespaces: &'a [Option<String>],
}

/// The declared service ports of each host, and the subsets of each service port.
pub(crate) struct Declared<'a> {
    pub ports_of_host: &'a HashMap<String, Vec<u16>>,
    pub ports: &'a HashMap<ServiceKey, ServicePort>,
}

/// The routes of `server` from the VirtualServices bound to it, with a diagnostic for each
/// destination that names nothing declared and each SNI taken twice on the port.
pub(crate) fn routes_for(
    sink: &mut Sink,
    server: &ServerRef<'_>,
    vss: &[VirtualServiceDoc],
    declared: &Declared<'_>,
    taken: &mut BTreeMap<(u16, String), (Loc, String)>,
) -> Vec<L4Route> {
    let mut out = Vec::new();
    for vs in vss {
        let admits = |(s, ns): (&HostMatch, &Option<String>)| {
            ns.as_ref().is_none_or(|ns| *ns == vs.meta.namespace)
                && vs.hosts.iter().any(|h| s.intersects(h))
        };
        if !binds(vs, &vs.gateways, server)
            || !server.hosts.iter().zip(server.host_namespaces).any(admits)
        {
            continue;
        }
        let rules = match server.mode {
            ServerTlsMode::Passthrough => &vs.tls,
            ServerTlsMode::IstioMutual => &vs.tcp,
            ServerTlsMode::AutoPassthrough | ServerTlsMode::Hbone => continue,
        };
        for rule in rules {
            let applies = |m: &MatchDoc| {
                m.port.is_none_or(|p| p == server.port)
                    && (m.gateways.is_empty() || binds(vs, &m.gateways, server))
            };
            let destinations = destinations(sink, vs, &rule.route, declared);
            match server.mode {
                ServerTlsMode::Passthrough => {
                    for m in rule.matches.iter().filter(|m| applies(m)) {
                        // As istiod does (`CheckDuplicates`), a match naming a host another
                        // route already takes on this port is skipped whole.
                        let mut duplicate = false;
                        for (sni, loc) in &m.sni_hosts {
                            let key = (server.port, sni.to_ascii_lowercase());
                            let Some((first, first_vs)) = taken.get(&key) else {
                                continue;
                            };
                            duplicate = true;
                            sink.warn(
                                *loc,
                                format!(
                                    "VirtualService {}: sniHost {sni} on port {} is already routed by VirtualService {first_vs} (line {}); this match is skipped, the first route is kept",
                                    vs.meta.qualified(),
                                    server.port,
                                    first.line
                                ),
                            );
                            sink.warn(
                                *first,
                                format!(
                                    "VirtualService {first_vs}: sniHost {sni} on port {} is routed again by VirtualService {} (line {}); this first route is kept",
                                    server.port,
                                    vs.meta.qualified(),
                                    loc.line
                                ),
                            );
                        }
                        if duplicate || m.sni_hosts.is_empty() {
                            continue;
                        }
                        for (sni, loc) in &m.sni_hosts {
                            taken.insert(
                                (server.port, sni.to_ascii_lowercase()),
                                (*loc, vs.meta.qualified()),
                            );
                        }
                        out.push(L4Route {
                            virtual_service: vs.meta.qualified(),
                            sni_hosts: m
                                .sni_hosts
                                .iter()
                                .map(|(h, _)| HostMatch::parse(h))
                                .collect(),
                            destinations: destinations.clone(),
                        });
                    }
                }
                _ => {
                    if rule.matches.is_empty() || rule.matches.iter().any(applies) {
                        // The first tcp rule that matches takes every connection.
                        return vec![L4Route {
                            virtual_service: vs.meta.qualified(),
                            sni_hosts: Vec::new(),
                            destinations,
                        }];
                    }
                }
            }
        }
    }
    out
}

/// The route a sidecar would apply to a connection for `host:port`: the first `tcp` rule
/// of a mesh-bound VirtualService (`gateways` absent or naming `mesh`) whose `hosts` hold
/// the host and whose `match` applies to the port.
pub(crate) fn bridge_route(
    sink: &mut Sink,
    host: &str,
    port: u16,
    vss: &[VirtualServiceDoc],
    declared: &Declared<'_>,
) -> Option<L4Route> {
    let mesh = |g: &[String]| g.is_empty() || g.iter().any(|g| g == "mesh");
    for vs in vss {
        if !mesh(&vs.gateways) || !vs.hosts.iter().any(|h| h.matches(host)) {
            continue;
        }
        for rule in &vs.tcp {
            let applies = |m: &MatchDoc| m.port.is_none_or(|p| p == port) && mesh(&m.gateways);
            if rule.matches.is_empty() || rule.matches.iter().any(applies) {
                return Some(L4Route {
                    virtual_service: vs.meta.qualified(),
                    sni_hosts: Vec::new(),
                    destinations: destinations(sink, vs, &rule.route, declared),
                });
            }
        }
    }
    None
}

/// Whether `gateways` (a VirtualService's or a match's) names the server's Gateway.
fn binds(vs: &VirtualServiceDoc, gateways: &[String], server: &ServerRef<'_>) -> bool {
    gateways.iter().any(|g| match g.split_once('/') {
        Some((ns, name)) => ns == server.gateway_namespace && name == server.gateway_name,
        None => vs.meta.namespace == server.gateway_namespace && g == server.gateway_name,
    })
}

/// The destinations of a rule that name a declared service port (and subset), weights of
/// 0 dropped.
fn destinations(
    sink: &mut Sink,
    vs: &VirtualServiceDoc,
    route: &[RouteDoc],
    declared: &Declared<'_>,
) -> Vec<Destination> {
    let mut out = Vec::new();
    for r in route {
        let weight = match r.weight {
            Some(w) => w,
            None if route.len() == 1 => 100,
            None => 0,
        };
        if weight == 0 {
            continue;
        }
        let host = qualified(&r.host, &vs.meta.namespace);
        let Some(ports) = declared.ports_of_host.get(&host) else {
            sink.error(
                r.loc,
                format!(
                    "VirtualService {}: destination host {host} is not declared by a ServiceEntry; declare it, or connections routed here are refused",
                    vs.meta.qualified()
                ),
            );
            continue;
        };
        let port = match (r.port, ports.as_slice()) {
            (Some(p), _) if ports.contains(&p) => p,
            (None, [only]) => *only,
            (p, _) => {
                let listed: Vec<String> = ports.iter().map(u16::to_string).collect();
                sink.error(
                    r.loc,
                    format!(
                        "VirtualService {}: destination {host} {}; its declared ports are {}",
                        vs.meta.qualified(),
                        match p {
                            Some(p) => format!("has no port {p}"),
                            None => "needs a port number".to_string(),
                        },
                        listed.join(", ")
                    ),
                );
                continue;
            }
        };
        let service = ServiceKey::new(&host, port);
        if let Some(subset) = &r.subset {
            let known: Vec<String> = declared
                .ports
                .get(&service)
                .map(|s| s.subsets.keys().cloned().collect())
                .unwrap_or_default();
            if !known.contains(subset) {
                sink.error(
                    r.loc,
                    format!(
                        "VirtualService {}: {host} has no subset {subset:?} ({})",
                        vs.meta.qualified(),
                        if known.is_empty() {
                            "no DestinationRule declares subsets for it".to_string()
                        } else {
                            format!("declared subsets: {}", known.join(", "))
                        }
                    ),
                );
                continue;
            }
        }
        out.push(Destination {
            service,
            subset: r.subset.clone(),
            weight,
        });
    }
    out
}
