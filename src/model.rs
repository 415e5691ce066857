//! The routing snapshot: what the gateway acts on, independent of where it came from.
//!
//! Configuration loading (`crate::config`) turns Istio YAML into a [`Snapshot`]; the data
//! path only ever reads one. A second source (istiod over xDS) can build the same types
//! without touching the data path. Everything here is immutable once built and shared
//! behind an `Arc`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The endpoint label Istio's injection sets: `istio` (mTLS-capable) or `disabled`.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// The label Istio reads to tell that a workload accepts HBONE tunnels: a CSV list of
/// protocols, HBONE-capable when it holds `http` (`pilot/pkg/model/service.go`).
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// The port every HBONE-capable workload (its ztunnel, or a waypoint) takes tunnels on.
pub const HBONE_PORT: u16 = 15008;

/// The five ALPN values Istio sidecars offer on mTLS connections (`allIstioMtlsALPNs`).
pub const ISTIO_ALPNS: [&str; 5] = [
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// Everything the gateway needs to route, built once per configuration load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub settings: Settings,
    /// One entry per bound socket address; several Gateway servers may share one.
    pub listeners: Vec<ListenerSpec>,
    /// Services by (lower-case host, service port number).
    pub services: Services,
    pub bridges: Vec<BridgeSpec>,
    /// The network RBAC compiled from the AuthorizationPolicies in files that select the
    /// gateway. Already on every ISTIO_MUTUAL, PASSTHROUGH and HBONE server from files; with
    /// istiod, `xds::merge` puts it after istiod's own filters on istiod's servers too.
    pub rbac: Vec<RbacFilter>,
    /// PeerAuthentication mode that applies to this gateway, if any: whether its
    /// ISTIO_MUTUAL servers require a client certificate. (AuthorizationPolicies are
    /// each server's `rbac`.)
    pub peer_authentication: Option<PeerAuthMode>,
}

/// Service ports by key, in a persistent map: a snapshot that changes one service port
/// shares every other entry with the snapshot before it (a clone costs O(1), an insert
/// O(log n)), so an update from istiod costs in proportion to what it changed.
pub type Services = imbl::HashMap<ServiceKey, Arc<ServicePort>>;

/// What a new snapshot may change relative to the one in force: everything (a file
/// reload, new listeners or clusters from istiod), or only the named service ports (new
/// endpoints from istiod); every other entry is then the very same `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    Everything,
    Services(std::collections::BTreeSet<ServiceKey>),
}

impl Changed {
    /// Both changes together: what a snapshot changes after two updates in a row.
    pub fn merge(&mut self, other: Changed) {
        match (&mut *self, other) {
            (Changed::Everything, _) => {}
            (this, Changed::Everything) => *this = Changed::Everything,
            (Changed::Services(a), Changed::Services(b)) => a.extend(b),
        }
    }
}

/// Lookup key for a service port: lower-case host plus the *service* port number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub host: String,
    pub port: u16,
}

impl ServiceKey {
    pub fn new(host: &str, port: u16) -> Self {
        ServiceKey {
            host: host.to_ascii_lowercase(),
            port,
        }
    }
}

/// The gateway's own settings (`strait.dev/v1alpha1` `Bootstrap`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cluster: String,
    pub network: String,
    pub locality: Locality,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    /// Federated trust domains that bring their own root bundle (trust domain → file).
    pub trust_bundles: BTreeMap<String, PathBuf>,
    /// Network name → that network's east-west gateways.
    pub mesh_networks: BTreeMap<String, Vec<NetworkGateway>>,
    pub cert_dir: PathBuf,
    pub status_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub drain_duration: Duration,
    pub client_hello_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Process-wide cap on accepted connections, including ones still in their ClientHello.
    pub max_connections: Option<usize>,
    /// ALPN values a passthrough ClientHello must offer one of; empty allows any.
    pub passthrough_alpn: Vec<String>,
    pub access_log: AccessLogTarget,
    pub labels: BTreeMap<String, String>,
    pub root_namespace: String,
    /// Worker threads for the data path; `None` means one per available core.
    pub workers: Option<usize>,
    /// Warn when a certificate expires within this window.
    pub cert_expiry_warning: Duration,
    /// Listeners, clusters and endpoints from istiod over xDS (Bootstrap `discovery`).
    pub discovery: Option<Discovery>,
    /// Files or the mesh CA (Bootstrap `certificates`).
    pub cert_source: CertSource,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster: "Kubernetes".into(),
            network: String::new(),
            locality: Locality::default(),
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: Vec::new(),
            trust_bundles: BTreeMap::new(),
            mesh_networks: BTreeMap::new(),
            cert_dir: PathBuf::from("/etc/certs"),
            status_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15090)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            drain_duration: Duration::from_secs(45),
            client_hello_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_connections: None,
            passthrough_alpn: ISTIO_ALPNS.iter().map(|s| s.to_string()).collect(),
            access_log: AccessLogTarget::Stdout,
            labels: BTreeMap::new(),
            root_namespace: "istio-system".into(),
            workers: None,
            cert_expiry_warning: Duration::from_secs(7 * 24 * 3600),
            discovery: None,
            cert_source: CertSource::Files,
        }
    }
}

/// How to reach istiod (or any xDS server that speaks Istio's dialect) and who to say
/// the gateway is.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    pub server: ControlPlane,
    pub protocol: XdsProtocol,
    /// Readiness waits this long at most for a referenced cluster's endpoints.
    pub initial_fetch_timeout: Duration,
    /// A stream that has sent a subscription and heard nothing for this long is
    /// reconnected.
    pub stall_timeout: Duration,
    pub node: NodeIdentity,
    /// `discovery.waypoint`: also be the ambient east-west gateway. A second ADS stream
    /// to the same control plane, as this `waypoint~` node (istiod sends the 15008
    /// configuration only to such a node, and the 15443 one only to a `router`).
    pub waypoint: Option<NodeIdentity>,
}

impl Discovery {
    /// The same control plane and settings, as the waypoint node (`None` without one).
    pub fn as_waypoint(&self) -> Option<Discovery> {
        let node = self.waypoint.clone()?;
        Some(Discovery {
            node,
            waypoint: None,
            ..self.clone()
        })
    }
}

/// Where the gateway's certificates come from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum CertSource {
    /// `certificates.dir`: `cert-chain.pem`, `key.pem`, `root-cert.pem`, reloaded on change.
    #[default]
    Files,
    /// `certificates.ca`: an SVID from the mesh CA (`IstioCertificateService`), its key
    /// made in memory, renewed at half its lifetime.
    MeshCa(MeshCa),
}

/// The mesh CA and what to ask it for.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshCa {
    pub server: ControlPlane,
    /// `validity_duration` asked for (the CA may refuse more than its maximum); `None`
    /// asks for none, and the CA's default applies (istiod's
    /// `DEFAULT_WORKLOAD_CERT_TTL`, 24 h unless set).
    pub ttl: Option<Duration>,
    /// The SPIFFE ID the certificate must carry, and nothing else.
    pub identity: String,
}

/// An endpoint of istiod (xDS or CA) and how the gateway proves who it is to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlPlane {
    /// `host:port`.
    pub address: String,
    /// TLS with `root_cert` (istiod's 15012), or plaintext (15010), only when the address
    /// was written as `http://`.
    pub plaintext: bool,
    /// The name istiod's certificate must carry (default: the address's host).
    pub server_name: String,
    /// Root certificate(s) that verify istiod (`istio-ca-root-cert`).
    pub root_cert: PathBuf,
    /// Projected service-account token sent as `authorization: Bearer`, re-read on
    /// every connection; `None` sends none (plaintext labs).
    pub token: Option<PathBuf>,
    /// `clusterid` header (and, for xDS, `CLUSTER_ID` metadata).
    pub cluster_id: String,
}

/// ADS flavour: incremental (pilot-agent's default) or state of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdsProtocol {
    Delta,
    StateOfTheWorld,
}

/// The xDS node: `router~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` and its metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeIdentity {
    pub id: String,
    /// `Node.cluster` (Istio's service cluster).
    pub cluster: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: String,
    pub pod_name: String,
    /// Node metadata, string values (`NAMESPACE`, `CLUSTER_ID`, `NETWORK`, …); `LABELS`
    /// is sent as a map from `labels`.
    pub metadata: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

/// `region/zone/subzone`; empty parts are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub fn parse(s: &str) -> Self {
        let mut parts = s.splitn(3, '/');
        Locality {
            region: parts.next().unwrap_or("").to_string(),
            zone: parts.next().unwrap_or("").to_string(),
            subzone: parts.next().unwrap_or("").to_string(),
        }
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.zone.is_empty() && self.subzone.is_empty() {
            return f.write_str(&self.region);
        }
        if self.subzone.is_empty() {
            return write!(f, "{}/{}", self.region, self.zone);
        }
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

/// One east-west gateway of a network, from `meshNetworks.networks.<name>.gateways[]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkGateway {
    pub address: String,
    pub port: u16,
}

/// A bound socket with the Gateway servers that share it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub servers: Vec<ServerSpec>,
}

/// One `Gateway.spec.servers[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    /// `<gateway namespace>/<gateway name>/<server index>`, for logs and `route`.
    pub name: String,
    pub mode: ServerTlsMode,
    pub hosts: HostSet,
    /// ALPN values a ClientHello must offer one of, when the server sets its own (an xDS
    /// filter chain's `application_protocols`); `None` uses `passthroughAlpn`.
    pub alpn: Option<Vec<String>>,
    /// The routes of the VirtualServices bound to this server, in order: on a PASSTHROUGH
    /// server, its `tls` routes (the first whose `sniHosts` matches the SNI applies); on
    /// an ISTIO_MUTUAL server, the first `tcp` route matching its port, which then
    /// applies to every connection instead of the SNI subset key.
    pub routes: Vec<L4Route>,
    /// The network RBAC filters in front of the server's routing for the
    /// AuthorizationPolicies selecting the gateway, in order (DENY, then ALLOW): every one
    /// must let a connection through. From istiod, as it sends them; from files, compiled
    /// as istiod compiles them (`policy::compile`), on ISTIO_MUTUAL, PASSTHROUGH and HBONE
    /// servers. An AUTO_PASSTHROUGH server has none, as istiod gives it none.
    pub rbac: Vec<RbacFilter>,
    /// On an HBONE server from istiod: the Service addresses it also takes as a tunnel's
    /// `:authority` (`<VIP>:<port>`), most specific range first. Empty elsewhere.
    pub vips: Vec<VipRoute>,
    /// An HBONE server's HTTP/2 settings; other servers do not read them.
    pub http2: Http2Settings,
    /// On an HBONE server from istiod: the `<host>:<port>` authorities whose service port
    /// is chosen by the tunnel's source (a Service with a waypoint). Empty elsewhere.
    pub sources: BTreeMap<ServiceKey, Arc<SourceRoutes>>,
}

/// Where an HBONE server sends one `:authority`: the service port of one chain, or the
/// one the tunnel's source picks.
#[derive(Debug, Clone, PartialEq)]
pub enum TunnelTarget {
    Service(ServiceKey),
    BySource(Arc<SourceRoutes>),
}

/// istiod's dispatch of a tunnel to a Service that has a waypoint, on the outer
/// `CONNECT`'s `x-istio-source` (which `connect_terminate` copies into the filter state
/// `main_internal` matches on): `waypoint` (the waypoint already applied the Service's
/// policies) goes to the Service's own endpoints, anything else to the waypoint's chain.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRoutes {
    /// The request header whose value is matched; `None` when no filter of the HBONE
    /// listener sets the matched filter state from a header (every tunnel then takes
    /// `otherwise`, as Envoy finds the state absent).
    pub header: Option<String>,
    /// The filter state the matcher reads (istiod: `io.istio.source`).
    pub state_key: String,
    /// `exact_match_map`: value → service port.
    pub exact: BTreeMap<String, ServiceKey>,
    /// `prefix_match_map`: the longest matching prefix wins, as Envoy's trie.
    pub prefix: Vec<(String, ServiceKey)>,
    /// `on_no_match`; `None` refuses the tunnel.
    pub otherwise: Option<ServiceKey>,
}

/// Which entry of a [`SourceRoutes`] took a tunnel.
#[derive(Debug, Clone, PartialEq)]
pub enum SourcePick {
    Exact(String),
    Prefix(String),
    OnNoMatch,
}

impl SourceRoutes {
    /// The service port for a source value (`None`: the header is absent), and which
    /// entry chose it; `None` when no entry does and there is no `on_no_match`.
    pub fn pick(&self, value: Option<&str>) -> Option<(&ServiceKey, SourcePick)> {
        if let (Some(v), Some(_)) = (value, &self.header) {
            if let Some(k) = self.exact.get(v) {
                return Some((k, SourcePick::Exact(v.to_string())));
            }
            if let Some((p, k)) = self
                .prefix
                .iter()
                .filter(|(p, _)| v.starts_with(p.as_str()))
                .max_by_key(|(p, _)| p.len())
            {
                return Some((k, SourcePick::Prefix(p.clone())));
            }
        }
        self.otherwise.as_ref().map(|k| (k, SourcePick::OnNoMatch))
    }
}

/// A Service address an HBONE server takes as a tunnel's `:authority`: istiod's
/// `main_internal` matches the exact `<host>:<port>` names first and, failing them, the
/// destination address (Envoy takes it from an `:authority` of `<VIP>:<port>`) against
/// each Service's VIPs and ports, to the same chains.
#[derive(Debug, Clone, PartialEq)]
pub struct VipRoute {
    pub range: Cidr,
    pub port: u16,
    /// The service port the chain routes to, or the dispatch on the tunnel's source.
    pub target: TunnelTarget,
}

/// The HTTP/2 settings of an HBONE server's connections: what istiod's
/// `http2_protocol_options` says, each setting it leaves out (and every setting, from
/// files) strait's default, which is ztunnel's and Istio's gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`: streams one connection may hold open.
    pub max_concurrent_streams: u32,
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: what a stream may send before strait reads it.
    pub initial_stream_window_size: u32,
    /// The connection's window, shared by its streams.
    pub initial_connection_window_size: u32,
    /// A PING every `interval` …
    pub keepalive_interval: Duration,
    /// … and the connection closed when an answer takes longer than this.
    pub keepalive_timeout: Duration,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: 100,
            initial_stream_window_size: 4 << 20,
            initial_connection_window_size: 16 << 20,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Envoy's network RBAC filter (`envoy.filters.network.rbac`), as far as a TCP gateway can
/// evaluate it: peer identity, addresses, ports and server name.
#[derive(Debug, Clone, PartialEq)]
pub struct RbacFilter {
    /// For logs: istiod's `stat_prefix`; for a filter compiled from files, the
    /// AuthorizationPolicies it holds (`namespace/name`, comma-separated).
    pub name: String,
    pub action: RbacAction,
    /// `None` when the filter has no `rules`: it lets every connection through.
    pub policies: Option<Vec<RbacPolicy>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacAction {
    /// A connection must match a policy.
    Allow,
    /// A connection matching a policy is refused.
    Deny,
    /// Matching only marks the connection for logging; nothing is refused.
    Log,
}

/// One named policy: it matches when one of its permissions and one of its principals do.
#[derive(Debug, Clone, PartialEq)]
pub struct RbacPolicy {
    pub name: String,
    pub permissions: Vec<RbacPermission>,
    pub principals: Vec<RbacPrincipal>,
}

/// What the connection asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum RbacPermission {
    Any,
    And(Vec<RbacPermission>),
    Or(Vec<RbacPermission>),
    Not(Box<RbacPermission>),
    DestinationPort(u16),
    /// `[start, end)`, as Envoy's `Int32Range`.
    DestinationPortRange(u32, u32),
    DestinationIp(Cidr),
    /// `requested_server_name`: the ClientHello's SNI.
    ServerName(StringMatch),
}

/// Who the connection comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum RbacPrincipal {
    Any,
    And(Vec<RbacPrincipal>),
    Or(Vec<RbacPrincipal>),
    Not(Box<RbacPrincipal>),
    /// `authenticated`: a peer certificate was verified, with a URI SAN matching the
    /// pattern when one is given. A connection whose TLS the gateway does not terminate is
    /// never authenticated.
    Authenticated(Option<StringMatch>),
    /// `remote_ip`, `direct_remote_ip` and `source_ip`: the peer's address (the gateway
    /// reads no PROXY protocol or forwarded headers, so the three are the same).
    RemoteIp(Cidr),
}

/// An address range, `address_prefix/prefix_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let len = u32::from(self.len.min(32));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let len = u32::from(self.len.min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Envoy's `StringMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct StringMatch {
    /// With `ignore_case`, the pattern is held in lower case.
    kind: StringMatchKind,
    ignore_case: bool,
}

#[derive(Debug, Clone)]
pub enum StringMatchKind {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// `safe_regex`, matched against the whole value (RE2 syntax).
    Regex(regex::Regex),
}

impl PartialEq for StringMatchKind {
    fn eq(&self, other: &Self) -> bool {
        use StringMatchKind::*;
        match (self, other) {
            (Exact(a), Exact(b))
            | (Prefix(a), Prefix(b))
            | (Suffix(a), Suffix(b))
            | (Contains(a), Contains(b)) => a == b,
            (Regex(a), Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatch {
    /// A `safe_regex`: Envoy matches it against the whole value, hence the anchors. The
    /// pattern must be a regular expression on its own first: wrapped, an unbalanced one
    /// such as `a)|(?:b` would parse, and match far more.
    pub fn regex(pattern: &str) -> Result<StringMatch, regex::Error> {
        let build = |p: &str| regex::RegexBuilder::new(p).size_limit(1 << 20).build();
        build(pattern)?;
        Ok(StringMatch::new(
            StringMatchKind::Regex(build(&format!("^(?:{pattern})$"))?),
            false,
        ))
    }

    pub fn kind(&self) -> &StringMatchKind {
        &self.kind
    }

    pub fn ignore_case(&self) -> bool {
        self.ignore_case
    }

    /// `ignore_case` applies to the literal patterns, as in Envoy (not to a regex).
    pub fn new(kind: StringMatchKind, ignore_case: bool) -> StringMatch {
        use StringMatchKind::*;
        let kind = match kind {
            Exact(p) if ignore_case => Exact(p.to_lowercase()),
            Prefix(p) if ignore_case => Prefix(p.to_lowercase()),
            Suffix(p) if ignore_case => Suffix(p.to_lowercase()),
            Contains(p) if ignore_case => Contains(p.to_lowercase()),
            other => other,
        };
        StringMatch { kind, ignore_case }
    }

    pub fn matches(&self, value: &str) -> bool {
        // Runs per connection: the value is copied only to fold its case.
        let value = if self.ignore_case && !matches!(self.kind, StringMatchKind::Regex(_)) {
            std::borrow::Cow::Owned(value.to_lowercase())
        } else {
            std::borrow::Cow::Borrowed(value)
        };
        match &self.kind {
            StringMatchKind::Exact(p) => *value == **p,
            StringMatchKind::Prefix(p) => value.starts_with(p.as_str()),
            StringMatchKind::Suffix(p) => value.ends_with(p.as_str()),
            StringMatchKind::Contains(p) => value.contains(p.as_str()),
            StringMatchKind::Regex(r) => r.is_match(&value),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTlsMode {
    AutoPassthrough,
    IstioMutual,
    /// `PASSTHROUGH`: any TLS ClientHello, routed by the server's VirtualService `tls`
    /// routes on its SNI and replayed to the destination, which terminates TLS itself.
    Passthrough,
    /// Ambient's double HBONE (a Gateway API `istio-east-west` listener, protocol
    /// `HBONE`): mTLS with the gateway's SVID, then HTTP/2 `CONNECT` streams, each routed
    /// by its `:authority` (`<service host>:<service port>`) to an HBONE-capable endpoint's
    /// port 15008, its bytes copied unread.
    Hbone,
}

impl ServerTlsMode {
    pub fn name(self) -> &'static str {
        match self {
            ServerTlsMode::AutoPassthrough => "AUTO_PASSTHROUGH",
            ServerTlsMode::IstioMutual => "ISTIO_MUTUAL",
            ServerTlsMode::Passthrough => "PASSTHROUGH",
            ServerTlsMode::Hbone => "HBONE",
        }
    }
}

/// One VirtualService route on a gateway server or a Bridge: `tls[].match[]` (with
/// `sniHosts`) or a `tcp[]` rule (without), and where it sends connections.
#[derive(Debug, Clone, PartialEq)]
pub struct L4Route {
    /// `<namespace>/<name>` of the VirtualService, for logs and metrics.
    pub virtual_service: String,
    /// `match.sniHosts` (`*`, `*.suffix`, exact, lower case); empty for a `tcp` route.
    pub sni_hosts: Vec<HostMatch>,
    /// Weighted destinations, weight 0 left out; one is chosen per connection.
    pub destinations: Vec<Destination>,
}

/// A `route[].destination` with its `weight`.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub service: ServiceKey,
    pub subset: Option<String>,
    pub weight: u32,
}

impl L4Route {
    /// How specifically the route takes a connection with this (lower-case) SNI, as Envoy
    /// ranks `server_names`: an exact name before the longest `*.suffix`, before `*`
    /// (lower is more specific); `None` when it does not take it.
    pub fn specificity(&self, sni: &str) -> Option<(u8, usize)> {
        self.sni_hosts
            .iter()
            .filter(|h| h.matches(sni))
            .map(HostMatch::rank)
            .min()
    }

    /// A destination, at random by weight (Envoy's `weighted_clusters`, per connection).
    pub fn pick(&self) -> Option<&Destination> {
        let weights = self.destinations.iter().map(|d| d.weight as u64);
        weighted_index(weights).and_then(|i| self.destinations.get(i))
    }
}

/// An index at random, in proportion to its weight; `None` when every weight is 0. Shared
/// by a route's weighted destinations and the upstream balancers.
pub(crate) fn weighted_index(weights: impl Iterator<Item = u64> + Clone) -> Option<usize> {
    let total: u64 = weights.clone().sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    for (i, w) in weights.enumerate() {
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// A Gateway server host pattern, after dropping any `namespace/` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `*`
    Any,
    /// `*.local` is stored as `.local` (lower case): matches any host ending in it.
    Suffix(String),
    /// An exact host (lower case).
    Exact(String),
}

impl HostMatch {
    pub fn parse(pattern: &str) -> Self {
        let p = match pattern.split_once('/') {
            Some((_ns, host)) => host,
            None => pattern,
        };
        let p = p.to_ascii_lowercase();
        if p == "*" {
            HostMatch::Any
        } else if let Some(rest) = p.strip_prefix('*') {
            HostMatch::Suffix(rest.to_string())
        } else {
            HostMatch::Exact(p)
        }
    }

    /// Whether a (lower-case) service host falls under this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostMatch::Exact(e) => e == host,
        }
    }

    /// Envoy's `server_names` order: an exact name before the longest `*.suffix`, before
    /// `*` (lower is more specific).
    pub fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(_) => (0, 0),
            HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
            HostMatch::Any => (2, 0),
        }
    }

    /// Whether some host matches both patterns: a VirtualService's `hosts` against a
    /// Gateway server's (Istio's `pickMatchingGatewayHosts`).
    pub fn intersects(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Any, _) | (_, HostMatch::Any) => true,
            (HostMatch::Exact(a), b) | (b, HostMatch::Exact(a)) => b.matches(a),
            (HostMatch::Suffix(a), HostMatch::Suffix(b)) => {
                a.ends_with(b.as_str()) || b.ends_with(a.as_str())
            }
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Any => f.write_str("*"),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
            HostMatch::Exact(e) => f.write_str(e),
        }
    }
}

/// A server's `hosts` in declaration order, with the exact names indexed: istiod lists
/// every exported service's host on one listener, and matching a ClientHello must not
/// scan them. Shared, so copying a server copies no host.
#[derive(Clone, Default)]
pub struct HostSet(Arc<HostIndex>);

#[derive(Default)]
struct HostIndex {
    list: Vec<HostMatch>,
    exact: HashSet<String>,
    /// `*` and `*.suffix` patterns, in order.
    patterns: Vec<HostMatch>,
}

impl HostSet {
    pub fn new(list: Vec<HostMatch>) -> Self {
        let mut exact = HashSet::new();
        let mut patterns = Vec::new();
        for h in &list {
            match h {
                HostMatch::Exact(e) => {
                    exact.insert(e.clone());
                }
                other => patterns.push(other.clone()),
            }
        }
        HostSet(Arc::new(HostIndex {
            list,
            exact,
            patterns,
        }))
    }

    /// Whether a (lower-case) service host falls under one of the patterns.
    pub fn matches(&self, host: &str) -> bool {
        self.0.exact.contains(host) || self.0.patterns.iter().any(|p| p.matches(host))
    }

    /// How specifically the set takes `host` ([`HostMatch::rank`] of its best pattern);
    /// `None` when no pattern matches.
    pub fn specificity(&self, host: &str) -> Option<(u8, usize)> {
        if self.0.exact.contains(host) {
            return Some((0, 0));
        }
        self.0
            .patterns
            .iter()
            .filter(|p| p.matches(host))
            .map(HostMatch::rank)
            .min()
    }

    /// The patterns as declared, for display: at most `max` of them, then how many more.
    pub fn describe(&self, max: usize) -> String {
        let list = &self.0.list;
        let mut out: Vec<String> = list.iter().take(max).map(HostMatch::to_string).collect();
        if list.len() > max {
            out.push(format!("… {} more", list.len() - max));
        }
        out.join(", ")
    }
}

impl std::ops::Deref for HostSet {
    type Target = [HostMatch];
    fn deref(&self) -> &[HostMatch] {
        &self.0.list
    }
}

impl std::fmt::Debug for HostSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.list.iter()).finish()
    }
}

impl PartialEq for HostSet {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.list == other.0.list
    }
}

impl<const N: usize> PartialEq<[HostMatch; N]> for HostSet {
    fn eq(&self, other: &[HostMatch; N]) -> bool {
        self.0.list == other
    }
}

impl From<Vec<HostMatch>> for HostSet {
    fn from(list: Vec<HostMatch>) -> Self {
        HostSet::new(list)
    }
}

/// One port of one service (ServiceEntry host × port), with its subsets and endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    /// Lower-case service host.
    pub host: String,
    /// Namespace of the ServiceEntry that declared it.
    pub namespace: String,
    /// The service port number (what the SNI carries).
    pub port: u16,
    /// The port's name (used to find endpoint ports by name).
    pub port_name: String,
    /// All endpoints of this service port, each with its resolved target port.
    pub endpoints: Vec<Endpoint>,
    /// Service-level traffic policy (DestinationRule `trafficPolicy`, port-level merged in).
    pub policy: TrafficPolicy,
    /// The policy of the 15008 tunnels' cluster (`inbound-vip|<port>|tcp|<host>`). istiod
    /// gives an ambient east-west gateway's `inbound-vip` clusters no DestinationRule
    /// policy (LEAST_REQUEST, no outlier detection, no connection limit) and takes only the
    /// DestinationRule's top-level `connectionPool.tcp` `idleTimeout` and
    /// `maxConnectionDuration` onto the tunnel's `tcp_proxy`: from istiod, what its
    /// cluster and `tcp_proxy` say; from files, the same built from the DestinationRule.
    pub tunnel_policy: TrafficPolicy,
    /// Declared subsets by name.
    pub subsets: BTreeMap<String, Subset>,
    pub resolution: Resolution,
    /// What an SNI without a subset (`outbound_.<port>_._.<host>`) routes to.
    pub default_route: DefaultRoute,
}

/// The endpoints of the service-level route (no subset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DefaultRoute {
    /// Every endpoint of the service port (the file form).
    #[default]
    AllEndpoints,
    /// These indexes into `ServicePort::endpoints` (an xDS cluster of its own).
    Endpoints(Vec<usize>),
    /// Not routable: the control plane listed only subset names for this port.
    NotListed,
}

impl ServicePort {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolution {
    #[default]
    Static,
    Dns,
}

/// A DestinationRule subset.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Indexes into `ServicePort::endpoints` whose labels match.
    pub endpoints: Vec<usize>,
    /// The subset's policy with the service's merged underneath (subset wins).
    pub policy: TrafficPolicy,
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub address: EndpointAddress,
    /// The port to dial (endpoint port map by port name, else targetPort, else service port).
    pub port: u16,
    pub labels: BTreeMap<String, String>,
    pub locality: Locality,
    /// Network of the endpoint; empty means the gateway's own.
    pub network: String,
    pub weight: u32,
    pub service_account: Option<String>,
    /// Labelled `security.istio.io/tlsMode: disabled`: never a passthrough target.
    pub tls_disabled: bool,
    /// Which of the gateway's paths may dial it.
    pub reach: Reach,
    /// Priority the control plane assigned (EDS `LocalityLbEndpoints.priority`, 0 first):
    /// when set, locality failover follows it as sent instead of computing one.
    pub priority: Option<u32>,
    /// The weight of the endpoint's locality (EDS `LocalityLbEndpoints.load_balancing_weight`,
    /// 0 when unset) when its cluster balances by locality weight
    /// (`common_lb_config.locality_weighted_lb_config`, which istiod sets for a
    /// DestinationRule's `distribute`): within a priority, a locality is picked by this
    /// weight first, then an endpoint within it.
    pub locality_weight: Option<u32>,
}

impl Endpoint {
    /// Labelled `security.istio.io/tlsMode: istio`: it has a sidecar, which expects mTLS
    /// (Istio's auto mTLS).
    pub fn has_sidecar(&self) -> bool {
        self.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
    }

    /// Labelled `networking.istio.io/tunnel` with `http` in its list: the endpoint (its
    /// ztunnel) takes HBONE tunnels on [`HBONE_PORT`]. An endpoint without it must never
    /// get one: the inner tunnel's TLS would reach the application port.
    pub fn accepts_hbone(&self) -> bool {
        self.labels
            .get(TUNNEL_LABEL)
            .is_some_and(|v| v.split(',').any(|p| p.trim() == "http"))
    }

    pub fn authority(&self) -> String {
        match &self.address {
            EndpointAddress::Ip(ip) => SocketAddr::new(*ip, self.port).to_string(),
            EndpointAddress::Hostname(h) => format!("{h}:{}", self.port),
        }
    }
}

/// Which of the gateway's paths may dial an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reach {
    /// Every path whose own rules allow it: 15443 (AUTO_PASSTHROUGH), ISTIO_MUTUAL and
    /// PASSTHROUGH servers, bridges, and 15008 tunnels when it accepts HBONE.
    #[default]
    Any,
    /// 15008 tunnels only: istiod listed it for the ambient east-west gateway (the
    /// `waypoint` stream's `inbound-vip` clusters), not for the router's clusters, so
    /// Envoy's 15443, ISTIO_MUTUAL and PASSTHROUGH chains never reach it.
    Tunnels,
}

impl Reach {
    /// The paths that may dial an endpoint of this reach, as `config_dump` and
    /// `/clusters` name them (before each path's own rules: HBONE, network, tlsMode).
    pub fn paths(self) -> &'static [&'static str] {
        match self {
            Reach::Any => &[
                "AUTO_PASSTHROUGH",
                "PASSTHROUGH",
                "ISTIO_MUTUAL",
                "BRIDGE",
                "HBONE",
            ],
            Reach::Tunnels => &["HBONE"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Ip(IpAddr),
    /// Resolved at connect time (`resolution: DNS`).
    Hostname(String),
}

/// DestinationRule traffic policy, as much of it as strait acts on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    /// `<namespace>/<name>` of the DestinationRule this came from, for `config_dump`.
    pub destination_rule: Option<String>,
    pub lb: LbPolicy,
    pub locality_lb: Option<LocalityLbSetting>,
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub max_connection_duration: Option<Duration>,
    pub outlier: Option<OutlierDetection>,
    pub tls: UpstreamTls,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalityLbSetting {
    pub enabled: bool,
    /// `distribute`: from-pattern → (to-pattern → weight percent).
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// `failover`: from region → to region.
    pub failover: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    pub consecutive_errors: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        // Envoy's defaults, which Istio inherits.
        OutlierDetection {
            consecutive_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// How the gateway talks to an endpoint after terminating ISTIO_MUTUAL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpstreamTls {
    #[default]
    Plaintext,
    IstioMutual,
}

/// A `strait.dev/v1alpha1` `Bridge`.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub identity: Option<String>,
    /// The `tcp` route of a mesh-bound VirtualService for the Bridge's host and port (as a
    /// sidecar applies it): each connection goes to one of its destinations by weight
    /// instead of to `host`, `port` and `subset`.
    pub route: Option<L4Route>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAuthMode {
    Strict,
    Permissive,
    Disable,
}
