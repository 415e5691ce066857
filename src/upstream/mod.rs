//! Endpoint choice and connection: clusters (service port × subset), load balancers,
//! locality priority, outlier state, and connect with bounded retry.
//!
//! Endpoint state (active connections, consecutive failures, ejection) lives in a
//! [`StateRegistry`] keyed by service and endpoint, so it survives configuration reloads.

mod balancer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::model::{Endpoint, EndpointAddress, Locality, ServiceKey, ServicePort, TrafficPolicy};

pub use balancer::Pick;

/// Milliseconds since the process started: a cheap monotonic clock for atomics.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Live state of one endpoint, shared by every cluster that contains it.
#[derive(Debug, Default)]
pub struct EndpointState {
    active: AtomicU32,
    consecutive_failures: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    total_failures: AtomicU64,
}

impl EndpointState {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
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

    pub fn ejection_count(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn total_failures(&self) -> u64 {
        self.total_failures.load(Ordering::Relaxed)
    }
}

/// Endpoint states by (service, endpoint authority); reused across snapshots.
#[derive(Default)]
pub struct StateRegistry {
    states: Mutex<HashMap<(ServiceKey, String), Arc<EndpointState>>>,
}

impl StateRegistry {
    pub fn state_for(&self, service: &ServiceKey, endpoint: &Endpoint) -> Arc<EndpointState> {
        // A poisoned lock only means another thread panicked mid-insert; the map is
        // still a valid map, so keep using it.
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states
            .entry((service.clone(), endpoint.authority()))
            .or_default()
            .clone()
    }

    /// Drops state no cluster refers to any more (after a reload removed endpoints).
    pub fn prune(&self) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|_, s| Arc::strong_count(s) > 1);
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
    pub policy: TrafficPolicy,
    pub members: Vec<Member>,
    balancer: balancer::Balancer,
    active: AtomicU32,
}

/// Which endpoints may be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// AUTO_PASSTHROUGH: the endpoint must terminate the client's mTLS itself, so
    /// endpoints labelled `security.istio.io/tlsMode: disabled` are never picked.
    Passthrough,
    /// The gateway (or bridge) speaks for the client: any endpoint will do.
    Terminated,
}

impl Cluster {
    pub fn new(
        service: Arc<ServicePort>,
        subset: Option<&str>,
        registry: &StateRegistry,
    ) -> Option<Cluster> {
        let (policy, indexes): (TrafficPolicy, Vec<usize>) = match subset {
            None => (
                service.policy.clone(),
                (0..service.endpoints.len()).collect(),
            ),
            Some(name) => {
                let s = service.subsets.get(name)?;
                (s.policy.clone(), s.endpoints.clone())
            }
        };
        let key = service.key();
        let members: Vec<Member> = indexes
            .iter()
            .filter_map(|&i| service.endpoints.get(i))
            .map(|e| Member {
                endpoint: e.clone(),
                state: registry.state_for(&key, e),
            })
            .collect();
        let weights: Vec<u32> = members.iter().map(|m| m.endpoint.weight.max(1)).collect();
        Some(Cluster {
            balancer: balancer::Balancer::new(policy.lb, &weights),
            service,
            subset: subset.map(str::to_string),
            policy,
            members,
            active: AtomicU32::new(0),
        })
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

    /// Members eligible for `purpose`, grouped by locality priority, health applied.
    pub fn pick(&self, purpose: Purpose, gateway: &Locality, exclude: &[usize]) -> Pick {
        balancer::pick(self, purpose, gateway, exclude)
    }

    /// Records a connect failure; ejects the endpoint when outlier detection says so.
    /// Returns true when this failure ejected it.
    pub fn record_failure(&self, member: usize) -> bool {
        let Some(m) = self.members.get(member) else {
            return false;
        };
        m.state.total_failures.fetch_add(1, Ordering::Relaxed);
        let failures = m.state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(od) = &self.policy.outlier else {
            return false;
        };
        if failures < od.consecutive_errors.max(1) || m.state.is_ejected() {
            return false;
        }
        // maxEjectionPercent, with Envoy's rule that at least one host may be ejected.
        let ejected = self.members.iter().filter(|m| m.state.is_ejected()).count();
        let cap = ((self.members.len() as u64 * od.max_ejection_percent as u64) / 100).max(1);
        if ejected as u64 >= cap {
            return false;
        }
        let n = m.state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        // The ejection time grows with each repeat ejection, as in Envoy.
        let ms = od.base_ejection_time.as_millis() as u64 * n.min(10) as u64;
        m.state
            .ejected_until
            .store(now_ms() + ms.max(1), Ordering::Relaxed);
        m.state.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    pub fn record_success(&self, member: usize) {
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
#[derive(Debug, Clone, Copy)]
pub enum AttemptFailure {
    Refused,
    Timeout,
    Resolve,
    Other,
}

impl AttemptFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AttemptFailure::Refused => "refused",
            AttemptFailure::Timeout => "timeout",
            AttemptFailure::Resolve => "resolve",
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
    fn success(&self, took: Duration);
}

/// Connects to an endpoint of `cluster`: up to `max_attempts` distinct endpoints, each
/// bounded by `timeout`.
pub async fn connect(
    cluster: &Cluster,
    purpose: Purpose,
    gateway: &Locality,
    timeout: Duration,
    max_attempts: usize,
    observer: &(dyn ConnectObserver + Sync),
) -> Result<Connected, ConnectError> {
    let mut tried: Vec<usize> = Vec::new();
    let mut last = String::new();
    while tried.len() < max_attempts.max(1) {
        let Some(idx) = cluster.pick(purpose, gateway, &tried).member() else {
            break;
        };
        tried.push(idx);
        let member = &cluster.members[idx];
        member.state.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(member.state.clone());
        observer.attempt();
        let started = Instant::now();
        match connect_endpoint(&member.endpoint, timeout).await {
            Ok((stream, addr)) => {
                observer.success(started.elapsed());
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
                cluster.record_failure(idx);
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

async fn connect_endpoint(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), (AttemptFailure, String)> {
    let attempt = async {
        let addr = match &endpoint.address {
            EndpointAddress::Ip(ip) => SocketAddr::new(*ip, endpoint.port),
            EndpointAddress::Hostname(host) => {
                let mut addrs = tokio::net::lookup_host((host.as_str(), endpoint.port))
                    .await
                    .map_err(|e| (AttemptFailure::Resolve, format!("resolve {host}: {e}")))?;
                addrs.next().ok_or_else(|| {
                    (
                        AttemptFailure::Resolve,
                        format!("resolve {host}: no addresses"),
                    )
                })?
            }
        };
        let stream = TcpStream::connect(addr).await.map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                AttemptFailure::Refused
            } else {
                AttemptFailure::Other
            };
            (kind, e.to_string())
        })?;
        let _ = stream.set_nodelay(true);
        Ok((stream, addr))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            AttemptFailure::Timeout,
            format!("connect timed out after {timeout:?}"),
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
