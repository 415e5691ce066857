//! Routing: SNI subset keys, Gateway host matching, service/subset lookup.
//!
//! Only declared (service, port, subset) combinations route, as in Istio since
//! CVE-2021-31921: the SNI is never used as a destination by itself.

pub mod sni;

use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{
    DefaultRoute, HostMatch, L4Route, ServerSpec, ServerTlsMode, ServiceKey, ServicePort, Services,
    SourcePick, SourceRoutes, TunnelTarget,
};
use sni::{SniMiss, lower_case, parse_subset_key};

/// Why an SNI does not route. Each variant is one `NR` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteMiss {
    #[error("the ClientHello carries no SNI; the gateway routes only by SNI")]
    NoSni,
    #[error("{0}")]
    NotSubsetKey(#[from] SniMiss),
    #[error("host {host} is not covered by the Gateway server hosts [{hosts}]")]
    HostNotInGateway { host: String, hosts: String },
    #[error(
        "no ServiceEntry declares host {host} with port {port}{known}; the SNI (or :authority) must carry the service port, not the target port"
    )]
    UnknownService {
        host: String,
        port: u16,
        known: String,
    },
    #[error(
        "subset {subset} of {host} is not declared in a DestinationRule (declared: [{declared}])"
    )]
    UnknownSubset {
        host: String,
        subset: String,
        declared: String,
    },
    #[error("ALPN [{offered}] offers none of the allowed [{allowed}] (passthroughAlpn)")]
    AlpnNotAllowed { offered: String, allowed: String },
    #[error("the control plane lists no filter chain for {sni}")]
    NotListed { sni: String },
    #[error(
        "the :authority {authority:?} is not <service host>:<service port>; an HBONE tunnel names the service port it goes to"
    )]
    BadAuthority { authority: String },
    #[error("no VirtualService tls route on this server takes the name {sni}")]
    NoTlsRoute { sni: String },
    #[error(
        "{authority} is dispatched on the tunnel's source and no entry takes {header}: {value} (and there is no on_no_match)"
    )]
    NoSourceRoute {
        authority: String,
        header: String,
        value: String,
    },
    #[error(
        "VirtualService {virtual_service} routes here, but none of its destinations is declared"
    )]
    NoDestination { virtual_service: String },
}

impl RouteMiss {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteMiss::NoSni => "no_sni",
            RouteMiss::NotSubsetKey(_) => "not_subset_key",
            RouteMiss::HostNotInGateway { .. } => "host_not_in_gateway",
            RouteMiss::UnknownService { .. } => "unknown_service",
            RouteMiss::UnknownSubset { .. } => "unknown_subset",
            RouteMiss::AlpnNotAllowed { .. } => "alpn_not_allowed",
            RouteMiss::NotListed { .. } => "not_listed",
            RouteMiss::BadAuthority { .. } => "bad_authority",
            RouteMiss::NoTlsRoute { .. } => "no_tls_route",
            RouteMiss::NoSourceRoute { .. } => "no_source_route",
            RouteMiss::NoDestination { .. } => "no_destination",
        }
    }
}

/// Where an SNI routes.
#[derive(Debug, Clone)]
pub struct RouteMatch<'s> {
    /// Index of the matched server in the listener's list.
    pub server: usize,
    pub service: &'s Arc<ServicePort>,
    /// The declared subset name (as written in the DestinationRule).
    pub subset: Option<&'s str>,
    /// The VirtualService route that chose the destination, when one did.
    pub route: Option<&'s L4Route>,
    /// On an HBONE server, when the tunnel's source chose the service port: the dispatch,
    /// the value read and the entry that took it.
    pub source: Option<SourceChoice<'s>>,
}

/// How a tunnel's source chose its service port ([`SourceRoutes`]).
#[derive(Debug, Clone)]
pub struct SourceChoice<'s> {
    pub routes: &'s SourceRoutes,
    /// The header's value on the `CONNECT` (`None`: absent).
    pub value: Option<String>,
    pub pick: SourcePick,
}

/// Resolves an SNI against one listener's servers and the service table.
///
/// The name matches without regard to case (RFC 4343): it is lower-cased, prefix and
/// subset included, then parsed and looked up, against Gateway hosts, service hosts and
/// subset names that configuration holds in lower case.
pub fn resolve<'s>(
    servers: &'s [ServerSpec],
    services: &'s Services,
    sni: Option<&str>,
) -> Result<RouteMatch<'s>, RouteMiss> {
    let Some(sni) = sni else {
        return resolve_without_sni(servers, services);
    };
    let sni = lower_case(sni);
    if servers
        .iter()
        .any(|s| !s.routes.is_empty() || s.mode == ServerTlsMode::Passthrough)
    {
        return resolve_by_route(servers, services, &sni);
    }
    let key = parse_subset_key(&sni)?;
    let host = key.host;
    let server = servers
        .iter()
        .position(|s| s.hosts.matches(host))
        .ok_or_else(|| host_not_in_gateway(servers, host))?;
    let lookup = ServiceKey {
        host: host.to_string(),
        port: key.port,
    };
    let Some(service) = services.get(&lookup) else {
        // Listing the host's declared ports would scan every service: a client sending
        // unknown names must not cost O(services). `strait route` adds them offline.
        return Err(RouteMiss::UnknownService {
            host: lookup.host,
            port: lookup.port,
            known: String::new(),
        });
    };
    let subset = match key.subset {
        None if service.default_route == DefaultRoute::NotListed => {
            return Err(RouteMiss::NotListed {
                sni: sni.to_string(),
            });
        }
        None => None,
        Some(name) => match service.subsets.get_key_value(name) {
            Some((k, _)) => Some(k.as_str()),
            None => {
                return Err(RouteMiss::UnknownSubset {
                    host: service.host.clone(),
                    subset: name.to_string(),
                    declared: service
                        .subsets
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        },
    };
    Ok(RouteMatch {
        server,
        service,
        subset,
        route: None,
        source: None,
    })
}

/// A listener whose servers route by VirtualService: a PASSTHROUGH server takes the `tls`
/// route whose `sniHosts` match the name most specifically (exact, then the longest
/// `*.suffix`, then `*`, as Envoy matches `server_names`); an ISTIO_MUTUAL server whose hosts cover
/// the name (a subset key's host, or the name itself) takes its `tcp` route. The route
/// then picks a destination by weight. Servers without routes route by subset key.
fn resolve_by_route<'s>(
    servers: &'s [ServerSpec],
    services: &'s Services,
    sni: &str,
) -> Result<RouteMatch<'s>, RouteMiss> {
    let key = parse_subset_key(sni).ok();
    let host = key.as_ref().map_or(sni, |k| k.host);
    // Across every server on the port, the most specific match wins, the first among
    // equals, as Envoy ranks the `server_names` of a listener's filter chains: a
    // PASSTHROUGH route for `a.example.com` takes that name from an ISTIO_MUTUAL server
    // for `*.example.com` declared before it.
    let mut found: Option<((u8, usize), usize, Option<&L4Route>)> = None;
    for (i, s) in servers.iter().enumerate() {
        let candidate = match s.mode {
            ServerTlsMode::Passthrough => s
                .routes
                .iter()
                .filter_map(|r| r.specificity(sni).map(|rank| (rank, Some(r))))
                .min_by_key(|(rank, _)| *rank),
            // A server without a VirtualService routes by subset key.
            _ => s
                .hosts
                .specificity(host)
                .map(|rank| (rank, s.routes.first())),
        };
        if let Some((rank, route)) = candidate
            && found.as_ref().is_none_or(|(best, _, _)| rank < *best)
        {
            found = Some((rank, i, route));
            if rank == (0, 0) {
                break; // an exact name: nothing later can be more specific
            }
        }
    }
    match found {
        Some((_, server, Some(route))) => route_to(server, route, services),
        Some((_, server, None)) => resolve_key(servers, server, services, sni),
        None => Err(RouteMiss::NoTlsRoute {
            sni: sni.to_string(),
        }),
    }
}

/// A ClientHello without SNI matches only a filter chain without `server_names`: an
/// ISTIO_MUTUAL server for exactly `*` (istiod writes no names for it) whose route takes
/// every connection, as Envoy matches it. Everything else needs the name.
fn resolve_without_sni<'s>(
    servers: &'s [ServerSpec],
    services: &'s Services,
) -> Result<RouteMatch<'s>, RouteMiss> {
    servers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.mode == ServerTlsMode::IstioMutual && s.hosts.contains(&HostMatch::Any))
        .find_map(|(i, s)| s.routes.first().map(|r| (i, r)))
        .map_or(Err(RouteMiss::NoSni), |(i, r)| route_to(i, r, services))
}

/// Picks `route`'s destination on server `server`.
fn route_to<'s>(
    server: usize,
    route: &'s L4Route,
    services: &'s Services,
) -> Result<RouteMatch<'s>, RouteMiss> {
    let no_destination = || RouteMiss::NoDestination {
        virtual_service: route.virtual_service.clone(),
    };
    let dest = route.pick().ok_or_else(no_destination)?;
    let service = services.get(&dest.service).ok_or_else(no_destination)?;
    let subset = match &dest.subset {
        Some(name) => Some(
            service
                .subsets
                .get_key_value(name)
                .map(|(k, _)| k.as_str())
                .ok_or_else(no_destination)?,
        ),
        None => None,
    };
    Ok(RouteMatch {
        server,
        service,
        subset,
        route: Some(route),
        source: None,
    })
}

/// The subset-key route of `sni` on server `i` alone.
fn resolve_key<'s>(
    servers: &'s [ServerSpec],
    i: usize,
    services: &'s Services,
    sni: &str,
) -> Result<RouteMatch<'s>, RouteMiss> {
    // The server has no routes, so this takes the subset-key path.
    resolve(&servers[i..=i], services, Some(sni)).map(|m| RouteMatch { server: i, ..m })
}

fn host_not_in_gateway(servers: &[ServerSpec], host: &str) -> RouteMiss {
    RouteMiss::HostNotInGateway {
        host: host.to_string(),
        // A server from istiod lists every exported host: a client sending unknown
        // names must not cost a copy of them all.
        hosts: servers
            .iter()
            .map(|s| s.hosts.describe(8))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `<host>:<port>` of an HBONE `CONNECT` (RFC 9113 §8.5: the `:authority` names the
/// destination), the host lower-cased; `None` when it is not that shape.
pub fn parse_authority(authority: &str) -> Option<(std::borrow::Cow<'_, str>, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if let Some(v6) = host.strip_prefix('[') {
        // `[<IPv6>]:<port>`: a Service's IPv6 VIP; nothing else is bracketed.
        let v6 = v6.strip_suffix(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        return Some((std::borrow::Cow::Owned(v6.to_ascii_lowercase()), port));
    }
    if host.is_empty() {
        return None;
    }
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    };
    Some((host, port))
}

/// Resolves an HBONE tunnel's `:authority` (`<service host>:<service port>`) against one
/// listener's HBONE servers and the service table, as Istio's ambient east-west gateway
/// maps `<svc-host>:<svc-port>` to the service port's endpoints, and failing a name,
/// `<VIP>:<port>` by the servers' [`crate::model::VipRoute`]s. No subsets, no routes: a
/// tunnel goes to the service port it names, or, for a Service with a waypoint, to the one
/// its source picks ([`SourceRoutes`]: `header` gives the `CONNECT`'s header by name).
pub fn resolve_authority<'s>(
    servers: &'s [ServerSpec],
    services: &'s Services,
    authority: &str,
    header: &dyn Fn(&str) -> Option<String>,
) -> Result<RouteMatch<'s>, RouteMiss> {
    let (host, port) = parse_authority(authority).ok_or_else(|| RouteMiss::BadAuthority {
        authority: authority.chars().take(256).collect(),
    })?;
    let exact = servers
        .iter()
        .position(|s| s.mode == ServerTlsMode::Hbone && s.hosts.matches(&host));
    let (server, target) = match exact {
        Some(server) => {
            let key = ServiceKey {
                host: host.into_owned(),
                port,
            };
            match servers[server].sources.get(&key) {
                Some(by_source) => (server, Target::BySource(by_source)),
                None => (server, Target::Service(key)),
            }
        }
        // Failing the names, a Service VIP and port, as istiod's `main_internal` falls
        // back on the destination address.
        None => host
            .parse::<IpAddr>()
            .ok()
            .and_then(|ip| vip_route(servers, ip, port))
            .map(|(i, t)| {
                (
                    i,
                    match t {
                        TunnelTarget::Service(k) => Target::Service(k.clone()),
                        TunnelTarget::BySource(s) => Target::BySource(s),
                    },
                )
            })
            .ok_or_else(|| host_not_in_gateway(servers, &host))?,
    };
    let (lookup, source) = match target {
        Target::Service(key) => (key, None),
        Target::BySource(routes) => {
            let value = routes.header.as_deref().and_then(header);
            let Some((key, pick)) = routes.pick(value.as_deref()) else {
                return Err(RouteMiss::NoSourceRoute {
                    authority: authority.chars().take(256).collect(),
                    header: routes
                        .header
                        .clone()
                        .unwrap_or_else(|| format!("filter state {}", routes.state_key)),
                    value: value
                        .map(|v| format!("{:?}", v.chars().take(64).collect::<String>()))
                        .unwrap_or_else(|| "(absent)".into()),
                });
            };
            (
                key.clone(),
                Some(SourceChoice {
                    routes,
                    value,
                    pick,
                }),
            )
        }
    };
    let Some(service) = services.get(&lookup) else {
        return Err(RouteMiss::UnknownService {
            host: lookup.host,
            port: lookup.port,
            known: String::new(),
        });
    };
    if service.default_route == DefaultRoute::NotListed {
        return Err(RouteMiss::NotListed {
            sni: authority.to_string(),
        });
    }
    Ok(RouteMatch {
        server,
        service,
        subset: None,
        route: None,
        source,
    })
}

/// Where an authority leads before the source is read.
enum Target<'s> {
    Service(ServiceKey),
    BySource(&'s SourceRoutes),
}

/// The first HBONE server taking `ip`:`port` as a Service VIP, and where it routes.
fn vip_route(servers: &[ServerSpec], ip: IpAddr, port: u16) -> Option<(usize, &TunnelTarget)> {
    servers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.mode == ServerTlsMode::Hbone)
        .find_map(|(i, s)| {
            s.vips
                .iter()
                .find(|v| v.port == port && v.range.contains(ip))
                .map(|v| (i, &v.target))
        })
}

/// The ports declared for `host`, for explaining an `UnknownService` miss offline
/// (linear in the number of services, so never on the data path).
pub fn declared_ports(services: &Services, host: &str) -> String {
    let mut ports: Vec<u16> = services
        .values()
        .filter(|s| s.host == host)
        .map(|s| s.port)
        .collect();
    if ports.is_empty() {
        return String::new();
    }
    ports.sort_unstable();
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(" (declared ports of that host: {})", list.join(", "))
}

/// Checks the ClientHello's ALPN against `passthroughAlpn` (empty allows any).
pub fn alpn_allowed<'a>(mut offered: impl Iterator<Item = &'a [u8]>, allowed: &[String]) -> bool {
    allowed.is_empty() || offered.any(|proto| allowed.iter().any(|a| a.as_bytes() == proto))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostMatch, ServerTlsMode, Subset, TrafficPolicy};
    use std::collections::BTreeMap;

    fn table() -> (Vec<ServerSpec>, Services) {
        let servers = vec![ServerSpec {
            name: "istio-system/gw/0".into(),
            mode: ServerTlsMode::AutoPassthrough,
            hosts: vec![HostMatch::parse("*.local")].into(),
            alpn: None,
            routes: Vec::new(),
            rbac: Vec::new(),
            vips: Vec::new(),
            http2: Default::default(),
            sources: Default::default(),
        }];
        let mut subsets = BTreeMap::new();
        subsets.insert(
            "v2".to_string(),
            Subset {
                name: "v2".into(),
                labels: BTreeMap::new(),
                endpoints: vec![],
                policy: TrafficPolicy::default(),
            },
        );
        let svc = ServicePort {
            host: "reviews.default.svc.cluster.local".into(),
            namespace: "default".into(),
            port: 9080,
            port_name: "tcp".into(),
            endpoints: vec![],
            policy: TrafficPolicy::default(),
            tunnel_policy: TrafficPolicy::default(),
            subsets,
            resolution: Default::default(),
            default_route: Default::default(),
        };
        let mut services = Services::new();
        services.insert(svc.key(), Arc::new(svc));
        (servers, services)
    }

    #[test]
    fn a_server_listing_every_host_matches_by_name_and_a_refusal_names_only_a_few() {
        let (_, services) = table();
        let mut hosts: Vec<HostMatch> = (0..10_000)
            .map(|i| HostMatch::Exact(format!("svc{i}.default.svc.cluster.local")))
            .collect();
        hosts.push(HostMatch::Exact("reviews.default.svc.cluster.local".into()));
        let servers = vec![ServerSpec {
            name: "xds/0.0.0.0_15443/0".into(),
            mode: ServerTlsMode::AutoPassthrough,
            hosts: hosts.into(),
            alpn: None,
            routes: Vec::new(),
            rbac: Vec::new(),
            vips: Vec::new(),
            http2: Default::default(),
            sources: Default::default(),
        }];
        let hit = resolve(
            &servers,
            &services,
            Some("outbound_.9080_._.Reviews.default.svc.cluster.local"),
        );
        assert_eq!(hit.map(|m| m.service.port).ok(), Some(9080));
        let miss = resolve(
            &servers,
            &services,
            Some("outbound_.9080_._.other.default.svc.cluster.local"),
        )
        .unwrap_err();
        let RouteMiss::HostNotInGateway { hosts, .. } = &miss else {
            panic!("{miss:?}");
        };
        assert!(
            hosts.starts_with("svc0.default.svc.cluster.local, svc1."),
            "{hosts}"
        );
        assert!(hosts.ends_with("… 9993 more"), "{hosts}");
    }

    #[test]
    fn a_passthrough_server_takes_the_most_specific_sni_hosts_match() {
        use crate::model::{Destination, L4Route};
        let (_, services) = table();
        let reviews = ServiceKey::new("reviews.default.svc.cluster.local", 9080);
        let route = |vs: &str, hosts: &[&str], subset: Option<&str>| L4Route {
            virtual_service: vs.into(),
            sni_hosts: hosts.iter().map(|h| HostMatch::parse(h)).collect(),
            destinations: vec![Destination {
                service: reviews.clone(),
                subset: subset.map(str::to_string),
                weight: 1,
            }],
        };
        let servers = vec![ServerSpec {
            name: "istio-system/gw/0".into(),
            mode: ServerTlsMode::Passthrough,
            hosts: vec![HostMatch::Any].into(),
            alpn: None,
            routes: vec![
                route("any", &["*"], None),
                route("suffix", &["*.example.com"], None),
                route("longer", &["*.b.example.com"], None),
                route("exact", &["a.b.example.com"], Some("v2")),
            ],
            rbac: Vec::new(),
            vips: Vec::new(),
            http2: Default::default(),
            sources: Default::default(),
        }];
        let vs = |sni: &str| {
            resolve(&servers, &services, Some(sni))
                .map(|m| m.route.map(|r| r.virtual_service.clone()))
                .unwrap_or_default()
        };
        assert_eq!(vs("A.B.example.com").as_deref(), Some("exact"));
        assert_eq!(vs("c.b.example.com").as_deref(), Some("longer"));
        assert_eq!(vs("c.example.com").as_deref(), Some("suffix"));
        assert_eq!(vs("elsewhere.test").as_deref(), Some("any"));
        let m = resolve(&servers, &services, Some("a.b.example.com")).unwrap();
        assert_eq!(m.subset, Some("v2"));
    }

    /// A server with one route, on `sni_hosts`, to reviews (and `subset`).
    fn routed_server(
        name: &str,
        mode: ServerTlsMode,
        hosts: &str,
        sni_hosts: &str,
        subset: Option<&str>,
    ) -> ServerSpec {
        use crate::model::{Destination, L4Route};
        ServerSpec {
            name: name.into(),
            mode,
            hosts: vec![HostMatch::parse(hosts)].into(),
            alpn: None,
            routes: vec![L4Route {
                virtual_service: name.into(),
                sni_hosts: vec![HostMatch::parse(sni_hosts)],
                destinations: vec![Destination {
                    service: ServiceKey::new("reviews.default.svc.cluster.local", 9080),
                    subset: subset.map(str::to_string),
                    weight: 1,
                }],
            }],
            rbac: Vec::new(),
            vips: Vec::new(),
            http2: Default::default(),
            sources: Default::default(),
        }
    }

    /// ISTIO_MUTUAL and PASSTHROUGH servers on one port: the most specific name wins
    /// whichever server was declared first, as among Envoy's filter chains.
    #[test]
    fn servers_on_one_port_are_ranked_by_the_specificity_of_their_names() {
        let (_, services) = table();
        let server =
            |name, mode, hosts, sni_hosts| routed_server(name, mode, hosts, sni_hosts, None);
        let servers = vec![
            server(
                "mutual-wide",
                ServerTlsMode::IstioMutual,
                "*.example.com",
                "*",
            ),
            server(
                "pass-exact",
                ServerTlsMode::Passthrough,
                "*",
                "a.example.com",
            ),
            server("mutual-exact", ServerTlsMode::IstioMutual, "c.test", "*"),
            server("pass-any", ServerTlsMode::Passthrough, "*", "*"),
            server(
                "pass-wide",
                ServerTlsMode::Passthrough,
                "*",
                "*.example.com",
            ),
        ];
        let picked = |sni: &str| {
            resolve(&servers, &services, Some(sni))
                .map(|m| servers[m.server].name.clone())
                .unwrap_or_default()
        };
        assert_eq!(picked("a.example.com"), "pass-exact");
        // Equally specific: the first declared.
        assert_eq!(picked("b.example.com"), "mutual-wide");
        assert_eq!(picked("c.test"), "mutual-exact");
        assert_eq!(picked("d.test"), "pass-any");
    }

    /// Without SNI only a chain without names matches: an ISTIO_MUTUAL server for `*`
    /// with a route. A PASSTHROUGH route for `*` and an ISTIO_MUTUAL server for a
    /// pattern need the name, as Envoy's filter chains with `server_names` do.
    #[test]
    fn a_client_without_sni_reaches_only_an_istio_mutual_server_for_every_host() {
        let (_, services) = table();
        let server = |name, mode, hosts| routed_server(name, mode, hosts, "*", Some("v2"));
        let mut servers = vec![
            server("passthrough", ServerTlsMode::Passthrough, "*"),
            server("named", ServerTlsMode::IstioMutual, "*.local"),
        ];
        assert_eq!(
            resolve(&servers, &services, None).unwrap_err(),
            RouteMiss::NoSni
        );
        servers.push(server("any", ServerTlsMode::IstioMutual, "*"));
        let m = resolve(&servers, &services, None).unwrap();
        assert_eq!((m.server, m.subset), (2, Some("v2")));
        assert_eq!(m.route.map(|r| r.virtual_service.as_str()), Some("any"));
        // Without a route, a server for `*` routes by subset key: the name is needed.
        servers[2].routes.clear();
        assert_eq!(
            resolve(&servers, &services, None).unwrap_err(),
            RouteMiss::NoSni
        );
    }

    #[test]
    fn routes_declared_combinations_only() {
        let (servers, services) = table();
        let r = resolve(
            &servers,
            &services,
            Some("outbound_.9080_._.reviews.default.svc.cluster.local"),
        )
        .unwrap();
        assert_eq!(r.service.port, 9080);
        assert_eq!(r.subset, None);
        let r = resolve(
            &servers,
            &services,
            Some("outbound_.9080_.v2_.Reviews.Default.svc.cluster.local"),
        )
        .unwrap();
        assert_eq!(r.subset, Some("v2"));
        let miss = |sni: &str| {
            resolve(&servers, &services, Some(sni))
                .unwrap_err()
                .reason()
        };
        assert_eq!(
            miss("outbound_.9080_.v3_.reviews.default.svc.cluster.local"),
            "unknown_subset"
        );
        assert_eq!(
            miss("outbound_.9081_._.reviews.default.svc.cluster.local"),
            "unknown_service"
        );
        assert_eq!(
            miss("outbound_.9080_._.reviews.default.svc.example.com"),
            "host_not_in_gateway"
        );
        assert_eq!(miss("reviews.default.svc.cluster.local"), "not_subset_key");
        assert_eq!(
            resolve(&servers, &services, None).unwrap_err(),
            RouteMiss::NoSni
        );
    }

    /// RFC 4343: the whole name, prefix and subset included, matches without regard to
    /// case; the allow-list does not grow.
    #[test]
    fn names_match_without_regard_to_case() {
        let (servers, services) = table();
        for sni in [
            "OUTBOUND_.9080_.V2_.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL",
            "Outbound_.9080_.v2_.Reviews.Default.svc.Cluster.Local",
            "outbound_.9080_.V2_.reviews.default.svc.cluster.local",
        ] {
            let r =
                resolve(&servers, &services, Some(sni)).unwrap_or_else(|e| panic!("{sni}: {e}"));
            assert_eq!(r.service.host, "reviews.default.svc.cluster.local", "{sni}");
            assert_eq!(r.subset, Some("v2"), "{sni}");
        }
        let r = resolve(
            &servers,
            &services,
            Some("OUTBOUND_.9080_._.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL"),
        )
        .unwrap();
        assert_eq!((r.service.port, r.subset), (9080, None));
        let miss = |sni: &str| {
            resolve(&servers, &services, Some(sni))
                .unwrap_err()
                .reason()
        };
        assert_eq!(
            miss("OUTBOUND_.9080_.V3_.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL"),
            "unknown_subset"
        );
        assert_eq!(
            miss("OUTBOUND_.9081_._.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL"),
            "unknown_service"
        );
        assert_eq!(
            miss("OUTBOUND_.9080_._.RATINGS.DEFAULT.SVC.CLUSTER.LOCAL"),
            "unknown_service"
        );
        assert_eq!(
            miss("INBOUND_.9080_._.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL"),
            "not_subset_key"
        );
    }

    /// A tunnel's `:authority` names the service port by its host or, failing the names,
    /// by a VIP and port the HBONE server takes (IPv6 in brackets); anything else misses.
    #[test]
    fn an_authority_routes_by_host_then_by_vip() {
        use crate::model::{Cidr, VipRoute};
        let (_, services) = table();
        let reviews = ServiceKey::new("reviews.default.svc.cluster.local", 9080);
        let vip = |addr: &str, len| VipRoute {
            range: Cidr {
                addr: addr.parse().unwrap(),
                len,
            },
            port: 9080,
            target: crate::model::TunnelTarget::Service(reviews.clone()),
        };
        let servers = vec![ServerSpec {
            name: "xds/connect_terminate".into(),
            mode: ServerTlsMode::Hbone,
            hosts: vec![HostMatch::Exact(reviews.host.clone())].into(),
            alpn: None,
            routes: Vec::new(),
            rbac: Vec::new(),
            vips: vec![vip("10.96.0.10", 32), vip("fd00::10", 128)],
            http2: Default::default(),
            sources: Default::default(),
        }];
        let host = |a: &str| {
            resolve_authority(&servers, &services, a, &|_| None)
                .map(|m| format!("{}:{}", m.service.host, m.service.port))
                .map_err(|e| e.reason())
        };
        let want = Ok(format!("{}:{}", reviews.host, reviews.port));
        assert_eq!(host("reviews.default.svc.cluster.local:9080"), want);
        assert_eq!(host("10.96.0.10:9080"), want);
        assert_eq!(host("[fd00::10]:9080"), want);
        assert_eq!(host("10.96.0.10:9081"), Err("host_not_in_gateway"));
        assert_eq!(host("10.96.0.11:9080"), Err("host_not_in_gateway"));
        assert_eq!(host("[fd00::10:9080"), Err("bad_authority"));
        assert_eq!(host("[reviews]:9080"), Err("bad_authority"));
    }

    #[test]
    fn alpn_allow_list() {
        let allowed = vec!["istio".to_string()];
        let offer = |v: &[&str]| alpn_allowed(v.iter().map(|s| s.as_bytes()), &allowed);
        assert!(offer(&["h2", "istio"]));
        assert!(!offer(&["h2"]));
        assert!(!offer(&[]));
        assert!(alpn_allowed(std::iter::empty(), &[]));
    }

    /// A name dispatched on the tunnel's source: the header's value picks the service
    /// port (exact, then the longest prefix, then on_no_match); with no on_no_match an
    /// unlisted value misses; a VIP dispatches as the name does.
    #[test]
    fn an_authority_dispatched_on_the_source_routes_by_the_header() {
        use crate::model::{Cidr, SourcePick, SourceRoutes, TunnelTarget, VipRoute};
        let (_, mut services) = table();
        let reviews = ServiceKey::new("reviews.default.svc.cluster.local", 9080);
        let waypoint = ServiceKey::new("waypoint.default.svc.cluster.local", 15008);
        let mut wp = (*services[&reviews]).clone();
        wp.host = waypoint.host.clone();
        wp.port = waypoint.port;
        services.insert(waypoint.clone(), Arc::new(wp));
        let mut routes = SourceRoutes {
            header: Some("x-istio-source".into()),
            state_key: "io.istio.source".into(),
            exact: [("waypoint".to_string(), reviews.clone())].into(),
            prefix: vec![
                ("gate".into(), waypoint.clone()),
                ("gateway".into(), reviews.clone()),
            ],
            otherwise: Some(waypoint.clone()),
        };
        let server = |routes: &SourceRoutes| ServerSpec {
            name: "xds/connect_terminate".into(),
            mode: ServerTlsMode::Hbone,
            hosts: vec![HostMatch::Exact(reviews.host.clone())].into(),
            alpn: None,
            routes: Vec::new(),
            rbac: Vec::new(),
            vips: vec![VipRoute {
                range: Cidr {
                    addr: "10.96.0.10".parse().unwrap(),
                    len: 32,
                },
                port: 9080,
                target: TunnelTarget::BySource(Arc::new(routes.clone())),
            }],
            sources: [(reviews.clone(), Arc::new(routes.clone()))].into(),
            http2: Default::default(),
        };
        let go = |servers: &[ServerSpec], authority: &str, source: Option<&str>| {
            let header = |name: &str| {
                source
                    .filter(|_| name == "x-istio-source")
                    .map(str::to_string)
            };
            resolve_authority(servers, &services, authority, &header)
                .map(|m| (m.service.port, m.source.map(|s| s.pick)))
                .map_err(|e| e.reason())
        };
        let servers = vec![server(&routes)];
        let name = "reviews.default.svc.cluster.local:9080";
        assert_eq!(
            go(&servers, name, Some("waypoint")),
            Ok((9080, Some(SourcePick::Exact("waypoint".into()))))
        );
        assert_eq!(
            go(&servers, name, Some("gateway-1")),
            Ok((9080, Some(SourcePick::Prefix("gateway".into()))))
        );
        assert_eq!(
            go(&servers, name, Some("gatekeeper")),
            Ok((15008, Some(SourcePick::Prefix("gate".into()))))
        );
        assert_eq!(
            go(&servers, name, Some("Waypoint")),
            Ok((15008, Some(SourcePick::OnNoMatch)))
        );
        assert_eq!(
            go(&servers, name, None),
            Ok((15008, Some(SourcePick::OnNoMatch)))
        );
        assert_eq!(
            go(&servers, "10.96.0.10:9080", Some("waypoint")),
            Ok((9080, Some(SourcePick::Exact("waypoint".into()))))
        );
        routes.otherwise = None;
        let servers = vec![server(&routes)];
        assert_eq!(go(&servers, name, Some("sidecar")), Err("no_source_route"));
        assert_eq!(
            go(&servers, name, Some("waypoint")),
            Ok((9080, Some(SourcePick::Exact("waypoint".into()))))
        );
        // No header behind the filter state: every tunnel takes on_no_match.
        routes.header = None;
        routes.otherwise = Some(waypoint);
        let servers = vec![server(&routes)];
        assert_eq!(
            go(&servers, name, Some("waypoint")),
            Ok((15008, Some(SourcePick::OnNoMatch)))
        );
    }
}
