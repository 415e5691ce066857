//! Readers for the Istio kinds strait acts on. Each turns a document's `spec` into a plain
//! value with positions kept for the checks that span documents (see `build`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::model::{
    Cidr, HostMatch, LbPolicy, Locality, LocalityLbSetting, OutlierDetection, PeerAuthMode,
    Resolution, ServerTlsMode, UpstreamTls,
};
use crate::policy::compile::{
    Action, AuthorizationPolicy, Condition, ConditionKey, Operation, Rule, Source, parse_cidr,
};

use super::diagnostics::{Loc, Sink};
use super::document::Meta;
use super::fields::{self, Fields, Path};
use super::yaml::Node;

// ---------------------------------------------------------------------------------------------
// Gateway

#[derive(Debug)]
pub(crate) struct GatewayDoc {
    pub name: String,
    pub namespace: String,
    pub servers: Vec<ServerDoc>,
}

/// One usable `servers[]` entry.
#[derive(Debug)]
pub(crate) struct ServerDoc {
    pub name: String,
    pub addr: SocketAddr,
    pub mode: ServerTlsMode,
    pub hosts: Vec<HostMatch>,
    /// The namespace each host admits VirtualServices from (`ns/host`, `./host` for the
    /// Gateway's own); `None` for any (no prefix, or `*/host`), as Istio's
    /// `pickMatchingGatewayHosts` reads it.
    pub host_namespaces: Vec<Option<String>>,
    /// Where `tls.mode` was written.
    pub mode_loc: Loc,
}

const SERVER_TLS_NOT_USED: [&str; 15] = [
    "httpsRedirect",
    "serverCertificate",
    "privateKey",
    "caCertificates",
    "caCrl",
    "credentialName",
    "credentialNames",
    "tlsCertificates",
    "subjectAltNames",
    "verifyCertificateSpki",
    "verifyCertificateHash",
    "minProtocolVersion",
    "maxProtocolVersion",
    "cipherSuites",
    "insecureSkipVerify",
];

pub(crate) fn gateway(sink: &mut Sink, meta: Meta, mut spec: Fields<'_, '_>) -> Option<GatewayDoc> {
    let root = *spec.path();
    spec.accept(&["selector"]);
    let mut servers = Vec::new();
    match spec.get("servers") {
        Some(list) => {
            let p = root.key("servers");
            for (i, item) in fields::seq(sink, list, &p).iter().enumerate() {
                if let Some(s) = server(sink, &meta, i, item, &p.index(i)) {
                    servers.push(s);
                }
            }
        }
        None => sink.error(
            meta.loc,
            "Gateway has no spec.servers; add at least one server",
        ),
    }
    spec.finish(sink);
    Some(GatewayDoc {
        name: meta.name,
        namespace: meta.namespace,
        servers,
    })
}

fn server(
    sink: &mut Sink,
    meta: &Meta,
    index: usize,
    node: &Node,
    path: &Path<'_>,
) -> Option<ServerDoc> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut number = None;
    match f.get("port") {
        Some(port_node) => {
            let pp = path.key("port");
            if let Some(mut pf) = Fields::of(sink, port_node, pp) {
                match pf.get("number") {
                    Some(n) => number = fields::port(sink, n, &pp.key("number")),
                    None => sink.error(port_node.loc, format!("{pp}.number is required")),
                }
                pf.accept(&["name", "protocol"]);
                pf.not_used(sink, &["targetPort"]);
                pf.finish(sink);
            }
        }
        None => sink.error(node.loc, format!("{path}.port is required")),
    }
    let bind = f
        .get("bind")
        .map(|n| fields::ip(sink, n, &path.key("bind")))
        .unwrap_or(Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
    let written = match f.get("hosts") {
        Some(n) => fields::strings(sink, n, &path.key("hosts")),
        None => Vec::new(),
    };
    let hosts: Vec<HostMatch> = written.iter().map(|h| HostMatch::parse(h)).collect();
    let host_namespaces = written
        .iter()
        .map(|h| match h.split_once('/') {
            None | Some(("*", _)) => None,
            Some((".", _)) => Some(meta.namespace.clone()),
            Some((ns, _)) => Some(ns.to_string()),
        })
        .collect();
    if hosts.is_empty() {
        sink.error(
            node.loc,
            format!(
                "{path}.hosts is empty; list the service hosts this server admits, e.g. \"*.local\""
            ),
        );
    }
    let mut mode = None;
    let mut mode_loc = node.loc;
    let mut skipped = false;
    match f.get("tls") {
        Some(tls) => {
            let tp = path.key("tls");
            if let Some(mut tf) = Fields::of(sink, tls, tp) {
                match tf.get("mode") {
                    Some(m) => {
                        mode_loc = m.loc;
                        let mp = tp.key("mode");
                        match fields::word(
                            sink,
                            m,
                            &mp,
                            &[
                                "AUTO_PASSTHROUGH",
                                "ISTIO_MUTUAL",
                                "PASSTHROUGH",
                                "SIMPLE",
                                "MUTUAL",
                                "OPTIONAL_MUTUAL",
                            ],
                        ) {
                            Some("AUTO_PASSTHROUGH") => mode = Some(ServerTlsMode::AutoPassthrough),
                            Some("ISTIO_MUTUAL") => mode = Some(ServerTlsMode::IstioMutual),
                            Some("PASSTHROUGH") => mode = Some(ServerTlsMode::Passthrough),
                            Some(other) => {
                                skipped = true;
                                sink.warn(
                                    m.loc,
                                    format!(
                                        "{mp} {other} is not supported by strait \
                                         (AUTO_PASSTHROUGH, ISTIO_MUTUAL or PASSTHROUGH); server skipped"
                                    ),
                                );
                            }
                            None => skipped = true,
                        }
                    }
                    None => {
                        skipped = true;
                        sink.warn(
                            tls.loc,
                            format!("{tp}.mode is not set; strait serves only AUTO_PASSTHROUGH, ISTIO_MUTUAL and PASSTHROUGH servers; server skipped"),
                        );
                    }
                }
                tf.not_used(sink, &SERVER_TLS_NOT_USED);
                tf.finish(sink);
            }
        }
        None => {
            skipped = true;
            sink.warn(
                node.loc,
                format!("{path} has no tls.mode; strait serves only AUTO_PASSTHROUGH, ISTIO_MUTUAL and PASSTHROUGH servers; server skipped"),
            );
        }
    }
    f.accept(&["name"]);
    f.not_used(sink, &["defaultEndpoint"]);
    f.finish(sink);
    if skipped {
        return None;
    }
    Some(ServerDoc {
        name: format!("{}/{}/{index}", meta.namespace, meta.name),
        addr: SocketAddr::new(bind?, number?),
        mode: mode?,
        hosts,
        host_namespaces,
        mode_loc,
    })
}

// ---------------------------------------------------------------------------------------------
// ServiceEntry and WorkloadEntry

#[derive(Debug)]
pub(crate) struct ServiceEntryDoc {
    pub meta: Meta,
    /// Lower-case hosts and where each was written.
    pub hosts: Vec<(String, Loc)>,
    pub ports: Vec<SePort>,
    pub resolution: Resolution,
    pub endpoints: Vec<EndpointDoc>,
    /// `workloadSelector.labels`: WorkloadEntries of the same namespace carrying all of them.
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Debug)]
pub(crate) struct SePort {
    pub number: u16,
    pub name: String,
    pub target_port: Option<u16>,
}

/// An endpoint as written (ServiceEntry `endpoints[]` or a WorkloadEntry's spec).
#[derive(Debug, Clone)]
pub(crate) struct EndpointDoc {
    pub address: String,
    pub address_loc: Loc,
    /// Port name → port to dial, with where the name was written.
    pub ports: Vec<(String, u16, Loc)>,
    pub labels: BTreeMap<String, String>,
    pub locality: Locality,
    pub network: String,
    pub weight: u32,
    pub service_account: Option<String>,
}

impl EndpointDoc {
    /// The port to dial for a service port: the endpoint's port of that name, else the
    /// service port's `targetPort`, else the service port number.
    pub fn port_for(&self, port: &SePort) -> u16 {
        self.ports
            .iter()
            .find(|(name, _, _)| !port.name.is_empty() && *name == port.name)
            .map(|(_, p, _)| *p)
            .or(port.target_port)
            .unwrap_or(port.number)
    }
}

#[derive(Debug)]
pub(crate) struct WorkloadEntryDoc {
    pub meta: Meta,
    pub endpoint: EndpointDoc,
}

pub(crate) fn service_entry(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<ServiceEntryDoc> {
    let root = *spec.path();
    let mut hosts = Vec::new();
    if let Some(n) = spec.get("hosts") {
        for (h, loc) in fields::strings_at(sink, n, &root.key("hosts")) {
            if h.starts_with('*') {
                sink.warn(
                    loc,
                    format!("wildcard host {h:?} cannot be reached by an SNI key; host skipped"),
                );
                continue;
            }
            hosts.push((h.to_ascii_lowercase(), loc));
        }
    } else {
        sink.error(
            meta.loc,
            "ServiceEntry has no spec.hosts; add the service's host name",
        );
    }

    let mut ports: Vec<SePort> = Vec::new();
    match spec.get("ports") {
        Some(list) => {
            let pp = root.key("ports");
            for (i, item) in fields::seq(sink, list, &pp).iter().enumerate() {
                let ip = pp.index(i);
                let Some(mut pf) = Fields::of(sink, item, ip) else {
                    continue;
                };
                let number = match pf.get("number") {
                    Some(n) => fields::port(sink, n, &ip.key("number")),
                    None => {
                        sink.error(item.loc, format!("{ip}.number is required"));
                        None
                    }
                };
                let name = pf
                    .get("name")
                    .and_then(|n| fields::string(sink, n, &ip.key("name")))
                    .unwrap_or_default();
                let target_port = pf
                    .get("targetPort")
                    .and_then(|n| fields::port(sink, n, &ip.key("targetPort")));
                pf.accept(&["protocol"]);
                pf.finish(sink);
                let Some(number) = number else { continue };
                if let Some(prev) = ports.iter().find(|p| p.number == number) {
                    sink.error(
                        item.loc,
                        format!(
                            "{ip}: port {number} is declared twice (also as {:?})",
                            prev.name
                        ),
                    );
                    continue;
                }
                if !name.is_empty() && ports.iter().any(|p| p.name == name) {
                    sink.error(
                        item.loc,
                        format!("{ip}: port name {name:?} is declared twice"),
                    );
                    continue;
                }
                ports.push(SePort {
                    number,
                    name,
                    target_port,
                });
            }
        }
        None => sink.error(
            meta.loc,
            "ServiceEntry has no spec.ports; add at least one port",
        ),
    }

    let mut resolution = Some(Resolution::Static);
    if let Some(n) = spec.get("resolution") {
        let rp = root.key("resolution");
        match fields::word(sink, n, &rp, &["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]) {
            Some("STATIC") => {}
            Some("DNS") | Some("DNS_ROUND_ROBIN") => resolution = Some(Resolution::Dns),
            Some(_) => {
                sink.warn(
                    n.loc,
                    format!(
                        "{rp} NONE forwards to the original destination, which a gateway does not \
                         know; ServiceEntry {} skipped (use STATIC or DNS)",
                        meta.qualified()
                    ),
                );
                resolution = None;
            }
            None => resolution = None,
        }
    }
    if let Some(n) = spec.get("location") {
        fields::word(
            sink,
            n,
            &root.key("location"),
            &["MESH_EXTERNAL", "MESH_INTERNAL"],
        );
    }

    let mut endpoints = Vec::new();
    let endpoints_node = spec.get("endpoints");
    if let Some(list) = endpoints_node {
        let ep = root.key("endpoints");
        for (i, item) in fields::seq(sink, list, &ep).iter().enumerate() {
            let ip = ep.index(i);
            let Some(mut f) = Fields::of(sink, item, ip) else {
                continue;
            };
            let Some(e) = endpoint(sink, &mut f, item, &ip) else {
                f.finish(sink);
                continue;
            };
            f.finish(sink);
            let mut ok = true;
            for (name, _, loc) in &e.ports {
                if !ports.iter().any(|p| &p.name == name) {
                    ok = false;
                    let declared: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
                    sink.error(
                        *loc,
                        format!(
                            "{ip}.ports: unknown port name {name:?}; the ServiceEntry declares {}",
                            if declared.is_empty() {
                                "no named ports".to_string()
                            } else {
                                declared.join(", ")
                            }
                        ),
                    );
                }
            }
            if let Some(res) = resolution {
                ok &= check_address(sink, &e, res, &ip.key("address"));
            }
            if ok {
                endpoints.push(e);
            }
        }
    }
    let mut selector = None;
    if let Some((key, n)) = spec.get_entry("workloadSelector") {
        let wp = root.key("workloadSelector");
        if let Some(mut wf) = Fields::of(sink, n, wp) {
            let labels = wf
                .get("labels")
                .map(|l| fields::string_map(sink, l, &wp.key("labels")))
                .unwrap_or_default();
            wf.finish(sink);
            if endpoints_node.is_some() {
                sink.error(
                    key.loc,
                    "spec.workloadSelector and spec.endpoints are both set; a ServiceEntry takes one or the other",
                );
            } else {
                selector = Some(labels);
            }
        }
    }
    spec.accept(&["addresses"]);
    spec.not_used(sink, &["exportTo", "subjectAltNames"]);
    spec.finish(sink);
    Some(ServiceEntryDoc {
        meta,
        hosts,
        ports,
        resolution: resolution?,
        endpoints,
        selector,
    })
}

/// Whether an endpoint address fits the resolution; reports it if not.
pub(crate) fn check_address(
    sink: &mut Sink,
    e: &EndpointDoc,
    resolution: Resolution,
    path: &dyn std::fmt::Display,
) -> bool {
    if e.address.starts_with("unix://") {
        sink.error(
            e.address_loc,
            format!("{path}: unix domain socket endpoints are not supported by strait"),
        );
        return false;
    }
    if resolution == Resolution::Static && e.address.parse::<IpAddr>().is_err() {
        sink.error(
            e.address_loc,
            format!(
                "{path}: {:?} is not an IP address; resolution STATIC needs IP addresses \
                 (use resolution: DNS for host names)",
                e.address
            ),
        );
        return false;
    }
    true
}

/// Reads the fields an endpoint and a WorkloadEntry share.
fn endpoint(
    sink: &mut Sink,
    f: &mut Fields<'_, '_>,
    node: &Node,
    path: &Path<'_>,
) -> Option<EndpointDoc> {
    let address = f.get("address");
    let address_loc = address.map(|n| n.loc).unwrap_or(node.loc);
    let address = match address {
        Some(n) => fields::string(sink, n, &path.key("address")),
        None => {
            sink.error(node.loc, format!("{path}.address is required"));
            None
        }
    };
    let mut ports = Vec::new();
    if let Some(n) = f.get("ports") {
        let pp = path.key("ports");
        if let Some(pf) = Fields::of(sink, n, pp) {
            for (k, v) in pf.entries() {
                if let Some(p) = fields::port(sink, v, &pp.key(&k.name)) {
                    ports.push((k.name.clone(), p, k.loc));
                }
            }
        }
    }
    let labels = f
        .get("labels")
        .map(|n| fields::string_map(sink, n, &path.key("labels")))
        .unwrap_or_default();
    let locality = f
        .get("locality")
        .and_then(|n| fields::string(sink, n, &path.key("locality")))
        .map(|s| Locality::parse(&s))
        .unwrap_or_default();
    let network = f
        .get("network")
        .and_then(|n| fields::string(sink, n, &path.key("network")))
        .unwrap_or_default();
    // Istio reads an unset (zero) weight as 1.
    let weight = f
        .get("weight")
        .and_then(|n| fields::u32_(sink, n, &path.key("weight")))
        .filter(|w| *w > 0)
        .unwrap_or(1);
    let service_account = f
        .get("serviceAccount")
        .and_then(|n| fields::string(sink, n, &path.key("serviceAccount")));
    Some(EndpointDoc {
        address: address?,
        address_loc,
        ports,
        labels,
        locality,
        network,
        weight,
        service_account,
    })
}

pub(crate) fn workload_entry(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<WorkloadEntryDoc> {
    let root = *spec.path();
    let here = Node {
        loc: meta.loc,
        value: super::yaml::Value::Null,
    };
    let e = endpoint(sink, &mut spec, &here, &root);
    spec.finish(sink);
    let endpoint = e?;
    if endpoint.address.starts_with("unix://") {
        sink.error(
            endpoint.address_loc,
            "spec.address: unix domain socket endpoints are not supported by strait",
        );
        return None;
    }
    Some(WorkloadEntryDoc { meta, endpoint })
}

// ---------------------------------------------------------------------------------------------
// DestinationRule

#[derive(Debug)]
pub(crate) struct DestinationRuleDoc {
    pub meta: Meta,
    /// Lower-case, short names resolved against the rule's namespace.
    pub host: String,
    pub host_loc: Loc,
    pub policy: PolicyDoc,
    pub subsets: Vec<SubsetDoc>,
}

#[derive(Debug)]
pub(crate) struct SubsetDoc {
    pub name: String,
    pub loc: Loc,
    pub labels: BTreeMap<String, String>,
    pub policy: PolicyDoc,
}

/// A `trafficPolicy`: its top-level sections and per-port overrides.
#[derive(Debug, Clone, Default)]
pub(crate) struct PolicyDoc {
    pub top: Sections,
    pub ports: Vec<(u16, Sections)>,
}

impl PolicyDoc {
    /// The sections in force for one port: port-level sections replace top-level ones.
    pub fn for_port(&self, port: u16) -> Sections {
        match self.ports.iter().find(|(p, _)| *p == port) {
            Some((_, over)) => over.clone().over(&self.top),
            None => self.top.clone(),
        }
    }
}

/// The sections of a traffic policy. As in Istio's `MergeTrafficPolicy`, a section set at a
/// more specific level (port, subset) replaces the whole section from the level below.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sections {
    pub lb: Option<(LbPolicy, Option<LocalityLbSetting>)>,
    pub pool: Option<Pool>,
    pub outlier: Option<OutlierDetection>,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Pool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_connection_duration: Option<Duration>,
}

impl Sections {
    /// `self` wins section by section; `base` fills what `self` leaves unset.
    pub fn over(self, base: &Sections) -> Sections {
        Sections {
            lb: self.lb.or_else(|| base.lb.clone()),
            pool: self.pool.or_else(|| base.pool.clone()),
            outlier: self.outlier.or_else(|| base.outlier.clone()),
            tls: self.tls.or_else(|| base.tls.clone()),
        }
    }

    pub fn to_policy(&self) -> crate::model::TrafficPolicy {
        let (lb, locality_lb) = self.lb.clone().unwrap_or_default();
        let pool = self.pool.clone().unwrap_or_default();
        crate::model::TrafficPolicy {
            destination_rule: None,
            lb,
            locality_lb,
            connect_timeout: pool.connect_timeout,
            idle_timeout: pool.idle_timeout,
            max_connections: pool.max_connections,
            max_connection_duration: pool.max_connection_duration,
            outlier: self.outlier.clone(),
            tls: self.tls.clone().unwrap_or_default(),
        }
    }
}

/// Resolves a DestinationRule host as Istio does: a name without dots is short for
/// `<name>.<namespace>.svc.cluster.local`.
pub(crate) fn resolve_short_name(host: &str, namespace: &str) -> String {
    let host = host.to_ascii_lowercase();
    if host == "*" || host.contains('.') {
        host
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// Whether a subset name is a DNS label (what Istio requires; it also keeps SNI keys parseable).
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub(crate) fn destination_rule(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<DestinationRuleDoc> {
    let root = *spec.path();
    let host_entry = spec.get("host");
    let host = match host_entry {
        Some(n) => fields::string(sink, n, &root.key("host")),
        None => {
            sink.error(
                meta.loc,
                "DestinationRule has no spec.host; name the service it applies to",
            );
            None
        }
    };
    let host_loc = host_entry.map(|n| n.loc).unwrap_or(meta.loc);
    let policy = spec
        .get("trafficPolicy")
        .map(|n| traffic_policy(sink, n, &root.key("trafficPolicy")))
        .unwrap_or_default();
    let mut subsets: Vec<SubsetDoc> = Vec::new();
    if let Some(list) = spec.get("subsets") {
        let sp = root.key("subsets");
        for (i, item) in fields::seq(sink, list, &sp).iter().enumerate() {
            let ip = sp.index(i);
            let Some(mut f) = Fields::of(sink, item, ip) else {
                continue;
            };
            let name_node = f.get("name");
            let name = name_node.and_then(|n| fields::string(sink, n, &ip.key("name")));
            let labels = f
                .get("labels")
                .map(|n| fields::string_map(sink, n, &ip.key("labels")))
                .unwrap_or_default();
            let policy = f
                .get("trafficPolicy")
                .map(|n| traffic_policy(sink, n, &ip.key("trafficPolicy")))
                .unwrap_or_default();
            f.finish(sink);
            let loc = name_node.map(|n| n.loc).unwrap_or(item.loc);
            let Some(name) = name else {
                if name_node.is_none() {
                    sink.error(item.loc, format!("{ip}.name is required"));
                }
                continue;
            };
            if !is_dns_label(&name) {
                sink.error(
                    loc,
                    format!("{ip}.name: subset name {name:?} must be a DNS label (lower-case letters, digits and '-')"),
                );
                continue;
            }
            if subsets.iter().any(|s| s.name == name) {
                sink.error(loc, format!("{ip}.name: subset {name:?} is declared twice"));
                continue;
            }
            subsets.push(SubsetDoc {
                name,
                loc,
                labels,
                policy,
            });
        }
    }
    spec.not_used(sink, &["exportTo", "workloadSelector"]);
    spec.finish(sink);
    Some(DestinationRuleDoc {
        host: resolve_short_name(&host?, &meta.namespace),
        meta,
        host_loc,
        policy,
        subsets,
    })
}

fn traffic_policy(sink: &mut Sink, node: &Node, path: &Path<'_>) -> PolicyDoc {
    let mut doc = PolicyDoc::default();
    let Some(mut f) = Fields::of(sink, node, *path) else {
        return doc;
    };
    doc.top = sections(sink, &mut f, path);
    if let Some(list) = f.get("portLevelSettings") {
        let pp = path.key("portLevelSettings");
        for (i, item) in fields::seq(sink, list, &pp).iter().enumerate() {
            let ip = pp.index(i);
            let Some(mut pf) = Fields::of(sink, item, ip) else {
                continue;
            };
            let mut number = None;
            match pf.get("port") {
                Some(port) => {
                    let portp = ip.key("port");
                    if let Some(mut nf) = Fields::of(sink, port, portp) {
                        number = nf
                            .get("number")
                            .and_then(|n| fields::port(sink, n, &portp.key("number")));
                        if number.is_none() && nf.get("number").is_none() {
                            sink.error(port.loc, format!("{portp}.number is required"));
                        }
                        nf.finish(sink);
                    }
                }
                None => sink.error(item.loc, format!("{ip}.port is required")),
            }
            let s = sections(sink, &mut pf, &ip);
            pf.finish(sink);
            if let Some(n) = number {
                if doc.ports.iter().any(|(p, _)| *p == n) {
                    sink.error(item.loc, format!("{ip}: port {n} has settings twice"));
                } else {
                    doc.ports.push((n, s));
                }
            }
        }
    }
    f.not_used(sink, &["tunnel", "proxyProtocol", "retryBudget"]);
    f.finish(sink);
    doc
}

fn sections(sink: &mut Sink, f: &mut Fields<'_, '_>, path: &Path<'_>) -> Sections {
    let mut s = Sections::default();
    if let Some(n) = f.get("loadBalancer") {
        s.lb = load_balancer(sink, n, &path.key("loadBalancer"));
    }
    if let Some(n) = f.get("connectionPool") {
        s.pool = connection_pool(sink, n, &path.key("connectionPool"));
    }
    if let Some(n) = f.get("outlierDetection") {
        s.outlier = outlier_detection(sink, n, &path.key("outlierDetection"));
    }
    if let Some(n) = f.get("tls") {
        s.tls = upstream_tls(sink, n, &path.key("tls"));
    }
    s
}

fn load_balancer(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
) -> Option<(LbPolicy, Option<LocalityLbSetting>)> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut lb = LbPolicy::RoundRobin;
    if let Some(n) = f.get("simple") {
        let sp = path.key("simple");
        match fields::word(
            sink,
            n,
            &sp,
            &[
                "UNSPECIFIED",
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "LEAST_CONN",
                "RANDOM",
                "PASSTHROUGH",
            ],
        ) {
            Some("LEAST_REQUEST") | Some("LEAST_CONN") => lb = LbPolicy::LeastRequest,
            Some("RANDOM") => lb = LbPolicy::Random,
            Some("PASSTHROUGH") => sink.warn(
                n.loc,
                format!("{sp} PASSTHROUGH is not supported by strait; ROUND_ROBIN used"),
            ),
            _ => {}
        }
    }
    let locality = f
        .get("localityLbSetting")
        .and_then(|n| locality_lb(sink, n, &path.key("localityLbSetting")));
    f.not_used(sink, &["consistentHash", "warmupDurationSecs", "warmup"]);
    f.finish(sink);
    Some((lb, locality))
}

fn locality_lb(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<LocalityLbSetting> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut setting = LocalityLbSetting {
        // Istio: a localityLbSetting that says nothing about `enabled` is on.
        enabled: true,
        ..Default::default()
    };
    if let Some(n) = f.get("enabled") {
        setting.enabled = fields::boolean(sink, n, &path.key("enabled")).unwrap_or(true);
    }
    if let Some(list) = f.get("distribute") {
        let dp = path.key("distribute");
        for (i, item) in fields::seq(sink, list, &dp).iter().enumerate() {
            let ip = dp.index(i);
            let Some(mut df) = Fields::of(sink, item, ip) else {
                continue;
            };
            let from = df
                .get("from")
                .and_then(|n| fields::string(sink, n, &ip.key("from")));
            let mut to = Vec::new();
            let to_node = df.get("to");
            if let Some(t) = to_node {
                let tp = ip.key("to");
                if let Some(tf) = Fields::of(sink, t, tp) {
                    for (k, v) in tf.entries() {
                        if let Some(w) = fields::uint(sink, v, &tp.key(&k.name), 100) {
                            to.push((k.name.clone(), w as u32));
                        }
                    }
                }
                let total: u32 = to.iter().map(|(_, w)| *w).sum();
                if !to.is_empty() && total != 100 {
                    sink.error(
                        t.loc,
                        format!("{tp}: weights add up to {total}; they must add up to 100"),
                    );
                }
            }
            df.finish(sink);
            match (from, to_node) {
                (Some(from), Some(_)) => setting.distribute.push((from, to)),
                _ => sink.error(item.loc, format!("{ip} needs both from and to")),
            }
        }
    }
    if let Some(list) = f.get("failover") {
        let fp = path.key("failover");
        for (i, item) in fields::seq(sink, list, &fp).iter().enumerate() {
            let ip = fp.index(i);
            let Some(mut ff) = Fields::of(sink, item, ip) else {
                continue;
            };
            let from = ff
                .get("from")
                .and_then(|n| fields::string(sink, n, &ip.key("from")));
            let to = ff
                .get("to")
                .and_then(|n| fields::string(sink, n, &ip.key("to")));
            ff.finish(sink);
            match (from, to) {
                (Some(from), Some(to)) => setting.failover.push((from, to)),
                _ => sink.error(item.loc, format!("{ip} needs both from and to")),
            }
        }
    }
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        sink.error(
            node.loc,
            format!("{path}: distribute and failover cannot both be set (Istio allows one)"),
        );
    }
    f.not_used(sink, &["failoverPriority"]);
    f.finish(sink);
    Some(setting)
}

fn connection_pool(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<Pool> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut pool = Pool::default();
    if let Some(n) = f.get("tcp") {
        let tp = path.key("tcp");
        if let Some(mut tf) = Fields::of(sink, n, tp) {
            pool.max_connections = tf
                .get("maxConnections")
                .and_then(|n| fields::u32_(sink, n, &tp.key("maxConnections")));
            pool.connect_timeout = tf
                .get("connectTimeout")
                .and_then(|n| fields::duration(sink, n, &tp.key("connectTimeout")));
            pool.idle_timeout = tf
                .get("idleTimeout")
                .and_then(|n| fields::duration(sink, n, &tp.key("idleTimeout")));
            pool.max_connection_duration = tf
                .get("maxConnectionDuration")
                .and_then(|n| fields::duration(sink, n, &tp.key("maxConnectionDuration")));
            tf.not_used(sink, &["tcpKeepalive"]);
            tf.finish(sink);
        }
    }
    f.not_used(sink, &["http"]);
    f.finish(sink);
    Some(pool)
}

fn outlier_detection(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<OutlierDetection> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut od = OutlierDetection::default();
    // A TCP gateway sees connect failures only; any of Istio's consecutive counters means
    // "this many in a row". The most specific one written wins.
    for key in [
        "consecutiveErrors",
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
    ] {
        if let Some(v) = f
            .get(key)
            .and_then(|n| fields::u32_(sink, n, &path.key(key)))
        {
            od.consecutive_errors = v;
        }
    }
    if let Some(d) = f
        .get("interval")
        .and_then(|n| fields::duration(sink, n, &path.key("interval")))
    {
        od.interval = d;
    }
    if let Some(d) = f
        .get("baseEjectionTime")
        .and_then(|n| fields::duration(sink, n, &path.key("baseEjectionTime")))
    {
        od.base_ejection_time = d;
    }
    if let Some(v) = f
        .get("maxEjectionPercent")
        .and_then(|n| fields::uint(sink, n, &path.key("maxEjectionPercent"), 100))
    {
        od.max_ejection_percent = v as u32;
    }
    if let Some(v) = f
        .get("minHealthPercent")
        .and_then(|n| fields::uint(sink, n, &path.key("minHealthPercent"), 100))
    {
        od.min_health_percent = v as u32;
    }
    f.not_used(
        sink,
        &[
            "consecutiveLocalOriginFailures",
            "splitExternalLocalOriginErrors",
        ],
    );
    f.finish(sink);
    Some(od)
}

fn upstream_tls(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<UpstreamTls> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut out = None;
    if let Some(n) = f.get("mode") {
        let mp = path.key("mode");
        match fields::word(
            sink,
            n,
            &mp,
            &["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"],
        ) {
            Some("DISABLE") => out = Some(UpstreamTls::Plaintext),
            Some("ISTIO_MUTUAL") => out = Some(UpstreamTls::IstioMutual),
            Some(other) => sink.warn(
                n.loc,
                format!(
                    "{mp} {other} is not supported by strait (DISABLE or ISTIO_MUTUAL); ignored"
                ),
            ),
            None => {}
        }
    }
    f.not_used(
        sink,
        &[
            "clientCertificate",
            "privateKey",
            "caCertificates",
            "caCrl",
            "credentialName",
            "subjectAltNames",
            "sni",
            "insecureSkipVerify",
        ],
    );
    f.finish(sink);
    out
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication and AuthorizationPolicy

#[derive(Debug)]
pub(crate) struct PeerAuthDoc {
    pub meta: Meta,
    /// `selector.matchLabels`; `None` (or empty) applies namespace-wide.
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` for UNSET: inherit.
    pub mode: Option<PeerAuthMode>,
}

#[derive(Debug)]
pub(crate) struct AuthzDoc {
    pub meta: Meta,
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` when the action is one strait cannot enforce (AUDIT, CUSTOM).
    pub policy: Option<AuthorizationPolicy>,
}

fn selector(sink: &mut Sink, spec: &mut Fields<'_, '_>) -> Option<BTreeMap<String, String>> {
    let root = *spec.path();
    let sp = root.key("selector");
    let node = spec.get("selector")?;
    let mut f = Fields::of(sink, node, sp)?;
    let labels = f
        .get("matchLabels")
        .map(|n| fields::string_map(sink, n, &sp.key("matchLabels")))
        .unwrap_or_default();
    f.finish(sink);
    (!labels.is_empty()).then_some(labels)
}

pub(crate) fn peer_authentication(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<PeerAuthDoc> {
    let root = *spec.path();
    let selector = selector(sink, &mut spec);
    let mut mode = None;
    if let Some(n) = spec.get("mtls") {
        let mp = root.key("mtls");
        if let Some(mut f) = Fields::of(sink, n, mp) {
            if let Some(m) = f.get("mode") {
                mode = match fields::word(
                    sink,
                    m,
                    &mp.key("mode"),
                    &["UNSET", "DISABLE", "PERMISSIVE", "STRICT"],
                ) {
                    Some("STRICT") => Some(PeerAuthMode::Strict),
                    Some("PERMISSIVE") => Some(PeerAuthMode::Permissive),
                    Some("DISABLE") => Some(PeerAuthMode::Disable),
                    _ => None,
                };
            }
            f.finish(sink);
        }
    }
    spec.not_used(sink, &["portLevelMtls"]);
    spec.finish(sink);
    Some(PeerAuthDoc {
        meta,
        selector,
        mode,
    })
}

pub(crate) fn authorization_policy(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<AuthzDoc> {
    let root = *spec.path();
    let selector = selector(sink, &mut spec);
    let mut action = Some(Action::Allow);
    if let Some(n) = spec.get("action") {
        let ap = root.key("action");
        action = match fields::word(sink, n, &ap, &["ALLOW", "DENY", "AUDIT", "CUSTOM"]) {
            Some("ALLOW") => Some(Action::Allow),
            Some("DENY") => Some(Action::Deny),
            Some(other) => {
                sink.warn(
                    n.loc,
                    format!("{ap} {other} is not supported by strait (ALLOW or DENY); policy {} ignored", meta.qualified()),
                );
                None
            }
            None => None,
        };
    }
    let mut rules = Vec::new();
    if let Some(list) = spec.get("rules") {
        let rp = root.key("rules");
        for (i, item) in fields::seq(sink, list, &rp).iter().enumerate() {
            // A rule that is not a mapping is an error: nothing is served from it.
            if let Some(rule) =
                authz_rule(sink, item, &rp.index(i), action.unwrap_or(Action::Allow))
            {
                rules.push(rule);
            }
        }
    }
    spec.not_used(sink, &["provider", "targetRef", "targetRefs"]);
    spec.finish(sink);
    let policy = action.map(|action| AuthorizationPolicy {
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        action,
        rules,
    });
    Some(AuthzDoc {
        meta,
        selector,
        policy,
    })
}

/// Reads one rule. Conditions strait cannot evaluate on a TCP connection are handled the way
/// istiod handles HTTP-only conditions on a TCP filter chain: an ALLOW rule using one never
/// matches (left out), a DENY rule drops the condition and so matches more.
fn authz_rule(sink: &mut Sink, node: &Node, path: &Path<'_>, action: Action) -> Option<Rule> {
    let mut rule = Rule::default();
    let mut f = Fields::of(sink, node, *path)?;
    let consequence = match action {
        Action::Allow => "this ALLOW rule can never match and is dropped",
        Action::Deny => "the condition is dropped, so this DENY rule matches more",
    };
    let mut unsupported = false;
    let mut warn_unsupported = |sink: &mut Sink, f: &mut Fields<'_, '_>, keys: &[&str]| {
        for (k, v) in f.entries() {
            if keys.contains(&k.name.as_str()) && !v.is_null() {
                unsupported = true;
                sink.warn(
                    k.loc,
                    format!(
                        "{} is not evaluated by strait on TCP connections; {consequence}",
                        f.path().key(&k.name)
                    ),
                );
            }
        }
        f.accept(keys);
    };
    if let Some(list) = f.get("from") {
        let fp = path.key("from");
        for (i, item) in fields::seq(sink, list, &fp).iter().enumerate() {
            let ip = fp.index(i);
            let Some(mut ff) = Fields::of(sink, item, ip) else {
                continue;
            };
            let mut s = Source::default();
            if let Some(src) = ff.get("source") {
                let sp = ip.key("source");
                if let Some(mut sf) = Fields::of(sink, src, sp) {
                    let list = |sf: &mut Fields<'_, '_>, key: &str, sink: &mut Sink| {
                        sf.get(key)
                            .map(|n| fields::strings(sink, n, &sp.key(key)))
                            .unwrap_or_default()
                    };
                    s.principals = list(&mut sf, "principals", sink);
                    s.not_principals = list(&mut sf, "notPrincipals", sink);
                    s.namespaces = list(&mut sf, "namespaces", sink);
                    s.not_namespaces = list(&mut sf, "notNamespaces", sink);
                    s.service_accounts = list(&mut sf, "serviceAccounts", sink);
                    s.not_service_accounts = list(&mut sf, "notServiceAccounts", sink);
                    let blocks = |sf: &mut Fields<'_, '_>, key: &str, sink: &mut Sink| {
                        sf.get(key)
                            .map(|n| cidrs(sink, n, &sp.key(key)))
                            .unwrap_or_default()
                    };
                    s.ip_blocks = blocks(&mut sf, "ipBlocks", sink);
                    s.not_ip_blocks = blocks(&mut sf, "notIpBlocks", sink);
                    s.remote_ip_blocks = blocks(&mut sf, "remoteIpBlocks", sink);
                    s.not_remote_ip_blocks = blocks(&mut sf, "notRemoteIpBlocks", sink);
                    warn_unsupported(
                        sink,
                        &mut sf,
                        &["requestPrincipals", "notRequestPrincipals"],
                    );
                    sf.finish(sink);
                }
            }
            ff.finish(sink);
            rule.from.push(s);
        }
    }
    if let Some(list) = f.get("to") {
        let tp = path.key("to");
        for (i, item) in fields::seq(sink, list, &tp).iter().enumerate() {
            let ip = tp.index(i);
            let Some(mut tf) = Fields::of(sink, item, ip) else {
                continue;
            };
            let mut operation = Operation::default();
            if let Some(op) = tf.get("operation") {
                let op_path = ip.key("operation");
                if let Some(mut of) = Fields::of(sink, op, op_path) {
                    for (key, into) in [
                        ("ports", &mut operation.ports),
                        ("notPorts", &mut operation.not_ports),
                    ] {
                        if let Some(n) = of.get(key) {
                            let pp = op_path.key(key);
                            for (j, p) in fields::seq(sink, n, &pp).iter().enumerate() {
                                if let Some(port) = fields::port_text(sink, p, &pp.index(j)) {
                                    into.push(port);
                                }
                            }
                        }
                    }
                    warn_unsupported(
                        sink,
                        &mut of,
                        &[
                            "hosts",
                            "notHosts",
                            "methods",
                            "notMethods",
                            "paths",
                            "notPaths",
                        ],
                    );
                    of.finish(sink);
                }
            }
            tf.finish(sink);
            rule.to.push(operation);
        }
    }
    if let Some(list) = f.get("when") {
        let wp = path.key("when");
        for (i, item) in fields::seq(sink, list, &wp).iter().enumerate() {
            let cp = wp.index(i);
            let Some(mut cf) = Fields::of(sink, item, cp) else {
                continue;
            };
            let key = cf.get_entry("key");
            let values = |cf: &mut Fields<'_, '_>, name: &str, sink: &mut Sink| {
                cf.get(name)
                    .map(|n| fields::strings_at(sink, n, &cp.key(name)))
                    .unwrap_or_default()
            };
            let (vals, not_vals) = (
                values(&mut cf, "values", sink),
                values(&mut cf, "notValues", sink),
            );
            cf.finish(sink);
            let Some((_, key_node)) = key else {
                sink.error(item.loc, format!("{cp}: a condition needs a key"));
                continue;
            };
            let Some(text) = fields::string(sink, key_node, &cp.key("key")) else {
                continue;
            };
            let Some(key) = ConditionKey::parse(&text) else {
                unsupported = true;
                sink.warn(
                    key_node.loc,
                    format!(
                        "{} {text} is not evaluated by strait on TCP connections; {consequence}",
                        cp.key("key")
                    ),
                );
                continue;
            };
            // Values must read as the key says (istiod's validation rejects the rest).
            for (v, loc) in vals.iter().chain(&not_vals) {
                let ok = match key {
                    ConditionKey::SourceIp
                    | ConditionKey::RemoteIp
                    | ConditionKey::DestinationIp => parse_cidr(v).is_some(),
                    ConditionKey::DestinationPort => v.parse::<u16>().is_ok(),
                    _ => true,
                };
                if !ok {
                    sink.error(*loc, format!("{cp}: {v:?} is not a valid value for {text}"));
                }
            }
            rule.when.push(Condition {
                key,
                values: vals.into_iter().map(|(v, _)| v).collect(),
                not_values: not_vals.into_iter().map(|(v, _)| v).collect(),
            });
        }
    }
    f.finish(sink);
    rule.unevaluable = unsupported;
    Some(rule)
}

/// Addresses or CIDR ranges (`10.0.0.1`, `10.0.0.0/16`, IPv6 alike), as istiod's
/// validation accepts them.
fn cidrs(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (i, item) in fields::seq(sink, node, path).iter().enumerate() {
        let p = path.index(i);
        let Some(text) = fields::string(sink, item, &p) else {
            continue;
        };
        let parsed = parse_cidr(&text);
        match parsed {
            Some(c) => out.push(c),
            None => sink.error(
                item.loc,
                format!("{p}: {text:?} is not an IP address or CIDR range"),
            ),
        }
    }
    out
}
