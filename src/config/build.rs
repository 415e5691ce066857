//! Checks that span documents (duplicates, references, conflicts) and assembly of the
//! [`Snapshot`] from everything read.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{
    BridgeSpec, Endpoint, EndpointAddress, HostMatch, ListenerSpec, Resolution, ServerSpec,
    ServerTlsMode, ServiceKey, ServicePort, Settings, Snapshot, Subset,
};
use crate::policy;

use super::diagnostics::{Loc, Sink};
use super::document::{Meta, Parsed};
use super::istio::{DestinationRuleDoc, EndpointDoc, SePort, ServiceEntryDoc, WorkloadEntryDoc};
use super::virtual_service::{self, Declared, ServerRef, VirtualServiceDoc};

/// The label Istio puts on workloads that do not accept mTLS.
use crate::model::TLS_MODE_LABEL;

pub(crate) fn build(sink: &mut Sink, parsed: Parsed) -> Snapshot {
    let Parsed {
        bootstrap,
        gateways,
        service_entries,
        workload_entries,
        destination_rules,
        peer_authentications,
        authorization_policies,
        bridges,
        virtual_services,
    } = parsed;

    let mut sockets: Vec<(SocketAddr, Option<Loc>, String)> = Vec::new();
    let settings = match bootstrap {
        Some(b) => {
            sockets.push((
                b.settings.status_addr,
                Some(b.status_loc),
                "Bootstrap status".into(),
            ));
            sockets.push((
                b.settings.metrics_addr,
                Some(b.metrics_loc),
                "Bootstrap metrics".into(),
            ));
            sockets.push((
                b.settings.admin_addr,
                Some(b.admin_loc),
                "Bootstrap admin".into(),
            ));
            b.settings
        }
        None => {
            let s = Settings::default();
            sockets.push((s.status_addr, None, "the default status address".into()));
            sockets.push((s.metrics_addr, None, "the default metrics address".into()));
            sockets.push((s.admin_addr, None, "the default admin address".into()));
            s
        }
    };

    // Listeners: servers grouped by socket address; one address serves one TLS mode.
    let mut listeners: Vec<ListenerSpec> = Vec::new();
    for gw in &gateways {
        for server in &gw.servers {
            match listeners.iter_mut().find(|l| l.addr == server.addr) {
                Some(l) => {
                    if let Some(other) = l.servers.iter().find(|s| s.mode != server.mode) {
                        sink.error(
                            server.mode_loc,
                            format!(
                                "server {} ({}) conflicts with server {} ({}) on {}; one address serves one TLS mode, use another port or bind",
                                server.name,
                                server.mode.name(),
                                other.name,
                                other.mode.name(),
                                server.addr
                            ),
                        );
                        continue;
                    }
                    l.servers.push(server_spec(server));
                }
                None => {
                    sockets.push((
                        server.addr,
                        Some(server.mode_loc),
                        format!("Gateway server {}", server.name),
                    ));
                    listeners.push(ListenerSpec {
                        addr: server.addr,
                        servers: vec![server_spec(server)],
                    });
                }
            }
        }
    }

    let mut services = build_services(sink, &service_entries, &workload_entries);
    apply_destination_rules(sink, &destination_rules, &mut services);
    bind_virtual_services(
        sink,
        &gateways,
        &virtual_services,
        &services,
        &mut listeners,
    );

    let mut bridge_specs = Vec::new();
    for b in &bridges {
        let key = ServiceKey::new(&b.host, b.port);
        let Some(svc) = services.ports.get(&key) else {
            sink.error(
                b.host_loc,
                format!(
                    "Bridge {}: no ServiceEntry declares {}:{}; name a host and service port a ServiceEntry declares",
                    b.meta.name, b.host, b.port
                ),
            );
            continue;
        };
        if let Some((subset, loc)) = &b.subset
            && !svc.subsets.contains_key(subset)
        {
            let known: Vec<&str> = svc.subsets.keys().map(String::as_str).collect();
            sink.error(
                *loc,
                format!(
                    "Bridge {}: {} has no subset {subset:?} ({})",
                    b.meta.name,
                    b.host,
                    if known.is_empty() {
                        "no DestinationRule declares subsets for it".to_string()
                    } else {
                        format!("declared subsets: {}", known.join(", "))
                    }
                ),
            );
            continue;
        }
        sockets.push((
            b.listen,
            Some(b.listen_loc),
            format!("Bridge {}", b.meta.name),
        ));
        let route = virtual_service::bridge_route(
            sink,
            &key.host,
            b.port,
            &virtual_services,
            &services.declared(),
        );
        bridge_specs.push(BridgeSpec {
            name: b.meta.name.clone(),
            listen: b.listen,
            host: key.host,
            port: b.port,
            subset: b.subset.as_ref().map(|(s, _)| s.clone()),
            identity: b.identity.clone(),
            route,
        });
    }

    check_socket_conflicts(sink, &sockets);

    // Policies that apply to this gateway: root namespace without selector, or a selector
    // whose labels the gateway carries.
    let applies = |meta: &Meta, selector: &Option<BTreeMap<String, String>>| match selector {
        None => meta.namespace == settings.root_namespace,
        Some(sel) => is_subset(sel, &settings.labels),
    };
    let mut peer_authentication = None;
    let mut chosen: Option<(&Meta, bool)> = None;
    for pa in &peer_authentications {
        if !applies(&pa.meta, &pa.selector) {
            tracing::debug!(policy = %pa.meta.qualified(), "PeerAuthentication does not select this gateway");
            continue;
        }
        let Some(mode) = pa.mode else { continue };
        let specific = pa.selector.is_some();
        match chosen {
            // A workload-specific policy overrides the mesh-wide one, as in Istio.
            Some((_, false)) if specific => {}
            Some((first, first_specific)) => {
                if first_specific == specific {
                    sink.warn(
                        pa.meta.loc,
                        format!(
                            "PeerAuthentication {} also applies to this gateway; {} is used; ignored",
                            pa.meta.qualified(),
                            first.qualified()
                        ),
                    );
                }
                continue;
            }
            None => {}
        }
        chosen = Some((&pa.meta, specific));
        peer_authentication = Some(mode);
    }
    let selected: Vec<_> = authorization_policies
        .iter()
        .filter(|ap| {
            let ok = applies(&ap.meta, &ap.selector);
            if !ok {
                tracing::debug!(policy = %ap.meta.qualified(), "AuthorizationPolicy does not select this gateway");
            }
            ok
        })
        .filter_map(|ap| ap.policy.clone())
        .collect();
    // As istiod: the RBAC goes in front of every ISTIO_MUTUAL and PASSTHROUGH server's
    // routing; AUTO_PASSTHROUGH chains get none. An HBONE listener gets it too, judged on
    // the outer client's identity.
    let mut trust_domains = vec![settings.trust_domain.clone()];
    trust_domains.extend(settings.trust_domain_aliases.iter().cloned());
    let rbac = policy::compile::compile(&selected, &trust_domains);
    for server in listeners.iter_mut().flat_map(|l| l.servers.iter_mut()) {
        if server.mode != ServerTlsMode::AutoPassthrough {
            server.rbac = rbac.clone();
        }
    }

    Snapshot {
        settings,
        listeners,
        services: services
            .ports
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
        bridges: bridge_specs,
        rbac,
        peer_authentication,
    }
}

/// Gives each PASSTHROUGH and ISTIO_MUTUAL server the routes of the VirtualServices bound
/// to it.
fn bind_virtual_services(
    sink: &mut Sink,
    gateways: &[super::istio::GatewayDoc],
    vss: &[VirtualServiceDoc],
    services: &Services,
    listeners: &mut [ListenerSpec],
) {
    let declared = services.declared();
    let mut taken = BTreeMap::new();
    for gw in gateways {
        for doc in &gw.servers {
            let server = ServerRef {
                gateway_namespace: &gw.namespace,
                gateway_name: &gw.name,
                port: doc.addr.port(),
                mode: doc.mode,
                hosts: &doc.hosts,
                host_namespaces: &doc.host_namespaces,
            };
            let routes = virtual_service::routes_for(sink, &server, vss, &declared, &mut taken);
            if doc.mode == ServerTlsMode::Passthrough && routes.is_empty() {
                sink.warn(
                    doc.mode_loc,
                    format!(
                        "PASSTHROUGH server {} has no VirtualService tls route bound to it (gateways: [{}/{}]); it refuses every connection",
                        doc.name, gw.namespace, gw.name
                    ),
                );
            }
            if let Some(spec) = listeners
                .iter_mut()
                .flat_map(|l| l.servers.iter_mut())
                .find(|s| s.name == doc.name)
            {
                spec.routes = routes;
            }
        }
    }
}

fn server_spec(s: &super::istio::ServerDoc) -> ServerSpec {
    ServerSpec {
        name: s.name.clone(),
        mode: s.mode,
        hosts: s.hosts.clone().into(),
        alpn: None,
        routes: Vec::new(),
        rbac: Vec::new(),
        vips: Vec::new(),
        http2: Default::default(),
        sources: Default::default(),
    }
}

fn is_subset(wanted: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Two sockets that cannot both be bound: same port, and the same IP or either a wildcard.
fn check_socket_conflicts(sink: &mut Sink, sockets: &[(SocketAddr, Option<Loc>, String)]) {
    for (i, (a, a_loc, a_what)) in sockets.iter().enumerate() {
        for (b, b_loc, b_what) in &sockets[..i] {
            let clash = a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified());
            if !clash {
                continue;
            }
            let loc = a_loc.or(*b_loc);
            if let Some(loc) = loc {
                sink.error(
                    loc,
                    format!("{a_what} ({a}) cannot be bound together with {b_what} ({b}); give one of them another port"),
                );
            }
        }
    }
}

impl Services {
    /// What VirtualService destinations may name.
    fn declared(&self) -> Declared<'_> {
        Declared {
            ports_of_host: &self.by_host,
            ports: &self.ports,
        }
    }
}

/// Services as they are built, with where each was declared.
struct Services {
    ports: HashMap<ServiceKey, ServicePort>,
    declared_by: HashMap<ServiceKey, String>,
    /// Host → its declared service ports.
    by_host: HashMap<String, Vec<u16>>,
}

/// Index of WorkloadEntries for `workloadSelector`s: by namespace and by (namespace, label).
struct WorkloadIndex<'a> {
    entries: &'a [WorkloadEntryDoc],
    by_namespace: HashMap<&'a str, Vec<usize>>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> WorkloadIndex<'a> {
    fn new(entries: &'a [WorkloadEntryDoc]) -> Self {
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, we) in entries.iter().enumerate() {
            let ns = we.meta.namespace.as_str();
            by_namespace.entry(ns).or_default().push(i);
            for (k, v) in &we.endpoint.labels {
                by_label.entry((ns, k, v)).or_default().push(i);
            }
        }
        WorkloadIndex {
            entries,
            by_namespace,
            by_label,
        }
    }

    /// WorkloadEntries of `namespace` carrying all `labels`, in file order.
    fn select(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<&'a WorkloadEntryDoc> {
        let candidates = if labels.is_empty() {
            self.by_namespace.get(namespace)
        } else {
            // The rarest label narrows the candidates most.
            labels
                .iter()
                .map(|(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())))
                .min_by_key(|list| list.map_or(0, |l| l.len()))
                .flatten()
        };
        candidates
            .map(|list| {
                list.iter()
                    .map(|i| &self.entries[*i])
                    .filter(|we| is_subset(labels, &we.endpoint.labels))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn endpoint(e: &EndpointDoc, port: &SePort, resolution: Resolution) -> Option<Endpoint> {
    let address = match e.address.parse::<IpAddr>() {
        Ok(ip) => EndpointAddress::Ip(ip),
        Err(_) if resolution == Resolution::Dns => {
            EndpointAddress::Hostname(e.address.to_ascii_lowercase())
        }
        Err(_) => return None,
    };
    Some(Endpoint {
        address,
        port: e.port_for(port),
        tls_disabled: e
            .labels
            .get(TLS_MODE_LABEL)
            .is_some_and(|v| v == "disabled"),
        reach: crate::model::Reach::Any,
        labels: e.labels.clone(),
        locality: e.locality.clone(),
        network: e.network.clone(),
        weight: e.weight,
        service_account: e.service_account.clone(),
        priority: None,
        locality_weight: None,
    })
}

fn build_services(
    sink: &mut Sink,
    entries: &[ServiceEntryDoc],
    workloads: &[WorkloadEntryDoc],
) -> Services {
    let index = WorkloadIndex::new(workloads);
    let mut out = Services {
        ports: HashMap::new(),
        declared_by: HashMap::new(),
        by_host: HashMap::new(),
    };
    for se in entries {
        // Endpoints written in the entry, then the WorkloadEntries it selects.
        let mut endpoint_docs: Vec<&EndpointDoc> = se.endpoints.iter().collect();
        if let Some(selector) = &se.selector {
            for we in index.select(&se.meta.namespace, selector) {
                if se.resolution == Resolution::Static
                    && we.endpoint.address.parse::<IpAddr>().is_err()
                {
                    sink.error(
                        we.endpoint.address_loc,
                        format!(
                            "spec.address: {:?} is not an IP address, but ServiceEntry {} (resolution STATIC) selects WorkloadEntry {}; use an IP address or resolution: DNS",
                            we.endpoint.address,
                            se.meta.qualified(),
                            we.meta.qualified()
                        ),
                    );
                    continue;
                }
                endpoint_docs.push(&we.endpoint);
            }
        }
        for (host, host_loc) in &se.hosts {
            for port in &se.ports {
                let key = ServiceKey::new(host, port.number);
                if let Some(first) = out.declared_by.get(&key) {
                    sink.error(
                        *host_loc,
                        format!(
                            "service {host}:{} is already declared by ServiceEntry {first}; each host and port may be declared once",
                            port.number
                        ),
                    );
                    continue;
                }
                let endpoints = endpoint_docs
                    .iter()
                    .filter_map(|e| endpoint(e, port, se.resolution))
                    .collect();
                out.declared_by.insert(key.clone(), se.meta.qualified());
                out.by_host
                    .entry(key.host.clone())
                    .or_default()
                    .push(port.number);
                out.ports.insert(
                    key.clone(),
                    ServicePort {
                        host: key.host,
                        namespace: se.meta.namespace.clone(),
                        port: port.number,
                        port_name: port.name.clone(),
                        endpoints,
                        policy: Default::default(),
                        tunnel_policy: tunnel_policy(None),
                        subsets: BTreeMap::new(),
                        resolution: se.resolution,
                        default_route: Default::default(),
                    },
                );
            }
        }
    }
    out
}

/// The policy of a service port's 15008 tunnels, as istiod builds an ambient east-west
/// gateway's `inbound-vip` cluster and its `tcp_proxy` (`cluster_waypoint.go`,
/// `listener_waypoint.go`): LEAST_REQUEST, no outlier detection, no connection limit and
/// the default connect timeout whatever the DestinationRule says ("east-west gateways don't
/// respect DestinationRule"); only the rule's top-level `connectionPool.tcp.idleTimeout`
/// and `maxConnectionDuration` hold, on the tunnel (port-level settings do not).
fn tunnel_policy(dr: Option<&DestinationRuleDoc>) -> crate::model::TrafficPolicy {
    let pool = dr.and_then(|d| d.policy.top.pool.as_ref());
    let idle_timeout = pool.and_then(|p| p.idle_timeout);
    let max_connection_duration = pool.and_then(|p| p.max_connection_duration);
    let applied = idle_timeout.is_some() || max_connection_duration.is_some();
    crate::model::TrafficPolicy {
        destination_rule: dr.filter(|_| applied).map(|d| d.meta.qualified()),
        lb: crate::model::LbPolicy::LeastRequest,
        idle_timeout,
        max_connection_duration,
        ..Default::default()
    }
}

fn apply_destination_rules(sink: &mut Sink, rules: &[DestinationRuleDoc], services: &mut Services) {
    let mut exact: HashMap<&str, &DestinationRuleDoc> = HashMap::new();
    let mut wildcard: Vec<(HostMatch, &DestinationRuleDoc)> = Vec::new();
    for dr in rules {
        if dr.host.starts_with('*') {
            wildcard.push((HostMatch::parse(&dr.host), dr));
            continue;
        }
        if let Some(first) = exact.get(dr.host.as_str()) {
            sink.warn(
                dr.host_loc,
                format!(
                    "DestinationRule {} also targets {}, which DestinationRule {} already covers; ignored",
                    dr.meta.qualified(),
                    dr.host,
                    first.meta.qualified()
                ),
            );
            continue;
        }
        if !services.by_host.contains_key(&dr.host) {
            sink.warn(
                dr.host_loc,
                format!(
                    "DestinationRule {}: host {} matches no ServiceEntry host; ignored",
                    dr.meta.qualified(),
                    dr.host
                ),
            );
            continue;
        }
        exact.insert(&dr.host, dr);
    }
    // The most specific wildcard first: `*.ns.svc.cluster.local` before `*.local` before `*`.
    wildcard.sort_by_key(|(m, _)| match m {
        HostMatch::Suffix(s) => std::cmp::Reverse(s.len()),
        _ => std::cmp::Reverse(0),
    });
    let mut wildcard_used = vec![false; wildcard.len()];

    for svc in services.ports.values_mut() {
        let dr = match exact.get(svc.host.as_str()) {
            Some(dr) => Some(*dr),
            None => wildcard
                .iter()
                .enumerate()
                .find(|(_, (m, _))| m.matches(&svc.host))
                .map(|(i, (_, dr))| {
                    wildcard_used[i] = true;
                    *dr
                }),
        };
        let Some(dr) = dr else { continue };
        let base = dr.policy.for_port(svc.port);
        let source = Some(dr.meta.qualified());
        svc.policy = base.to_policy();
        svc.policy.destination_rule = source.clone();
        svc.tunnel_policy = tunnel_policy(Some(dr));
        for s in &dr.subsets {
            let endpoints = svc
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| is_subset(&s.labels, &e.labels))
                .map(|(i, _)| i)
                .collect();
            svc.subsets.insert(
                s.name.clone(),
                Subset {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    endpoints,
                    policy: crate::model::TrafficPolicy {
                        destination_rule: source.clone(),
                        ..s.policy.for_port(svc.port).over(&base).to_policy()
                    },
                },
            );
        }
    }

    for (i, (_, dr)) in wildcard.iter().enumerate() {
        if !wildcard_used[i] {
            sink.warn(
                dr.host_loc,
                format!(
                    "DestinationRule {}: host {} matches no ServiceEntry host; ignored",
                    dr.meta.qualified(),
                    dr.host
                ),
            );
        }
    }
    // A subset that selects nothing on any port of its host is almost always a typo.
    for dr in exact.values() {
        let ports = services
            .by_host
            .get(&dr.host)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for s in &dr.subsets {
            let matched = ports.iter().any(|p| {
                services
                    .ports
                    .get(&ServiceKey::new(&dr.host, *p))
                    .and_then(|svc| svc.subsets.get(&s.name))
                    .is_some_and(|sub| !sub.endpoints.is_empty())
            });
            if !matched {
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                sink.warn(
                    s.loc,
                    format!(
                        "subset {} of {} matches no endpoint (labels {})",
                        s.name,
                        dr.host,
                        labels.join(", ")
                    ),
                );
            }
        }
    }
}
