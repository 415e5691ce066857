//! The metrics registry: Istio's standard TCP metrics plus `strait_*` gateway metrics.
//!
//! Label values come only from bounded sets: declared services and subsets, response
//! flags, and fixed reason strings. Nothing a client sends (an SNI, an ALPN) becomes a
//! label value, so a flood of random names cannot grow the number of series.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Istio's label set for the `istio_tcp_*` metrics, in this order.
const ISTIO_LABELS: [&str; 15] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

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
    pub upstream_connect_attempts: IntCounter,
    pub upstream_connect_failures: IntCounterVec,
    pub upstream_connect_seconds: Histogram,
    pub client_hello_bytes: Histogram,
    pub client_hello_seconds: Histogram,
    pub connection_seconds: Histogram,
    pub config_reloads: IntCounterVec,
    pub cert_expiry: IntGaugeVec,
    pub endpoint_healthy: IntGaugeVec,
    pub endpoint_ejections: IntCounterVec,
    pub accept_errors: IntCounterVec,
}

/// Identity of the gateway itself, which fills Istio's `source_*` labels: an east-west
/// gateway reports as `reporter="source"` describing itself (ANCHORS §2).
#[derive(Debug, Clone)]
pub struct GatewayIdentity {
    pub workload: String,
    pub namespace: String,
    pub cluster: String,
}

impl Default for GatewayIdentity {
    fn default() -> Self {
        GatewayIdentity {
            workload: "istio-eastwestgateway".into(),
            namespace: "istio-system".into(),
            cluster: "Kubernetes".into(),
        }
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
            "Bytes sent to the downstream client.",
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
            "Time to establish an upstream TCP connection.",
            prometheus::exponential_buckets(0.0001, 4.0, 9).unwrap_or_default(),
        );
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
            "Configuration loads, by result (success or failure).",
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
                "1 when the endpoint is eligible for traffic, 0 while ejected.",
            ),
            &["destination_service", "endpoint"],
        )
        .expect("valid metric definition");
        r.register(Box::new(endpoint_healthy.clone()))
            .expect("metric registered once");
        let endpoint_ejections = counter_vec(
            r,
            "strait_endpoint_ejections_total",
            "Outlier-detection ejections, by service and endpoint.",
            &["destination_service", "endpoint"],
        );
        let accept_errors = counter_vec(
            r,
            "strait_accept_errors_total",
            "Errors from accept(2), by kind (e.g. fd_exhausted).",
            &["kind"],
        );
        Metrics {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            accepted,
            active,
            refusals,
            upstream_connect_attempts,
            upstream_connect_failures,
            upstream_connect_seconds,
            client_hello_bytes,
            client_hello_seconds,
            connection_seconds,
            config_reloads,
            cert_expiry,
            endpoint_healthy,
            endpoint_ejections,
            accept_errors,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The Istio label values for one (service, subset) as seen by this gateway.
#[derive(Debug, Clone)]
pub struct IstioLabels {
    values: [String; 15],
}

impl IstioLabels {
    pub fn new(
        gw: &GatewayIdentity,
        service_host: &str,
        service_namespace: &str,
        subset: Option<&str>,
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
                source_principal.map_or_else(unknown, |p| format!("spiffe://{p}")),
                gw.cluster.clone(),
                unknown(),
                unknown(),
                service_host.to_string(),
                name.to_string(),
                service_namespace.to_string(),
                subset.map_or_else(unknown, str::to_string),
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

    fn with_flag<'a>(&'a self, flag: &'a str) -> [&'a str; 15] {
        let mut v: [&str; 15] = std::array::from_fn(|i| self.values[i].as_str());
        v[13] = flag;
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

impl Metrics {
    /// Counts a connection opened towards a service and returns its byte counters.
    pub fn open_route(&self, labels: &IstioLabels) -> RouteCounters {
        let v = labels.with_flag("-");
        self.tcp_opened.with_label_values(&v).inc();
        RouteCounters {
            sent: self.tcp_sent.with_label_values(&v),
            received: self.tcp_received.with_label_values(&v),
        }
    }

    pub fn close_route(&self, labels: &IstioLabels, flag: &str) {
        self.tcp_closed
            .with_label_values(&labels.with_flag(flag))
            .inc();
    }
}
