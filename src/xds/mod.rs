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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::model::{
    Changed, DefaultRoute, Discovery, Endpoint, EndpointAddress, ListenerSpec, Reach,
    ServerTlsMode, ServicePort, Snapshot, TUNNEL_LABEL, XdsProtocol,
};

pub use client::Published;

/// What readiness says until a stream's first complete configuration (Envoy's words).
const WAITING: &str = "config not received from XDS server";

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

/// Which of the gateway's two ADS streams: the `router` node (15443, as Istio's classic
/// east-west gateway) or the `waypoint` node (15008, as Istio's ambient east-west
/// gateway). The `stream` label of every `strait_xds_*` series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Router,
    Waypoint,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Router => "router",
            Stream::Waypoint => "waypoint",
        }
    }

    /// Why readiness waits, saying which stream waits when it is the waypoint's.
    pub fn waiting(self, why: &str) -> String {
        match self {
            Stream::Router => why.to_string(),
            Stream::Waypoint => {
                why.replacen(WAITING, &format!("{WAITING} for the waypoint node"), 1)
            }
        }
    }

    /// The readiness source it holds at 503 until its first complete configuration.
    pub fn readiness_source(self) -> &'static str {
        match self {
            Stream::Router => "xds",
            Stream::Waypoint => "xds-waypoint",
        }
    }
}

/// The xDS metrics (`strait_xds_*`), registered once when discovery is on; every series
/// carries the `stream` it is about.
#[derive(Clone)]
pub struct XdsMetrics {
    pub stream: &'static str,
    pub connected: IntGaugeVec,
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
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        // The names and labels below are valid Prometheus names: construction cannot fail.
        XdsMetrics {
            stream: Stream::Router.name(),
            connected: reg(
                r,
                gauge_vec(
                    "strait_xds_connected",
                    "1 while the ADS stream to the control plane is up, by stream",
                    &["stream"],
                )
                .expect("valid metric"),
            ),
            connect_failures: reg(
                r,
                counter_vec(
                    "strait_xds_stream_failures_total",
                    "ADS streams that could not be opened or ended with an error, by stream and reason",
                    &["stream", "reason"],
                )
                .expect("valid metric"),
            ),
            responses: reg(
                r,
                counter_vec(
                    "strait_xds_responses_total",
                    "xDS responses received, by stream, type and whether they were acknowledged (ack) or rejected (nack)",
                    &["stream", "type", "result"],
                )
                .expect("valid metric"),
            ),
            resources: reg(
                r,
                gauge_vec(
                    "strait_xds_resources",
                    "xDS resources held, by stream and type",
                    &["stream", "type"],
                )
                .expect("valid metric"),
            ),
            last_accepted: reg(
                r,
                gauge_vec(
                    "strait_xds_last_update_timestamp_seconds",
                    "When a response of this type was last accepted on this stream (Unix time); time since it is the age of the configuration",
                    &["stream", "type"],
                )
                .expect("valid metric"),
            ),
        }
    }

    /// The same series, labelled for `stream`.
    pub fn for_stream(&self, stream: Stream) -> XdsMetrics {
        XdsMetrics {
            stream: stream.name(),
            ..self.clone()
        }
    }

    /// `strait_xds_connected` of this stream.
    pub fn connected(&self) -> prometheus::IntGauge {
        self.connected.with_label_values(&[self.stream])
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
    /// What a served listener asks that strait serves its own way, or left out of it.
    pub listener_notes: BTreeMap<String, Vec<String>>,
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
    pub stream: Stream,
    /// The control plane and this stream's node.
    pub discovery: Discovery,
    pub inner: Mutex<StatusInner>,
    pub metrics: XdsMetrics,
    /// Held apart from `inner`, which readiness and metrics read often.
    pub accepted: Arc<Mutex<AcceptedResources>>,
}

impl Status {
    /// The status of one stream; `metrics` are registered once for both
    /// ([`XdsMetrics::register`]).
    pub fn new(stream: Stream, discovery: Discovery, metrics: &XdsMetrics) -> Arc<Status> {
        Arc::new(Status {
            stream,
            discovery,
            inner: Mutex::new(StatusInner {
                waiting: Some(stream.waiting(WAITING)),
                ..StatusInner::default()
            }),
            metrics: metrics.for_stream(stream),
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
            "stream": self.stream.name(),
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
            "listenerNotes": s.listener_notes,
            "clusterNotes": s.cluster_notes,
            "accepted": self.accepted().iter().map(|(t, held)| (short_type(t).to_string(), json!(held.keys().collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
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

/// The file snapshot with the control plane's listeners and services added (the router
/// stream's, and the waypoint stream's when there is one), the RBAC of file
/// AuthorizationPolicies after istiod's own on its servers. Where both declare the same
/// listener address or service port, the file wins and the xDS one is left out with a
/// warning. Costs in proportion to the files and the number of the waypoint's services:
/// the router's services are shared, not copied, and a service port both streams name is
/// joined again only when one of them changed it (`joined` keeps the joins).
///
/// A service port both streams name is one service port, as it is from files: the
/// router's (its endpoints, balancer and policy serve 15443; the tunnels keep the
/// waypoint's cluster policy), with each endpoint the
/// waypoint stream lists as taking HBONE labelled so ([`TUNNEL_LABEL`]); one the router
/// does not list is added for tunnels only ([`Reach::Tunnels`]: never a destination of
/// 15443, an ISTIO_MUTUAL or PASSTHROUGH server or a bridge, as istiod did not give it
/// to the router's clusters).
pub fn merge(
    files: &Snapshot,
    xds: Option<&Published>,
    waypoint: Option<&Published>,
    joined: &Joined,
) -> Snapshot {
    let mut out = files.clone();
    let mut taken: Vec<std::net::SocketAddr> = out.listeners.iter().map(|l| l.addr).collect();
    let listeners = xds
        .into_iter()
        .chain(waypoint)
        .flat_map(|p| p.listeners.iter());
    for l in listeners {
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
        taken.push(l.addr);
        out.listeners.push(l);
    }
    let mut services = xds.map(|p| p.services.clone()).unwrap_or_default();
    {
        let mut cache = joined.0.lock().unwrap_or_else(|e| e.into_inner());
        let hbone_services = waypoint.map(|p| &p.services);
        cache.retain(|k, _| hbone_services.is_some_and(|s| s.contains_key(k)));
        for (k, hbone) in hbone_services.into_iter().flatten() {
            let port = match services.get(k) {
                Some(router) => match cache.get(k) {
                    // Neither stream changed this service port: the same join.
                    Some((r, h, j)) if Arc::ptr_eq(r, router) && Arc::ptr_eq(h, hbone) => j.clone(),
                    _ => {
                        let j = Arc::new(with_hbone(router, hbone));
                        cache.insert(k.clone(), (router.clone(), hbone.clone(), j.clone()));
                        j
                    }
                },
                None => hbone.clone(),
            };
            services.insert(k.clone(), port);
        }
    }
    for (k, s) in &files.services {
        if services.contains_key(k) {
            tracing::debug!(host = %k.host, port = k.port, "service declared in files and by xDS; the file's is kept");
        }
        services.insert(k.clone(), s.clone());
    }
    out.services = services;
    out
}

/// The service ports both streams name, joined ([`merge`]) once per pair of versions:
/// each stream replaces only the service ports it changed, so an update joins only
/// those again.
#[derive(Default)]
pub struct Joined(Mutex<JoinedPorts>);

type JoinedPorts =
    HashMap<crate::model::ServiceKey, (Arc<ServicePort>, Arc<ServicePort>, Arc<ServicePort>)>;

/// The router's service port with the waypoint's HBONE endpoints and tunnel policy: the
/// same endpoint (address and port) labelled as taking HBONE, one the router does not
/// have added, reachable by tunnels only ([`Reach::Tunnels`]); the tunnels' cluster takes
/// the policy of the waypoint's `inbound-vip` cluster.
fn with_hbone(router: &ServicePort, hbone: &ServicePort) -> ServicePort {
    let mut out = router.clone();
    // The tunnels' cluster is the waypoint's `inbound-vip` one, as istiod sent it: the
    // router's DestinationRule policy is not its own.
    out.tunnel_policy = hbone.policy.clone();
    let index: HashMap<(EndpointAddress, u16), usize> = out
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| ((e.address.clone(), e.port), i))
        .collect();
    let mut added = Vec::new();
    for e in hbone.endpoints.iter().filter(|e| e.accepts_hbone()) {
        match index.get(&(e.address.clone(), e.port)) {
            Some(&i) => {
                out.endpoints[i]
                    .labels
                    .insert(TUNNEL_LABEL.to_string(), "http".to_string());
            }
            None => {
                added.push(out.endpoints.len());
                out.endpoints.push(Endpoint {
                    // Not the router's: a tunnel destination only, never one of 15443,
                    // an ISTIO_MUTUAL or PASSTHROUGH server or a bridge.
                    reach: Reach::Tunnels,
                    ..e.clone()
                });
            }
        }
    }
    if let DefaultRoute::Endpoints(indexes) = &mut out.default_route {
        indexes.extend(added);
    }
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
            vips: Vec::new(),
            http2: Default::default(),
            sources: Default::default(),
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
        let merged = merge(&files, Some(&xds), None, &Joined::default());
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

    #[test]
    fn a_service_port_both_streams_name_is_joined_once_per_pair_of_versions() {
        use crate::model::{EndpointAddress, Locality, ServiceKey};
        let endpoint = |ip: [u8; 4], hbone: bool| Endpoint {
            address: EndpointAddress::Ip(ip.into()),
            port: 8080,
            labels: if hbone {
                [(TUNNEL_LABEL.to_string(), "http".to_string())].into()
            } else {
                BTreeMap::new()
            },
            locality: Locality::default(),
            network: String::new(),
            weight: 1,
            service_account: None,
            tls_disabled: false,
            reach: crate::model::Reach::Any,
            priority: None,
            locality_weight: None,
        };
        // Each stream's cluster policy: the router's from a DestinationRule, the
        // waypoint's `inbound-vip` cluster as istiod builds it (no DestinationRule).
        let router_policy = crate::model::TrafficPolicy {
            destination_rule: Some("echo/echo".into()),
            max_connections: Some(1),
            outlier: Some(Default::default()),
            ..Default::default()
        };
        let waypoint_policy = crate::model::TrafficPolicy {
            lb: crate::model::LbPolicy::LeastRequest,
            connect_timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let port = |endpoints: Vec<Endpoint>, policy: &crate::model::TrafficPolicy| {
            Arc::new(ServicePort {
                host: "echo.echo.svc.cluster.local".into(),
                namespace: "echo".into(),
                port: 80,
                port_name: String::new(),
                default_route: DefaultRoute::Endpoints((0..endpoints.len()).collect()),
                endpoints,
                policy: policy.clone(),
                tunnel_policy: policy.clone(),
                subsets: BTreeMap::new(),
                resolution: Default::default(),
            })
        };
        let key = ServiceKey::new("echo.echo.svc.cluster.local", 80);
        let published = |p: Arc<ServicePort>| Published {
            services: [(key.clone(), p)].into_iter().collect(),
            ..Published::default()
        };
        // The router lists the sidecar pod .22 and the HBONE pod .21; the waypoint .21 and .23.
        let router = published(port(
            vec![
                endpoint([10, 0, 0, 22], false),
                endpoint([10, 0, 0, 21], false),
            ],
            &router_policy,
        ));
        let waypoint = published(port(
            vec![
                endpoint([10, 0, 0, 21], true),
                endpoint([10, 0, 0, 23], true),
            ],
            &waypoint_policy,
        ));
        let joined = Joined::default();
        let files = Snapshot::default();
        let first = merge(&files, Some(&router), Some(&waypoint), &joined);
        let p = &first.services[&key];
        let seen: Vec<(String, bool, Reach, bool)> = p
            .endpoints
            .iter()
            .map(|e| (e.authority(), e.accepts_hbone(), e.reach, e.tls_disabled))
            .collect();
        assert_eq!(
            seen,
            [
                ("10.0.0.22:8080".to_string(), false, Reach::Any, false),
                ("10.0.0.21:8080".to_string(), true, Reach::Any, false),
                ("10.0.0.23:8080".to_string(), true, Reach::Tunnels, false),
            ]
        );
        assert_eq!(p.default_route, DefaultRoute::Endpoints(vec![0, 1, 2]));
        // 15443 keeps the router's policy, the tunnels the waypoint's cluster's.
        assert_eq!(p.policy, router_policy);
        assert_eq!(p.tunnel_policy, waypoint_policy);
        // Nothing changed: the very same join.
        let again = merge(&files, Some(&router), Some(&waypoint), &joined);
        assert!(Arc::ptr_eq(&first.services[&key], &again.services[&key]));
        // The router's port changed: joined again.
        let router = published(port(vec![endpoint([10, 0, 0, 22], false)], &router_policy));
        let third = merge(&files, Some(&router), Some(&waypoint), &joined);
        assert!(!Arc::ptr_eq(&first.services[&key], &third.services[&key]));
        assert_eq!(third.services[&key].endpoints.len(), 3);
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
