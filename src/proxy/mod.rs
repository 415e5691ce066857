//! Listeners and the per-connection flow: accept → inspect → route → connect → copy.

mod bridge;
pub mod copy;
mod h2_copy;
mod h2_refusals;
pub mod handover;
mod hbone;
pub mod hello;
mod listener;
mod mutual;
mod passthrough;
mod upstream_leg;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

use crate::model::{BridgeSpec, Changed, ServiceKey, Snapshot};
use crate::telemetry::Telemetry;
use crate::tls::material::TlsMaterial;
use crate::upstream::{Cluster, StateRegistry};
use handover::Inherited;

pub use listener::{BindError, bind_reuseport};

/// The clusters of one service port: all endpoints, and one per declared subset, for
/// 15443, ISTIO_MUTUAL and PASSTHROUGH servers and bridges; and its HBONE endpoints for
/// 15008 tunnels ([`Cluster::tunnels`]).
#[derive(Debug, Clone)]
pub struct ServiceClusters {
    pub all: Arc<Cluster>,
    pub subsets: BTreeMap<String, Arc<Cluster>>,
    /// `None` when no endpoint of the default route accepts HBONE.
    pub tunnels: Option<Arc<Cluster>>,
}

impl ServiceClusters {
    pub fn get(&self, subset: Option<&str>) -> Option<&Arc<Cluster>> {
        match subset {
            None => Some(&self.all),
            Some(s) => self.subsets.get(s),
        }
    }
}

/// The clusters of one service port, or `None` when it has no cluster to build.
fn service_clusters(
    service: &Arc<crate::model::ServicePort>,
    registry: &StateRegistry,
) -> Option<Arc<ServiceClusters>> {
    let all = Cluster::new(service.clone(), None, registry)?;
    let subsets = service
        .subsets
        .keys()
        .filter_map(|name| {
            Cluster::new(service.clone(), Some(name), registry).map(|c| (name.clone(), Arc::new(c)))
        })
        .collect();
    Some(Arc::new(ServiceClusters {
        all: Arc::new(all),
        subsets,
        tunnels: Cluster::tunnels(service.clone(), registry).map(Arc::new),
    }))
}

/// A snapshot plus the clusters built from it: what one connection routes against.
pub struct Runtime {
    pub snapshot: Arc<Snapshot>,
    /// Shared with the next runtime for every service port an update left alone.
    pub clusters: imbl::HashMap<ServiceKey, Arc<ServiceClusters>>,
    /// Listener address → index into `snapshot.listeners`.
    listeners: HashMap<SocketAddr, usize>,
    /// Bridge listener address → index into `snapshot.bridges`.
    bridges: HashMap<SocketAddr, usize>,
}

impl Runtime {
    pub fn build(snapshot: Arc<Snapshot>, registry: &StateRegistry) -> Runtime {
        Self::build_after(snapshot, registry, None, &Changed::Everything)
    }

    /// Builds the clusters of `snapshot`, keeping those of `previous` whose service port
    /// is the very same (`Arc::ptr_eq`): an update that changed one service rebuilds one
    /// service's clusters, and the others keep their balancer and connection counts.
    /// With `Changed::Services`, only the service ports named are looked at: every
    /// other one is `previous`'s, shared, so the work is proportional to the change.
    pub fn build_after(
        snapshot: Arc<Snapshot>,
        registry: &StateRegistry,
        previous: Option<&Runtime>,
        changed: &Changed,
    ) -> Runtime {
        let same = |key: &ServiceKey, service: &Arc<crate::model::ServicePort>| {
            let prev = previous?;
            let old = prev.snapshot.services.get(key)?;
            Arc::ptr_eq(old, service)
                .then(|| prev.clusters.get(key).cloned())
                .flatten()
        };
        let clusters = match (previous, changed) {
            (Some(prev), Changed::Services(keys)) => {
                let mut clusters = prev.clusters.clone();
                for key in keys {
                    let built = snapshot
                        .services
                        .get(key)
                        .and_then(|s| same(key, s).or_else(|| service_clusters(s, registry)));
                    match built {
                        Some(c) => clusters.insert(key.clone(), c),
                        None => clusters.remove(key),
                    };
                }
                clusters
            }
            _ => snapshot
                .services
                .iter()
                .filter_map(|(key, service)| {
                    same(key, service)
                        .or_else(|| service_clusters(service, registry))
                        .map(|c| (key.clone(), c))
                })
                .collect(),
        };
        let listeners = snapshot
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (l.addr, i))
            .collect();
        let bridges = snapshot
            .bridges
            .iter()
            .enumerate()
            .map(|(i, b)| (b.listen, i))
            .collect();
        Runtime {
            snapshot,
            clusters,
            listeners,
            bridges,
        }
    }

    pub fn servers_for(&self, addr: &SocketAddr) -> &[crate::model::ServerSpec] {
        self.listeners
            .get(addr)
            .and_then(|&i| self.snapshot.listeners.get(i))
            .map_or(&[], |l| l.servers.as_slice())
    }

    /// The Bridge listening on `addr`, if one does.
    pub fn bridge_at(&self, addr: &SocketAddr) -> Option<&BridgeSpec> {
        self.bridges
            .get(addr)
            .and_then(|&i| self.snapshot.bridges.get(i))
    }
}

/// Drain progress, broadcast to accept loops and connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    Serving,
    /// Stop accepting; live connections continue.
    Draining,
    /// Deadline passed: close what is left.
    Closing,
}

/// State shared by every listener and connection.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub telemetry: Arc<Telemetry>,
    pub registry: StateRegistry,
    /// The gateway's own SVID and mTLS configurations, when the configuration needs them.
    pub tls: ArcSwapOption<TlsMaterial>,
    drain: watch::Sender<DrainState>,
    /// Downstream connections admitted under `maxConnections`.
    open: AtomicUsize,
    /// Connection tasks alive, counted from the moment of accept: what a drain waits for.
    live: AtomicUsize,
    idle: Notify,
    /// Woken when the drain deadline passes and open connections must close. Leaked
    /// (one per gateway, alive as long as the process) so that each connection can wait
    /// on it with a 64-byte `Notified<'static>` instead of a watch subscription.
    closing: &'static Notify,
    ready: AtomicBool,
    /// Why the gateway is not ready although its listeners are bound, by source: the
    /// control plane has not sent a complete configuration yet, the mesh CA no
    /// certificate.
    waiting: std::sync::Mutex<BTreeMap<&'static str, String>>,
    /// The SVID from the mesh CA, when certificates come from it.
    pub svid: ArcSwapOption<crate::tls::certs::Identity>,
    /// The control-plane source, when discovery is on.
    pub discovery: std::sync::OnceLock<Arc<crate::xds::Status>>,
    /// The second stream, as the ambient east-west gateway (`discovery.waypoint`).
    pub waypoint_discovery: std::sync::OnceLock<Arc<crate::xds::Status>>,
}

impl Shared {
    pub fn new(snapshot: Arc<Snapshot>, telemetry: Arc<Telemetry>) -> Arc<Shared> {
        let registry = StateRegistry::default();
        let runtime = Runtime::build(snapshot, &registry);
        Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            telemetry,
            registry,
            tls: ArcSwapOption::empty(),
            drain: watch::channel(DrainState::Serving).0,
            open: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            idle: Notify::new(),
            closing: Box::leak(Box::new(Notify::new())),
            ready: AtomicBool::new(false),
            waiting: std::sync::Mutex::new(BTreeMap::new()),
            svid: ArcSwapOption::empty(),
            discovery: std::sync::OnceLock::new(),
            waypoint_discovery: std::sync::OnceLock::new(),
        })
    }

    /// Installs a new snapshot; connections already open keep what they picked.
    pub fn install(&self, snapshot: Arc<Snapshot>) {
        self.install_changed(snapshot, &Changed::Everything);
    }

    /// Installs a new snapshot that differs from the one in force only where `changed`
    /// says.
    pub fn install_changed(&self, snapshot: Arc<Snapshot>, changed: &Changed) {
        let previous = self.runtime.load_full();
        let runtime = Runtime::build_after(snapshot, &self.registry, Some(&previous), changed);
        drop(previous);
        self.runtime.store(Arc::new(runtime));
        self.registry.prune(changed);
    }

    pub fn drain_state(&self) -> DrainState {
        *self.drain.borrow()
    }

    pub fn subscribe_drain(&self) -> watch::Receiver<DrainState> {
        self.drain.subscribe()
    }

    /// Resolves when the drain deadline has passed and open connections must close.
    pub(crate) fn closing(&self) -> Closing {
        // Created before the state is read: a `Notified` receives `notify_waiters` from
        // its creation on, so a deadline passing in between is not missed.
        let notified = self.closing.notified();
        Closing {
            notified,
            already: self.drain_state() == DrainState::Closing,
        }
    }

    /// Ready: configuration loaded, listeners bound, not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self.drain_state() == DrainState::Serving
            && self.not_ready_because().is_none()
    }

    /// Why readiness waits for configuration or a certificate, if it does.
    pub fn not_ready_because(&self) -> Option<String> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.is_empty() {
            return None;
        }
        Some(waiting.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// Holds readiness at 503 for `source` with `why`, or releases it (`None`).
    pub fn set_waiting(&self, source: &'static str, why: Option<String>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(why) => {
                waiting.insert(source, why);
            }
            None => {
                waiting.remove(source);
            }
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Admits a connection under the process-wide `maxConnections`.
    fn admit(self: &Arc<Self>) -> Option<OpenGuard> {
        let limit = self
            .runtime
            .load()
            .snapshot
            .settings
            .max_connections
            .unwrap_or(usize::MAX);
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        let guard = OpenGuard(self.clone());
        (prev < limit).then_some(guard)
    }

    /// Connection tasks alive (accepted and not yet finished).
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Counts one accepted connection until the guard drops; taken by the accept loop
    /// before the connection's task is spawned, so a drain never misses it.
    pub(crate) fn track(self: &Arc<Self>) -> LiveGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        LiveGuard(self.clone())
    }

    /// Marks the gateway draining (readiness fails), waits for live connections up to
    /// `deadline`, then tells the rest to close. Accepting is stopped by the caller.
    pub async fn drain(&self, deadline: Duration) {
        self.drain.send_replace(DrainState::Draining);
        let all_closed = async {
            loop {
                let notified = self.idle.notified();
                if self.live_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(deadline, all_closed).await.is_err() {
            tracing::info!(
                open = self.live_connections(),
                "drain deadline reached; closing remaining connections"
            );
            self.drain.send_replace(DrainState::Closing);
            self.closing.notify_waiters();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while self.live_connections() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
    }
}

/// Counts one open downstream connection; released on drop.
pub(crate) struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one live connection task; released on drop.
pub(crate) struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Shared::closing`].
    pub(crate) struct Closing {
        #[pin]
        notified: tokio::sync::futures::Notified<'static>,
        already: bool,
    }
}

impl std::future::Future for Closing {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        if *this.already {
            return std::task::Poll::Ready(());
        }
        this.notified.poll(cx)
    }
}

/// How long listeners keep accepting after a drain begins, readiness already failing:
/// a replacement process started together with the signal gets time to bind the same
/// ports (see `listener` on why stopping is not simply closing). Capped by the drain
/// duration.
pub const ACCEPT_OVERLAP: Duration = Duration::from_secs(1);

/// One listening address: its accept task and the switch that stops it.
struct ListenerTask {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// A second descriptor for the socket, to duplicate for a replacement process
    /// (`handover`). Dropped by [`ListenerTask::stop`], before the accept task closes
    /// its own, so that close still ends the socket. `None` if the duplicate could not
    /// be made (out of descriptors); the socket is then not handed over.
    socket: Option<OwnedFd>,
}

impl ListenerTask {
    fn spawn(listener: tokio::net::TcpListener, addr: SocketAddr, shared: Arc<Shared>) -> Self {
        let socket = listener.as_fd().try_clone_to_owned().ok();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(listener::accept_loop(listener, addr, shared, stopped));
        ListenerTask { stop, task, socket }
    }

    /// Stops accepting; the task sweeps the queue and closes the socket.
    fn stop(self) -> JoinHandle<()> {
        drop(self.socket);
        let _ = self.stop.send(());
        self.task
    }
}

/// The running gateway: its shared state and one accept task per listener.
pub struct Gateway {
    pub shared: Arc<Shared>,
    listeners: HashMap<SocketAddr, ListenerTask>,
}

impl Gateway {
    /// Binds every listener of the snapshot, taking a socket handed over by a previous
    /// process where there is one for the address; fails if any cannot be bound.
    pub async fn start(
        shared: Arc<Shared>,
        inherited: &mut Inherited,
    ) -> Result<Gateway, BindError> {
        let mut gw = Gateway {
            shared,
            listeners: HashMap::new(),
        };
        let addrs = listener_addrs(&gw.shared.runtime.load().snapshot);
        let bound = bind_all(&addrs, inherited)?;
        for (addr, l) in bound {
            tracing::info!(%addr, "listening");
            let task = ListenerTask::spawn(l, addr, gw.shared.clone());
            gw.listeners.insert(addr, task);
        }
        gw.shared.set_ready(true);
        Ok(gw)
    }

    /// A duplicate of every listening socket, for a replacement process.
    pub fn listener_sockets(&self) -> Vec<OwnedFd> {
        self.listeners
            .values()
            .filter_map(|t| t.socket.as_ref()?.try_clone().ok())
            .collect()
    }

    /// Addresses actually bound (useful when a config asks for port 0).
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.listeners.keys().copied().collect()
    }

    /// Applies a validated snapshot as one step: new listeners are bound first, so a
    /// port that cannot be bound rejects the whole reload and the previous configuration
    /// keeps serving untouched. Then the snapshot is swapped in, new listeners start
    /// accepting and removed ones stop; connections already open, on any listener, keep
    /// the route and upstream they picked.
    pub fn reload(&mut self, snapshot: Arc<Snapshot>) -> Result<(), BindError> {
        self.reload_changed(snapshot, &Changed::Everything)
    }

    /// `reload` of a snapshot that differs from the one in force only where `changed`
    /// says.
    pub fn reload_changed(
        &mut self,
        snapshot: Arc<Snapshot>,
        changed: &Changed,
    ) -> Result<(), BindError> {
        let wanted = listener_addrs(&snapshot);
        let missing: Vec<SocketAddr> = wanted
            .iter()
            .copied()
            .filter(|a| !self.listeners.contains_key(a))
            .collect();
        let fresh = bind_all(&missing, &mut Inherited::default())?;
        self.shared.install_changed(snapshot, changed);
        for (addr, l) in fresh {
            tracing::info!(%addr, "listening");
            let task = ListenerTask::spawn(l, addr, self.shared.clone());
            self.listeners.insert(addr, task);
        }
        let removed: Vec<SocketAddr> = self
            .listeners
            .keys()
            .copied()
            .filter(|a| !wanted.contains(a))
            .collect();
        for addr in removed {
            if let Some(task) = self.listeners.remove(&addr) {
                tracing::info!(%addr, "listener removed from the configuration");
                drop(task.stop());
            }
        }
        Ok(())
    }

    /// Graceful shutdown: readiness fails at once; listeners keep accepting for
    /// `overlap` (capped by `deadline`), then sweep their queues and close; live
    /// connections get what is left of `deadline` to finish, then the rest are closed.
    pub async fn shutdown(mut self, overlap: Duration, deadline: Duration) {
        let began = tokio::time::Instant::now();
        self.shared.drain.send_replace(DrainState::Draining);
        tokio::time::sleep(overlap.min(deadline)).await;
        let tasks: Vec<JoinHandle<()>> = self.listeners.drain().map(|(_, t)| t.stop()).collect();
        for t in tasks {
            let _ = t.await;
        }
        tracing::info!(
            live = self.shared.live_connections(),
            "stopped accepting; waiting for live connections"
        );
        self.shared
            .drain(deadline.saturating_sub(began.elapsed()))
            .await;
    }
}

/// Every address to listen on: Gateway servers and Bridges alike.
fn listener_addrs(snapshot: &Snapshot) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = snapshot
        .listeners
        .iter()
        .map(|l| l.addr)
        .chain(snapshot.bridges.iter().map(|b| b.listen))
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Binds every address or none, taking a socket handed over by a previous process where
/// there is one for the address; on failure the sockets bound so far are closed.
fn bind_all(
    addrs: &[SocketAddr],
    inherited: &mut Inherited,
) -> Result<Vec<(SocketAddr, tokio::net::TcpListener)>, BindError> {
    addrs
        .iter()
        .map(|&addr| {
            let l = match inherited.take(addr) {
                Some(l) => {
                    tracing::info!(%addr, "listening on the socket handed over");
                    l.and_then(tokio::net::TcpListener::from_std)
                        .map_err(|e| BindError::Other { addr, source: e })?
                }
                None => listener::bind(addr)?,
            };
            Ok((addr, l))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointAddress, Locality, ServicePort, TrafficPolicy};

    fn service(host: &str, ips: &[[u8; 4]]) -> Arc<ServicePort> {
        Arc::new(ServicePort {
            host: host.into(),
            namespace: "default".into(),
            port: 9080,
            port_name: String::new(),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    address: EndpointAddress::Ip((*ip).into()),
                    port: 9080,
                    labels: Default::default(),
                    locality: Locality::default(),
                    network: String::new(),
                    weight: 1,
                    service_account: None,
                    tls_disabled: false,
                    reach: crate::model::Reach::Any,
                    priority: None,
                    locality_weight: None,
                })
                .collect(),
            policy: TrafficPolicy::default(),
            tunnel_policy: TrafficPolicy::default(),
            subsets: Default::default(),
            resolution: Default::default(),
            default_route: Default::default(),
        })
    }

    fn snapshot(services: &[Arc<ServicePort>]) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            services: services.iter().map(|s| (s.key(), s.clone())).collect(),
            ..Snapshot::default()
        })
    }

    #[test]
    fn a_named_change_rebuilds_only_its_service_port_and_prunes_only_its_state() {
        let registry = StateRegistry::default();
        let (a, b) = (
            service("a.local", &[[10, 0, 0, 1]]),
            service("b.local", &[[10, 0, 0, 2]]),
        );
        let first = Runtime::build(snapshot(&[a.clone(), b.clone()]), &registry);
        let a2 = service("a.local", &[[10, 0, 0, 3]]);
        // b's entry is the very same Arc; a's is new.
        let mut services = first.snapshot.services.clone();
        services.insert(a2.key(), a2.clone());
        let second = Arc::new(Snapshot {
            services,
            ..Snapshot::default()
        });
        let changed = Changed::Services([a.key()].into());
        let next = Runtime::build_after(second, &registry, Some(&first), &changed);
        assert!(Arc::ptr_eq(
            &next.clusters[&b.key()],
            &first.clusters[&b.key()]
        ));
        assert!(!Arc::ptr_eq(
            &next.clusters[&a.key()],
            &first.clusters[&a.key()]
        ));
        assert_eq!(
            next.clusters[&a.key()].all.members[0].endpoint.authority(),
            "10.0.0.3:9080"
        );
        drop(first);
        registry.prune(&changed);
        let left: Vec<String> = registry
            .endpoints()
            .into_iter()
            .map(|(_, a, _)| a)
            .collect();
        assert_eq!(left, ["10.0.0.3:9080", "10.0.0.2:9080"]);

        // A named service port that is gone loses its clusters.
        let third = Arc::new(Snapshot {
            services: next.snapshot.services.without(&a.key()),
            ..Snapshot::default()
        });
        let last = Runtime::build_after(third, &registry, Some(&next), &changed);
        assert!(!last.clusters.contains_key(&a.key()));
        assert!(Arc::ptr_eq(
            &last.clusters[&b.key()],
            &next.clusters[&b.key()]
        ));
    }
}
