//! One connection, one result: the per-connection record that feeds metrics and the
//! access log exactly once, when it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{IstioLabels, RouteCounters, RouteMetrics, Telemetry};

/// Envoy-style response flags, as operators read them in access logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// `-`: nothing abnormal.
    None,
    /// `NR`: no route for the SNI (unknown name, host outside the Gateway, undeclared subset, wrong ALPN).
    NoRoute,
    /// `UH`: the route has no healthy endpoint.
    NoHealthyUpstream,
    /// `UF`: every upstream connect attempt failed.
    UpstreamConnectFailure,
    /// `UO`: a connection limit refused it.
    UpstreamOverflow,
    /// `DC`: the client went away before the gateway could route it.
    DownstreamConnectionTermination,
    /// `DPE`: the client did not speak TLS, or its ClientHello was malformed, too large or too slow.
    DownstreamProtocolError,
    /// `DT`: closed by `maxConnectionDuration`.
    DurationTimeout,
    /// `UT`: closed by the idle timeout.
    IdleTimeout,
    /// `UAEX`: refused by authorization or peer authentication (ISTIO_MUTUAL).
    Unauthorized,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::DurationTimeout => "DT",
            ResponseFlag::IdleTimeout => "UT",
            ResponseFlag::Unauthorized => "UAEX",
        }
    }

    /// Whether this flag means the connection was refused (as opposed to ended by a timer).
    pub fn is_refusal(self) -> bool {
        !matches!(
            self,
            ResponseFlag::None | ResponseFlag::DurationTimeout | ResponseFlag::IdleTimeout
        )
    }
}

/// Everything learned about one downstream connection.
pub struct ConnectionResult {
    telemetry: Arc<Telemetry>,
    start_wall: SystemTime,
    start: Instant,
    pub listener: SocketAddr,
    pub downstream: SocketAddr,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub service: Option<String>,
    pub subset: Option<String>,
    /// The VirtualService whose route chose the destination.
    pub virtual_service: Option<String>,
    pub upstream: Option<SocketAddr>,
    /// Network of the endpoint picked, when it is not this process's own (a bridge
    /// reaching it through that network's gateway).
    pub upstream_network: Option<String>,
    pub peer_identity: Option<String>,
    /// Bytes received from the client (ClientHello included).
    pub received: u64,
    /// Bytes sent to the client.
    pub sent: u64,
    pub flag: ResponseFlag,
    /// A fixed, bounded string saying why (metric label and log field).
    pub reason: &'static str,
    /// Free text for the access log only (e.g. the connect error).
    pub detail: Option<String>,
    /// The `:authority` of an HBONE tunnel (`host:port`, as the client sent it).
    pub authority: Option<String>,
    route: Option<Arc<RouteMetrics>>,
    unit: Unit,
}

/// What one result stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A downstream connection, logged whatever its end.
    Connection,
    /// An outer HBONE connection: its tunnels have lines of their own, so it is logged
    /// only when refused.
    HboneConnection,
    /// One HBONE `CONNECT` stream.
    Tunnel,
}

/// A connection counted as accepted and active, before anything else is known about it:
/// a few words where a [`ConnectionResult`] is a few hundred bytes, so a connection
/// still sending its ClientHello stays small. Becomes the result once there is
/// something to record.
pub struct Accepted {
    /// `None` only once handed to the result.
    telemetry: Option<Arc<Telemetry>>,
    start_wall: SystemTime,
    start: Instant,
}

impl Accepted {
    pub fn new(telemetry: Arc<Telemetry>) -> Accepted {
        telemetry.metrics.accepted.inc();
        telemetry.metrics.active.inc();
        Accepted {
            telemetry: Some(telemetry),
            start_wall: SystemTime::now(),
            start: Instant::now(),
        }
    }

    /// The result of this connection, timed from its accept.
    pub fn into_result(mut self, listener: SocketAddr, downstream: SocketAddr) -> ConnectionResult {
        // Set in `new`, taken only here (which consumes `self`).
        let telemetry = self
            .telemetry
            .take()
            .expect("an Accepted is turned into a result once");
        ConnectionResult::with_start(telemetry, listener, downstream, self.start_wall, self.start)
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        // Dropped without a result (the runtime shutting down mid-ClientHello): the
        // connection is no longer active.
        if let Some(t) = &self.telemetry {
            t.metrics.active.dec();
        }
    }
}

impl ConnectionResult {
    pub fn new(telemetry: Arc<Telemetry>, listener: SocketAddr, downstream: SocketAddr) -> Self {
        Accepted::new(telemetry).into_result(listener, downstream)
    }

    fn with_start(
        telemetry: Arc<Telemetry>,
        listener: SocketAddr,
        downstream: SocketAddr,
        start_wall: SystemTime,
        start: Instant,
    ) -> Self {
        ConnectionResult {
            telemetry,
            start_wall,
            start,
            listener,
            downstream,
            sni: None,
            alpn: None,
            service: None,
            subset: None,
            virtual_service: None,
            upstream: None,
            upstream_network: None,
            peer_identity: None,
            received: 0,
            sent: 0,
            flag: ResponseFlag::None,
            reason: "",
            detail: None,
            authority: None,
            route: None,
            unit: Unit::Connection,
        }
    }

    /// The result of one HBONE stream on an outer connection from `downstream`: counted
    /// as a stream (`strait_hbone_*`), not as a downstream connection.
    pub fn tunnel(telemetry: Arc<Telemetry>, listener: SocketAddr, downstream: SocketAddr) -> Self {
        let hbone = &telemetry.metrics.hbone;
        hbone.streams.inc();
        hbone.active_streams.inc();
        let mut r = Self::with_start(
            telemetry,
            listener,
            downstream,
            SystemTime::now(),
            Instant::now(),
        );
        r.unit = Unit::Tunnel;
        r
    }

    /// Marks this as an outer HBONE connection: logged only if refused, since each of its
    /// tunnels writes its own line.
    pub fn hbone_outer(&mut self) {
        self.unit = Unit::HboneConnection;
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }

    /// Records the VirtualService route that chose this connection's destination, and
    /// counts the choice.
    pub fn routed_by(
        &mut self,
        route: &crate::model::L4Route,
        service: &crate::model::ServicePort,
        subset: Option<&str>,
    ) {
        self.telemetry
            .metrics
            .route_picks
            .with_label_values(&[
                route.virtual_service.as_str(),
                service.host.as_str(),
                &service.port.to_string(),
                subset.unwrap_or(""),
            ])
            .inc();
        self.virtual_service = Some(route.virtual_service.clone());
    }

    /// Records a refusal (or abnormal end) with its flag and bounded reason.
    pub fn refuse(&mut self, flag: ResponseFlag, reason: &'static str) {
        self.flag = flag;
        self.reason = reason;
    }

    /// Marks the connection as routed to a service: counts `istio_tcp_connections_opened_total`
    /// and returns the byte counters the copy loop adds to as data flows.
    pub fn open_route(&mut self, labels: IstioLabels) -> RouteCounters {
        let route = self.telemetry.metrics.route(labels);
        self.open_shared_route(route)
    }

    /// Like [`ConnectionResult::open_route`], with series already looked up (shared by
    /// every connection of a cluster).
    pub fn open_shared_route(&mut self, route: Arc<RouteMetrics>) -> RouteCounters {
        self.telemetry.metrics.open_route(&route);
        let counters = route.counters.clone();
        self.route = Some(route);
        counters
    }

    fn access_log_line(&self) -> String {
        let ts: time::OffsetDateTime = self.start_wall.into();
        let start = ts
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut line = serde_json::json!({
            "start_time": start,
            "listener": self.listener.to_string(),
            "downstream": self.downstream.to_string(),
            "sni": self.sni,
            "alpn": self.alpn,
            "service": self.service,
            "subset": self.subset,
            "virtual_service": self.virtual_service,
            "upstream": self.upstream.map(|a| a.to_string()),
            "upstream_network": self.upstream_network,
            "peer_identity": self.peer_identity,
            "bytes_received": self.received,
            "bytes_sent": self.sent,
            "duration_ms": self.start.elapsed().as_millis() as u64,
            "response_flag": self.flag.as_str(),
            "reason": if self.reason.is_empty() { None } else { Some(self.reason) },
            "detail": self.detail,
        });
        if let (Some(a), Some(map)) = (&self.authority, line.as_object_mut()) {
            map.insert("authority".into(), serde_json::Value::String(a.clone()));
        }
        line.to_string()
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        let m = &self.telemetry.metrics;
        let lived = self.start.elapsed().as_secs_f64();
        if self.unit == Unit::Tunnel {
            m.hbone.active_streams.dec();
            m.hbone.stream_seconds.observe(lived);
        } else {
            m.active.dec();
            m.connection_seconds.observe(lived);
        }
        if self.flag.is_refusal() {
            m.refusals
                .with_label_values(&[self.flag.as_str(), self.reason])
                .inc();
        }
        if let Some(route) = &self.route {
            m.close_route(route, self.flag.as_str());
        }
        let quiet = self.unit == Unit::HboneConnection && self.flag == ResponseFlag::None;
        if self.telemetry.access_log.enabled() && !quiet {
            self.telemetry.access_log.write(self.access_log_line());
        }
    }
}
