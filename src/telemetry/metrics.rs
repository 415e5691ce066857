//! The metrics registry: Istio's standard TCP metrics plus `strait_*` gateway metrics.
//!
//! Label values come only from bounded sets: declared services and subsets, response
//! flags, and fixed reason strings. Nothing a client sends (an SNI, an ALPN) becomes a
//! label value, so a flood of random names cannot grow the number of series.

use std::path::Path;
use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::model::ServicePort;

/// Istio's label set for the `istio_tcp_*` metrics, in the order Istio's stats filter
/// emits them (`istio/proxy` `istio_stats.cc`, ztunnel's `CommonTrafficLabels`).
pub const ISTIO_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Position of `response_flags` in [`ISTIO_LABELS`].
const RESPONSE_FLAGS: usize = 21;

/// Labels of the per-endpoint series: one series per declared endpoint of a service port.
const ENDPOINT_LABELS: [&str; 3] = ["destination_service", "destination_port", "endpoint"];

/// Every metric the gateway exports, registered once per process.
pub struct Metrics {
    registry: Registry,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_sent: IntCounterVec,
    pub tcp_received: IntCounterVec,
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub refusals: IntCounterVec,
    /// Connections a VirtualService route sent to each of its destinations.
    pub route_picks: IntCounterVec,
    pub upstream_connect_attempts: IntCounter,
    pub upstream_connect_failures: IntCounterVec,
    pub upstream_connect_seconds: Histogram,
    pub upstream_first_byte_seconds: FirstByteSeconds,
    pub client_hello_bytes: Histogram,
    pub client_hello_seconds: Histogram,
    pub connection_seconds: Histogram,
    pub config_reloads: IntCounterVec,
    pub cert_expiry: IntGaugeVec,
    pub endpoint_healthy: IntGaugeVec,
    pub endpoint_ejections: IntCounterVec,
    pub accept_errors: IntCounterVec,
    /// TLS handshakes strait completed on the data path, by role and session.
    pub tls_handshakes: TlsHandshakes,
    /// Outer HBONE connections (mTLS and HTTP/2 up) and their `CONNECT` streams (tunnels).
    pub hbone: HboneMetrics,
    /// Serialises rebuilding the per-endpoint series with gathering them, so a scrape
    /// never sees a counter half-rebuilt.
    endpoint_refresh: Mutex<()>,
}

/// `strait_tls_handshakes_total`, one series per role and session, all present from
/// the start.
pub struct TlsHandshakes {
    server_new: IntCounter,
    server_resumed: IntCounter,
    client_new: IntCounter,
    client_resumed: IntCounter,
}

impl TlsHandshakes {
    /// Counts a handshake strait completed as the server, of `kind`.
    pub fn server(&self, kind: Option<rustls::HandshakeKind>) {
        Self::count(kind, &self.server_new, &self.server_resumed);
    }

    /// Counts a handshake strait completed as the client, of `kind`.
    pub fn client(&self, kind: Option<rustls::HandshakeKind>) {
        Self::count(kind, &self.client_new, &self.client_resumed);
    }

    fn count(kind: Option<rustls::HandshakeKind>, new: &IntCounter, resumed: &IntCounter) {
        match kind {
            Some(rustls::HandshakeKind::Resumed) => resumed.inc(),
            _ => new.inc(),
        }
    }
}

/// The `strait_hbone_*` figures of the 15008 listener: outer connections and their
/// tunnels. Refused tunnels are also in `strait_refusals_total`, by flag and reason.
pub struct HboneMetrics {
    pub connections: IntCounter,
    pub active_connections: IntGauge,
    pub streams: IntCounter,
    pub active_streams: IntGauge,
    pub stream_seconds: Histogram,
    /// What the HTTP/2 limits refused, by reason: streams (`RST_STREAM`, `431`) and
    /// connections (`GOAWAY` with an error code).
    pub refusals: IntCounterVec,
}

impl HboneMetrics {
    fn new(r: &Registry) -> HboneMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric definition");
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric definition");
            r.register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        HboneMetrics {
            connections: counter(
                "strait_hbone_connections_total",
                "Outer HBONE connections whose mTLS handshake and HTTP/2 preface succeeded.",
            ),
            active_connections: gauge(
                "strait_hbone_active_connections",
                "Outer HBONE connections open now.",
            ),
            streams: counter(
                "strait_hbone_streams_total",
                "HTTP/2 streams received on outer HBONE connections (each CONNECT is one tunnel), whatever their outcome.",
            ),
            active_streams: gauge(
                "strait_hbone_active_streams",
                "HBONE streams (tunnels) open now.",
            ),
            stream_seconds: histogram(
                r,
                "strait_hbone_stream_duration_seconds",
                "Lifetime of HBONE streams (tunnels).",
                prometheus::exponential_buckets(0.001, 4.0, 12).unwrap_or_default(),
            ),
            refusals: {
                let c = IntCounterVec::new(
                    prometheus::Opts::new(
                        "strait_hbone_refusals_total",
                        "Streams and outer connections refused by the HTTP/2 limits of the HBONE listener (floods of streams, resets, headers), by reason.",
                    ),
                    &["reason"],
                )
                .expect("valid metric definition");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
        }
    }
}

/// How the wait for an endpoint's first byte, after the replayed ClientHello, ended, as
/// `upstream::connect` reports it: kept beside the histogram it labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstByte {
    /// The endpoint answered.
    Answered,
    /// It closed or reset without answering: a failed attempt, retried elsewhere.
    Closed,
    /// The connect timeout passed in silence: slow, not broken, so the connection goes
    /// on to the copy all the same.
    Timeout,
}

impl FirstByte {
    pub const ALL: [FirstByte; 3] = [FirstByte::Answered, FirstByte::Closed, FirstByte::Timeout];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FirstByte::Answered => "answered",
            FirstByte::Closed => "closed",
            FirstByte::Timeout => "timeout",
        }
    }
}

/// `strait_upstream_first_byte_seconds`, one handle per outcome, resolved once so a
/// connection never looks a label up.
pub struct FirstByteSeconds {
    pub answered: Histogram,
    pub closed: Histogram,
    pub timeout: Histogram,
}

impl FirstByteSeconds {
    pub fn get(&self, outcome: FirstByte) -> &Histogram {
        match outcome {
            FirstByte::Answered => &self.answered,
            FirstByte::Closed => &self.closed,
            FirstByte::Timeout => &self.timeout,
        }
    }
}

/// Identity of the gateway itself, which fills Istio's `source_*` labels: an east-west
/// gateway reports as `reporter="source"` describing itself (ANCHORS §2).
#[derive(Debug, Clone)]
pub struct GatewayIdentity {
    pub workload: String,
    pub namespace: String,
    pub cluster: String,
    /// The gateway's `app` label.
    pub app: String,
    /// The gateway's `version` label, when it has one.
    pub version: Option<String>,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl Default for GatewayIdentity {
    /// The names Istio's east-west gateway install uses, overridden by the variables
    /// Kubernetes and istio-agent set in a gateway pod (`ISTIO_META_WORKLOAD_NAME`,
    /// `POD_NAMESPACE`), so the same image reports correctly wherever it is deployed.
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let workload =
            env("ISTIO_META_WORKLOAD_NAME").unwrap_or_else(|| "istio-eastwestgateway".into());
        GatewayIdentity {
            namespace: env("POD_NAMESPACE").unwrap_or_else(|| "istio-system".into()),
            cluster: "Kubernetes".into(),
            app: "istio-eastwestgateway".into(),
            version: None,
            canonical_service: workload.clone(),
            canonical_revision: "latest".into(),
            workload,
        }
    }
}

impl GatewayIdentity {
    /// Applies the gateway's own Bootstrap `labels` the way Istio derives canonical names
    /// from pod labels (`service.istio.io/canonical-name`, then `app.kubernetes.io/name`,
    /// then `app`; revision from `service.istio.io/canonical-revision`, then
    /// `app.kubernetes.io/version`, then `version`).
    pub fn with_labels(mut self, labels: &std::collections::BTreeMap<String, String>) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
        if let Some(app) = first(&["app", "app.kubernetes.io/name"]) {
            self.app = app;
        }
        if let Some(v) = first(&["version", "app.kubernetes.io/version"]) {
            self.version = Some(v);
        }
        if let Some(c) = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]) {
            self.canonical_service = c;
        }
        if let Some(r) = first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ]) {
            self.canonical_revision = r;
        }
        self
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        // Names and label names are literals in this file, so construction cannot fail.
        .expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        // Each name is registered exactly once, below.
        .expect("metric registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let tcp_opened = counter_vec(
            r,
            "istio_tcp_connections_opened_total",
            "TCP connections opened through the gateway to a service.",
            &ISTIO_LABELS,
        );
        let tcp_closed = counter_vec(
            r,
            "istio_tcp_connections_closed_total",
            "TCP connections closed, by final response flag.",
            &ISTIO_LABELS,
        );
        let tcp_sent = counter_vec(
            r,
            "istio_tcp_sent_bytes_total",
            "Bytes sent to the downstream client from the service (the gateway's own refusal alert is not counted).",
            &ISTIO_LABELS,
        );
        let tcp_received = counter_vec(
            r,
            "istio_tcp_received_bytes_total",
            "Bytes received from the downstream client, ClientHello included.",
            &ISTIO_LABELS,
        );
        let accepted = IntCounter::new(
            "strait_downstream_connections_total",
            "Connections accepted on all listeners.",
        )
        .expect("valid metric definition");
        r.register(Box::new(accepted.clone()))
            .expect("metric registered once");
        let active = IntGauge::new(
            "strait_active_connections",
            "Downstream connections open now, including ones still sending their ClientHello.",
        )
        .expect("valid metric definition");
        r.register(Box::new(active.clone()))
            .expect("metric registered once");
        let refusals = counter_vec(
            r,
            "strait_refusals_total",
            "Connections refused or ended abnormally, by response flag and reason.",
            &["response_flag", "reason"],
        );
        let route_picks = counter_vec(
            r,
            "strait_route_destination_total",
            "Connections a VirtualService tls or tcp route sent to each destination (weighted per connection).",
            &[
                "virtual_service",
                "destination_service",
                "destination_port",
                "destination_subset",
            ],
        );
        let upstream_connect_attempts = IntCounter::new(
            "strait_upstream_connect_attempts_total",
            "Upstream connection attempts.",
        )
        .expect("valid metric definition");
        r.register(Box::new(upstream_connect_attempts.clone()))
            .expect("metric registered once");
        let upstream_connect_failures = counter_vec(
            r,
            "strait_upstream_connect_failures_total",
            "Upstream connection attempts that failed, by reason.",
            &["reason"],
        );
        let upstream_connect_seconds = histogram(
            r,
            "strait_upstream_connect_duration_seconds",
            "Time to establish an upstream TCP connection (the wait for the endpoint's first byte is strait_upstream_first_byte_seconds).",
            prometheus::exponential_buckets(0.0001, 4.0, 9).unwrap_or_default(),
        );
        let first_byte = HistogramVec::new(
            HistogramOpts::new(
                "strait_upstream_first_byte_seconds",
                "Time a passthrough connection waited, after replaying the ClientHello, for the endpoint's first byte (at most connectTimeout), by outcome: answered; closed (closed or reset first, so another endpoint is tried); timeout (silent until connectTimeout, then copied all the same).",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 4.0, 10).unwrap_or_default()),
            &["outcome"],
        )
        .expect("valid metric definition");
        r.register(Box::new(first_byte.clone()))
            .expect("metric registered once");
        // Every outcome exists from the start, so the first timeout shows as 0 → 1.
        let [answered, closed, timeout] =
            FirstByte::ALL.map(|o| first_byte.with_label_values(&[o.label()]));
        let upstream_first_byte_seconds = FirstByteSeconds {
            answered,
            closed,
            timeout,
        };
        let client_hello_bytes = histogram(
            r,
            "strait_client_hello_bytes",
            "Size of the TLS records carrying each ClientHello.",
            vec![
                256.0, 512.0, 1024.0, 1536.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
            ],
        );
        let client_hello_seconds = histogram(
            r,
            "strait_client_hello_wait_seconds",
            "Time from accept until the whole ClientHello had arrived.",
            prometheus::exponential_buckets(0.0001, 4.0, 10).unwrap_or_default(),
        );
        let connection_seconds = histogram(
            r,
            "strait_connection_duration_seconds",
            "Lifetime of downstream connections.",
            prometheus::exponential_buckets(0.001, 4.0, 12).unwrap_or_default(),
        );
        let config_reloads = counter_vec(
            r,
            "strait_config_reloads_total",
            "Configuration loads, by result: success (something changed), unchanged (the files say what they said; nothing rebuilt) or failure.",
            &["result"],
        );
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "strait_cert_expiry_timestamp_seconds",
                "Expiry time (unix seconds) of each certificate in use.",
            ),
            &["role", "file"],
        )
        .expect("valid metric definition");
        r.register(Box::new(cert_expiry.clone()))
            .expect("metric registered once");
        let endpoint_healthy = IntGaugeVec::new(
            Opts::new(
                "strait_endpoint_healthy",
                "1 when the endpoint is eligible for traffic, 0 while outlier detection ejects it.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric definition");
        r.register(Box::new(endpoint_healthy.clone()))
            .expect("metric registered once");
        let endpoint_ejections = counter_vec(
            r,
            "strait_endpoint_ejections_total",
            "Outlier-detection ejections, by service port and endpoint.",
            &ENDPOINT_LABELS,
        );
        let accept_errors = counter_vec(
            r,
            "strait_accept_errors_total",
            "Errors from accept(2), by kind (e.g. fd_exhausted).",
            &["kind"],
        );
        let handshakes = counter_vec(
            r,
            "strait_tls_handshakes_total",
            "TLS handshakes completed on the data path, by strait's role (server: ISTIO_MUTUAL and HBONE listeners; client: bridges and re-encryption) and session (new: a full handshake, the peer's chain verified; resumed: a session of an earlier full handshake with the same peer identities, as Envoy's ssl.session_reused).",
            &["role", "session"],
        );
        let tls_handshakes = TlsHandshakes {
            server_new: handshakes.with_label_values(&["server", "new"]),
            server_resumed: handshakes.with_label_values(&["server", "resumed"]),
            client_new: handshakes.with_label_values(&["client", "new"]),
            client_resumed: handshakes.with_label_values(&["client", "resumed"]),
        };
        let hbone = HboneMetrics::new(r);
        // Both results exist from the start, so a failure shows as 0 → 1 rather than as a
        // series appearing out of nowhere.
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        Metrics {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            accepted,
            active,
            refusals,
            route_picks,
            upstream_connect_attempts,
            upstream_connect_failures,
            upstream_connect_seconds,
            upstream_first_byte_seconds,
            client_hello_bytes,
            client_hello_seconds,
            connection_seconds,
            config_reloads,
            cert_expiry,
            endpoint_healthy,
            endpoint_ejections,
            accept_errors,
            tls_handshakes,
            hbone,
            endpoint_refresh: Mutex::new(()),
        }
    }

    /// The Prometheus text exposition of every metric.
    /// The registry, for metric families registered later (the xDS client's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> Vec<u8> {
        let _guard = self
            .endpoint_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on inconsistent metric families, which the
        // registry prevents; an empty page is the honest fallback.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

/// The state of one declared endpoint, sampled when metrics are scraped.
#[derive(Debug, Clone, Copy)]
pub struct EndpointSample<'a> {
    pub service: &'a str,
    pub port: u16,
    /// The endpoint's `address:port`.
    pub endpoint: &'a str,
    pub healthy: bool,
    /// Ejections since the endpoint was first declared.
    pub ejections: u64,
}

impl Metrics {
    /// Replaces the per-endpoint series with `samples`: endpoints no longer declared
    /// disappear, so the number of series follows the configuration, never the traffic.
    pub fn set_endpoints<'a>(&self, samples: impl IntoIterator<Item = EndpointSample<'a>>) {
        let _guard = self
            .endpoint_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.endpoint_healthy.reset();
        self.endpoint_ejections.reset();
        for s in samples {
            let port = s.port.to_string();
            let labels = [s.service, port.as_str(), s.endpoint];
            self.endpoint_healthy
                .with_label_values(&labels)
                .set(i64::from(s.healthy));
            let ejections = self.endpoint_ejections.with_label_values(&labels);
            // The same endpoint can appear twice (two ServiceEntries); count it once.
            if ejections.get() < s.ejections {
                ejections.inc_by(s.ejections - ejections.get());
            }
        }
    }

    /// Records when a certificate in use expires (`role`: e.g. `server`, `root`; `file`:
    /// where it was read from). Setting the same role and file again replaces the value.
    pub fn set_cert_expiry(&self, role: &str, file: &Path, not_after_unix: i64) {
        self.cert_expiry
            .with_label_values(&[role, &file.display().to_string()])
            .set(not_after_unix);
    }

    /// Drops the expiry series of a certificate no longer in use.
    pub fn forget_cert_expiry(&self, role: &str, file: &Path) {
        let _ = self
            .cert_expiry
            .remove_label_values(&[role, &file.display().to_string()]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The Istio label values for one (service, subset) as seen by this gateway.
#[derive(Debug, Clone)]
pub struct IstioLabels {
    values: [String; 23],
}

/// The SPIFFE URI form Istio uses for principals, whichever form the caller holds.
fn principal_uri(p: &str) -> String {
    if p.starts_with("spiffe://") {
        p.to_string()
    } else {
        format!("spiffe://{p}")
    }
}

impl IstioLabels {
    /// Labels for a connection to `service_host` (and `subset`): `destination_version`
    /// is the subset name. Prefer [`IstioLabels::for_route`], which reads the version
    /// from the subset's labels.
    pub fn new(
        gw: &GatewayIdentity,
        service_host: &str,
        service_namespace: &str,
        subset: Option<&str>,
        source_principal: Option<&str>,
        mutual_tls: bool,
    ) -> Self {
        Self::build(
            gw,
            service_host,
            service_namespace,
            subset,
            source_principal,
            mutual_tls,
        )
    }

    /// Labels for a connection routed to `service` (and `subset`), as an Envoy
    /// east-west gateway fills them: `source_*` is the gateway itself, except
    /// `source_principal`, which is the client's verified SPIFFE ID when the gateway
    /// terminated mTLS (ISTIO_MUTUAL; `mutual_tls` also sets
    /// `connection_security_policy="mutual_tls"`). `destination_version` comes from
    /// the subset's `version` label; anything the gateway cannot know is `unknown`.
    pub fn for_route(
        gw: &GatewayIdentity,
        service: &ServicePort,
        subset: Option<&str>,
        source_principal: Option<&str>,
        mutual_tls: bool,
    ) -> Self {
        let version = subset
            .and_then(|name| service.subsets.get(name))
            .and_then(|s| {
                s.labels
                    .get("version")
                    .or_else(|| s.labels.get("app.kubernetes.io/version"))
            })
            .map(String::as_str);
        Self::build(
            gw,
            &service.host,
            &service.namespace,
            version,
            source_principal,
            mutual_tls,
        )
    }

    fn build(
        gw: &GatewayIdentity,
        service_host: &str,
        service_namespace: &str,
        version: Option<&str>,
        source_principal: Option<&str>,
        mutual_tls: bool,
    ) -> Self {
        let unknown = || "unknown".to_string();
        let name = service_host.split('.').next().unwrap_or(service_host);
        IstioLabels {
            values: [
                "source".into(),
                gw.workload.clone(),
                gw.namespace.clone(),
                source_principal.map_or_else(unknown, principal_uri),
                gw.app.clone(),
                gw.version.clone().unwrap_or_else(unknown),
                gw.canonical_service.clone(),
                gw.canonical_revision.clone(),
                gw.cluster.clone(),
                // The destination workload is a pod behind an endpoint address; a
                // passthrough gateway has no workload metadata for it.
                unknown(),
                unknown(),
                // No upstream TLS at the gateway, so no destination principal.
                unknown(),
                unknown(),
                version.map_or_else(unknown, str::to_string),
                service_host.to_string(),
                name.to_string(),
                service_namespace.to_string(),
                unknown(),
                "latest".into(),
                gw.cluster.clone(),
                "tcp".into(),
                "-".into(),
                if mutual_tls {
                    "mutual_tls".into()
                } else {
                    unknown()
                },
            ],
        }
    }

    /// The same labels with `destination_principal` set: the SPIFFE ID the far end
    /// presented when this process originated the mTLS (a bridge).
    pub fn with_destination_principal(mut self, principal: &str) -> Self {
        self.values[11] = principal_uri(principal);
        self
    }

    /// The same labels as a waypoint reports them (`reporter="waypoint"`): what Istio's
    /// ambient east-west gateway writes for each tunnel.
    pub fn as_waypoint(mut self) -> Self {
        self.values[0] = "waypoint".into();
        self
    }

    /// The value of one label, by name.
    pub fn get(&self, label: &str) -> Option<&str> {
        ISTIO_LABELS
            .iter()
            .position(|l| *l == label)
            .map(|i| self.values[i].as_str())
    }

    fn with_flag<'a>(&'a self, flag: &'a str) -> [&'a str; 23] {
        let mut v: [&str; 23] = std::array::from_fn(|i| self.values[i].as_str());
        v[RESPONSE_FLAGS] = flag;
        v
    }
}

/// Counter handles for one route, looked up once per connection so the copy loop only
/// does atomic adds.
#[derive(Clone)]
pub struct RouteCounters {
    pub sent: IntCounter,
    pub received: IntCounter,
}

/// The Istio series of one route, looked up once: a connection then only does atomic
/// adds. Shared by every connection of a cluster (see `upstream::Cluster`), so a
/// connection holds one `Arc`, not its own copy of the 23 label values.
pub struct RouteMetrics {
    labels: IstioLabels,
    opened: IntCounter,
    /// `istio_tcp_connections_closed_total` with `response_flags="-"`, the usual end.
    closed_ok: IntCounter,
    pub counters: RouteCounters,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics").finish_non_exhaustive()
    }
}

impl RouteMetrics {
    pub fn labels(&self) -> &IstioLabels {
        &self.labels
    }
}

impl Metrics {
    /// Looks up every series of a route once.
    pub fn route(&self, labels: IstioLabels) -> std::sync::Arc<RouteMetrics> {
        let v = labels.with_flag("-");
        let opened = self.tcp_opened.with_label_values(&v);
        let closed_ok = self.tcp_closed.with_label_values(&v);
        let counters = RouteCounters {
            sent: self.tcp_sent.with_label_values(&v),
            received: self.tcp_received.with_label_values(&v),
        };
        std::sync::Arc::new(RouteMetrics {
            labels,
            opened,
            closed_ok,
            counters,
        })
    }

    /// Counts a connection opened towards a route.
    pub fn open_route(&self, route: &RouteMetrics) {
        route.opened.inc();
    }

    pub fn close_route(&self, route: &RouteMetrics, flag: &str) {
        if flag == "-" {
            route.closed_ok.inc();
        } else {
            self.tcp_closed
                .with_label_values(&route.labels.with_flag(flag))
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Resolution, Subset, TrafficPolicy};
    use std::collections::BTreeMap;

    fn reviews() -> ServicePort {
        let subset = |name: &str, labels: &[(&str, &str)]| {
            (
                name.to_string(),
                Subset {
                    name: name.to_string(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    endpoints: vec![],
                    policy: TrafficPolicy::default(),
                },
            )
        };
        ServicePort {
            host: "reviews.bookinfo.svc.cluster.local".into(),
            namespace: "bookinfo".into(),
            port: 9080,
            port_name: "tcp".into(),
            endpoints: vec![],
            policy: TrafficPolicy::default(),
            tunnel_policy: TrafficPolicy::default(),
            subsets: [
                subset("v1", &[("version", "v1")]),
                subset("canary", &[("version", "v3"), ("track", "canary")]),
                subset("blue", &[("track", "blue")]),
            ]
            .into_iter()
            .collect(),
            resolution: Resolution::Static,
            default_route: Default::default(),
        }
    }

    fn gateway() -> GatewayIdentity {
        GatewayIdentity {
            workload: "istio-eastwestgateway".into(),
            namespace: "istio-system".into(),
            cluster: "cluster-east".into(),
            app: "istio-eastwestgateway".into(),
            version: None,
            canonical_service: "istio-eastwestgateway".into(),
            canonical_revision: "latest".into(),
        }
    }

    #[test]
    fn passthrough_labels_describe_the_gateway_as_source_and_the_service_as_destination() {
        let l = IstioLabels::for_route(&gateway(), &reviews(), None, None, false);
        let expect = [
            ("reporter", "source"),
            ("source_workload", "istio-eastwestgateway"),
            ("source_workload_namespace", "istio-system"),
            ("source_principal", "unknown"),
            ("source_cluster", "cluster-east"),
            ("source_canonical_revision", "latest"),
            ("destination_service", "reviews.bookinfo.svc.cluster.local"),
            ("destination_service_name", "reviews"),
            ("destination_service_namespace", "bookinfo"),
            ("destination_version", "unknown"),
            ("destination_principal", "unknown"),
            ("destination_workload", "unknown"),
            ("destination_canonical_revision", "latest"),
            ("destination_cluster", "cluster-east"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
        ];
        for (k, v) in expect {
            assert_eq!(l.get(k), Some(v), "{k}");
        }
        assert!(l.with_flag("UF").contains(&"UF"));
    }

    #[test]
    fn destination_version_comes_from_the_subset_labels_not_its_name() {
        let svc = reviews();
        let version = |subset| {
            IstioLabels::for_route(&gateway(), &svc, Some(subset), None, false)
                .get("destination_version")
                .map(str::to_string)
        };
        assert_eq!(version("v1").as_deref(), Some("v1"));
        assert_eq!(version("canary").as_deref(), Some("v3"));
        assert_eq!(version("blue").as_deref(), Some("unknown"));
    }

    #[test]
    fn mutual_tls_fills_source_principal_and_security_policy() {
        let svc = reviews();
        for peer in [
            "spiffe://cluster.local/ns/default/sa/productpage",
            "cluster.local/ns/default/sa/productpage",
        ] {
            let l = IstioLabels::for_route(&gateway(), &svc, None, Some(peer), true);
            assert_eq!(
                l.get("source_principal"),
                Some("spiffe://cluster.local/ns/default/sa/productpage")
            );
            assert_eq!(l.get("connection_security_policy"), Some("mutual_tls"));
        }
    }

    #[test]
    fn gateway_labels_follow_istio_canonical_name_rules() {
        let labels: BTreeMap<String, String> = [
            ("app", "eastwest"),
            ("service.istio.io/canonical-name", "ew-gateway"),
            ("version", "1.2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let gw = gateway().with_labels(&labels);
        assert_eq!(gw.app, "eastwest");
        assert_eq!(gw.canonical_service, "ew-gateway");
        assert_eq!(gw.canonical_revision, "1.2");
        assert_eq!(gw.version.as_deref(), Some("1.2"));
    }

    fn series(m: &Metrics, name: &str) -> Vec<String> {
        String::from_utf8(m.render())
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn endpoint_series_follow_the_declared_endpoints() {
        let m = Metrics::new();
        let sample = |endpoint, healthy, ejections| EndpointSample {
            service: "reviews.default.svc.cluster.local",
            port: 9080,
            endpoint,
            healthy,
            ejections,
        };
        m.set_endpoints([
            sample("10.0.0.1:9080", true, 0),
            sample("10.0.0.2:9080", false, 2),
        ]);
        let healthy = series(&m, "strait_endpoint_healthy");
        assert_eq!(healthy.len(), 2, "{healthy:?}");
        assert!(
            healthy
                .iter()
                .any(|l| l.contains("10.0.0.2:9080") && l.ends_with(" 0"))
        );
        assert!(
            healthy
                .iter()
                .any(|l| l.contains("10.0.0.1:9080") && l.ends_with(" 1"))
        );
        let ejections = series(&m, "strait_endpoint_ejections_total");
        assert!(
            ejections
                .iter()
                .any(|l| l.contains("10.0.0.2:9080") && l.ends_with(" 2"))
        );

        // A reload removed 10.0.0.2: its series go with it.
        m.set_endpoints([sample("10.0.0.1:9080", true, 1)]);
        let healthy = series(&m, "strait_endpoint_healthy");
        assert_eq!(healthy.len(), 1, "{healthy:?}");
        let ejections = series(&m, "strait_endpoint_ejections_total");
        assert_eq!(ejections.len(), 1, "{ejections:?}");
        assert!(ejections[0].ends_with(" 1"));
    }

    #[test]
    fn cert_expiry_is_set_replaced_and_forgotten() {
        let m = Metrics::new();
        let file = Path::new("/etc/certs/cert-chain.pem");
        m.set_cert_expiry("server", file, 1_900_000_000);
        m.set_cert_expiry("server", file, 1_950_000_000);
        let s = series(&m, "strait_cert_expiry_timestamp_seconds");
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].contains("role=\"server\"") && s[0].ends_with(" 1950000000"));
        m.forget_cert_expiry("server", file);
        assert!(series(&m, "strait_cert_expiry_timestamp_seconds").is_empty());
    }

    #[test]
    fn reload_results_are_exposed_from_the_start() {
        let m = Metrics::new();
        let s = series(&m, "strait_config_reloads_total");
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s.iter().all(|l| l.ends_with(" 0")));
    }
}
