//! `strait route`: how one SNI would be routed, step by step, or why it would not.

use std::fmt::Write;

use crate::model::{ServerTlsMode, Snapshot};
use crate::route;
use crate::route::sni::{build_subset_key, lower_case, parse_subset_key};

/// The explanation, and whether the name routes on at least one listener.
pub struct Explanation {
    pub text: String,
    pub routes: bool,
}

/// `source`: the tunnel's `x-istio-source`, for an authority dispatched on it.
pub fn explain(
    snapshot: &Snapshot,
    sni: &str,
    alpn: &[String],
    source: Option<&str>,
) -> Explanation {
    let live = LiveHealth::fetch(snapshot.settings.admin_addr);
    explain_with(snapshot, sni, alpn, source, live)
}

/// Explains against the snapshot a gateway is running, with its own endpoint state (the
/// admin `/route` endpoint).
pub fn explain_running(
    snapshot: &Snapshot,
    sni: &str,
    alpn: &[String],
    source: Option<&str>,
    clusters: serde_json::Value,
) -> Explanation {
    let live = LiveHealth {
        clusters: Some(clusters),
        admin: snapshot.settings.admin_addr,
    };
    explain_with(snapshot, sni, alpn, source, live)
}

/// The header a tunnel's source is read from (istiod's `connect_terminate` copies it into
/// the filter state `main_internal` dispatches on).
const SOURCE_HEADER: &str = "x-istio-source";

fn explain_with(
    snapshot: &Snapshot,
    sni: &str,
    alpn: &[String],
    source: Option<&str>,
    live: LiveHealth,
) -> Explanation {
    let mut out = String::new();
    let mut routes = false;
    let is_hbone =
        |l: &crate::model::ListenerSpec| l.servers.iter().any(|s| s.mode == ServerTlsMode::Hbone);
    // `host:port` is an HBONE tunnel's `:authority` where an HBONE listener takes it; an
    // SNI never carries a port.
    let authority = route::parse_authority(sni).filter(|_| snapshot.listeners.iter().any(is_hbone));
    if let Some((host, port)) = &authority {
        let _ = writeln!(out, ":authority {sni}");
        let _ = writeln!(
            out,
            "parsed     host={host} port={port} (an HBONE tunnel's destination)"
        );
        match source {
            Some(v) => {
                let _ = writeln!(out, "source     {SOURCE_HEADER}: {v}");
            }
            None => {
                let _ = writeln!(out, "source     no {SOURCE_HEADER} header");
            }
        }
    } else {
        explain_sni(&mut out, snapshot, sni, alpn);
    }
    if snapshot.listeners.is_empty() {
        let _ = writeln!(
            out,
            "result     does not route: the configuration has no Gateway listener"
        );
    }
    for listener in &snapshot.listeners {
        let _ = writeln!(out, "\nlistener   {}", listener.addr);
        let r = if is_hbone(listener) {
            let header = |name: &str| {
                source
                    .filter(|_| name.eq_ignore_ascii_case(SOURCE_HEADER))
                    .map(str::to_string)
            };
            route::resolve_authority(&listener.servers, &snapshot.services, sni, &header)
        } else if authority.is_some() {
            let _ = writeln!(
                out,
                "result     not for this listener: it routes TLS by SNI, not HBONE tunnels"
            );
            continue;
        } else {
            route::resolve(&listener.servers, &snapshot.services, Some(sni))
        };
        let m = match r {
            Ok(m) => m,
            Err(miss) => {
                // The data path does not list a host's ports (that scan is linear).
                let miss = match miss {
                    route::RouteMiss::UnknownService { host, port, .. } => {
                        let known = route::declared_ports(&snapshot.services, &host);
                        route::RouteMiss::UnknownService { host, port, known }
                    }
                    other => other,
                };
                let _ = writeln!(
                    out,
                    "result     does not route (NR {}): {miss}",
                    miss.reason()
                );
                continue;
            }
        };
        let server = &listener.servers[m.server];
        let mode = server.mode.name();
        let _ = writeln!(
            out,
            "server     {} ({mode}) hosts [{}]",
            server.name,
            server.hosts.describe(16)
        );
        if let Some(c) = &m.source {
            let header = c.routes.header.as_deref().unwrap_or("(no header)");
            let seen = c
                .value
                .as_deref()
                .map(|v| format!("{v:?}"))
                .unwrap_or_else(|| "absent".into());
            let entry = match &c.pick {
                crate::model::SourcePick::Exact(v) => format!("exact {v:?}"),
                crate::model::SourcePick::Prefix(p) => format!("prefix {p:?}"),
                crate::model::SourcePick::OnNoMatch => "on_no_match".into(),
            };
            let _ = writeln!(
                out,
                "dispatch   on {header} (filter state {}): {seen} takes {entry} -> {}:{}",
                c.routes.state_key, m.service.host, m.service.port
            );
            let mut all: Vec<String> = c
                .routes
                .exact
                .iter()
                .map(|(v, k)| format!("{v:?} -> {}:{}", k.host, k.port))
                .chain(
                    c.routes
                        .prefix
                        .iter()
                        .map(|(p, k)| format!("{p:?}* -> {}:{}", k.host, k.port)),
                )
                .chain(
                    c.routes
                        .otherwise
                        .iter()
                        .map(|k| format!("otherwise -> {}:{}", k.host, k.port)),
                )
                .collect();
            all.sort();
            let _ = writeln!(out, "           ({})", all.join(", "));
        }
        if let Some(r) = m.route {
            let matched = if r.sni_hosts.is_empty() {
                "tcp route".to_string()
            } else {
                let hosts: Vec<String> = r.sni_hosts.iter().map(|h| h.to_string()).collect();
                format!("tls route sniHosts [{}]", hosts.join(", "))
            };
            let _ = writeln!(
                out,
                "route      VirtualService {} {matched}",
                r.virtual_service
            );
            let total: u64 = r.destinations.iter().map(|d| d.weight as u64).sum();
            for d in &r.destinations {
                let _ = writeln!(
                    out,
                    "  -> {}:{}{} weight {} ({:.0} % of connections)",
                    d.service.host,
                    d.service.port,
                    d.subset
                        .as_deref()
                        .map(|s| format!(" subset {s}"))
                        .unwrap_or_default(),
                    d.weight,
                    d.weight as f64 * 100.0 / total.max(1) as f64
                );
            }
            if r.destinations.len() > 1 {
                let _ = writeln!(
                    out,
                    "           (each connection picks one by weight; one pick is shown below)"
                );
            }
        }
        let svc = m.service;
        let _ = writeln!(
            out,
            "service    {}:{} (namespace {}, port name {})",
            svc.host, svc.port, svc.namespace, svc.port_name
        );
        let (indexes, policy) = match m.subset {
            Some(name) => {
                let s = &svc.subsets[name];
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(out, "subset     {name} labels {{{}}}", labels.join(", "));
                (s.endpoints.clone(), &s.policy)
            }
            None => {
                let _ = writeln!(out, "subset     (none): all endpoints of the service");
                ((0..svc.endpoints.len()).collect(), &svc.policy)
            }
        };
        let _ = writeln!(
            out,
            "policy     {:?}{}{}",
            policy.lb,
            policy
                .connect_timeout
                .map(|d| format!(", connectTimeout {d:?}"))
                .unwrap_or_default(),
            policy
                .outlier
                .as_ref()
                .map(|o| format!(", outlier detection after {} errors", o.consecutive_errors))
                .unwrap_or_default()
        );
        let purpose = crate::upstream::Purpose::of_server(server.mode);
        let mut eligible = 0;
        let _ = writeln!(out, "endpoints  {}", indexes.len());
        if purpose == crate::upstream::Purpose::Hbone {
            let _ = writeln!(
                out,
                "           (a tunnel dials an endpoint's HBONE port, {})",
                crate::model::HBONE_PORT
            );
        }
        for i in indexes {
            let Some(e) = svc.endpoints.get(i) else {
                continue;
            };
            let excluded = purpose.exclusion(e, &snapshot.settings.network);
            let ok = excluded.is_none();
            if ok {
                eligible += 1;
            }
            let _ = writeln!(
                out,
                "  {:<24} weight {:<3} locality {:<16} network {:<10} {}",
                e.authority(),
                e.weight,
                if e.locality.region.is_empty() {
                    "-".to_string()
                } else {
                    e.locality.to_string()
                },
                if e.network.is_empty() {
                    "-"
                } else {
                    e.network.as_str()
                },
                match excluded {
                    None => format!(
                        "candidate, {}",
                        live.describe(
                            &if purpose == crate::upstream::Purpose::Hbone {
                                // Tunnels balance over a cluster of their own.
                                format!("inbound-vip|{}|tcp|{}", svc.port, svc.host)
                            } else {
                                build_subset_key(svc.port, m.subset, &svc.host)
                            },
                            &e.authority()
                        )
                    ),
                    Some(why) => format!("excluded: {why}"),
                }
            );
        }
        let allowed = server
            .alpn
            .as_deref()
            .unwrap_or(&snapshot.settings.passthrough_alpn);
        let alpn_ok = purpose != crate::upstream::Purpose::Passthrough
            || route::alpn_allowed(alpn.iter().map(|s| s.as_bytes()), allowed);
        if !alpn_ok {
            let _ = writeln!(
                out,
                "result     does not route (NR alpn_not_allowed): the client must offer one of [{}]",
                allowed.join(", ")
            );
        } else if eligible == 0 {
            let _ = writeln!(
                out,
                "result     routes, but no endpoint can take it: connections get UH (no healthy upstream)"
            );
        } else {
            routes = true;
            let _ = writeln!(
                out,
                "result     routes ({mode}) to {eligible} candidate endpoint(s)"
            );
        }
    }
    Explanation { text: out, routes }
}

/// The SNI's heading lines: the name, how it parses as a subset key, the ALPN check.
fn explain_sni(out: &mut String, snapshot: &Snapshot, sni: &str, alpn: &[String]) {
    let _ = writeln!(out, "SNI        {sni}");
    // As on the data path (`route::resolve`): the name matches without regard to case.
    let lower = lower_case(sni);
    if *lower != *sni {
        let _ = writeln!(out, "matched as {}", &*lower);
    }
    match parse_subset_key(&lower) {
        Ok(k) => {
            let _ = writeln!(
                out,
                "parsed     port={} subset={} host={}",
                k.port,
                k.subset.unwrap_or("(none)"),
                k.host
            );
        }
        Err(e) => {
            let by_route = snapshot
                .listeners
                .iter()
                .flat_map(|l| l.servers.iter())
                .any(|s| s.mode == ServerTlsMode::Passthrough || !s.routes.is_empty());
            if by_route {
                let _ = writeln!(
                    out,
                    "parsed     not a subset key: only VirtualService routes can take it"
                );
            } else {
                let _ = writeln!(out, "parsed     no: {e}");
            }
        }
    }
    let _ = writeln!(
        out,
        "ALPN       [{}] allowed [{}]",
        alpn.join(", "),
        if snapshot.settings.passthrough_alpn.is_empty() {
            "any".to_string()
        } else {
            snapshot.settings.passthrough_alpn.join(", ")
        }
    );
}

/// Endpoint health as a running gateway reports it on its admin port, when one answers.
struct LiveHealth {
    clusters: Option<serde_json::Value>,
    admin: std::net::SocketAddr,
}

impl LiveHealth {
    fn fetch(admin: std::net::SocketAddr) -> LiveHealth {
        LiveHealth {
            clusters: fetch_clusters(admin),
            admin,
        }
    }

    fn describe(&self, cluster: &str, endpoint: &str) -> String {
        let Some(clusters) = &self.clusters else {
            return format!("health unknown (no gateway answering on {})", self.admin);
        };
        let found = clusters["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"].as_str() == Some(cluster))
            .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
            .find(|e| e["address"].as_str() == Some(endpoint));
        match found {
            Some(e) => format!(
                "{} (live from {}: {} active, {} connect failures)",
                e["health"].as_str().unwrap_or("unknown"),
                self.admin,
                e["activeConnections"],
                e["connectFailures"]
            ),
            None => format!("not in the configuration running on {}", self.admin),
        }
    }
}

/// `GET /clusters` from the admin port, bounded to a fraction of a second.
fn fetch_clusters(admin: std::net::SocketAddr) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_millis(300);
    let addr = if admin.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], admin.port()))
    } else {
        admin
    };
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET /clusters HTTP/1.1\r\nHost: strait\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    s.take(16 << 20).read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let (_, json) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
}

/// `strait route --admin ADDR`: the running gateway's own explanation, from `/route`.
pub fn ask_running(
    admin: std::net::SocketAddr,
    sni: &str,
    alpn: &str,
    source: Option<&str>,
) -> std::io::Result<(bool, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let source = source.map(|v| format!("&source={v}")).unwrap_or_default();
    let query: String = format!("sni={sni}&alpn={alpn}{source}")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .collect();
    write!(
        s,
        "GET /route?{query} HTTP/1.1\r\nHost: strait\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.take(16 << 20).read_to_end(&mut body)?;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    match status {
        "200" => Ok((true, body.to_string())),
        "404" => Ok((false, body.to_string())),
        other => Err(std::io::Error::other(format!(
            "HTTP {other}: {}",
            body.trim()
        ))),
    }
}
