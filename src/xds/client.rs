//! The ADS stream: subscribe to clusters and listeners (wildcard) and to the endpoints of
//! every EDS cluster a served listener routes to (by name), apply each response's valid resources, acknowledge it or
//! reject it with the reasons, and keep doing so across lost streams.
//!
//! Rules, from Envoy's xDS protocol and what istiod does with them:
//! - a rejection (NACK) carries the previous accepted version, the response's nonce and
//!   an `error_detail`; istiod never re-sends a rejected push, so the valid resources of
//!   the same response are applied anyway and only the bad ones keep their last good
//!   form (a bad cluster never takes the 15443 listener down);
//! - in state of the world, a listener or cluster response is the whole set (absence is
//!   deletion) while an endpoint response names only what it carries; in delta, each
//!   resource comes on its own and deletions are listed;
//! - a new stream re-subscribes with the versions held (delta
//!   `initial_resource_versions`), and until it has answered, everything held keeps
//!   serving unchanged;
//! - the receive loop never waits on the consumer: updates are published to a [`Feed`],
//!   which keeps only the newest and what it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, Value as PbValue, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::connect::{self, ConnectError};
use super::translate::{self, Assembly, Held, Listener};
use super::{Accepted, AcceptedResources, Feed, Rejection, Status, Stream, jitter, short_type};
use crate::model::{Changed, Discovery, ListenerSpec, Services, XdsProtocol};

/// Far above tonic's 4 MiB: a mesh of 10,000 services sends tens of MiB of clusters.
const MAX_MESSAGE: usize = 1 << 30;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// What the client hands the gateway after each accepted change.
#[derive(Debug, Default)]
pub struct Published {
    pub listeners: Vec<ListenerSpec>,
    pub services: Services,
    /// Listeners and clusters received and every served cluster's endpoints in (or
    /// waited for long enough): readiness may pass.
    pub warm: bool,
    /// Why not warm yet.
    pub waiting: Option<String>,
}

impl State {
    fn accepted(&self) -> std::sync::MutexGuard<'_, AcceptedResources> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything held across streams.
struct State {
    /// Which node this client is: what its resources are read as.
    stream: Stream,
    held: Held,
    /// Accepted version of each resource, per type (delta `initial_resource_versions`).
    versions: HashMap<&'static str, BTreeMap<String, String>>,
    /// Accepted `version_info` and last nonce per type (SotW).
    sotw: HashMap<&'static str, (String, String)>,
    /// Types answered at least once since start.
    received: BTreeSet<&'static str>,
    /// EDS names subscribed on the current stream.
    subscribed_eds: BTreeSet<String>,
    /// When each EDS name was first wanted, for the initial fetch timeout.
    wanted_since: BTreeMap<String, Instant>,
    /// Ready once; stays ready through reconnects.
    warm: bool,
    /// The served part of `held`, kept up to date.
    assembly: Assembly,
    /// Listeners or clusters changed since the last publish: rebuild the assembly.
    structure_changed: bool,
    /// EDS names whose endpoints changed since the last publish.
    endpoints_changed: BTreeSet<String>,
    /// What the gateway was last handed.
    published: Option<Arc<Published>>,
    /// The bytes of every held resource, shared with [`Status`] for `config_dump`.
    accepted: Arc<Mutex<AcceptedResources>>,
}

/// How a stream ended.
enum End {
    /// Could not open: the cause, and whether it is an authentication problem.
    Open(String, &'static str),
    /// Opened, then ended; `applied` says whether any response was accepted on it.
    Closed {
        why: String,
        reason: &'static str,
        applied: bool,
    },
}

pub async fn run(status: Arc<Status>, feed: Arc<Feed>) {
    let d = status.discovery.clone();
    let mut state = State {
        stream: status.stream,
        held: Held::default(),
        versions: HashMap::new(),
        sotw: HashMap::new(),
        received: BTreeSet::new(),
        subscribed_eds: BTreeSet::new(),
        wanted_since: BTreeMap::new(),
        warm: false,
        assembly: Assembly::default(),
        structure_changed: true,
        endpoints_changed: BTreeSet::new(),
        published: None,
        accepted: status.accepted.clone(),
    };
    tracing::info!(
        stream = status.stream.name(),
        address = %d.server.address,
        tls = !d.server.plaintext,
        protocol = ?d.protocol,
        node = %d.node.id,
        cluster_id = %d.server.cluster_id,
        network = %d.node.metadata.get("NETWORK").map(String::as_str).unwrap_or(""),
        requested_network_view = %d.node.metadata.get("REQUESTED_NETWORK_VIEW").map(String::as_str).unwrap_or(""),
        "connecting to the control plane"
    );
    let mut backoff = BACKOFF_FIRST;
    loop {
        let end = session(&d, &status, &mut state, &feed).await;
        status.metrics.connected().set(0);
        let (why, reason, immediate) = match end {
            End::Open(why, reason) => (why, reason, false),
            End::Closed {
                why,
                reason,
                applied,
            } => (why, reason, applied),
        };
        status
            .metrics
            .connect_failures
            .with_label_values(&[status.metrics.stream, reason])
            .inc();
        {
            let mut s = status.lock();
            s.connected = false;
            s.last_error = Some(why.clone());
        }
        // A stream that carried configuration and then ended (istiod's 30-minute
        // GOAWAY, a restart) is reopened at once; anything else backs off.
        let delay = if immediate {
            backoff = BACKOFF_FIRST;
            Duration::ZERO
        } else {
            let d = jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            d
        };
        if reason == "auth" || reason == "token" || reason == "tls" || reason == "root_cert" {
            tracing::error!(stream = status.stream.name(), retry_in = ?delay, "control plane refused the gateway: {why}");
        } else {
            tracing::warn!(stream = status.stream.name(), retry_in = ?delay, "control plane stream ended: {why}; the last configuration keeps serving");
        }
        tokio::time::sleep(delay).await;
    }
}

fn status_reason(s: &tonic::Status) -> &'static str {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => "auth",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => "closed",
        _ => "error",
    }
}

fn describe_status(s: &tonic::Status) -> String {
    let hint = match s.code() {
        tonic::Code::Unauthenticated => {
            " (token rejected: check the projected token's audience is istio-ca and it is not expired)"
        }
        tonic::Code::PermissionDenied => {
            " (the token's identity does not match the node: check NAMESPACE and SERVICE_ACCOUNT)"
        }
        _ => "",
    };
    format!("{:?}: {}{hint}", s.code(), s.message())
}

/// One stream, from connect to its end.
async fn session(d: &Discovery, status: &Arc<Status>, state: &mut State, feed: &Feed) -> End {
    let channel = match connect::channel(&d.server).await {
        Ok(c) => c,
        Err(e) => return End::Open(e.to_string(), e.reason()),
    };
    let headers = match connect::headers(&d.server) {
        Ok(h) => h,
        Err(e @ ConnectError::Token { .. }) => return End::Open(e.to_string(), "token"),
        Err(e) => return End::Open(e.to_string(), e.reason()),
    };
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    state.subscribed_eds.clear();
    status.lock().streams += 1;
    match d.protocol {
        XdsProtocol::Delta => delta(d, status, state, feed, &mut client, headers).await,
        XdsProtocol::StateOfTheWorld => sotw(d, status, state, feed, &mut client, headers).await,
    }
}

type Headers = Vec<(
    &'static str,
    tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
)>;

fn with_headers<T>(body: T, headers: Headers) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    for (k, v) in headers {
        req.metadata_mut().insert(k, v);
    }
    req
}

/// The xDS `Node` istiod identifies the gateway by.
pub fn node(d: &Discovery) -> core::Node {
    let s = |v: &str| PbValue {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    let mut fields: HashMap<String, PbValue> = d
        .node
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "PROXY_CONFIG")
        .map(|(k, v)| (k.clone(), s(v)))
        .collect();
    fields.insert("PROXY_CONFIG".into(), proxy_config(d));
    fields.insert(
        "LABELS".into(),
        PbValue {
            kind: Some(Kind::StructValue(Struct {
                fields: d
                    .node
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), s(v)))
                    .collect(),
            })),
        },
    );
    core::Node {
        id: d.node.id.clone(),
        cluster: d.node.cluster.clone(),
        metadata: Some(Struct { fields }),
        user_agent_name: "strait".into(),
        user_agent_version_type: Some(core::node::UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").into(),
        )),
        ..core::Node::default()
    }
}

/// `PROXY_CONFIG`, the proxy's Istio `ProxyConfig` as pilot-agent sends it: istiod
/// lists only nodes that carry one in `istioctl proxy-status` (`isProxy`), and parses it
/// strictly, so it is an object, never a string. What strait knows of its own
/// (`discoveryAddress`, `serviceCluster`), with a `PROXY_CONFIG` from `ISTIO_META_*` or
/// `discovery.node.metadata` (a JSON object) laid over it.
fn proxy_config(d: &Discovery) -> PbValue {
    let mut config = serde_json::json!({
        "discoveryAddress": d.server.address,
        "serviceCluster": d.node.cluster,
    });
    if let (Some(serde_json::Value::Object(given)), Some(obj)) = (
        d.node
            .metadata
            .get("PROXY_CONFIG")
            .and_then(|v| serde_json::from_str(v).ok()),
        config.as_object_mut(),
    ) {
        obj.extend(given);
    }
    json_value(&config)
}

/// A JSON value as a protobuf `Value`.
fn json_value(v: &serde_json::Value) -> PbValue {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect(),
        }),
    };
    PbValue { kind: Some(kind) }
}

/// Applies one resource; `name` is the one delta sends beside it (SotW has none), put
/// in front of an error that cannot name the resource itself (a ClusterLoadAssignment
/// without `cluster_name`).
fn apply_one(
    state: &mut State,
    type_url: &str,
    name: Option<&str>,
    any: Option<&Any>,
    version: &str,
) -> Result<String, String> {
    let any =
        any.ok_or_else(|| format!("{}: resource without a body", name.unwrap_or("resource")))?;
    let applied = apply_body(state, type_url, any).map_err(|e| match name {
        Some(n) if !n.is_empty() && !e.contains(n) => format!("resource {n}: {e}"),
        _ => e,
    })?;
    if let Some(t) = static_type(type_url) {
        state.accepted().entry(t).or_default().insert(
            applied.clone(),
            Accepted {
                version: version.to_string(),
                value: any.value.clone(),
                at: SystemTime::now(),
            },
        );
    }
    Ok(applied)
}

fn apply_body(state: &mut State, type_url: &str, any: &Any) -> Result<String, String> {
    let waypoint = state.stream == Stream::Waypoint;
    match type_url {
        translate::LISTENER => {
            let (name, read) = if waypoint {
                translate::waypoint::listener(any)?
            } else {
                translate::listener(any)?
            };
            state.structure_changed = true;
            state.held.listeners.insert(name.clone(), read.value);
            if read.problems.is_empty() {
                Ok(name)
            } else {
                Err(read.problems.join("; "))
            }
        }
        translate::CLUSTER => {
            let (name, read) = if waypoint {
                translate::waypoint::cluster(any)?
            } else {
                translate::cluster(any)?
            };
            state.structure_changed = true;
            state.held.clusters.insert(name.clone(), read.value);
            Ok(name)
        }
        translate::ENDPOINTS => {
            let (name, read) = if waypoint {
                translate::waypoint::endpoints(any)?
            } else {
                translate::endpoints(any)?
            };
            state.endpoints_changed.insert(name.clone());
            state.held.endpoints.insert(name.clone(), read.value);
            Ok(name)
        }
        other => Err(format!("type {other} is not one strait subscribes to")),
    }
}

fn remove(state: &mut State, type_url: &str, name: &str) {
    if let Some(held) = state.accepted().get_mut(type_url) {
        held.remove(name);
    }
    match type_url {
        translate::LISTENER => {
            state.structure_changed |= state.held.listeners.remove(name).is_some();
        }
        translate::CLUSTER => {
            state.structure_changed |= state.held.clusters.remove(name).is_some();
        }
        translate::ENDPOINTS if state.held.endpoints.remove(name).is_some() => {
            state.endpoints_changed.insert(name.to_string());
        }
        _ => {}
    }
}

fn static_type(type_url: &str) -> Option<&'static str> {
    [
        translate::LISTENER,
        translate::CLUSTER,
        translate::ENDPOINTS,
    ]
    .into_iter()
    .find(|t| *t == type_url)
}

/// EDS names wanted now, with the time each was first wanted; drops endpoints of
/// clusters that are gone.
fn wanted_eds(state: &mut State) -> BTreeSet<String> {
    let wanted = state.held.eds_names();
    let now = Instant::now();
    state.wanted_since.retain(|n, _| wanted.contains(n));
    for n in &wanted {
        state.wanted_since.entry(n.clone()).or_insert(now);
    }
    state.held.endpoints.retain(|n, _| wanted.contains(n));
    if let Some(held) = state.accepted().get_mut(translate::ENDPOINTS) {
        held.retain(|n, _| wanted.contains(n));
    }
    if let Some(v) = state.versions.get_mut(translate::ENDPOINTS) {
        v.retain(|n, _| wanted.contains(n));
    }
    wanted
}

/// Records an ACK or NACK in status and metrics.
fn record(
    status: &Status,
    state: &State,
    type_url: &str,
    version: &str,
    nonce: &str,
    error: Option<&str>,
) {
    let t = short_type(type_url);
    let count = match type_url {
        translate::LISTENER => state.held.listeners.len(),
        translate::CLUSTER => state.held.clusters.len(),
        translate::ENDPOINTS => state.held.endpoints.len(),
        _ => 0,
    };
    let m = &status.metrics;
    m.resources
        .with_label_values(&[m.stream, t])
        .set(count as i64);
    let mut s = status.lock();
    let ts = s.types.entry(t).or_default();
    ts.nonce = nonce.to_string();
    ts.resources = count;
    let now = SystemTime::now();
    // Valid resources were applied either way: the configuration's age restarts.
    ts.last_accepted = Some(now);
    m.last_accepted.with_label_values(&[m.stream, t]).set(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    );
    match error {
        None => {
            ts.acks += 1;
            ts.version = version.to_string();
            m.responses.with_label_values(&[m.stream, t, "ack"]).inc();
        }
        Some(e) => {
            ts.nacks += 1;
            ts.last_rejection = Some(Rejection {
                version: version.to_string(),
                nonce: nonce.to_string(),
                error: e.to_string(),
                at: now,
            });
            m.responses.with_label_values(&[m.stream, t, "nack"]).inc();
            tracing::warn!(
                stream = status.stream.name(),
                r#type = t,
                version,
                nonce,
                "rejected part of an xDS response: {e}"
            );
        }
    }
}

/// Assembles and publishes the held configuration, and readiness with it.
fn publish(d: &Discovery, status: &Status, state: &mut State, feed: &Feed) {
    let changed = if state.structure_changed {
        state.assembly.rebuild(&state.held);
        for c in &state.assembly.conflicts {
            tracing::warn!("{c}");
        }
        update_status(status, state);
        Changed::Everything
    } else {
        let rebuilt = state
            .assembly
            .update_endpoints(&state.held, &state.endpoints_changed);
        if !rebuilt.is_empty() {
            tracing::debug!(
                clusters = state.endpoints_changed.len(),
                service_ports = rebuilt.len(),
                "endpoints changed"
            );
        }
        Changed::Services(rebuilt)
    };
    let anything = changed != Changed::Services(BTreeSet::new());
    state.structure_changed = false;
    state.endpoints_changed.clear();
    let was_warm = state.warm;
    let waiting =
        if state.warm { None } else { warming(d, state) }.map(|w| status.stream.waiting(&w));
    status.lock().waiting = waiting.clone();
    if !anything
        && state.warm == was_warm
        && state
            .published
            .as_ref()
            .is_some_and(|p| p.waiting == waiting)
    {
        // A readiness tick with nothing new: the gateway already has this.
        return;
    }
    let published = Arc::new(Published {
        listeners: state.assembly.listeners.clone(),
        services: state.assembly.services.clone(),
        warm: state.warm,
        waiting,
    });
    state.published = Some(published.clone());
    feed.push(published, changed);
}

/// Why the gateway is not warm yet, or `None` (and `state.warm` set) once it is.
fn warming(d: &Discovery, state: &mut State) -> Option<String> {
    let now = Instant::now();
    let missing_types: Vec<&str> = [("LDS", translate::LISTENER), ("CDS", translate::CLUSTER)]
        .into_iter()
        .filter(|(_, t)| !state.received.contains(t))
        .map(|(n, _)| n)
        .collect();
    if !missing_types.is_empty() {
        return Some(format!(
            "config not received from XDS server: waiting for {}",
            missing_types.join(" and ")
        ));
    }
    let awaiting = state.assembly.awaiting_endpoints(&state.held);
    let late: Vec<&String> = awaiting
        .iter()
        .filter(|n| {
            state
                .wanted_since
                .get(*n)
                .is_none_or(|t| now.duration_since(*t) < d.initial_fetch_timeout)
        })
        .collect();
    if !late.is_empty() {
        let shown: Vec<&str> = late.iter().take(5).map(|s| s.as_str()).collect();
        return Some(format!(
            "config not received from XDS server: waiting for the endpoints of {} cluster(s): {}{}",
            late.len(),
            shown.join(", "),
            if late.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        ));
    }
    state.warm = true;
    if !awaiting.is_empty() {
        tracing::warn!(
            clusters = awaiting.len(),
            timeout = ?d.initial_fetch_timeout,
            "ready without the endpoints of some clusters: their initial fetch timed out"
        );
    }
    None
}

/// What `config_dump` shows of the listeners and clusters held.
fn update_status(status: &Status, state: &State) {
    let mut s = status.lock();
    s.not_served.clear();
    s.skipped.clear();
    s.ignored_filters.clear();
    s.listener_notes.clear();
    for (name, l) in &state.held.listeners {
        match l {
            Listener::NotServed(why) => {
                s.not_served.insert(name.clone(), why.clone());
            }
            Listener::Hbone(h) => {
                if !h.ignored_filters.is_empty() {
                    s.ignored_filters
                        .insert(name.clone(), h.ignored_filters.iter().cloned().collect());
                }
                if !h.notes.is_empty() {
                    s.listener_notes.insert(name.clone(), h.notes.clone());
                }
            }
            Listener::Authorities(m) => {
                if !m.skipped.is_empty() {
                    s.listener_notes.insert(name.clone(), m.skipped.clone());
                }
            }
            Listener::Served(l) => {
                if !l.skipped_chains.is_empty() {
                    s.skipped.insert(name.clone(), l.skipped_chains.clone());
                }
                if !l.ignored_filters.is_empty() {
                    s.ignored_filters
                        .insert(name.clone(), l.ignored_filters.iter().cloned().collect());
                }
            }
        }
    }
    s.cluster_notes = state
        .held
        .clusters
        .iter()
        .filter(|(_, c)| !c.notes.is_empty())
        .map(|(n, c)| (n.clone(), c.notes.clone()))
        .collect();
}

/// How long the stream may stay silent while a subscription is unanswered.
fn stalled(outstanding: &HashMap<&'static str, Instant>, d: &Discovery) -> Option<Instant> {
    outstanding.values().min().map(|t| *t + d.stall_timeout)
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn closed(e: tonic::Status, applied: bool) -> End {
    End::Closed {
        why: describe_status(&e),
        reason: status_reason(&e),
        applied,
    }
}

/// The next response on the stream. While the configuration is not warm yet, readiness
/// is re-published every tick on the way (the initial fetch timeout counts down). The
/// stream's end, an error, or a subscription left unanswered past `stallTimeout` end it.
#[allow(clippy::too_many_arguments)]
async fn next_response<M: prost::Message + Default + 'static>(
    stream: &mut tonic::Streaming<M>,
    outstanding: &HashMap<&'static str, Instant>,
    tick: &mut tokio::time::Interval,
    applied: bool,
    d: &Discovery,
    status: &Status,
    state: &mut State,
    feed: &Feed,
) -> Result<M, End> {
    loop {
        tokio::select! {
            m = stream.message() => return match m {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(End::Closed { why: "the control plane closed the stream".into(), reason: "closed", applied }),
                Err(e) => Err(closed(e, applied)),
            },
            () = sleep_until(stalled(outstanding, d)) => {
                return Err(End::Closed { why: format!("no answer to a subscription within {:?}", d.stall_timeout), reason: "stalled", applied });
            }
            _ = tick.tick(), if !state.warm => publish(d, status, state, feed),
        }
    }
}

/// The rejection of a response of a type nobody asked for.
fn not_subscribed(type_url: &str) -> RpcStatus {
    RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message: format!("type {type_url} was not subscribed to"),
        details: Vec::new(),
    }
}

async fn delta(
    d: &Discovery,
    status: &Arc<Status>,
    state: &mut State,
    feed: &Feed,
    client: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    headers: Headers,
) -> End {
    let (out, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    let mut outstanding: HashMap<&'static str, Instant> = HashMap::new();
    let now = Instant::now();
    let initial = |state: &State, t: &str| -> HashMap<String, String> {
        state
            .versions
            .get(t)
            .map(|v| v.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    // Clusters first, then listeners (Envoy's order), each a wildcard subscription.
    for (i, t) in [translate::CLUSTER, translate::LISTENER]
        .into_iter()
        .enumerate()
    {
        let _ = out.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(d)),
            type_url: t.to_string(),
            initial_resource_versions: initial(state, t),
            ..Default::default()
        });
        outstanding.insert(t, now);
    }
    let eds = wanted_eds(state);
    if !eds.is_empty() {
        let _ = out.send(DeltaDiscoveryRequest {
            type_url: translate::ENDPOINTS.into(),
            resource_names_subscribe: eds.iter().cloned().collect(),
            initial_resource_versions: initial(state, translate::ENDPOINTS),
            ..Default::default()
        });
        outstanding.insert(translate::ENDPOINTS, now);
        state.subscribed_eds = eds;
    }
    let req = with_headers(UnboundedReceiverStream::new(rx), headers);
    let mut stream = match client.delta_aggregated_resources(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => return closed(e, false),
    };
    status.lock().connected = true;
    status.metrics.connected().set(1);
    let mut applied = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let msg: DeltaDiscoveryResponse = match next_response(
            &mut stream,
            &outstanding,
            &mut tick,
            applied,
            d,
            status,
            state,
            feed,
        )
        .await
        {
            Ok(m) => m,
            Err(end) => return end,
        };
        let Some(t) = static_type(&msg.type_url) else {
            let _ = out.send(DeltaDiscoveryRequest {
                type_url: msg.type_url.clone(),
                response_nonce: msg.nonce.clone(),
                error_detail: Some(not_subscribed(&msg.type_url)),
                ..Default::default()
            });
            continue;
        };
        outstanding.remove(t);
        let mut problems = Vec::new();
        for r in &msg.resources {
            match apply_one(state, t, Some(&r.name), r.resource.as_ref(), &r.version) {
                Ok(name) => {
                    state
                        .versions
                        .entry(t)
                        .or_default()
                        .insert(name, r.version.clone());
                }
                Err(e) => problems.push(e),
            }
        }
        for name in &msg.removed_resources {
            remove(state, t, name);
            if let Some(v) = state.versions.get_mut(t) {
                v.remove(name);
            }
        }
        state.received.insert(t);
        applied = true;
        let error = (!problems.is_empty()).then(|| problems.join("\n"));
        let _ = out.send(DeltaDiscoveryRequest {
            type_url: t.to_string(),
            response_nonce: msg.nonce.clone(),
            error_detail: error.as_ref().map(|e| RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message: e.clone(),
                details: Vec::new(),
            }),
            ..Default::default()
        });
        record(
            status,
            state,
            t,
            &msg.system_version_info,
            &msg.nonce,
            error.as_deref(),
        );
        if t != translate::ENDPOINTS {
            let wanted = wanted_eds(state);
            let subscribe: Vec<String> =
                wanted.difference(&state.subscribed_eds).cloned().collect();
            let unsubscribe: Vec<String> =
                state.subscribed_eds.difference(&wanted).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                let _ = out.send(DeltaDiscoveryRequest {
                    type_url: translate::ENDPOINTS.into(),
                    resource_names_subscribe: subscribe.clone(),
                    resource_names_unsubscribe: unsubscribe,
                    ..Default::default()
                });
                if !subscribe.is_empty() {
                    outstanding.insert(translate::ENDPOINTS, Instant::now());
                }
                state.subscribed_eds = wanted;
            }
        }
        publish(d, status, state, feed);
    }
}

async fn sotw(
    d: &Discovery,
    status: &Arc<Status>,
    state: &mut State,
    feed: &Feed,
    client: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    headers: Headers,
) -> End {
    let (out, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
    let mut outstanding: HashMap<&'static str, Instant> = HashMap::new();
    let now = Instant::now();
    // A new stream starts with empty nonces; the versions held tell istiod what we have.
    for (i, t) in [translate::CLUSTER, translate::LISTENER]
        .into_iter()
        .enumerate()
    {
        let version = state
            .sotw
            .get(t)
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        let _ = out.send(DiscoveryRequest {
            node: (i == 0).then(|| node(d)),
            type_url: t.to_string(),
            version_info: version,
            ..Default::default()
        });
        outstanding.insert(t, now);
    }
    let eds = wanted_eds(state);
    if !eds.is_empty() {
        let version = state
            .sotw
            .get(translate::ENDPOINTS)
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        let _ = out.send(DiscoveryRequest {
            type_url: translate::ENDPOINTS.into(),
            version_info: version,
            resource_names: eds.iter().cloned().collect(),
            ..Default::default()
        });
        outstanding.insert(translate::ENDPOINTS, now);
        state.subscribed_eds = eds;
    }
    for (_, nonce) in state.sotw.values_mut() {
        nonce.clear();
    }
    let req = with_headers(UnboundedReceiverStream::new(rx), headers);
    let mut stream = match client.stream_aggregated_resources(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => return closed(e, false),
    };
    status.lock().connected = true;
    status.metrics.connected().set(1);
    let mut applied = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let msg: DiscoveryResponse = match next_response(
            &mut stream,
            &outstanding,
            &mut tick,
            applied,
            d,
            status,
            state,
            feed,
        )
        .await
        {
            Ok(m) => m,
            Err(end) => return end,
        };
        let Some(t) = static_type(&msg.type_url) else {
            let _ = out.send(DiscoveryRequest {
                type_url: msg.type_url.clone(),
                response_nonce: msg.nonce.clone(),
                error_detail: Some(not_subscribed(&msg.type_url)),
                ..Default::default()
            });
            continue;
        };
        outstanding.remove(t);
        let mut problems = Vec::new();
        let mut present = BTreeSet::new();
        for any in &msg.resources {
            match apply_one(state, t, None, Some(any), &msg.version_info) {
                Ok(name) => {
                    present.insert(name);
                }
                Err(e) => {
                    // The name of a resource that failed to decode is unknown, so a
                    // listener or cluster held under it cannot be told apart from one
                    // the set dropped: keep every held one whose name the error text
                    // names.
                    problems.push(e);
                }
            }
        }
        // Listeners and clusters: the response is the whole set.
        if t != translate::ENDPOINTS {
            let held: Vec<String> = match t {
                translate::LISTENER => state.held.listeners.keys().cloned().collect(),
                _ => state.held.clusters.keys().cloned().collect(),
            };
            for name in held {
                if !present.contains(&name) && !problems.iter().any(|p| p.contains(&name)) {
                    remove(state, t, &name);
                }
            }
        }
        state.received.insert(t);
        applied = true;
        let error = (!problems.is_empty()).then(|| problems.join("\n"));
        let previous = state
            .sotw
            .get(t)
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        let version = if error.is_none() {
            msg.version_info.clone()
        } else {
            previous
        };
        state.sotw.insert(t, (version.clone(), msg.nonce.clone()));
        let names: Vec<String> = if t == translate::ENDPOINTS {
            state.subscribed_eds.iter().cloned().collect()
        } else {
            Vec::new()
        };
        let _ = out.send(DiscoveryRequest {
            type_url: t.to_string(),
            version_info: version,
            resource_names: names,
            response_nonce: msg.nonce.clone(),
            error_detail: error.as_ref().map(|e| RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message: e.clone(),
                details: Vec::new(),
            }),
            ..Default::default()
        });
        record(
            status,
            state,
            t,
            &msg.version_info,
            &msg.nonce,
            error.as_deref(),
        );
        if t != translate::ENDPOINTS {
            let wanted = wanted_eds(state);
            if wanted != state.subscribed_eds {
                let added = wanted.difference(&state.subscribed_eds).next().is_some();
                let (version, nonce) = state
                    .sotw
                    .get(translate::ENDPOINTS)
                    .cloned()
                    .unwrap_or_default();
                let _ = out.send(DiscoveryRequest {
                    type_url: translate::ENDPOINTS.into(),
                    version_info: version,
                    resource_names: wanted.iter().cloned().collect(),
                    response_nonce: nonce,
                    ..Default::default()
                });
                if added {
                    outstanding.insert(translate::ENDPOINTS, Instant::now());
                }
                state.subscribed_eds = wanted;
            }
        }
        publish(d, status, state, feed);
    }
}
