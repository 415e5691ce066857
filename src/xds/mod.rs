//! The second configuration source: listeners, clusters and endpoints from istiod over one
//! ADS stream (delta by default, state of the world selectable), as Istio's own
//! east-west gateway (Envoy behind pilot-agent, proxy type `router`) receives them.
//!
//! [`client`] keeps the stream up and holds the last accepted resources; [`translate`]
//! turns them into the same listeners and services the files produce; the app merges
//! them with the file snapshot (which still carries the Bootstrap, policies and Bridges)
//! and installs the result like any reload, so the data path does not know where its
//! configuration came from. [`Status`] is what readiness, metrics and `config_dump` show.

mod any;
mod client;
pub mod connect;
pub mod rbac;
pub mod translate;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::model::{Changed, Discovery, ListenerSpec, ServerTlsMode, Snapshot, XdsProtocol};

pub use client::Published;

/// Short names of the three resource types, as metric labels and in `config_dump`.
pub const TYPES: [(&str, &str); 3] = [
    ("lds", translate::LISTENER),
    ("cds", translate::CLUSTER),
    ("eds", translate::ENDPOINTS),
];

pub fn short_type(type_url: &str) -> &'static str {
    TYPES
        .iter()
        .find(|(_, u)| *u == type_url)
        .map_or("other", |(s, _)| s)
}

/// The xDS metrics (`strait_xds_*`), registered only when discovery is on.
pub struct XdsMetrics {
    pub connected: IntGauge,
    pub connect_failures: IntCounterVec,
    pub responses: IntCounterVec,
    pub resources: IntGaugeVec,
    pub last_accepted: IntGaugeVec,
}

impl XdsMetrics {
    pub fn register(r: &Registry) -> XdsMetrics {
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            // Registered once per process with fixed names: a clash is a programming error
            // caught by every test that starts discovery, so it is logged, not fatal.
            if let Err(e) = r.register(Box::new(c.clone())) {
                tracing::error!("cannot register an xDS metric: {e}");
            }
            c
        }
        let gauge = |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        // The names and labels below are valid Prometheus names: construction cannot fail.
        XdsMetrics {
            connected: reg(
                r,
                gauge(
                    "strait_xds_connected",
                    "1 while the ADS stream to the control plane is up",
                )
                .expect("valid metric"),
            ),
            connect_failures: reg(
                r,
                counter_vec(
                    "strait_xds_stream_failures_total",
                    "ADS streams that could not be opened or ended with an error, by reason",
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            responses: reg(
                r,
                counter_vec(
                    "strait_xds_responses_total",
                    "xDS responses received, by type and whether they were acknowledged (ack) or rejected (nack)",
                    &["type", "result"],
                )
                .expect("valid metric"),
            ),
            resources: reg(
                r,
                gauge_vec(
                    "strait_xds_resources",
                    "xDS resources held, by type",
                    &["type"],
                )
                .expect("valid metric"),
            ),
            last_accepted: reg(
                r,
                gauge_vec(
                    "strait_xds_last_update_timestamp_seconds",
                    "When a response of this type was last accepted (Unix time); time since it is the age of the configuration",
                    &["type"],
                )
                .expect("valid metric"),
            ),
        }
    }
}

/// One type's exchange with the control plane.
#[derive(Debug, Default, Clone)]
pub struct TypeStatus {
    /// Version accepted last (SotW `version_info`; delta `system_version_info`).
    pub version: String,
    pub nonce: String,
    pub acks: u64,
    pub nacks: u64,
    pub resources: usize,
    pub last_accepted: Option<SystemTime>,
    pub last_rejection: Option<Rejection>,
}

#[derive(Debug, Clone)]
pub struct Rejection {
    pub version: String,
    pub nonce: String,
    pub error: String,
    pub at: SystemTime,
}

/// What the stream is doing, for `config_dump` and readiness.
#[derive(Debug, Default)]
pub struct StatusInner {
    pub connected: bool,
    pub streams: u64,
    pub last_error: Option<String>,
    pub types: BTreeMap<&'static str, TypeStatus>,
    /// Why readiness is 503; `None` once warm.
    pub waiting: Option<String>,
    /// Listeners acknowledged but not served, with why.
    pub not_served: BTreeMap<String, String>,
    /// Filter chains and filters left out of served listeners.
    pub skipped: BTreeMap<String, Vec<String>>,
    pub ignored_filters: BTreeMap<String, Vec<String>>,
    pub cluster_notes: BTreeMap<String, Vec<String>>,
}

/// One resource as the control plane sent it and strait accepted it: what `config_dump`
/// shows in Envoy's shape.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub version: String,
    /// The resource's protobuf encoding (the `Any`'s value).
    pub value: Vec<u8>,
    pub at: SystemTime,
}

/// Accepted resources by type URL, then name.
pub type AcceptedResources = BTreeMap<&'static str, BTreeMap<String, Accepted>>;

pub struct Status {
    pub discovery: Discovery,
    pub inner: Mutex<StatusInner>,
    pub metrics: XdsMetrics,
    /// Held apart from `inner`, which readiness and metrics read often.
    pub accepted: Arc<Mutex<AcceptedResources>>,
}

impl Status {
    pub fn new(discovery: Discovery, registry: &Registry) -> Arc<Status> {
        Arc::new(Status {
            discovery,
            inner: Mutex::new(StatusInner {
                waiting: Some("config not received from XDS server".into()),
                ..StatusInner::default()
            }),
            metrics: XdsMetrics::register(registry),
            accepted: Arc::default(),
        })
    }

    /// The accepted resources, for `config_dump`.
    pub fn accepted(&self) -> std::sync::MutexGuard<'_, AcceptedResources> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `discovery` section of `config_dump`. The token is named, never shown.
    pub fn dump(&self) -> Value {
        let d = &self.discovery;
        let s = self.lock();
        let time = |t: &Option<SystemTime>| {
            t.map(|t| {
                time::OffsetDateTime::from(t)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            })
        };
        json!({
            "source": "xds",
            "address": d.server.address,
            "plaintext": d.server.plaintext,
            "serverName": d.server.server_name,
            "rootCert": d.server.root_cert.display().to_string(),
            "token": d.server.token.as_ref().map(|p| p.display().to_string()),
            "clusterId": d.server.cluster_id,
            "protocol": match d.protocol { XdsProtocol::Delta => "DELTA", XdsProtocol::StateOfTheWorld => "SOTW" },
            "node": {
                "id": d.node.id,
                "cluster": d.node.cluster,
                "metadata": d.node.metadata,
                "labels": d.node.labels,
            },
            "connected": s.connected,
            "streams": s.streams,
            "lastError": s.last_error,
            "ready": s.waiting.is_none(),
            "waiting": s.waiting,
            "types": s.types.iter().map(|(t, ts)| (t.to_string(), json!({
                "version": ts.version,
                "nonce": ts.nonce,
                "acks": ts.acks,
                "nacks": ts.nacks,
                "resources": ts.resources,
                "lastAccepted": time(&ts.last_accepted),
                "lastRejection": ts.last_rejection.as_ref().map(|r| json!({
                    "version": r.version,
                    "nonce": r.nonce,
                    "error": r.error,
                    "at": time(&Some(r.at)),
                })),
            }))).collect::<serde_json::Map<_, _>>(),
            "listenersNotServed": s.not_served,
            "skippedFilterChains": s.skipped,
            "ignoredFilters": s.ignored_filters,
            "clusterNotes": s.cluster_notes,
        })
    }
}

/// Updates from the client to the gateway, coalesced: a slow consumer takes the latest
/// configuration, never a queue, together with everything it changed since the one
/// taken before.
#[derive(Default)]
pub struct Feed {
    slot: Mutex<Option<Update>>,
    notify: Notify,
}

/// One configuration from the control plane, and what it changed.
pub struct Update {
    pub published: Arc<Published>,
    pub changed: Changed,
}

impl Feed {
    fn push(&self, published: Arc<Published>, changed: Changed) {
        {
            let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_mut() {
                Some(u) => {
                    u.published = published;
                    u.changed.merge(changed);
                }
                None => *slot = Some(Update { published, changed }),
            }
        }
        self.notify.notify_one();
    }

    /// The next update, once there is one.
    pub async fn next(&self) -> Update {
        loop {
            if let Some(u) = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return u;
            }
            // A push between the `take` above and this wait leaves a permit: no update
            // is missed.
            self.notify.notified().await;
        }
    }
}

/// Starts the ADS client on the current runtime; its updates arrive on the feed.
pub fn start(status: Arc<Status>) -> Arc<Feed> {
    let feed = Arc::new(Feed::default());
    tokio::spawn(client::run(status, feed.clone()));
    feed
}

/// The file snapshot with the control plane's listeners and services added, the RBAC of
/// file AuthorizationPolicies after istiod's own on its servers. Where both
/// declare the same listener address or service port, the file wins and the xDS one is
/// left out with a warning. Costs in proportion to the files: the control plane's
/// services are shared, not copied.
pub fn merge(files: &Snapshot, xds: &Published) -> Snapshot {
    let mut out = files.clone();
    let taken: Vec<std::net::SocketAddr> = out.listeners.iter().map(|l| l.addr).collect();
    for l in &xds.listeners {
        if taken.contains(&l.addr) {
            tracing::warn!(address = %l.addr, "an xDS listener's address is already served by a file-declared Gateway; the file's is kept");
            continue;
        }
        let mut l = ListenerSpec::clone(l);
        if !files.rbac.is_empty() {
            // File policies hold on every server that takes policies, whoever declared it.
            for server in &mut l.servers {
                if server.mode != ServerTlsMode::AutoPassthrough {
                    server.rbac.extend(files.rbac.iter().cloned());
                }
            }
        }
        out.listeners.push(l);
    }
    let mut services = xds.services.clone();
    for (k, s) in &files.services {
        if services.contains_key(k) {
            tracing::debug!(host = %k.host, port = k.port, "service declared in files and by xDS; the file's is kept");
        }
        services.insert(k.clone(), s.clone());
    }
    out.services = services;
    out
}

/// Full jitter between half and all of `d`, so a fleet does not reconnect in step.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;

    fn keys(hosts: &[&str]) -> Changed {
        Changed::Services(hosts.iter().map(|h| ServiceKey::new(h, 80)).collect())
    }

    #[test]
    fn file_policies_hold_after_istiods_own_on_its_servers_but_auto_passthrough() {
        use crate::model::{RbacAction, RbacFilter, ServerSpec};
        let filter = |name: &str| RbacFilter {
            name: name.into(),
            action: RbacAction::Allow,
            policies: Some(Vec::new()),
        };
        let server = |mode, rbac: Vec<RbacFilter>| ServerSpec {
            name: format!("{mode:?}"),
            mode,
            hosts: Vec::<crate::model::HostMatch>::new().into(),
            alpn: None,
            routes: Vec::new(),
            rbac,
        };
        let files = Snapshot {
            rbac: vec![filter("istio-system/from-files")],
            ..Snapshot::default()
        };
        let xds = Published {
            listeners: vec![ListenerSpec {
                addr: "0.0.0.0:15443".parse().unwrap(),
                servers: vec![
                    server(ServerTlsMode::IstioMutual, vec![filter("tcp.")]),
                    server(ServerTlsMode::Passthrough, Vec::new()),
                    server(ServerTlsMode::AutoPassthrough, Vec::new()),
                ],
            }],
            ..Published::default()
        };
        let merged = merge(&files, &xds);
        let names: Vec<Vec<&str>> = merged.listeners[0]
            .servers
            .iter()
            .map(|s| s.rbac.iter().map(|f| f.name.as_str()).collect())
            .collect();
        assert_eq!(
            names,
            [
                vec!["tcp.", "istio-system/from-files"],
                vec!["istio-system/from-files"],
                vec![],
            ]
        );
    }

    #[tokio::test]
    async fn a_slow_consumer_gets_the_latest_configuration_and_every_change_since_its_last() {
        let feed = Feed::default();
        let first = Arc::new(Published::default());
        let second = Arc::new(Published {
            warm: true,
            ..Published::default()
        });
        feed.push(first, keys(&["a"]));
        feed.push(second.clone(), keys(&["b"]));
        let u = feed.next().await;
        assert!(Arc::ptr_eq(&u.published, &second));
        assert_eq!(u.changed, keys(&["a", "b"]));

        feed.push(second.clone(), keys(&["c"]));
        feed.push(second.clone(), Changed::Everything);
        feed.push(second, keys(&["d"]));
        assert_eq!(feed.next().await.changed, Changed::Everything);
        // Nothing pushed since: the next wait does not return a stale update.
        let waited = tokio::time::timeout(Duration::from_millis(50), feed.next()).await;
        assert!(waited.is_err());
    }
}
