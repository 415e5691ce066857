//! `strait run`: load, serve, reload on change or SIGHUP, drain on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::admin::{self, Role};
use crate::config::{self, ConfigError, Loaded};
use crate::model::{CertSource, Changed, Snapshot};
use crate::proxy::handover::{self, Inherited};
use crate::proxy::{BindError, Gateway, Shared};
use crate::telemetry::{AccessLog, GatewayIdentity, Telemetry};
use crate::tls::material;
use crate::xds;

/// Why `run` could not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Bind(#[from] BindError),
    #[error("{0}")]
    Admin(std::io::Error),
    #[error("cannot open access log: {0}")]
    AccessLog(std::io::Error),
    #[error("cannot start runtime: {0}")]
    Runtime(std::io::Error),
    #[error("gateway certificates: {0}")]
    Certs(#[from] crate::tls::CertError),
    #[error("hand-over socket {path}: {source}")]
    Handover {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Listener hand-over between processes (`strait run --handover PATH`).
#[derive(Default)]
pub struct Handover {
    /// Where this process serves its listeners to a replacement; `None`: no hand-over.
    pub path: Option<PathBuf>,
    /// Sockets received from the process this one replaces.
    pub inherited: Inherited,
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Paths(Vec<PathBuf>),
    /// Embedded text (the demo); never reloaded.
    Text {
        name: String,
        yaml: String,
    },
}

impl Source {
    fn load(&self) -> Result<Loaded, ConfigError> {
        match self {
            Source::Paths(p) => config::load_paths(p),
            Source::Text { name, yaml } => config::load_str(name, yaml),
        }
    }
}

/// Builds the runtime for the configured worker count. One worker runs everything on
/// the calling thread (no work-stealing queues, no cross-thread wake-ups); more get a
/// multi-thread runtime.
pub fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, RunError> {
    let mut b = match workers {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.thread_name("strait-worker")
        .enable_all()
        .build()
        .map_err(RunError::Runtime)
}

/// Loads the configuration once (to size the runtime), takes over the listeners of the
/// process serving `handover` if there is one, then runs until drained.
pub fn run_blocking(source: Source, handover: Option<PathBuf>) -> Result<(), RunError> {
    let loaded = source.load()?;
    for d in &loaded.diagnostics {
        tracing::warn!("{d}");
    }
    let inherited = match &handover {
        Some(path) => Inherited::receive(path).map_err(|source| RunError::Handover {
            path: path.clone(),
            source,
        })?,
        None => Inherited::default(),
    };
    let rt = runtime(loaded.snapshot.settings.workers)?;
    rt.block_on(run(
        source,
        loaded,
        None,
        Handover {
            path: handover,
            inherited,
        },
    ))
}

/// A running gateway, for callers that need to know when it is up (the demo, tests).
pub struct Started {
    pub shared: Arc<Shared>,
}

/// Serves `loaded` until SIGTERM/SIGINT, reloading from `source` on change.
pub async fn run(
    source: Source,
    loaded: Loaded,
    on_started: Option<tokio::sync::oneshot::Sender<Started>>,
    mut handover: Handover,
) -> Result<(), RunError> {
    let snapshot = Arc::new(loaded.snapshot);
    let settings = snapshot.settings.clone();
    let access_log = AccessLog::open(&settings.access_log).map_err(RunError::AccessLog)?;
    let identity = GatewayIdentity {
        cluster: settings.cluster.clone(),
        ..GatewayIdentity::default()
    }
    .with_labels(&settings.labels);
    let telemetry = Telemetry::new(access_log, identity);
    telemetry
        .metrics
        .config_reloads
        .with_label_values(&["success"])
        .inc();
    // Present from the start, so a dashboard sees the series before the first one.
    for result in ["failure", "unchanged"] {
        let _ = telemetry
            .metrics
            .config_reloads
            .with_label_values(&[result]);
    }
    let shared = Shared::new(snapshot.clone(), telemetry);
    // With discovery on, readiness waits for the control plane's first complete
    // configuration, and every update is merged into the file snapshot.
    // With `discovery.waypoint`, a second stream as the ambient east-west gateway's node.
    let mut feed = None;
    let mut waypoint_feed = None;
    if let Some(d) = settings.discovery.clone() {
        let metrics = xds::XdsMetrics::register(shared.telemetry.metrics.registry());
        if let Some(w) = d.as_waypoint() {
            let status = xds::Status::new(xds::Stream::Waypoint, w, &metrics);
            shared.set_waiting(
                xds::Stream::Waypoint.readiness_source(),
                status.lock().waiting.clone(),
            );
            let _ = shared.waypoint_discovery.set(status.clone());
            waypoint_feed = Some(xds::start(status));
        }
        let status = xds::Status::new(xds::Stream::Router, d, &metrics);
        shared.set_waiting(
            xds::Stream::Router.readiness_source(),
            status.lock().waiting.clone(),
        );
        let _ = shared.discovery.set(status.clone());
        feed = Some(xds::start(status));
    }
    let mut files = snapshot.clone();
    // The last configuration of each stream.
    let mut from_xds = FromXds::default();
    // What the control plane changed that the runtime in force does not have yet.
    let mut xds_pending = Changed::Services(Default::default());
    if material::needed(&snapshot) {
        install_tls(&shared, &snapshot)?;
    }
    if let CertSource::MeshCa(ca) = &settings.cert_source {
        let failures = crate::identity::svid::failures_metric(shared.telemetry.metrics.registry());
        tokio::spawn(crate::identity::svid::run(
            shared.clone(),
            ca.clone(),
            failures,
            |shared| {
                let snapshot = shared.runtime.load().snapshot.clone();
                if let Err(e) = install_tls(shared, &snapshot) {
                    tracing::error!("cannot use the certificate from the mesh CA: {e}");
                }
            },
        ));
    }
    // Signal handlers and the file watcher before readiness: a SIGHUP or SIGTERM sent as
    // soon as the gateway is ready must reload or drain it, not meet the default action
    // (exit), and a file changed as soon as it is ready must be reloaded, not missed.
    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(4);
    spawn_sighup(reload_tx.clone());
    let mut stop = stop_signal();
    let _watcher = match &source {
        Source::Paths(paths) => {
            let mut watched = paths.clone();
            watched.extend(material::watched_paths(&snapshot));
            watch_files(&watched, reload_tx.clone())
        }
        Source::Text { .. } => None,
    };
    // Status first, so readiness answers 503 until every listener is bound.
    admin::start(
        shared.clone(),
        &[
            (Role::Status, settings.status_addr),
            (Role::Metrics, settings.metrics_addr),
            (Role::Admin, settings.admin_addr),
        ],
    )
    .map_err(RunError::Admin)?;
    let mut gateway = Gateway::start(shared.clone(), &mut handover.inherited).await?;
    let (handover_tx, mut handover_rx) = mpsc::channel::<handover::Request>(1);
    let server = match &handover.path {
        Some(path) => Some(
            handover::Server::start(path, handover_tx).map_err(|source| RunError::Handover {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    if handover.inherited.from_process() {
        let unused = handover.inherited.close_unused();
        match handover.inherited.confirm() {
            Ok(()) => tracing::info!(
                unused,
                "took the listeners over from the previous process; it now drains"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "could not tell the previous process to drain; it keeps accepting until stopped"
            ),
        }
    }
    tracing::info!(
        listeners = ?gateway.bound(),
        status = %settings.status_addr,
        metrics = %settings.metrics_addr,
        admin = %settings.admin_addr,
        "strait ready"
    );
    if let Some(tx) = on_started {
        let _ = tx.send(Started {
            shared: shared.clone(),
        });
    }

    let mut handed_over = false;
    loop {
        tokio::select! {
            Some(why) = reload_rx.recv() => {
                // Coalesce a burst of file events into one reload.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while reload_rx.try_recv().is_ok() {}
                if let Some(new) = reload(&source, &mut gateway, why, &from_xds, &files) {
                    files = new;
                    xds_pending = Changed::Services(Default::default());
                }
            }
            Some(update) = next_update(feed.as_deref()) => {
                xds_pending.merge(update.changed);
                from_xds.router = Some(update.published);
                if apply_xds(&mut gateway, &files, &from_xds, &xds_pending) {
                    xds_pending = Changed::Services(Default::default());
                }
            }
            Some(update) = next_update(waypoint_feed.as_deref()) => {
                xds_pending.merge(update.changed);
                from_xds.waypoint = Some(update.published);
                if apply_xds(&mut gateway, &files, &from_xds, &xds_pending) {
                    xds_pending = Changed::Services(Default::default());
                }
            }
            Some(request) = handover_rx.recv() => match request {
                handover::Request::Listeners(reply) => {
                    let _ = reply.send(gateway.listener_sockets());
                }
                handover::Request::HandedOver => {
                    handed_over = true;
                    break;
                }
            },
            _ = stop.recv() => break,
        }
    }
    if let Some(server) = server {
        server.close();
    }
    // After a hand-over the successor accepts from the same sockets: no overlap needed.
    let overlap = if handed_over {
        Duration::ZERO
    } else {
        crate::proxy::ACCEPT_OVERLAP
    };
    let drain = gateway
        .shared
        .runtime
        .load()
        .snapshot
        .settings
        .drain_duration;
    tracing::info!(
        ?drain,
        live = shared.live_connections(),
        overlap = ?overlap.min(drain),
        "draining: readiness now fails; accepting stops after the overlap (a second signal exits at once)"
    );
    tokio::select! {
        () = gateway.shutdown(overlap, drain) => {}
        _ = stop.recv() => tracing::warn!("second signal: exiting now"),
    }
    // Every connection's log line is queued by now; let the writer finish them.
    shared.telemetry.access_log.flush(Duration::from_secs(2));
    tracing::info!("stopped");
    Ok(())
}

/// The next configuration from the control plane; never resolves without discovery.
async fn next_update(feed: Option<&xds::Feed>) -> Option<xds::Update> {
    match feed {
        Some(feed) => Some(feed.next().await),
        None => std::future::pending().await,
    }
}

/// The last configuration each stream published.
#[derive(Default)]
struct FromXds {
    router: Option<Arc<xds::Published>>,
    waypoint: Option<Arc<xds::Published>>,
    joined: xds::Joined,
}

impl FromXds {
    fn any(&self) -> bool {
        self.router.is_some() || self.waypoint.is_some()
    }

    fn merge(&self, files: &Snapshot) -> Snapshot {
        xds::merge(
            files,
            self.router.as_deref(),
            self.waypoint.as_deref(),
            &self.joined,
        )
    }
}

/// Installs the file snapshot merged with the control plane's resources, and readiness
/// with it; `changed` says which service ports differ from the runtime in force. Returns
/// whether it was installed.
fn apply_xds(
    gateway: &mut Gateway,
    files: &Arc<Snapshot>,
    from_xds: &FromXds,
    changed: &Changed,
) -> bool {
    let merged = Arc::new(from_xds.merge(files));
    // istiod may be the first to ask for an ISTIO_MUTUAL server: the gateway's own
    // certificate is needed from now on. Only a change of listeners can ask for one; an
    // endpoint update must not scan every service.
    if *changed == Changed::Everything
        && gateway.shared.tls.load().is_none()
        && material::needed(&merged)
        && let Err(e) = install_tls(&gateway.shared, &merged)
    {
        tracing::error!(
            "an ISTIO_MUTUAL server from the control plane has no certificate and refuses connections: {e}"
        );
    }
    let services = merged.services.len();
    let installed = match gateway.reload_changed(merged, changed) {
        Ok(()) => {
            tracing::debug!(listeners = ?gateway.bound(), services, "xDS configuration applied");
            true
        }
        Err(e) => {
            tracing::error!(
                "an xDS listener cannot be bound; the previous listeners keep serving: {e}"
            );
            false
        }
    };
    for (stream, published) in [
        (xds::Stream::Router, &from_xds.router),
        (xds::Stream::Waypoint, &from_xds.waypoint),
    ] {
        if let Some(p) = published {
            gateway.shared.set_waiting(
                stream.readiness_source(),
                if p.warm { None } else { p.waiting.clone() },
            );
        }
    }
    installed
}

/// Reloads the files; returns the new file snapshot when it was installed.
fn reload(
    source: &Source,
    gateway: &mut Gateway,
    why: &str,
    from_xds: &FromXds,
    current: &Snapshot,
) -> Option<Arc<Snapshot>> {
    let telemetry = gateway.shared.telemetry.clone();
    let metrics = &telemetry.metrics;
    match source.load() {
        Ok(loaded) => {
            for d in &loaded.diagnostics {
                tracing::warn!("{d}");
            }
            let old = gateway.shared.runtime.load().snapshot.settings.clone();
            warn_restart_only(&old, &loaded.snapshot);
            let expiries = |g: &Gateway| g.shared.tls.load_full().map(|m| m.expiries.clone());
            let certs_before = expiries(gateway);
            // What will be installed: the files with the control plane's resources, which
            // may hold the only ISTIO_MUTUAL servers.
            let with_xds = from_xds.any().then(|| from_xds.merge(&loaded.snapshot));
            let will_serve = with_xds.as_ref().unwrap_or(&loaded.snapshot);
            if material::needed(will_serve)
                && let Err(e) = install_tls(&gateway.shared, will_serve)
            {
                // Keep the certificates in use; a half-written rotation will be retried
                // on the next file event.
                metrics.config_reloads.with_label_values(&["failure"]).inc();
                tracing::error!(
                    trigger = why,
                    "certificate reload failed, keeping the previous ones: {e}"
                );
                return None;
            }
            // The files say what they said: nothing is rebuilt, so clusters keep their
            // balancer state and connection counts. A certificate rotation is installed
            // above either way.
            if loaded.snapshot == *current {
                if expiries(gateway) != certs_before {
                    metrics.config_reloads.with_label_values(&["success"]).inc();
                    tracing::info!(
                        trigger = why,
                        "certificates reloaded; configuration unchanged"
                    );
                } else {
                    metrics
                        .config_reloads
                        .with_label_values(&["unchanged"])
                        .inc();
                    tracing::debug!(trigger = why, "configuration unchanged; nothing rebuilt");
                }
                return None;
            }
            let files = Arc::new(loaded.snapshot);
            let installed = match with_xds {
                Some(merged) => Arc::new(merged),
                None => files.clone(),
            };
            match gateway.reload(installed) {
                Ok(()) => {
                    metrics.config_reloads.with_label_values(&["success"]).inc();
                    tracing::info!(trigger = why, listeners = ?gateway.bound(), "configuration reloaded");
                    Some(files)
                }
                Err(e) => {
                    metrics.config_reloads.with_label_values(&["failure"]).inc();
                    tracing::error!(
                        trigger = why,
                        "reload rejected; the previous configuration keeps serving: {e}"
                    );
                    None
                }
            }
        }
        Err(e) => {
            metrics.config_reloads.with_label_values(&["failure"]).inc();
            // Every diagnostic, each with its file, line and column.
            let detail = match &e {
                ConfigError::Invalid { diagnostics } => diagnostics
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                ConfigError::Io { .. } => e.to_string(),
            };
            tracing::error!(
                trigger = why,
                "reload rejected; the previous configuration keeps serving:\n{detail}"
            );
            None
        }
    }
}

/// Loads the gateway's SVID and trust bundles, installs them for new handshakes (open
/// connections keep theirs), and exports their expiry.
fn install_tls(shared: &Shared, snapshot: &Snapshot) -> Result<(), crate::tls::CertError> {
    let m = match &snapshot.settings.cert_source {
        CertSource::Files => material::load(snapshot)?,
        CertSource::MeshCa(ca) => {
            if !material::needed(snapshot) {
                shared.set_waiting("svid", None);
                return Ok(());
            }
            let Some(svid) = shared.svid.load_full() else {
                shared.tls.store(None);
                shared.set_waiting(
                    "svid",
                    Some(format!(
                        "no certificate from the mesh CA {} yet (ISTIO_MUTUAL servers and Bridges need one)",
                        ca.server.address
                    )),
                );
                return Ok(());
            };
            let m =
                material::build_from_ca(snapshot, &svid, &ca.server.address, &ca.server.root_cert)?;
            shared.set_waiting("svid", None);
            m
        }
    };
    let warn_within = snapshot.settings.cert_expiry_warning;
    let now = std::time::SystemTime::now();
    for (role, file, expiry) in &m.expiries {
        let secs = expiry
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        shared
            .telemetry
            .metrics
            .cert_expiry
            .with_label_values(&[*role, file.display().to_string().as_str()])
            .set(secs);
        match expiry.duration_since(now) {
            Ok(left) if left < warn_within => tracing::warn!(
                file = %file.display(), role, "certificate expires in {}h", left.as_secs() / 3600
            ),
            Err(_) => tracing::warn!(file = %file.display(), role, "certificate has expired"),
            _ => {}
        }
    }
    if let Some(id) = &m.spiffe_id {
        tracing::info!(identity = %id, "gateway certificates loaded");
    }
    shared.tls.store(Some(Arc::new(m)));
    Ok(())
}

fn warn_restart_only(old: &crate::model::Settings, new: &Snapshot) {
    let n = &new.settings;
    if old.status_addr != n.status_addr
        || old.metrics_addr != n.metrics_addr
        || old.admin_addr != n.admin_addr
        || old.workers != n.workers
        || old.access_log != n.access_log
    {
        tracing::warn!(
            "Bootstrap status/metrics/admin addresses, workers and accessLog take effect only at restart"
        );
    }
}

/// Watches the configured paths: each directory, and the directory holding each file.
///
/// Watching directories rather than files is what catches atomic replacement: an editor
/// or `mv` renames a new file over the old one, and a Kubernetes ConfigMap mount swaps
/// its `..data` symlink to a new hidden `..<timestamp>` directory, so the files the user
/// names never change in place. Any event other than a read triggers a reload (after a
/// short pause to coalesce the burst); reloading an unchanged configuration is harmless.
fn watch_files(
    paths: &[PathBuf],
    tx: mpsc::Sender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = tx.try_send("file change");
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch configuration files; reload with SIGHUP");
            return None;
        }
    };
    let mut dirs: Vec<PathBuf> = paths.iter().map(|p| watched_dir(p)).collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        if let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory; reload with SIGHUP");
        }
    }
    Some(watcher)
}

/// The directory whose entries change when `path` is replaced.
fn watched_dir(path: &std::path::Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn spawn_sighup(tx: mpsc::Sender<&'static str>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    let _ = tx.send("SIGHUP").await;
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot install SIGHUP handler"),
    }
}

/// Yields once per SIGTERM or SIGINT.
fn stop_signal() -> mpsc::Receiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = mpsc::channel(2);
    for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
        let tx = tx.clone();
        match signal(kind) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        let _ = tx.send(()).await;
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot install signal handler"),
        }
    }
    rx
}
