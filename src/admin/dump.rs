//! JSON views of the configuration in force and of endpoint state. Private keys are
//! never part of a snapshot, so nothing here can leak one; certificate paths are shown.

use serde_json::{Value, json};

use crate::model::{
    AccessLogTarget, Cidr, EndpointAddress, HostMatch, RbacFilter, RbacPermission, RbacPrincipal,
    ServerTlsMode, ServiceKey, ServicePort, SourceRoutes, StringMatch, StringMatchKind,
    TrafficPolicy, TunnelTarget,
};
use crate::proxy::{ServiceClusters, Shared};
use crate::route::sni::build_subset_key;
use crate::upstream::Purpose;

/// strait's own sections, and beside them Envoy's `configs` ([`super::envoy_dump`]),
/// endpoints included when asked (`include_eds`, as Envoy's admin takes it).
pub fn config_dump(shared: &Shared, include_eds: bool) -> Value {
    let runtime = shared.runtime.load();
    let snap = &runtime.snapshot;
    let s = &snap.settings;
    let mut services: Vec<&ServicePort> = snap.services.values().map(|s| s.as_ref()).collect();
    services.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    json!({
        "configs": super::envoy_dump::configs(shared, include_eds),
        "bootstrap": {
            "cluster": s.cluster,
            "network": s.network,
            "locality": s.locality.to_string(),
            "trustDomain": s.trust_domain,
            "trustDomainAliases": s.trust_domain_aliases,
            "certificates": {"dir": s.cert_dir.display().to_string()},
            "status": s.status_addr.to_string(),
            "metrics": s.metrics_addr.to_string(),
            "admin": s.admin_addr.to_string(),
            "drainDuration": format!("{:?}", s.drain_duration),
            "clientHelloTimeout": format!("{:?}", s.client_hello_timeout),
            "connectTimeout": format!("{:?}", s.connect_timeout),
            "idleTimeout": format!("{:?}", s.idle_timeout),
            "maxConnections": s.max_connections,
            "passthroughAlpn": s.passthrough_alpn,
            "accessLog": match &s.access_log {
                AccessLogTarget::Stdout => "stdout".to_string(),
                AccessLogTarget::Off => "off".to_string(),
                AccessLogTarget::File(p) => p.display().to_string(),
            },
            "rootNamespace": s.root_namespace,
            "labels": s.labels,
            "meshNetworks": s.mesh_networks.iter().map(|(n, gws)| (n.clone(), json!(gws.iter().map(|g| format!("{}:{}", g.address, g.port)).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
        },
        "discovery": shared.discovery.get().map(|d| d.dump()),
        "waypointDiscovery": shared.waypoint_discovery.get().map(|d| d.dump()),
        "listeners": snap.listeners.iter().map(|l| json!({
            "address": l.addr.to_string(),
            "servers": l.servers.iter().map(|srv| json!({
                "name": srv.name,
                "mode": srv.mode.name(),
                "routes": srv.routes.iter().map(|r| json!({
                    "virtualService": r.virtual_service,
                    "sniHosts": r.sni_hosts.iter().map(HostMatch::to_string).collect::<Vec<_>>(),
                    "destinations": r.destinations.iter().map(|d| json!({
                        "host": d.service.host,
                        "port": d.service.port,
                        "subset": d.subset,
                        "weight": d.weight,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "hosts": srv.hosts.iter().map(HostMatch::to_string).collect::<Vec<_>>(),
                "alpn": srv.alpn,
                "rbac": srv.rbac.iter().map(rbac_filter).collect::<Vec<_>>(),
                "vips": srv.vips.iter().map(|v| {
                    let mut vip = json!({
                        "range": format!("{}/{}", v.range.addr, v.range.len),
                        "port": v.port,
                    });
                    match &v.target {
                        TunnelTarget::Service(k) => vip["service"] = json!(format!("{}:{}", k.host, k.port)),
                        TunnelTarget::BySource(r) => vip["bySource"] = source_routes(r),
                    }
                    vip
                }).collect::<Vec<_>>(),
                "bySource": srv.sources.iter().map(|(k, r)| (format!("{}:{}", k.host, k.port), source_routes(r))).collect::<serde_json::Map<_, _>>(),
                "http2": (srv.mode == ServerTlsMode::Hbone).then(|| json!({
                    "maxConcurrentStreams": srv.http2.max_concurrent_streams,
                    "initialStreamWindowSize": srv.http2.initial_stream_window_size,
                    "initialConnectionWindowSize": srv.http2.initial_connection_window_size,
                    "keepaliveInterval": format!("{:?}", srv.http2.keepalive_interval),
                    "keepaliveTimeout": format!("{:?}", srv.http2.keepalive_timeout),
                })),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "services": services.iter().map(|svc| json!({
            "host": svc.host,
            "namespace": svc.namespace,
            "port": svc.port,
            "portName": svc.port_name,
            "sni": build_subset_key(svc.port, None, &svc.host),
            "policy": policy(&svc.policy),
            "tunnelPolicy": policy(&svc.tunnel_policy),
            "subsets": svc.subsets.values().map(|sub| json!({
                "name": sub.name,
                "sni": build_subset_key(svc.port, Some(&sub.name), &svc.host),
                "labels": sub.labels,
                "endpoints": sub.endpoints.len(),
                "policy": policy(&sub.policy),
            })).collect::<Vec<_>>(),
            "endpoints": svc.endpoints.iter().map(|e| json!({
                "address": match &e.address { EndpointAddress::Ip(ip) => ip.to_string(), EndpointAddress::Hostname(h) => h.clone() },
                "port": e.port,
                "labels": e.labels,
                "locality": e.locality.to_string(),
                "network": e.network,
                "weight": e.weight,
                "serviceAccount": e.service_account,
                "tlsDisabled": e.tls_disabled,
                "reach": format!("{:?}", e.reach),
                "dialledBy": Purpose::allowed(e, &s.network),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "bridges": snap.bridges.iter().map(|b| json!({
            "name": b.name, "listen": b.listen.to_string(), "host": b.host, "port": b.port,
            "subset": b.subset, "identity": b.identity,
        })).collect::<Vec<_>>(),
    })
}

/// A dispatch on a tunnel's source: the header (and the filter state istiod matches), each
/// value's service port and the one every other source takes.
fn source_routes(r: &SourceRoutes) -> serde_json::Value {
    let key = |k: &ServiceKey| format!("{}:{}", k.host, k.port);
    json!({
        "header": r.header,
        "filterState": r.state_key,
        "exact": r.exact.iter().map(|(v, k)| (v.clone(), json!(key(k)))).collect::<serde_json::Map<_, _>>(),
        "prefix": r.prefix.iter().map(|(v, k)| (v.clone(), json!(key(k)))).collect::<serde_json::Map<_, _>>(),
        "onNoMatch": r.otherwise.as_ref().map(key),
    })
}

/// A network RBAC filter in Envoy's JSON shape (`rules.policies`, keyed by name), whether
/// istiod sent it or it was compiled from files.
fn rbac_filter(f: &RbacFilter) -> Value {
    json!({
        "name": f.name,
        "action": format!("{:?}", f.action).to_uppercase(),
        "policies": f.policies.as_ref().map(|ps| ps.iter().map(|p| (p.name.clone(), json!({
            "permissions": p.permissions.iter().map(rbac_permission).collect::<Vec<_>>(),
            "principals": p.principals.iter().map(rbac_principal).collect::<Vec<_>>(),
        }))).collect::<serde_json::Map<_, _>>()),
    })
}

fn rbac_permission(p: &RbacPermission) -> Value {
    match p {
        RbacPermission::Any => json!({"any": true}),
        RbacPermission::And(all) => {
            json!({"andRules": {"rules": all.iter().map(rbac_permission).collect::<Vec<_>>()}})
        }
        RbacPermission::Or(any) => {
            json!({"orRules": {"rules": any.iter().map(rbac_permission).collect::<Vec<_>>()}})
        }
        RbacPermission::Not(x) => json!({"notRule": rbac_permission(x)}),
        RbacPermission::DestinationPort(port) => json!({"destinationPort": port}),
        RbacPermission::DestinationPortRange(start, end) => {
            json!({"destinationPortRange": {"start": start, "end": end}})
        }
        RbacPermission::DestinationIp(c) => json!({"destinationIp": cidr(c)}),
        RbacPermission::ServerName(m) => json!({"requestedServerName": string_match(m)}),
    }
}

fn rbac_principal(p: &RbacPrincipal) -> Value {
    match p {
        RbacPrincipal::Any => json!({"any": true}),
        RbacPrincipal::And(all) => {
            json!({"andIds": {"ids": all.iter().map(rbac_principal).collect::<Vec<_>>()}})
        }
        RbacPrincipal::Or(any) => {
            json!({"orIds": {"ids": any.iter().map(rbac_principal).collect::<Vec<_>>()}})
        }
        RbacPrincipal::Not(x) => json!({"notId": rbac_principal(x)}),
        RbacPrincipal::Authenticated(m) => {
            json!({"authenticated": {"principalName": m.as_ref().map(string_match)}})
        }
        RbacPrincipal::RemoteIp(c) => json!({"remoteIp": cidr(c)}),
    }
}

fn cidr(c: &Cidr) -> Value {
    json!({"addressPrefix": c.addr.to_string(), "prefixLen": c.len})
}

fn string_match(m: &StringMatch) -> Value {
    let mut out = match m.kind() {
        StringMatchKind::Exact(s) => json!({"exact": s}),
        StringMatchKind::Prefix(s) => json!({"prefix": s}),
        StringMatchKind::Suffix(s) => json!({"suffix": s}),
        StringMatchKind::Contains(s) => json!({"contains": s}),
        StringMatchKind::Regex(r) => {
            // Held anchored for a full match; shown as written.
            let written = r
                .as_str()
                .strip_prefix("^(?:")
                .and_then(|s| s.strip_suffix(")$"))
                .unwrap_or(r.as_str());
            json!({"safeRegex": {"regex": written}})
        }
    };
    if m.ignore_case() {
        out["ignoreCase"] = json!(true);
    }
    out
}

fn policy(p: &TrafficPolicy) -> Value {
    json!({
        "destinationRule": p.destination_rule,
        "loadBalancer": format!("{:?}", p.lb),
        "connectTimeout": p.connect_timeout.map(|d| format!("{d:?}")),
        "idleTimeout": p.idle_timeout.map(|d| format!("{d:?}")),
        "maxConnections": p.max_connections,
        "maxConnectionDuration": p.max_connection_duration.map(|d| format!("{d:?}")),
        "outlierDetection": p.outlier.as_ref().map(|o| json!({
            "consecutiveErrors": o.consecutive_errors,
            "interval": format!("{:?}", o.interval),
            "baseEjectionTime": format!("{:?}", o.base_ejection_time),
            "maxEjectionPercent": o.max_ejection_percent,
            "minHealthPercent": o.min_health_percent,
        })),
        "tls": format!("{:?}", p.tls),
    })
}

pub fn clusters(shared: &Shared) -> Value {
    let runtime = shared.runtime.load();
    let mut keys: Vec<_> = runtime.clusters.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let ServiceClusters {
            all,
            subsets,
            tunnels,
        } = runtime.clusters[key].as_ref();
        let mut entries = vec![(build_subset_key(key.port, None, &key.host), None, all)];
        entries.extend(
            subsets
                .iter()
                .map(|(n, c)| (build_subset_key(key.port, Some(n), &key.host), Some(n), c)),
        );
        // The 15008 tunnels' cluster, by the name Istio's ambient east-west gateway gives it.
        entries.extend(tunnels.iter().map(|c| {
            (
                format!("inbound-vip|{}|tcp|{}", key.port, key.host),
                None,
                c,
            )
        }));
        for (name, subset, cluster) in entries {
            out.push(json!({
                "name": name,
                "service": key.host,
                "port": key.port,
                "subset": subset,
                "policy": policy(&cluster.policy),
                "activeConnections": cluster.active(),
                "endpoints": cluster.members.iter().map(|m| json!({
                    "address": m.endpoint.authority(),
                    "locality": m.endpoint.locality.to_string(),
                    "network": m.endpoint.network,
                    "weight": m.endpoint.weight,
                    "health": if cluster.is_ejected(m) { "ejected" } else { "healthy" },
                    "ejectedForMs": m.state.ejected_for().map(|d| d.as_millis() as u64),
                    "ejections": m.state.ejection_count(),
                    "consecutiveFailures": m.state.consecutive_failures(),
                    "connectFailures": m.state.total_failures(),
                    "activeConnections": m.state.active(),
                    "passthroughEligible": !m.endpoint.tls_disabled,
                    "dialledBy": Purpose::allowed(&m.endpoint, &runtime.snapshot.settings.network),
                })).collect::<Vec<_>>(),
            }));
        }
    }
    json!({
        "clusters": out,
        "cluster_statuses": super::envoy_dump::cluster_statuses(shared),
    })
}
