//! Listeners and the per-connection flow: accept → inspect → route → connect → copy.

pub mod copy;
pub mod hello;
mod listener;
mod mutual;
mod passthrough;
mod rewind;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::model::{ServiceKey, Snapshot};
use crate::telemetry::Telemetry;
use crate::tls::material::TlsMaterial;
use crate::upstream::{Cluster, StateRegistry};

pub use listener::BindError;

/// The clusters of one service port: all endpoints, and one per declared subset.
#[derive(Debug)]
pub struct ServiceClusters {
    pub all: Arc<Cluster>,
    pub subsets: BTreeMap<String, Arc<Cluster>>,
}

impl ServiceClusters {
    pub fn get(&self, subset: Option<&str>) -> Option<&Arc<Cluster>> {
        match subset {
            None => Some(&self.all),
            Some(s) => self.subsets.get(s),
        }
    }
}

/// A snapshot plus the clusters built from it: what one connection routes against.
pub struct Runtime {
    pub snapshot: Arc<Snapshot>,
    pub clusters: HashMap<ServiceKey, ServiceClusters>,
    /// Listener address → index into `snapshot.listeners`.
    listeners: HashMap<SocketAddr, usize>,
}

impl Runtime {
    pub fn build(snapshot: Arc<Snapshot>, registry: &StateRegistry) -> Runtime {
        let mut clusters = HashMap::with_capacity(snapshot.services.len());
        for (key, service) in &snapshot.services {
            let Some(all) = Cluster::new(service.clone(), None, registry) else {
                continue;
            };
            let subsets = service
                .subsets
                .keys()
                .filter_map(|name| {
                    Cluster::new(service.clone(), Some(name), registry)
                        .map(|c| (name.clone(), Arc::new(c)))
                })
                .collect();
            clusters.insert(
                key.clone(),
                ServiceClusters {
                    all: Arc::new(all),
                    subsets,
                },
            );
        }
        let listeners = snapshot
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (l.addr, i))
            .collect();
        Runtime {
            snapshot,
            clusters,
            listeners,
        }
    }

    pub fn servers_for(&self, addr: &SocketAddr) -> &[crate::model::ServerSpec] {
        self.listeners
            .get(addr)
            .and_then(|&i| self.snapshot.listeners.get(i))
            .map_or(&[], |l| l.servers.as_slice())
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
    /// Downstream connections being handled, for `maxConnections` and drain.
    open: AtomicUsize,
    idle: Notify,
    ready: AtomicBool,
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
            idle: Notify::new(),
            ready: AtomicBool::new(false),
        })
    }

    /// Installs a new snapshot; connections already open keep what they picked.
    pub fn install(&self, snapshot: Arc<Snapshot>) {
        let runtime = Runtime::build(snapshot, &self.registry);
        self.runtime.store(Arc::new(runtime));
        self.registry.prune();
    }

    pub fn drain_state(&self) -> DrainState {
        *self.drain.borrow()
    }

    pub fn subscribe_drain(&self) -> watch::Receiver<DrainState> {
        self.drain.subscribe()
    }

    /// Ready: configuration loaded, listeners bound, not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.drain_state() == DrainState::Serving
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
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

    /// Stops accepting, waits for live connections up to `deadline`, then closes the rest.
    pub async fn drain(&self, deadline: Duration) {
        self.drain.send_replace(DrainState::Draining);
        let all_closed = async {
            loop {
                let notified = self.idle.notified();
                if self.open_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(deadline, all_closed).await.is_err() {
            tracing::info!(
                open = self.open_connections(),
                "drain deadline reached; closing remaining connections"
            );
            self.drain.send_replace(DrainState::Closing);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while self.open_connections() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
    }
}

/// Counts one open downstream connection; released on drop.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves when the drain reaches `Closing`.
pub(crate) async fn closing(mut rx: watch::Receiver<DrainState>) {
    let _ = rx.wait_for(|s| *s == DrainState::Closing).await;
}

/// The running gateway: its shared state and one accept task per listener.
pub struct Gateway {
    pub shared: Arc<Shared>,
    listeners: HashMap<SocketAddr, JoinHandle<()>>,
}

impl Gateway {
    /// Binds every listener of the snapshot; fails if any cannot be bound.
    pub async fn start(shared: Arc<Shared>) -> Result<Gateway, BindError> {
        let mut gw = Gateway {
            shared,
            listeners: HashMap::new(),
        };
        gw.sync_listeners()?;
        gw.shared.set_ready(true);
        Ok(gw)
    }

    /// Addresses actually bound (useful when a config asks for port 0).
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.listeners.keys().copied().collect()
    }

    /// Installs a new snapshot and opens/closes listeners to match it. Listeners that
    /// cannot be bound are reported; the rest of the new configuration still applies.
    pub fn reload(&mut self, snapshot: Arc<Snapshot>) -> Result<(), BindError> {
        self.shared.install(snapshot);
        self.sync_listeners()
    }

    fn sync_listeners(&mut self) -> Result<(), BindError> {
        let runtime = self.shared.runtime.load();
        let wanted: Vec<SocketAddr> = runtime.snapshot.listeners.iter().map(|l| l.addr).collect();
        self.listeners.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(%addr, "listener removed; its live connections continue");
                task.abort();
            }
            keep
        });
        for addr in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            let listener = listener::bind(addr)?;
            tracing::info!(%addr, "listening");
            let task = tokio::spawn(listener::accept_loop(listener, addr, self.shared.clone()));
            self.listeners.insert(addr, task);
        }
        Ok(())
    }

    /// Graceful shutdown: readiness fails, accepting stops, live connections get
    /// `deadline` to finish.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.shared.drain.send_replace(DrainState::Draining);
        for (_, task) in self.listeners.drain() {
            task.abort();
        }
        self.shared.drain(deadline).await;
    }
}
