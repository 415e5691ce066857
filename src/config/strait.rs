//! Readers for strait's own kinds, `strait.dev/v1alpha1` `Bootstrap` and `Bridge`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::model::{AccessLogTarget, Locality, NetworkGateway, Settings};

use super::diagnostics::{Loc, Sink};
use super::document::Meta;
use super::fields::{self, Fields, Path};
use super::istio::resolve_short_name;
use super::yaml::Node;

#[derive(Debug)]
pub(crate) struct BootstrapDoc {
    pub meta: Meta,
    pub settings: Settings,
    /// Where each listening address was written, for conflict reports.
    pub status_loc: Loc,
    pub metrics_loc: Loc,
    pub admin_loc: Loc,
}

#[derive(Debug)]
pub(crate) struct BridgeDoc {
    pub meta: Meta,
    pub listen: SocketAddr,
    pub listen_loc: Loc,
    pub host: String,
    pub host_loc: Loc,
    pub port: u16,
    pub subset: Option<(String, Loc)>,
    pub identity: Option<String>,
}

pub(crate) fn bootstrap(
    sink: &mut Sink,
    meta: Meta,
    mut spec: Fields<'_, '_>,
) -> Option<BootstrapDoc> {
    let root = *spec.path();
    let mut s = Settings::default();
    macro_rules! text {
        ($key:literal) => {
            spec.get($key)
                .and_then(|n| fields::string(sink, n, &root.key($key)))
        };
    }
    macro_rules! dur {
        ($key:literal, $field:expr) => {
            if let Some(d) = spec
                .get($key)
                .and_then(|n| fields::duration(sink, n, &root.key($key)))
            {
                $field = d;
            }
        };
    }
    if let Some(v) = text!("cluster") {
        s.cluster = v;
    }
    if let Some(v) = text!("network") {
        s.network = v;
    }
    if let Some(v) = text!("locality") {
        s.locality = Locality::parse(&v);
    }
    if let Some(v) = text!("trustDomain") {
        if v.is_empty() {
            sink.error(meta.loc, "spec.trustDomain is empty");
        }
        s.trust_domain = v;
    }
    if let Some(n) = spec.get("trustDomainAliases") {
        s.trust_domain_aliases = fields::strings(sink, n, &root.key("trustDomainAliases"));
    }
    if let Some(n) = spec.get("trustBundles") {
        s.trust_bundles = fields::string_map(sink, n, &root.key("trustBundles"))
            .into_iter()
            .map(|(td, path)| (td, PathBuf::from(path)))
            .collect();
    }
    if let Some(n) = spec.get("meshNetworks") {
        let mp = root.key("meshNetworks");
        if let Some(mut mf) = Fields::of(sink, n, mp) {
            if let Some(nets) = mf.get("networks") {
                let np = mp.key("networks");
                if let Some(nf) = Fields::of(sink, nets, np) {
                    for (k, v) in nf.entries() {
                        let gateways = network_gateways(sink, v, &np.key(&k.name));
                        s.mesh_networks.insert(k.name.clone(), gateways);
                    }
                }
            }
            mf.finish(sink);
        }
    }
    if let Some(n) = spec.get("certificates") {
        let cp = root.key("certificates");
        if let Some(mut cf) = Fields::of(sink, n, cp) {
            if let Some(d) = cf
                .get("dir")
                .and_then(|n| fields::string(sink, n, &cp.key("dir")))
            {
                s.cert_dir = PathBuf::from(d);
            }
            cf.finish(sink);
        }
    }
    let mut addr = |spec: &mut Fields<'_, '_>, key: &str, field: &mut SocketAddr| -> Loc {
        match spec.get(key) {
            Some(n) => {
                if let Some(a) = fields::socket_addr(sink, n, &root.key(key)) {
                    *field = a;
                }
                n.loc
            }
            None => meta.loc,
        }
    };
    let status_loc = addr(&mut spec, "status", &mut s.status_addr);
    let metrics_loc = addr(&mut spec, "metrics", &mut s.metrics_addr);
    let admin_loc = addr(&mut spec, "admin", &mut s.admin_addr);
    dur!("drainDuration", s.drain_duration);
    dur!("clientHelloTimeout", s.client_hello_timeout);
    dur!("connectTimeout", s.connect_timeout);
    dur!("idleTimeout", s.idle_timeout);
    dur!("certExpiryWarning", s.cert_expiry_warning);
    if let Some(n) = spec.get("maxConnections") {
        let p = root.key("maxConnections");
        match fields::uint(sink, n, &p, u64::from(u32::MAX)) {
            Some(0) => sink.error(
                n.loc,
                format!("{p} must be at least 1 (leave it out for no cap)"),
            ),
            Some(v) => s.max_connections = Some(v as usize),
            None => {}
        }
    }
    if let Some(n) = spec.get("workers") {
        let p = root.key("workers");
        match fields::uint(sink, n, &p, 1024) {
            Some(0) => sink.error(
                n.loc,
                format!("{p} must be at least 1 (leave it out for one per core)"),
            ),
            Some(v) => s.workers = Some(v as usize),
            None => {}
        }
    }
    if let Some(n) = spec.get_entry("passthroughAlpn").map(|(_, n)| n) {
        s.passthrough_alpn = fields::strings(sink, n, &root.key("passthroughAlpn"));
    }
    if let Some(n) = spec.get("accessLog") {
        if let Some(v) = fields::string(sink, n, &root.key("accessLog")) {
            s.access_log = match v.as_str() {
                "stdout" => AccessLogTarget::Stdout,
                "off" => AccessLogTarget::Off,
                "" => {
                    sink.error(
                        n.loc,
                        "spec.accessLog is empty; write stdout, off, or a file path",
                    );
                    AccessLogTarget::Stdout
                }
                path => AccessLogTarget::File(PathBuf::from(path)),
            };
        }
    }
    if let Some(n) = spec.get("labels") {
        s.labels = fields::string_map(sink, n, &root.key("labels"));
    }
    if let Some(v) = text!("rootNamespace") {
        s.root_namespace = v;
    }
    spec.finish(sink);
    Some(BootstrapDoc {
        meta,
        settings: s,
        status_loc,
        metrics_loc,
        admin_loc,
    })
}

/// `meshNetworks.networks.<name>`: Istio's `Network` (`endpoints`, `gateways`).
fn network_gateways(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Vec<NetworkGateway> {
    let mut out = Vec::new();
    let Some(mut f) = Fields::of(sink, node, *path) else {
        return out;
    };
    // Endpoint membership (fromRegistry/fromCidr) is how istiod assigns networks; strait reads
    // each endpoint's own `network` instead.
    f.accept(&["endpoints"]);
    if let Some(list) = f.get("gateways") {
        let gp = path.key("gateways");
        for (i, item) in fields::seq(sink, list, &gp).iter().enumerate() {
            let ip = gp.index(i);
            let Some(mut gf) = Fields::of(sink, item, ip) else {
                continue;
            };
            let address = gf
                .get("address")
                .and_then(|n| fields::string(sink, n, &ip.key("address")));
            let port = match gf.get("port") {
                Some(n) => fields::port(sink, n, &ip.key("port")),
                None => Some(15443),
            };
            // Looked at only to explain why the gateway is skipped: not a field strait uses.
            gf.accept(&["registryServiceName"]);
            let registry = gf
                .entries()
                .iter()
                .find(|(k, v)| k.name == "registryServiceName" && !v.is_null());
            if let Some((k, _)) = registry {
                sink.warn(
                    k.loc,
                    format!("{ip}.registryServiceName needs a service registry, which strait does not have; write the gateway's address instead; gateway skipped"),
                );
            } else if address.is_none() && gf.get("address").is_none() {
                sink.error(item.loc, format!("{ip}.address is required"));
            }
            gf.not_used(sink, &["locality", "weight"]);
            gf.finish(sink);
            if let (Some(address), Some(port)) = (address, port) {
                out.push(NetworkGateway { address, port });
            }
        }
    }
    f.finish(sink);
    out
}

pub(crate) fn bridge(sink: &mut Sink, meta: Meta, mut spec: Fields<'_, '_>) -> Option<BridgeDoc> {
    let root = *spec.path();
    fn required<'n>(
        sink: &mut Sink,
        meta: &Meta,
        spec: &mut Fields<'n, '_>,
        key: &str,
    ) -> Option<&'n Node> {
        let n = spec.get(key);
        if n.is_none() {
            sink.error(
                meta.loc,
                format!("Bridge {}: spec.{key} is required", meta.name),
            );
        }
        n
    }
    let listen_node = required(sink, &meta, &mut spec, "listen");
    let host_node = required(sink, &meta, &mut spec, "host");
    let port_node = required(sink, &meta, &mut spec, "port");
    let listen = listen_node.and_then(|n| fields::socket_addr(sink, n, &root.key("listen")));
    let host = host_node.and_then(|n| fields::string(sink, n, &root.key("host")));
    let port = port_node.and_then(|n| fields::port(sink, n, &root.key("port")));
    let subset = spec
        .get("subset")
        .and_then(|n| fields::string(sink, n, &root.key("subset")).map(|s| (s, n.loc)));
    let mut identity = None;
    if let Some(n) = spec.get("identity") {
        if let Some(id) = fields::string(sink, n, &root.key("identity")) {
            if id.starts_with("spiffe://") {
                identity = Some(id);
            } else {
                sink.error(
                    n.loc,
                    format!("spec.identity: {id:?} is not a SPIFFE ID; write e.g. spiffe://cluster.local/ns/default/sa/reviews"),
                );
            }
        }
    }
    spec.finish(sink);
    Some(BridgeDoc {
        listen: listen?,
        listen_loc: listen_node?.loc,
        host: resolve_short_name(&host?, &meta.namespace),
        host_loc: host_node?.loc,
        port: port?,
        subset,
        identity,
        meta,
    })
}
