//! Readers for strait's own kinds, `strait.dev/v1alpha1` `Bootstrap` and `Bridge`.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{
    AccessLogTarget, CertSource, ControlPlane, Discovery, Locality, MeshCa, NetworkGateway,
    NodeIdentity, Settings, XdsProtocol,
};

use super::diagnostics::{Loc, Sink};
use super::document::Meta;
use super::fields::{self, Fields, Path};
use super::istio::resolve_short_name;
use super::yaml::{Node, Value};

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
    let mut ca_node = None;
    if let Some(n) = spec.get("certificates") {
        let cp = root.key("certificates");
        if let Some(mut cf) = Fields::of(sink, n, cp) {
            if let Some(d) = cf
                .get("dir")
                .and_then(|n| fields::string(sink, n, &cp.key("dir")))
            {
                s.cert_dir = PathBuf::from(d);
            }
            // Read once the discovery section is (it is the CA's default connection).
            ca_node = cf.get("ca");
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
    if let Some(n) = spec.get("accessLog")
        && let Some(v) = fields::string(sink, n, &root.key("accessLog"))
    {
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
    if let Some(n) = spec.get("labels") {
        s.labels = fields::string_map(sink, n, &root.key("labels"));
    }
    if let Some(v) = text!("rootNamespace") {
        s.root_namespace = v;
    }
    let env = Env::process();
    if let Some(n) = spec.get("discovery") {
        s.discovery = discovery(sink, n, &root.key("discovery"), &s, &env);
    }
    if let Some(n) = ca_node {
        let cp = root.key("certificates");
        if let Some(ca) = mesh_ca(sink, n, &cp.key("ca"), &s, &env) {
            s.cert_source = CertSource::MeshCa(ca);
        }
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

/// The environment Istio's injection template sets for a gateway pod, as far as the
/// discovery client reads it.
pub(crate) struct Env(pub BTreeMap<String, String>);

impl Env {
    fn process() -> Env {
        Env(std::env::vars().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// istiod's address and the root, token and headers pilot-agent uses to reach it.
const ISTIOD_ADDRESS: &str = "istiod.istio-system.svc:15012";
const ISTIOD_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
const ISTIO_TOKEN: &str = "/var/run/secrets/tokens/istio-token";
/// The Istio release whose xDS dialect strait speaks (node metadata `ISTIO_VERSION`):
/// the istiod of `interop/` that the tests run, Istio's 1.32 development line.
/// `ISTIO_META_ISTIO_VERSION` overrides it, as for pilot-agent.
pub const ISTIO_VERSION: &str = "1.32.0";

/// `spec.discovery`: istiod over ADS. Everything a pod's environment says (Istio's
/// `POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`, `ISTIO_META_*`) is
/// used unless the Bootstrap sets it.
pub(crate) fn discovery(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
    settings: &Settings,
    env: &Env,
) -> Option<Discovery> {
    let mut f = Fields::of(sink, node, *path)?;
    let text = |sink: &mut Sink, f: &mut Fields<'_, '_>, key: &str| {
        f.get(key)
            .and_then(|n| fields::string(sink, n, &path.key(key)))
    };
    let server = control_plane(sink, &mut f, node, path, None, settings, env)?;
    let protocol = match text(sink, &mut f, "protocol").as_deref() {
        None | Some("DELTA") | Some("delta") => XdsProtocol::Delta,
        Some("SOTW") | Some("sotw") | Some("STATE_OF_THE_WORLD") => XdsProtocol::StateOfTheWorld,
        Some(other) => {
            sink.error(
                node.loc,
                format!("{}: {other:?} is not DELTA or SOTW", path.key("protocol")),
            );
            XdsProtocol::Delta
        }
    };
    let mut initial_fetch_timeout = Duration::from_secs(15);
    if let Some(d) = f
        .get("initialFetchTimeout")
        .and_then(|n| fields::duration(sink, n, &path.key("initialFetchTimeout")))
    {
        initial_fetch_timeout = d;
    }
    let mut stall_timeout = Duration::from_secs(60);
    if let Some(d) = f
        .get("stallTimeout")
        .and_then(|n| fields::duration(sink, n, &path.key("stallTimeout")))
    {
        stall_timeout = d;
    }
    let empty = Node {
        loc: node.loc,
        value: Value::Map(Vec::new()),
    };
    let node_node = f.get("node").unwrap_or(&empty);
    let node_loc = node_node.loc;
    let identity = node_identity(
        sink,
        node_node,
        &path.key("node"),
        settings,
        env,
        &server.cluster_id,
    );
    let waypoint_node = f.get("waypoint").cloned();
    f.finish(sink);
    let identity = identity?;
    let waypoint = match &waypoint_node {
        Some(n) => Some(waypoint_identity(
            sink,
            n,
            &path.key("waypoint"),
            &identity,
        )?),
        None => None,
    };
    if identity.ip.is_empty() {
        sink.error(
            node_loc,
            format!(
                "{}: the gateway's IP is unknown; set INSTANCE_IP (downward API status.podIP) or {}",
                path.key("node"),
                path.key("node").key("ip")
            ),
        );
    }
    Some(Discovery {
        server,
        protocol,
        initial_fetch_timeout,
        stall_timeout,
        node: identity,
        waypoint,
    })
}

/// The label that makes istiod treat a `waypoint` node as the ambient east-west gateway
/// (what Istio's `istio-east-west` GatewayClass puts on the pods it deploys).
pub const EAST_WEST_MANAGED: (&str, &str) =
    ("gateway.istio.io/managed", "istio.io-eastwest-controller");

/// `discovery.waypoint`: the node of the second stream, the ambient east-west gateway's.
/// The pod is the router node's (IP, pod name, namespace, service account, the metadata
/// the environment gave, `NETWORK` and `REQUESTED_NETWORK_VIEW`); the id is
/// `waypoint~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`; the labels are the
/// east-west controller's and the network's, never the router's (those select the classic
/// Gateway, whose 15443 configuration a waypoint node cannot serve).
fn waypoint_identity(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
    router: &NodeIdentity,
) -> Option<NodeIdentity> {
    let mut f = Fields::of(sink, node, *path)?;
    let id = f
        .get("id")
        .and_then(|n| fields::string(sink, n, &path.key("id")).map(|id| (id, n.loc)));
    let mut metadata = router.metadata.clone();
    if let Some(n) = f.get("metadata") {
        metadata.extend(fields::string_map(sink, n, &path.key("metadata")));
    }
    let mut labels = BTreeMap::from([(
        EAST_WEST_MANAGED.0.to_string(),
        EAST_WEST_MANAGED.1.to_string(),
    )]);
    let network = metadata.get("NETWORK").cloned().unwrap_or_default();
    if !network.is_empty() {
        labels.insert("topology.istio.io/network".into(), network.clone());
    }
    let mut labels_loc = node.loc;
    if let Some(n) = f.get("labels") {
        labels_loc = n.loc;
        labels.extend(fields::string_map(sink, n, &path.key("labels")));
    }
    f.finish(sink);
    if labels.get(EAST_WEST_MANAGED.0).map(String::as_str) != Some(EAST_WEST_MANAGED.1) {
        sink.error(
            labels_loc,
            format!(
                "{}.{}: must be {}: istiod sends the ambient east-west configuration only to a node with that label",
                path.key("labels"),
                EAST_WEST_MANAGED.0,
                EAST_WEST_MANAGED.1
            ),
        );
    }
    if network.is_empty() {
        sink.warn(
            node.loc,
            format!(
                "{path}: the gateway's network is unknown (spec.network or ISTIO_META_NETWORK); istiod then sends the ambient east-west gateway endpoints of every network, and those of other networks are never dialled"
            ),
        );
    }
    let (ns, pod) = (&router.namespace, &router.pod_name);
    let pod = if pod.is_empty() {
        "strait"
    } else {
        pod.as_str()
    };
    let id = match id {
        Some((id, loc)) => {
            if !id.starts_with("waypoint~") {
                sink.error(
                    loc,
                    format!(
                        "{}: {id:?} is not a waypoint node id (waypoint~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local); istiod gives the 15008 configuration only to waypoint nodes",
                        path.key("id")
                    ),
                );
            }
            id
        }
        None => format!("waypoint~{}~{pod}.{ns}~{ns}.svc.cluster.local", router.ip),
    };
    if id == router.id {
        sink.error(
            node.loc,
            format!("{path}: the waypoint node id is the router's ({id}); the two streams need two identities"),
        );
    }
    Some(NodeIdentity {
        id,
        labels,
        metadata,
        ..router.clone()
    })
}

/// The connection fields `discovery` and `certificates.ca` share: `address`,
/// `serverName`, `rootCert`, `token`, `clusterId`. Unwritten ones come from `inherit`
/// (the CA takes the discovery connection's), else from Istio's defaults.
fn control_plane(
    sink: &mut Sink,
    f: &mut Fields<'_, '_>,
    node: &Node,
    path: &Path<'_>,
    inherit: Option<&ControlPlane>,
    settings: &Settings,
    env: &Env,
) -> Option<ControlPlane> {
    let text = |sink: &mut Sink, f: &mut Fields<'_, '_>, key: &str| {
        f.get(key)
            .and_then(|n| fields::string(sink, n, &path.key(key)))
    };
    let written = text(sink, f, "address");
    let (plaintext, address) = match (written, inherit) {
        (None, Some(i)) => (i.plaintext, i.address.clone()),
        (written, _) => {
            let address = written
                .or_else(|| env.get("PILOT_DISCOVERY_ADDRESS").map(str::to_string))
                .unwrap_or_else(|| ISTIOD_ADDRESS.to_string());
            if let Some(rest) = address.strip_prefix("http://") {
                (true, rest.trim_end_matches('/').to_string())
            } else if let Some(rest) = address.strip_prefix("https://") {
                (false, rest.trim_end_matches('/').to_string())
            } else {
                (false, address.trim_end_matches('/').to_string())
            }
        }
    };
    let host = match address.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && !h.is_empty() => {
            h.trim_start_matches('[').trim_end_matches(']').to_string()
        }
        _ => {
            sink.error(
                node.loc,
                format!(
                    "{}: {address:?} is not host:port; write e.g. {ISTIOD_ADDRESS}, or http://HOST:15010 for plaintext",
                    path.key("address")
                ),
            );
            return None;
        }
    };
    let same_server = inherit.is_some_and(|i| i.address == address);
    let server_name = text(sink, f, "serverName")
        .or_else(|| {
            inherit
                .filter(|_| same_server)
                .map(|i| i.server_name.clone())
        })
        .unwrap_or(host);
    let root_cert = text(sink, f, "rootCert")
        .map(Into::into)
        .or_else(|| inherit.map(|i| i.root_cert.clone()))
        .unwrap_or_else(|| ISTIOD_ROOT_CERT.into());
    let token = match f.get("token") {
        Some(n) if n.is_null() => None,
        Some(n) => fields::string(sink, n, &path.key("token"))
            .filter(|t| !t.is_empty())
            .map(Into::into),
        None => match inherit {
            Some(i) => i.token.clone(),
            None if plaintext => None,
            None => Some(ISTIO_TOKEN.into()),
        },
    };
    let cluster_id = text(sink, f, "clusterId")
        .or_else(|| inherit.map(|i| i.cluster_id.clone()))
        .or_else(|| env.get("ISTIO_META_CLUSTER_ID").map(str::to_string))
        .unwrap_or_else(|| settings.cluster.clone());
    Some(ControlPlane {
        address,
        plaintext,
        server_name,
        root_cert,
        token,
        cluster_id,
    })
}

/// `certificates.ca`: the gateway's SVID from the mesh CA. The connection defaults to the
/// discovery one; the identity is `spiffe://<trustDomain>/ns/<namespace>/sa/<service
/// account>` of the same node.
pub(crate) fn mesh_ca(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
    settings: &Settings,
    env: &Env,
) -> Option<MeshCa> {
    let mut f = Fields::of(sink, node, *path)?;
    let inherit = settings.discovery.as_ref().map(|d| &d.server);
    let server = control_plane(sink, &mut f, node, path, inherit, settings, env);
    let ttl = f
        .get("ttl")
        .and_then(|n| fields::duration(sink, n, &path.key("ttl")));
    f.finish(sink);
    let (namespace, account) = match &settings.discovery {
        Some(d) => (d.node.namespace.clone(), d.node.service_account.clone()),
        None => (
            env.get("POD_NAMESPACE")
                .unwrap_or("istio-system")
                .to_string(),
            env.get("SERVICE_ACCOUNT").unwrap_or("").to_string(),
        ),
    };
    if account.is_empty() {
        sink.error(
            node.loc,
            format!(
                "{path}: the gateway's service account is unknown, so is the identity to ask the CA for; set SERVICE_ACCOUNT (downward API spec.serviceAccountName) or discovery.node.serviceAccount"
            ),
        );
        return None;
    }
    let identity = format!(
        "spiffe://{}/ns/{namespace}/sa/{account}",
        settings.trust_domain
    );
    if let Err(e) = crate::tls::SpiffeId::parse(&identity) {
        sink.error(
            node.loc,
            format!("{path}: {identity} is not a SPIFFE ID: {e}"),
        );
        return None;
    }
    Some(MeshCa {
        server: server?,
        ttl,
        identity,
    })
}

/// `discovery.node`, filled from the pod's environment where not written.
fn node_identity(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
    settings: &Settings,
    env: &Env,
    cluster_id: &str,
) -> Option<NodeIdentity> {
    let mut f = Fields::of(sink, node, *path)?;
    let mut text = |f: &mut Fields<'_, '_>, key: &str, env_key: &str| {
        f.get(key)
            .and_then(|n| fields::string(sink, n, &path.key(key)))
            .or_else(|| env.get(env_key).map(str::to_string))
            .unwrap_or_default()
    };
    let pod_name = text(&mut f, "podName", "POD_NAME");
    let namespace = {
        let ns = text(&mut f, "namespace", "POD_NAMESPACE");
        if ns.is_empty() {
            "istio-system".to_string()
        } else {
            ns
        }
    };
    let ip = text(&mut f, "ip", "INSTANCE_IP");
    let service_account = text(&mut f, "serviceAccount", "SERVICE_ACCOUNT");
    let id = text(&mut f, "id", "");
    let cluster = text(&mut f, "cluster", "ISTIO_META_SERVICE_CLUSTER");
    // Istio's `ISTIO_META_*` convention: the rest of the name is the metadata key.
    let mut metadata: BTreeMap<String, String> = env
        .0
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("ISTIO_META_")?.to_string(), v.clone())))
        .filter(|(k, _)| !k.is_empty())
        .collect();
    if let Some(n) = f.get("metadata") {
        metadata.extend(fields::string_map(sink, n, &path.key("metadata")));
    }
    let mut labels = settings.labels.clone();
    if let Some(n) = f.get("labels") {
        labels.extend(fields::string_map(sink, n, &path.key("labels")));
    }
    f.finish(sink);
    let pod = if pod_name.is_empty() {
        "strait".to_string()
    } else {
        pod_name.clone()
    };
    let id = if id.is_empty() {
        format!("router~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local")
    } else {
        id
    };
    let set = |metadata: &mut BTreeMap<String, String>, k: &str, v: &str| {
        if !v.is_empty() {
            metadata
                .entry(k.to_string())
                .or_insert_with(|| v.to_string());
        }
    };
    set(&mut metadata, "NAMESPACE", &namespace);
    set(&mut metadata, "SERVICE_ACCOUNT", &service_account);
    set(&mut metadata, "INSTANCE_IPS", &ip);
    set(&mut metadata, "CLUSTER_ID", cluster_id);
    set(&mut metadata, "NETWORK", &settings.network);
    let network = metadata.get("NETWORK").cloned().unwrap_or_default();
    set(&mut metadata, "REQUESTED_NETWORK_VIEW", &network);
    set(&mut metadata, "ISTIO_VERSION", ISTIO_VERSION);
    set(&mut metadata, "NAME", &pod_name);
    set(&mut metadata, "WORKLOAD_NAME", &pod_name);
    // The Gateway selector matches pod labels; istiod falls back to these when it cannot
    // find the pod.
    metadata.remove("LABELS");
    Some(NodeIdentity {
        id,
        cluster: if cluster.is_empty() {
            format!(
                "{}.{namespace}",
                labels
                    .get("app")
                    .map(String::as_str)
                    .unwrap_or("istio-eastwestgateway")
            )
        } else {
            cluster
        },
        namespace,
        service_account,
        ip,
        pod_name,
        metadata,
        labels,
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
    if let Some(n) = spec.get("identity")
        && let Some(id) = fields::string(sink, n, &root.key("identity"))
    {
        if id.starts_with("spiffe://") {
            identity = Some(id);
        } else {
            sink.error(
                    n.loc,
                    format!("spec.identity: {id:?} is not a SPIFFE ID; write e.g. spiffe://cluster.local/ns/default/sa/reviews"),
                );
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
