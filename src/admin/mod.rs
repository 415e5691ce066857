//! Status (`/healthz/ready`), metrics (`/stats/prometheus`) and admin (`/config_dump`,
//! `/clusters`) HTTP servers.
//!
//! They run on their own thread and runtime, so a scrape or a slow admin client never
//! takes time from the data path. Each server bounds its connections, header size and
//! header read time.

mod dump;
mod envoy_dump;
mod envoy_files;
pub mod explain;
pub mod proto_json;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::proxy::Shared;
use crate::telemetry::EndpointSample;

/// Which endpoints a server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Status,
    Metrics,
    Admin,
}

const MAX_CONNECTIONS: usize = 256;

/// Binds the three servers (merging roles that share an address) and serves them on a
/// dedicated thread. Binding happens before this returns, so a port in use is an error here.
pub fn start(shared: Arc<Shared>, addrs: &[(Role, SocketAddr)]) -> std::io::Result<()> {
    let mut grouped: Vec<(SocketAddr, Vec<Role>)> = Vec::new();
    for &(role, addr) in addrs {
        match grouped.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, roles)) => roles.push(role),
            None => grouped.push((addr, vec![role])),
        }
    }
    let mut listeners = Vec::new();
    for (addr, roles) in grouped {
        // SO_REUSEPORT, like the gateway listeners: a replacement process binds these
        // ports while this one drains.
        let l = crate::proxy::bind_reuseport(addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {addr} for {}: {}",
                    roles
                        .iter()
                        .map(|r| format!("{r:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join("/"),
                    match e.kind() {
                        std::io::ErrorKind::AddrInUse =>
                            "address already in use by another program".to_string(),
                        std::io::ErrorKind::PermissionDenied =>
                            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
                                .to_string(),
                        _ => e.to_string(),
                    }
                ),
            )
        })?;
        listeners.push((l, roles));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("strait-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, roles) in listeners {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => tasks.push(tokio::spawn(serve(l, roles, shared.clone()))),
                        Err(e) => tracing::error!(error = %e, "admin listener"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })?;
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, roles: Vec<Role>, shared: Arc<Shared>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let roles: Arc<[Role]> = roles.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Over the limit, close at once rather than queue.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let roles = roles.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let roles = roles.clone();
                async move { Ok::<_, Infallible>(respond(&req, &roles, &shared)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 * 1024)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            // A whole exchange is bounded too, so a slow reader cannot hold a slot forever.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(permit);
        });
    }
}

fn respond(req: &Request<Incoming>, roles: &[Role], shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path();
    let has = |r: Role| roles.contains(&r);
    match path {
        "/healthz/ready" if has(Role::Status) => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if shared.drain_state() != crate::proxy::DrainState::Serving {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if let Some(why) = shared.not_ready_because() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {why}\n"),
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/stats/prometheus" | "/metrics" if has(Role::Metrics) => {
            refresh_endpoint_metrics(shared);
            let body = shared.telemetry.metrics.render();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/config_dump" if has(Role::Admin) => {
            let include_eds = query_has(req.uri().query(), "include_eds");
            json(dump::config_dump(shared, include_eds))
        }
        "/route" if has(Role::Admin) => route(req.uri().query().unwrap_or(""), shared),
        "/clusters" if has(Role::Admin) => json(dump::clusters(shared)),
        "/ready" if has(Role::Admin) => {
            let state = if shared.is_ready() {
                "LIVE"
            } else {
                "DRAINING"
            };
            text(StatusCode::OK, &format!("{state}\n"))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Samples every declared endpoint's outlier state into the endpoint gauges. Endpoint
/// state is shared by a service's clusters, so the all-endpoints cluster and the
/// tunnels' (which alone holds the endpoints reached by tunnels only) cover them.
fn refresh_endpoint_metrics(shared: &Shared) {
    let runtime = shared.runtime.load();
    let endpoints: Vec<(&str, u16, String, bool, u64)> = runtime
        .clusters
        .iter()
        .flat_map(|(key, clusters)| {
            let tunnels_only = clusters.tunnels.iter().flat_map(|c| {
                c.members
                    .iter()
                    .filter(|m| m.endpoint.reach == crate::model::Reach::Tunnels)
            });
            clusters
                .all
                .members
                .iter()
                .chain(tunnels_only)
                .map(move |m| {
                    (
                        key.host.as_str(),
                        key.port,
                        m.endpoint.authority(),
                        !m.state.is_ejected(),
                        u64::from(m.state.ejection_count()),
                    )
                })
        })
        .collect();
    shared.telemetry.metrics.set_endpoints(endpoints.iter().map(
        |(service, port, endpoint, healthy, ejections)| EndpointSample {
            service,
            port: *port,
            endpoint,
            healthy: *healthy,
            ejections: *ejections,
        },
    ));
}

/// `/route?sni=NAME[&alpn=a,b][&source=VALUE]`: `strait route` against the snapshot in
/// force (`source`: a tunnel's `x-istio-source`). 200 when the name routes, 404 when it
/// does not.
fn route(query: &str, shared: &Shared) -> Response<Full<Bytes>> {
    let mut sni = None;
    let mut source = None;
    let mut alpn = vec!["istio".to_string()];
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sni", v)) => sni = Some(v.to_string()),
            Some(("source", v)) => source = Some(v.to_string()),
            Some(("alpn", v)) => {
                alpn = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            _ => {}
        }
    }
    let Some(sni) = sni.filter(|s| !s.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "usage: /route?sni=NAME[&alpn=a,b]\n",
        );
    };
    let runtime = shared.runtime.load();
    let report = explain::explain_running(
        &runtime.snapshot,
        &sni,
        &alpn,
        source.as_deref(),
        dump::clusters(shared),
    );
    let status = if report.routes {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    };
    text(status, &report.text)
}

/// Whether a query string names `key` (`?include_eds`, `?include_eds=true`).
fn query_has(query: Option<&str>, key: &str) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .any(|kv| kv.split('=').next() == Some(key))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r
}

fn json(value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}
