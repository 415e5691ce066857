//! Endpoint choice and connection: clusters (service port × subset), load balancers,
//! locality, outlier state, name resolution, and connect with bounded retry.
//!
//! Endpoint state (active connections, consecutive failures, ejection, cached DNS
//! answers) lives in a [`StateRegistry`] keyed by service and endpoint, so it survives
//! configuration reloads.

mod balancer;
mod dns;
mod locality;
mod outlier;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::model::{
    Changed, DefaultRoute, Endpoint, EndpointAddress, Locality, Reach, ServiceKey, ServicePort,
    Settings, TrafficPolicy,
};
use crate::telemetry::{FirstByte, RouteMetrics};

pub use balancer::Pick;
pub use dns::DEFAULT_DNS_TTL;

/// Milliseconds since the process started: a cheap monotonic clock for atomics.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Where the gateway stands: its locality (for locality-aware balancing) and network
/// (for the passthrough network view).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub locality: &'a Locality,
    /// Empty: the gateway does not know its network and sees every endpoint.
    pub network: &'a str,
}

impl<'a> From<&'a Settings> for Origin<'a> {
    fn from(s: &'a Settings) -> Self {
        Origin {
            locality: &s.locality,
            network: &s.network,
        }
    }
}

impl<'a> From<&'a Locality> for Origin<'a> {
    fn from(locality: &'a Locality) -> Self {
        Origin {
            locality,
            network: "",
        }
    }
}

/// Live state of one endpoint, shared by every cluster that contains it.
#[derive(Debug)]
pub struct EndpointState {
    active: AtomicU32,
    consecutive_failures: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when never ejected.
    ejected_until: AtomicU64,
    /// Envoy's ejection multiplier: grows per ejection, decays while healthy.
    multiplier: AtomicU32,
    ejections: AtomicU32,
    total_failures: AtomicU64,
    dns: dns::DnsCache,
}

impl EndpointState {
    fn new(dns_ttl: Duration) -> Self {
        EndpointState {
            active: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            multiplier: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            total_failures: AtomicU64::new(0),
            dns: dns::DnsCache::new(dns_ttl),
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_for().is_some()
    }

    /// Remaining ejection time, if ejected.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until != 0 && now < until).then(|| Duration::from_millis(until - now))
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Ejections since the endpoint first appeared (monotonic, for metrics).
    pub fn ejection_count(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Failed connect attempts since the endpoint first appeared.
    pub fn total_failures(&self) -> u64 {
        self.total_failures.load(Ordering::Relaxed)
    }

    /// What a DNS endpoint's name last resolved to (empty for an IP endpoint, or a name
    /// no connection has needed yet: names are resolved when a connection needs them).
    pub fn resolved(&self) -> Vec<std::net::SocketAddr> {
        self.dns.cached()
    }
}

/// Endpoint states by service and endpoint authority; reused across snapshots.
pub struct StateRegistry {
    states: Mutex<HashMap<ServiceKey, HashMap<String, Arc<EndpointState>>>>,
    dns_ttl: Duration,
}

impl Default for StateRegistry {
    fn default() -> Self {
        Self::with_dns_ttl(DEFAULT_DNS_TTL)
    }
}

impl StateRegistry {
    /// A registry whose DNS endpoints keep each answer for `dns_ttl`.
    pub fn with_dns_ttl(dns_ttl: Duration) -> Self {
        StateRegistry {
            states: Mutex::new(HashMap::new()),
            dns_ttl,
        }
    }

    pub fn state_for(&self, service: &ServiceKey, endpoint: &Endpoint) -> Arc<EndpointState> {
        // A poisoned lock only means another thread panicked mid-insert; the map is
        // still a valid map, so keep using it.
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let of_service = match states.get_mut(service) {
            Some(m) => m,
            None => states.entry(service.clone()).or_default(),
        };
        of_service
            .entry(endpoint.authority())
            .or_insert_with(|| Arc::new(EndpointState::new(self.dns_ttl)))
            .clone()
    }

    /// Every endpoint state with its service and authority, sorted: for metrics that
    /// are computed at scrape time (health gauges, ejection totals).
    pub fn endpoints(&self) -> Vec<(ServiceKey, String, Arc<EndpointState>)> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = states
            .iter()
            .flat_map(|(k, m)| m.iter().map(|(a, s)| (k.clone(), a.clone(), s.clone())))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// Drops state no cluster refers to any more (after a reload removed endpoints): of
    /// every service, or only of the service ports an update changed.
    pub fn prune(&self, changed: &Changed) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        // Keeps the states in use; says whether any is.
        let keep_used = |m: &mut HashMap<String, Arc<EndpointState>>| {
            m.retain(|_, s| Arc::strong_count(s) > 1);
            !m.is_empty()
        };
        match changed {
            Changed::Everything => states.retain(|_, m| keep_used(m)),
            Changed::Services(keys) => {
                for key in keys {
                    if let Some(m) = states.get_mut(key)
                        && !keep_used(m)
                    {
                        states.remove(key);
                    }
                }
            }
        }
    }
}

/// One endpoint within a cluster.
#[derive(Debug)]
pub struct Member {
    pub endpoint: Endpoint,
    pub state: Arc<EndpointState>,
}

/// A service port, or one subset of it: the unit of load balancing.
#[derive(Debug)]
pub struct Cluster {
    pub service: Arc<ServicePort>,
    pub subset: Option<String>,
    /// The subset's policy where it sets a section, the service's otherwise.
    pub policy: TrafficPolicy,
    pub members: Vec<Member>,
    balancer: balancer::Balancer,
    /// Locality plan for the first gateway locality seen (the snapshot's own).
    plan: OnceLock<(Locality, locality::Plan)>,
    active: AtomicU32,
    /// The route's metric series for passthrough connections, looked up on first use.
    pub passthrough_metrics: OnceLock<Arc<RouteMetrics>>,
}

/// Which endpoints may be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// AUTO_PASSTHROUGH: the endpoint must terminate the client's mTLS itself, so
    /// endpoints labelled `security.istio.io/tlsMode: disabled` are never picked, and
    /// only the gateway's own network is seen (Istio's `REQUESTED_NETWORK_VIEW`):
    /// endpoints of another network are reached through that network's gateway, not
    /// dialled from here.
    Passthrough,
    /// PASSTHROUGH: the client's TLS is the destination's own (a server certificate of
    /// its own, not mesh mTLS), so any endpoint of the gateway's network will do.
    Tls,
    /// The gateway speaks for the client: any endpoint will do.
    Terminated,
    /// A bridge speaks for a local client: every endpoint is a candidate, but those in
    /// the bridge's own network (dialled directly) are preferred while any of them is
    /// healthy; endpoints of other networks (reached through their network's gateway)
    /// take traffic only when none is. The caller leaves out endpoints it cannot reach
    /// (a network without a gateway) through `exclude`.
    Bridge,
    /// A double-HBONE tunnel (ambient): only endpoints labelled as accepting HBONE, in the
    /// gateway's own network, dialled on their HBONE port (15008) instead of the target port.
    Hbone,
}

/// Whether `endpoint` lives in `own_network`. An endpoint without a network is taken to
/// be in the caller's own; one that names a network is elsewhere unless it names the
/// caller's.
pub fn in_network(endpoint: &Endpoint, own_network: &str) -> bool {
    endpoint.network.is_empty() || endpoint.network == own_network
}

/// Why an endpoint can never be a passthrough target from a gateway in
/// `gateway_network`, or `None` when it can be.
fn passthrough_exclusion(endpoint: &Endpoint, gateway_network: &str) -> Option<&'static str> {
    if endpoint.tls_disabled {
        Some("security.istio.io/tlsMode=disabled cannot terminate the client's mTLS")
    } else {
        network_exclusion(endpoint, gateway_network)
    }
}

/// Why a gateway in `gateway_network` never dials `endpoint` itself (it is reached through
/// its own network's gateway), or `None`. A gateway without a network sees every one.
fn network_exclusion(endpoint: &Endpoint, gateway_network: &str) -> Option<&'static str> {
    (!gateway_network.is_empty()
        && !endpoint.network.is_empty()
        && endpoint.network != gateway_network)
        .then_some("in another network: reached through that network's gateway")
}

impl Purpose {
    /// What a connection on a gateway server of this mode dials for.
    pub fn of_server(mode: crate::model::ServerTlsMode) -> Purpose {
        match mode {
            crate::model::ServerTlsMode::AutoPassthrough => Purpose::Passthrough,
            crate::model::ServerTlsMode::Passthrough => Purpose::Tls,
            crate::model::ServerTlsMode::IstioMutual => Purpose::Terminated,
            crate::model::ServerTlsMode::Hbone => Purpose::Hbone,
        }
    }

    /// The port to dial on `endpoint`: its HBONE port for a tunnel, else its own port.
    pub fn dial_port(self, endpoint: &Endpoint) -> u16 {
        match self {
            Purpose::Hbone => crate::model::HBONE_PORT,
            _ => endpoint.port,
        }
    }

    /// Every purpose, in the order `config_dump` and `/clusters` list them.
    pub const ALL: [Purpose; 5] = [
        Purpose::Passthrough,
        Purpose::Tls,
        Purpose::Terminated,
        Purpose::Bridge,
        Purpose::Hbone,
    ];

    /// The purpose as `config_dump` and `/clusters` name it: the server mode, or `BRIDGE`.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Passthrough => "AUTO_PASSTHROUGH",
            Purpose::Tls => "PASSTHROUGH",
            Purpose::Terminated => "ISTIO_MUTUAL",
            Purpose::Bridge => "BRIDGE",
            Purpose::Hbone => "HBONE",
        }
    }

    /// The names of the purposes that may use `endpoint` from a gateway in
    /// `gateway_network`: what `config_dump` and `/clusters` show of it.
    pub fn allowed(endpoint: &Endpoint, gateway_network: &str) -> Vec<&'static str> {
        Purpose::ALL
            .into_iter()
            .filter(|p| p.exclusion(endpoint, gateway_network).is_none())
            .map(Purpose::name)
            .collect()
    }

    /// Why a connection of this purpose can never use `endpoint`, or `None` when it can.
    pub fn exclusion(self, endpoint: &Endpoint, gateway_network: &str) -> Option<&'static str> {
        if self != Purpose::Hbone && endpoint.reach == Reach::Tunnels {
            return Some(
                "listed by istiod for the ambient east-west gateway only (its inbound-vip cluster): a 15008 tunnel destination, never dialled by another path",
            );
        }
        match self {
            Purpose::Passthrough => passthrough_exclusion(endpoint, gateway_network),
            Purpose::Tls => network_exclusion(endpoint, gateway_network),
            Purpose::Hbone if !endpoint.accepts_hbone() => {
                Some("not labelled networking.istio.io/tunnel: http: cannot take an HBONE tunnel")
            }
            Purpose::Hbone => network_exclusion(endpoint, gateway_network),
            Purpose::Terminated | Purpose::Bridge => None,
        }
    }
}

/// Share of `maxConnectionDuration` added at random to each connection's limit, so
/// connections opened together are not all closed (and reopened) together.
pub const MAX_DURATION_JITTER_PERCENT: u32 = 10;

/// `d` plus `fraction` (0..1) of the jitter allowance.
fn jittered(d: Duration, fraction: f64) -> Duration {
    let extra = d.mul_f64(MAX_DURATION_JITTER_PERCENT as f64 / 100.0 * fraction.clamp(0.0, 1.0));
    d.saturating_add(extra)
}

/// The indexes of the endpoints a service port's default route sends to.
fn default_route(service: &ServicePort) -> Vec<usize> {
    match &service.default_route {
        DefaultRoute::AllEndpoints => (0..service.endpoints.len()).collect(),
        DefaultRoute::Endpoints(indexes) => indexes.clone(),
        DefaultRoute::NotListed => Vec::new(),
    }
}

impl Cluster {
    /// The cluster of the service port (or of one subset) that 15443, ISTIO_MUTUAL and
    /// PASSTHROUGH servers and bridges use: every endpoint of it but those reached by
    /// tunnels only ([`Reach::Tunnels`]), as Envoy's router clusters hold only what
    /// istiod listed for the router.
    pub fn new(
        service: Arc<ServicePort>,
        subset: Option<&str>,
        registry: &StateRegistry,
    ) -> Option<Cluster> {
        let (policy, indexes): (TrafficPolicy, Vec<usize>) = match subset {
            None => (service.policy.clone(), default_route(&service)),
            Some(name) => {
                let s = service.subsets.get(name)?;
                (s.policy.clone(), s.endpoints.clone())
            }
        };
        let members = indexes.into_iter().filter(|&i| {
            service
                .endpoints
                .get(i)
                .is_some_and(|e| e.reach != Reach::Tunnels)
        });
        Some(Self::of(service.clone(), subset, policy, members, registry))
    }

    /// The cluster 15008 tunnels use: the endpoints of the service port's default route
    /// that accept HBONE, whoever listed them (Envoy's `inbound-vip|<port>|tcp|<host>`),
    /// under the service port's tunnel policy ([`ServicePort::tunnel_policy`]); `None`
    /// when there is none. Its members share their connection counts with the same
    /// endpoints in the other clusters of the service; ejection holds only in clusters
    /// with outlier detection ([`Cluster::is_ejected`]).
    pub fn tunnels(service: Arc<ServicePort>, registry: &StateRegistry) -> Option<Cluster> {
        let members: Vec<usize> = default_route(&service)
            .into_iter()
            .filter(|&i| {
                service
                    .endpoints
                    .get(i)
                    .is_some_and(Endpoint::accepts_hbone)
            })
            .collect();
        if members.is_empty() {
            return None;
        }
        let policy = service.tunnel_policy.clone();
        Some(Self::of(
            service,
            None,
            policy,
            members.into_iter(),
            registry,
        ))
    }

    fn of(
        service: Arc<ServicePort>,
        subset: Option<&str>,
        policy: TrafficPolicy,
        indexes: impl Iterator<Item = usize>,
        registry: &StateRegistry,
    ) -> Cluster {
        let key = service.key();
        let members: Vec<Member> = indexes
            .filter_map(|i| service.endpoints.get(i))
            .map(|e| Member {
                endpoint: e.clone(),
                state: registry.state_for(&key, e),
            })
            .collect();
        let weights: Vec<u32> = members.iter().map(|m| m.endpoint.weight.max(1)).collect();
        Cluster {
            balancer: balancer::Balancer::new(policy.lb, &weights),
            service,
            subset: subset.map(str::to_string),
            policy,
            members,
            plan: OnceLock::new(),
            active: AtomicU32::new(0),
            passthrough_metrics: OnceLock::new(),
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Reserves a slot under `connectionPool.tcp.maxConnections`, or `None` when full.
    pub fn admit(self: &Arc<Self>) -> Option<ClusterSlot> {
        let limit = self.policy.max_connections.unwrap_or(u32::MAX);
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(ClusterSlot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// `connectionPool.tcp.connectTimeout`, else the gateway's default.
    pub fn connect_timeout(&self, default: Duration) -> Duration {
        self.policy.connect_timeout.unwrap_or(default)
    }

    /// `connectionPool.tcp.idleTimeout`, else the gateway's default.
    pub fn idle_timeout(&self, default: Duration) -> Duration {
        self.policy.idle_timeout.unwrap_or(default)
    }

    /// The lifetime limit for one new connection: `maxConnectionDuration` plus up to
    /// [`MAX_DURATION_JITTER_PERCENT`] at random.
    pub fn max_connection_duration(&self) -> Option<Duration> {
        self.policy
            .max_connection_duration
            .filter(|d| !d.is_zero())
            .map(|d| jittered(d, fastrand::f64()))
    }

    /// Picks a member eligible for `purpose` that is not in `exclude`: locality plan,
    /// health and load balancer applied.
    pub fn pick<'a>(
        &self,
        purpose: Purpose,
        origin: impl Into<Origin<'a>>,
        exclude: &[usize],
    ) -> Pick {
        let origin = origin.into();
        let computed;
        let plan = match self.plan.get() {
            Some((l, p)) if l == origin.locality => p,
            Some(_) => {
                computed = self.plan_for(origin.locality);
                &computed
            }
            None => {
                &self
                    .plan
                    .get_or_init(|| (origin.locality.clone(), self.plan_for(origin.locality)))
                    .1
            }
        };
        balancer::pick(self, plan, purpose, origin.network, exclude)
    }

    fn plan_for(&self, gateway: &Locality) -> locality::Plan {
        // Priorities the control plane computed for this gateway are applied as sent.
        if self.members.iter().any(|m| m.endpoint.priority.is_some()) {
            let priority: Vec<u8> = self
                .members
                .iter()
                .map(|m| m.endpoint.priority.unwrap_or(0).min(u8::MAX as u32) as u8)
                .collect();
            if self
                .members
                .iter()
                .any(|m| m.endpoint.locality_weight.is_some())
            {
                let localities: Vec<&Locality> =
                    self.members.iter().map(|m| &m.endpoint.locality).collect();
                let weights: Vec<u32> = self
                    .members
                    .iter()
                    .map(|m| m.endpoint.locality_weight.unwrap_or(0))
                    .collect();
                return locality::weighted(priority, &localities, &weights);
            }
            return locality::Plan::Priority(priority);
        }
        let localities: Vec<&Locality> =
            self.members.iter().map(|m| &m.endpoint.locality).collect();
        let weights: Vec<u32> = self.members.iter().map(|m| m.endpoint.weight).collect();
        locality::Plan::new(&self.policy, gateway, &localities, &weights)
    }

    /// Whether `member` is ejected as this cluster sees it: an endpoint the outlier
    /// detection of the service's clusters ejected, where this cluster has outlier
    /// detection itself. A cluster without it (Envoy: no outlier detector) dials every
    /// member, as the 15008 tunnels' cluster from istiod does.
    pub fn is_ejected(&self, member: &Member) -> bool {
        self.policy.outlier.is_some() && member.state.is_ejected()
    }

    /// Records a failed connect attempt; ejects the endpoint when outlier detection says
    /// so. Returns the ejection time when this failure ejected it. A cluster without
    /// outlier detection counts the failure but leaves the consecutive count, which only
    /// outlier detection reads, to the clusters that have it.
    pub fn record_failure(&self, member: usize) -> Option<Duration> {
        let m = self.members.get(member)?;
        m.state.total_failures.fetch_add(1, Ordering::Relaxed);
        let od = self.policy.outlier.as_ref()?;
        let failures = m.state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < od.consecutive_errors.max(1) || m.state.is_ejected() {
            return None;
        }
        let ejected = self.members.iter().filter(|m| m.state.is_ejected()).count();
        if !outlier::may_eject(ejected, self.members.len(), od.max_ejection_percent) {
            return None;
        }
        let now = now_ms();
        let until = m.state.ejected_until.load(Ordering::Relaxed);
        let healthy_for = Duration::from_millis(if until == 0 {
            0
        } else {
            now.saturating_sub(until)
        });
        let (time, multiplier) = outlier::next_ejection(
            od.base_ejection_time,
            od.interval,
            m.state.multiplier.load(Ordering::Relaxed),
            healthy_for,
        );
        m.state.multiplier.store(multiplier, Ordering::Relaxed);
        m.state
            .ejected_until
            .store(now + time.as_millis() as u64, Ordering::Relaxed);
        m.state.ejections.fetch_add(1, Ordering::Relaxed);
        m.state.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::info!(
            service = %self.service.host,
            endpoint = %m.endpoint.authority(),
            failures,
            ejected_for = ?time,
            "endpoint ejected by outlier detection"
        );
        Some(time)
    }

    pub fn record_success(&self, member: usize) {
        if self.policy.outlier.is_none() {
            return;
        }
        if let Some(m) = self.members.get(member) {
            m.state.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// A reserved place in a cluster's connection budget; released on drop.
#[derive(Debug)]
pub struct ClusterSlot(Arc<Cluster>);

impl Drop for ClusterSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One active connection to an endpoint; released on drop.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    #[error("all {attempts} connect attempts failed; last: {last}")]
    AllFailed { attempts: usize, last: String },
}

/// One failed attempt, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    Refused,
    Timeout,
    Resolve,
    /// Accepted, then closed or reset before answering the replayed ClientHello.
    Reset,
    /// This process ran out of file descriptors: the endpoint is not at fault.
    LocalExhaustion,
    Other,
}

impl AttemptFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AttemptFailure::Refused => "refused",
            AttemptFailure::Timeout => "timeout",
            AttemptFailure::Resolve => "resolve",
            AttemptFailure::Reset => "reset",
            AttemptFailure::LocalExhaustion => "fd_exhausted",
            AttemptFailure::Other => "other",
        }
    }
}

/// A connected upstream socket and what it is connected to.
pub struct Connected {
    pub stream: TcpStream,
    pub member: usize,
    pub addr: SocketAddr,
    pub guard: ActiveGuard,
}

/// Hooks for the caller to observe each attempt (metrics), kept out of this module.
pub trait ConnectObserver {
    fn attempt(&self);
    fn failure(&self, kind: AttemptFailure, took: Duration);
    /// `took` is the TCP connect time, without the wait for a first byte.
    fn success(&self, took: Duration);
    /// After a connect that replayed an opening (a ClientHello), the endpoint's first
    /// byte was awaited for `waited` (at most the connect timeout), ending as `outcome`.
    fn first_byte(&self, outcome: FirstByte, waited: Duration) {
        let _ = (outcome, waited);
    }
    /// Outlier detection ejected `cluster.members[member]` for `time`.
    fn ejected(&self, cluster: &Cluster, member: usize, time: Duration) {
        let _ = (cluster, member, time);
    }
}

/// Connects to an endpoint of `cluster`: up to `max_attempts` distinct endpoints, each
/// bounded by `timeout` (resolution included).
///
/// With `opening` (a client's ClientHello), also writes it and waits, up to `timeout`
/// again, for the endpoint's first byte. An endpoint that accepts and then closes or
/// resets without answering counts as a failed attempt and the next endpoint is tried:
/// the client has seen nothing yet, so replaying its ClientHello elsewhere is safe. For
/// TLS the wait costs nothing a client would notice, as a server always answers a
/// ClientHello; whatever the client sends meanwhile waits in the socket, unread, and
/// every wait is reported to `observer.first_byte`.
pub async fn connect<'a>(
    cluster: &Cluster,
    purpose: Purpose,
    origin: impl Into<Origin<'a>>,
    timeout: Duration,
    max_attempts: usize,
    observer: &(dyn ConnectObserver + Sync),
    opening: Option<&[u8]>,
) -> Result<Connected, ConnectError> {
    let origin = origin.into();
    let mut tried: Vec<usize> = Vec::new();
    let mut last = String::new();
    while tried.len() < max_attempts.max(1) {
        let Some(idx) = cluster.pick(purpose, origin, &tried).member() else {
            break;
        };
        tried.push(idx);
        let member = &cluster.members[idx];
        let guard = member.activate();
        observer.attempt();
        let started = Instant::now();
        let port = purpose.dial_port(&member.endpoint);
        let outcome = match dial_endpoint(member, port, timeout, opening).await {
            Ok((stream, addr, sent)) => {
                let took = started.elapsed();
                match opening {
                    Some(bytes) => {
                        let waiting = Instant::now();
                        let answer = await_answer(&stream, &bytes[sent..], timeout).await;
                        let outcome = *answer.as_ref().unwrap_or(&FirstByte::Closed);
                        observer.first_byte(outcome, waiting.elapsed());
                        answer.map(|_| (stream, addr, took))
                    }
                    None => Ok((stream, addr, took)),
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok((stream, addr, took)) => {
                observer.success(took);
                cluster.record_success(idx);
                return Ok(Connected {
                    stream,
                    member: idx,
                    addr,
                    guard,
                });
            }
            Err((kind, msg)) => {
                observer.failure(kind, started.elapsed());
                // Running out of descriptors here says nothing about the endpoint, so it
                // must not count towards ejecting a healthy one.
                if !matches!(kind, AttemptFailure::LocalExhaustion)
                    && let Some(time) = cluster.record_failure(idx)
                {
                    observer.ejected(cluster, idx, time);
                }
                tracing::debug!(endpoint = %member.endpoint.authority(), error = %msg, "upstream connect failed");
                last = format!("{}: {msg}", member.endpoint.authority());
            }
        }
    }
    if tried.is_empty() {
        Err(ConnectError::NoHealthyEndpoint)
    } else {
        Err(ConnectError::AllFailed {
            attempts: tried.len(),
            last,
        })
    }
}

/// Writes `opening` and waits until the endpoint has something to say (its first byte
/// stays in the socket for the copy that follows), or until `timeout`.
async fn await_answer(
    stream: &TcpStream,
    opening: &[u8],
    timeout: Duration,
) -> Result<FirstByte, (AttemptFailure, String)> {
    let exchange = async {
        let mut written = 0;
        while written < opening.len() {
            stream.writable().await.map_err(reset)?;
            match stream.try_write(&opening[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(reset(e)),
            }
        }
        // Readiness alone says "answered" without a system call. Only when the peer
        // has also closed (or errored) does a peek tell an answer followed by a close
        // (an alert, say, which the client must get) from a close without one.
        let ready = stream
            .ready(tokio::io::Interest::READABLE)
            .await
            .map_err(reset)?;
        if !ready.is_read_closed() && !ready.is_error() {
            return Ok(FirstByte::Answered);
        }
        let mut probe = [0u8; 1];
        match stream.peek(&mut probe).await {
            Ok(0) => Err((
                AttemptFailure::Reset,
                "closed the connection without answering".to_string(),
            )),
            Ok(_) => Ok(FirstByte::Answered),
            Err(e) => Err(reset(e)),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        // Connected and silent is slow, not broken (a loaded workload may take a while
        // to answer a handshake): hand the connection to the copy, which waits as long
        // as the idle timeout allows. Only a close or reset before answering is a
        // failed attempt.
        Err(_) => Ok(FirstByte::Timeout),
    }
}

fn reset(e: std::io::Error) -> (AttemptFailure, String) {
    (
        AttemptFailure::Reset,
        format!("failed before answering: {e}"),
    )
}

/// Opens a TCP connection to the member's endpoint (resolving a hostname endpoint
/// through its DNS cache) on `port`, bounded by `timeout`.
pub async fn dial_endpoint(
    member: &Member,
    port: u16,
    timeout: Duration,
    opening: Option<&[u8]>,
) -> Result<(TcpStream, SocketAddr, usize), (AttemptFailure, String)> {
    let endpoint = &member.endpoint;
    let attempt = async {
        let addrs = match &endpoint.address {
            EndpointAddress::Ip(ip) => vec![SocketAddr::new(*ip, port)],
            EndpointAddress::Hostname(host) => member
                .state
                .dns
                .resolve(host, port)
                .await
                .map_err(|e| (AttemptFailure::Resolve, e))?,
        };
        connect_first(
            addrs,
            (AttemptFailure::Other, "no address".to_string()),
            opening,
        )
        .await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            AttemptFailure::Timeout,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}

/// Connects to the first of `addrs` that takes the connection (a name may have several:
/// `localhost` is ::1 and 127.0.0.1); `none` is the answer when there are no addresses.
/// With `opening`, also returns how much of it was already written (see [`connect_tcp`]).
async fn connect_first(
    addrs: Vec<SocketAddr>,
    none: (AttemptFailure, String),
    opening: Option<&[u8]>,
) -> Result<(TcpStream, SocketAddr, usize), (AttemptFailure, String)> {
    let mut last = none;
    for addr in addrs {
        match connect_tcp(addr, opening).await {
            Ok((stream, sent)) => return Ok((stream, addr, sent)),
            Err(e) => {
                let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    AttemptFailure::Refused
                } else if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    AttemptFailure::LocalExhaustion
                } else {
                    AttemptFailure::Other
                };
                last = (kind, format!("{addr}: {e}"));
            }
        }
    }
    Err(last)
}

/// A non-blocking TCP connect with `TCP_NODELAY`. With `opening`, the bytes are written
/// right after `connect` returns: when the handshake has already completed (a local or
/// nearby endpoint), that saves a trip through the reactor and the `SO_ERROR` check, and
/// a refused connection shows as the write's error. Returns how much was written.
async fn connect_tcp(
    addr: SocketAddr,
    opening: Option<&[u8]>,
) -> std::io::Result<(TcpStream, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if let Some(bytes) = opening.filter(|b| !b.is_empty()) {
        match socket2::SockRef::from(&stream).send_with_flags(bytes, libc::MSG_NOSIGNAL) {
            Ok(n) => return Ok((stream, n)),
            // Still connecting (or no room): wait for the connection below.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    Ok((stream, 0))
}

impl Member {
    /// Counts one connection to this endpoint as active until the guard drops (for
    /// least-request balancing and `/clusters`).
    pub fn activate(&self) -> ActiveGuard {
        self.state.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.state.clone())
    }
}

/// Opens a TCP connection to `host:port` (an IP address or a name resolved now),
/// bounded by `timeout`: used for a network's gateway, which is not a cluster member.
pub async fn dial_address(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), (AttemptFailure, String)> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| (AttemptFailure::Resolve, format!("{host}: {e}")))?
                .collect(),
        };
        connect_first(
            addrs,
            (AttemptFailure::Resolve, format!("{host}: no address")),
            None,
        )
        .await
        .map(|(stream, addr, _)| (stream, addr))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            AttemptFailure::Timeout,
            format!("connect to {host}:{port} timed out after {timeout:?}"),
        )),
    }
}

/// A shared counter for round-robin cursors.
#[derive(Debug, Default)]
pub(crate) struct Cursor(AtomicUsize);

impl Cursor {
    pub(crate) fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_duration_jitter_only_lengthens_and_stays_within_ten_percent() {
        let d = Duration::from_secs(100);
        assert_eq!(jittered(d, 0.0), d);
        assert_eq!(jittered(d, 1.0), Duration::from_secs(110));
        assert_eq!(jittered(d, 0.5), Duration::from_secs(105));
        assert_eq!(jittered(d, 7.0), Duration::from_secs(110));
    }
}
