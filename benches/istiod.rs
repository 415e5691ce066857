//! xDS from the real istiod: strait and Envoy as network1's east-west gateway of a mesh
//! of S services, configured by Istio's own control plane (the Go harness of
//! `interop/`, as in `tests/istiod.rs`), in one run, one table.
//!
//! Run with `cargo bench --bench istiod` as root (network namespaces; see
//! `benches/README.md`). istiod (with [`IstiodOptions::istio_proxy_extensions`] off, so
//! that upstream Envoy accepts its output) starts with the mesh already in its watched
//! directory: for each of S services a `ServiceEntry` (`MESH_INTERNAL`, `STATIC`, TCP
//! 9080, `workloadSelector`), 2 or 3 `WorkloadEntry`s in network1 (10.1.x.y, never
//! dialled; versions v1, v2 and, for every other service, v3) and a `DestinationRule`
//! with subsets v1–v3; plus Istio's `expose-services.yaml`. strait and Envoy run in
//! spokes of a [`Lab`], istiod, its debug port and this process in the hub.
//!
//! Per round (the order of the proxies alternates from round to round):
//!
//! 1. **Initial sync**, each proxy in turn, istiod's xDS cache cleared before each
//!    (`/debug/cachez?clear=true`) so that neither inherits what istiod generated for
//!    the other: from spawning the proxy until istiod's `/debug/syncz` shows it SYNCED
//!    on LDS, CDS and EDS (polled every 10 ms), its CPU to then (`/proc/PID/stat`) and
//!    its `VmRSS` once settled.
//! 2. **Push → ACK**, both connected: `STRAIT_ISTIOD_BENCH_UPDATES` times one new
//!    `WorkloadEntry` for another service, written as a file; from the file's rename
//!    to the moment syncz shows, for each proxy, a nonce sent that differs from before
//!    the write on some type and every type acked. This includes istiod's file watch
//!    (a fixed 250 ms debounce, then a re-read of every file), its push debounce
//!    (`PILOT_DEBOUNCE_AFTER`, 20 ms here) and its push context: nothing is subtracted.
//!    istiod's log dates each step ("Triggering reload of file configuration", "Push
//!    debounce stable", "XDS: Pushing"), so the table also shows push start → ACK per
//!    proxy, and `pilot_xds_push_time` (`:15014/metrics`) istiod's own generate-and-send
//!    time per proxy and type.
//!
//! The proxies run under `taskset -c 0` (through wrapper scripts that `exec`, so the
//! PIDs stay the proxies'; checked in `/proc/PID/comm`), strait with `workers: 1` and
//! Envoy with `--concurrency 1`; this process, and istiod with it, on CPU 1.
//!
//! Environment:
//! - `STRAIT_ISTIOD_BENCH_SERVICES` (1000): S.
//! - `STRAIT_ISTIOD_BENCH_UPDATES` (10): pushes measured per round.
//! - `STRAIT_ISTIOD_BENCH_ROUNDS` (1).
//! - `STRAIT_ISTIOD_BENCH_FILES` (`few`): `few` writes the mesh as one multi-document
//!   file per kind, `many` as one file per object.
//! - `STRAIT_ISTIOD_BENCH_PROXIES` (`strait,envoy`).
//! - `STRAIT_ISTIOD_BENCH_TIMEOUT` (180): seconds a sync may take.
//! - `STRAIT_BIN` (this build's release strait), `STRAIT_TEST_ENVOY`,
//!   `STRAIT_TEST_ISTIOD` (else `target/istiod-harness`).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use common::istiod::{
    EXPOSE_SERVICES, Istiod, IstiodOptions, Lab, PilotAgent, Spoke, envoy_gateway,
    launch_strait_gateway, peers_present, sync_problems,
};
use common::xds::{Envoy, envoy_bin};
use common::{Strait, TempDir};
use support::{
    alive, cpu_secs, env_usize, loadavg, median, on_path, pin_self_to, pinned_wrapper,
    proc_status_kib, settled_rss, strait_bin,
};

/// The CPU the proxies run on; this process and istiod take the other one.
const PROXY_CPU: usize = 0;
const BENCH_CPU: usize = 1;
/// How often syncz is read while waiting.
const POLL: Duration = Duration::from_millis(10);
/// What one push may take before it counts as lost.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(30);
const STRAIT_POD: &str = "istio-eastwestgateway-strait";
const ENVOY_POD: &str = "istio-eastwestgateway-envoy";

// ---------------------------------------------------------------------------------------
// The mesh, as Istio YAML

/// Address `n` of a range starting at `10.<first>.0.0`: unique, never dialled.
fn address(first: u8, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, first + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn service_entry(i: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}, namespace: bench}}
spec:
  hosts: [svc{i}.bench.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: tcp, protocol: TCP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: svc{i}}}}}
"
    )
}

fn workload_entry(name: &str, service: usize, version: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: bench}}
spec:
  address: {ip}
  network: network1
  serviceAccount: svc{service}
  labels: {{app: svc{service}, version: {version}}}
"
    )
}

fn destination_rule(i: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc{i}, namespace: bench}}
spec:
  host: svc{i}.bench.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
"
    )
}

/// Service `i`'s WorkloadEntries: v1, v2, and v3 for every other service.
fn entries_of(i: usize) -> usize {
    2 + i % 2
}

/// The mesh as `(file name, YAML)`: one multi-document file per kind (`few`), or one
/// file per object.
fn mesh_files(services: usize, one_per_object: bool) -> Vec<(String, String)> {
    let mut files = vec![(
        "expose-services.yaml".to_string(),
        EXPOSE_SERVICES.to_string(),
    )];
    let mut by_kind: [Vec<(String, String)>; 3] = Default::default();
    let mut n = 0;
    for i in 0..services {
        by_kind[0].push((format!("se-svc{i}.yaml"), service_entry(i)));
        for j in 0..entries_of(i) {
            let version = format!("v{}", j + 1);
            let name = format!("svc{i}-{version}");
            n += 1;
            by_kind[1].push((
                format!("we-{name}.yaml"),
                workload_entry(&name, i, &version, address(1, n)),
            ));
        }
        by_kind[2].push((format!("dr-svc{i}.yaml"), destination_rule(i)));
    }
    for (kind, objects) in ["service-entries", "workload-entries", "destination-rules"]
        .into_iter()
        .zip(by_kind)
    {
        if one_per_object {
            files.extend(objects);
        } else {
            let docs: Vec<String> = objects.into_iter().map(|(_, y)| y).collect();
            files.push((format!("{kind}.yaml"), docs.join("---\n")));
        }
    }
    files
}

// ---------------------------------------------------------------------------------------
// Proxies

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
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

    fn pod(self) -> &'static str {
        match self {
            Kind::Strait => STRAIT_POD,
            Kind::Envoy => ENVOY_POD,
        }
    }

    /// The id istiod gives it in syncz (`<pod>.<namespace>`).
    fn id(self) -> String {
        format!("{}.istio-system", self.pod())
    }
}

/// One running gateway; killed on drop (by the helpers' own `Drop`).
struct Proxy {
    kind: Kind,
    pid: u32,
    strait: Option<Strait>,
    envoy: Option<Envoy>,
}

impl Proxy {
    fn log_tail(&self) -> String {
        let text = match (&self.strait, &self.envoy) {
            (Some(s), _) => s.stderr_text(),
            (_, Some(e)) => e.log(),
            _ => String::new(),
        };
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Where the binaries are: `exec taskset -c PROXY_CPU <binary>` wrappers.
struct Binaries {
    strait: PathBuf,
    _dir: TempDir,
}

async fn start(kind: Kind, spoke: &Spoke, agent: &PilotAgent, bins: &Binaries) -> Proxy {
    match kind {
        Kind::Strait => {
            let strait = launch_strait_gateway(
                spoke,
                kind.pod(),
                "  workers: 1\n  accessLog: \"off\"\n",
                &bins.strait,
                &[("RUST_LOG", "warn")],
            );
            Proxy {
                kind,
                pid: strait.pid(),
                strait: Some(strait),
                envoy: None,
            }
        }
        Kind::Envoy => {
            let envoy = envoy_gateway(spoke, kind.pod(), agent)
                .await
                .expect("envoy (checked at start)");
            Proxy {
                kind,
                pid: envoy.pid,
                strait: None,
                envoy: Some(envoy),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// /proc

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// What istiod says

/// `id`'s syncz entry.
fn entry<'a>(syncz: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    syncz.as_array()?.iter().find(|p| p["proxy"] == id)
}

/// Per type URL, the nonce last sent.
fn sent(entry: &serde_json::Value) -> BTreeMap<String, String> {
    entry["resources"]
        .as_object()
        .map(|r| {
            r.iter()
                .map(|(t, s)| (t.clone(), s["sent"].as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn short(type_url: &str) -> &str {
    match type_url.rsplit('.').next().unwrap_or(type_url) {
        "Listener" => "LDS",
        "Cluster" => "CDS",
        "ClusterLoadAssignment" => "EDS",
        "RouteConfiguration" => "RDS",
        "Secret" => "SDS",
        other => other,
    }
}

/// The sum over every series of metric `name` (a counter, or a histogram's `_sum` or
/// `_count`) in Prometheus text.
fn metric_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// istiod's histograms this bench reads, totals of `_sum` (seconds) and `_count`.
#[derive(Default, Clone, Copy)]
struct PushMetrics {
    push_sum: f64,
    push_count: f64,
    context_sum: f64,
    context_count: f64,
}

async fn push_metrics(istiod: &Istiod) -> PushMetrics {
    let text = match istiod.debug("/metrics").await {
        Ok((200, body)) => body,
        _ => String::new(),
    };
    PushMetrics {
        push_sum: metric_total(&text, "pilot_xds_push_time_sum"),
        push_count: metric_total(&text, "pilot_xds_push_time_count"),
        context_sum: metric_total(&text, "pilot_pushcontext_init_seconds_sum"),
        context_count: metric_total(&text, "pilot_pushcontext_init_seconds_count"),
    }
}

/// Seconds since the Unix epoch of an istio log line's time stamp
/// (`2025-01-02T03:04:05.678901Z`, the first tab-separated field).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split('\t').next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + s)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The time of the first line of istiod's log at or after `after` containing `needle`.
fn first_after(log: &str, after: f64, needle: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(log_time)
        .find(|&t| t >= after)
}

/// What istiod logs from now on (its standard error, a file, read through
/// `/proc/PID/fd/2`).
struct LogTail {
    file: Option<std::fs::File>,
    pending: String,
}

impl LogTail {
    fn open(istiod: &Istiod) -> LogTail {
        use std::io::{Seek, SeekFrom};
        let file = istiod
            .pid()
            .and_then(|pid| std::fs::File::open(format!("/proc/{pid}/fd/2")).ok())
            .and_then(|mut f| f.seek(SeekFrom::End(0)).ok().map(|_| f));
        LogTail {
            file,
            pending: String::new(),
        }
    }

    /// Whether a line containing `needle` was written since the last call that saw one.
    fn saw(&mut self, needle: &str) -> bool {
        use std::io::Read;
        let Some(f) = self.file.as_mut() else {
            return false;
        };
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return false;
        }
        self.pending.push_str(&String::from_utf8_lossy(&buf));
        match self.pending.find(needle) {
            Some(i) => {
                self.pending.drain(..i + needle.len());
                true
            }
            None => {
                // Keep a partial line only.
                if let Some(nl) = self.pending.rfind('\n') {
                    self.pending.drain(..=nl);
                }
                false
            }
        }
    }
}

/// Waits until `/debug/syncz` shows no change for `quiet` (every proxy connected
/// steady), at most `within`.
async fn syncz_quiet(istiod: &Istiod, quiet: Duration, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = istiod.syncz().await;
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = istiod.syncz().await;
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// Waits until istiod's log has had no new line for `quiet` (its first push context
/// built and nothing left to process), at most `within`.
async fn log_quiet(istiod: &Istiod, quiet: Duration, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = istiod.log().len();
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = istiod.log().len();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The scenarios

struct Sync {
    secs: f64,
    cpu: Option<f64>,
    rss_mib: Option<f64>,
}

/// Starts `kind` and waits until istiod has it SYNCED.
async fn sync(
    kind: Kind,
    istiod: &Istiod,
    spoke: &Spoke,
    agent: &PilotAgent,
    bins: &Binaries,
    timeout: Duration,
) -> Result<(Proxy, Sync), String> {
    // Cold for each proxy: nothing istiod generated for the other is reused.
    let _ = istiod.debug("/debug/cachez?clear=true").await;
    let wall = unix(SystemTime::now());
    let started = Instant::now();
    let poll = async {
        let id = kind.id();
        loop {
            let syncz = istiod.syncz().await;
            if let Some(e) = entry(&syncz, &id)
                && sync_problems(e).is_empty()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(match entry(&syncz, &id) {
                    Some(e) => format!("not SYNCED after {timeout:?}: {:?}", sync_problems(e)),
                    None => format!("not connected after {timeout:?}"),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let (synced, proxy) = tokio::join!(poll, start(kind, spoke, agent, bins));
    let what = comm(proxy.pid);
    if !what.starts_with(kind.name()) {
        return Err(format!(
            "pid {} is {what:?}, not {}: the PID is not the proxy's",
            proxy.pid,
            kind.name()
        ));
    }
    let secs = match synced {
        Ok(d) => d.as_secs_f64(),
        Err(e) => return Err(format!("{e}\n{}", proxy.log_tail())),
    };
    if !alive(proxy.pid) {
        return Err(format!("exited after its sync:\n{}", proxy.log_tail()));
    }
    // Where the time went, as istiod saw it: each push to this proxy, ms after spawn.
    for line in istiod.log().lines().filter(|l| l.contains(kind.pod())) {
        if let Some(t) = log_time(line).filter(|&t| t >= wall)
            && (line.contains("PUSH") || line.contains("new connection"))
        {
            let what = line.rsplit('\t').next().unwrap_or(line);
            eprintln!("    +{:.0} ms {what}", (t - wall) * 1000.0);
        }
    }
    let cpu = cpu_secs(proxy.pid);
    let rss_mib = settled_rss(proxy.pid, Duration::from_secs(20))
        .await
        .map(|k| k / 1024.0);
    Ok((proxy, Sync { secs, cpu, rss_mib }))
}

/// One push, as each proxy and istiod saw it.
#[derive(Default)]
struct Push {
    /// Per proxy: write → ACK, ms, and the types whose nonce changed.
    ack: BTreeMap<&'static str, f64>,
    types: BTreeSet<String>,
    /// istiod's log, ms after the write: file reload, debounce stable, push start.
    reload: Option<f64>,
    stable: Option<f64>,
    pushing: Option<f64>,
    /// pilot_xds_push_time per proxy and type; pilot_pushcontext_init_seconds; ms.
    generate: Option<f64>,
    context: Option<f64>,
}

/// Writes WorkloadEntry `name` for `service` and waits until every proxy has acked
/// what istiod pushed for it.
async fn push(
    istiod: &Istiod,
    proxies: &[Kind],
    name: &str,
    service: usize,
    ip: Ipv4Addr,
) -> Result<Push, String> {
    let ids: Vec<(Kind, String)> = proxies.iter().map(|&k| (k, k.id())).collect();
    let before_syncz = istiod.syncz().await;
    let mut before = BTreeMap::new();
    for (kind, id) in &ids {
        let e = entry(&before_syncz, id).ok_or_else(|| format!("{} not connected", kind.name()))?;
        before.insert(*kind, sent(e));
    }
    let metrics0 = push_metrics(istiod).await;
    let yaml = workload_entry(name, service, "v1", ip);
    let mut log = LogTail::open(istiod);
    let wall = SystemTime::now();
    let t0 = Instant::now();
    istiod.apply(&format!("{name}.yaml"), &yaml);
    let mut out = Push::default();
    let mut pushing = false;
    loop {
        // Cheap until istiod starts pushing (its file watch alone takes 250 ms), then
        // syncz as often as it answers, so that each ACK is seen within a few ms.
        pushing = pushing || log.saw("XDS: Pushing") || t0.elapsed() > Duration::from_secs(2);
        if !pushing {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let syncz = istiod.syncz().await;
        let at = t0.elapsed();
        for (kind, id) in &ids {
            if out.ack.contains_key(kind.name()) {
                continue;
            }
            let Some(e) = entry(&syncz, id) else {
                return Err(format!("{} disconnected", kind.name()));
            };
            let now = sent(e);
            let changed: Vec<String> = now
                .iter()
                .filter(|(t, n)| before[kind].get(*t) != Some(*n))
                .map(|(t, _)| short(t).to_string())
                .collect();
            if !changed.is_empty() && sync_problems(e).is_empty() {
                out.ack.insert(kind.name(), at.as_secs_f64() * 1000.0);
                out.types.extend(changed);
            }
        }
        if out.ack.len() == ids.len() {
            break;
        }
        if at >= UPDATE_TIMEOUT {
            return Err(format!(
                "{name}: not acked by {:?} within {UPDATE_TIMEOUT:?}",
                ids.iter()
                    .filter(|(k, _)| !out.ack.contains_key(k.name()))
                    .map(|(k, _)| k.name())
                    .collect::<Vec<_>>()
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Let any follow-up push land before the next write; then read what istiod says.
    syncz_quiet(istiod, Duration::from_millis(300), Duration::from_secs(10)).await;
    let metrics1 = push_metrics(istiod).await;
    let per = |sum: f64, count: f64| (count > 0.0).then(|| sum * 1000.0 / count);
    out.generate = per(
        metrics1.push_sum - metrics0.push_sum,
        metrics1.push_count - metrics0.push_count,
    );
    out.context = per(
        metrics1.context_sum - metrics0.context_sum,
        metrics1.context_count - metrics0.context_count,
    );
    let log = istiod.log();
    let w = unix(wall);
    let ms = |t: Option<f64>| t.map(|t| (t - w) * 1000.0);
    let reload = first_after(&log, w, "Triggering reload of file configuration");
    let stable = reload.and_then(|r| first_after(&log, r, "Push debounce stable"));
    let pushing = stable.and_then(|s| first_after(&log, s, "XDS: Pushing"));
    out.reload = ms(reload);
    out.stable = ms(stable);
    out.pushing = ms(pushing);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Report

/// Measurements by (target, row), each tagged with its round (as in `benches/xds.rs`).
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

    /// `a ÷ b`, taken round by round, then the median of those ratios.
    fn ratio(&self, a: &str, b: &str, id: &str) -> Option<f64> {
        let of = |t: &str| self.0.get(&(t.to_string(), id.to_string()));
        let (va, vb) = (of(a)?, of(b)?);
        let ratios: Vec<f64> = va
            .iter()
            .filter_map(|&(r, x)| {
                let y = vb.iter().find(|&&(rb, _)| rb == r)?.1;
                (y != 0.0).then_some(x / y)
            })
            .collect();
        median(&ratios)
    }
}

struct Setup {
    services: usize,
    updates: usize,
    rounds: usize,
    timeout: Duration,
    one_per_object: bool,
    kinds: Vec<Kind>,
}

/// Everything measured, and istiod's own figures.
#[derive(Default)]
struct Results {
    cells: Cells,
    /// Per push, ms after the write: reload, stable, pushing; generate and context.
    reload: Vec<f64>,
    stable: Vec<f64>,
    pushing: Vec<f64>,
    generate: Vec<f64>,
    context: Vec<f64>,
    types: BTreeSet<String>,
    istiod_ready: f64,
    istiod_settled: f64,
    istiod_rss_mib: Option<f64>,
    errors: Vec<String>,
}

async fn run(lab: &Lab, setup: &Setup, bins: &Binaries) -> Results {
    let mut res = Results::default();
    let files = mesh_files(setup.services, setup.one_per_object);
    let bytes: usize = files.iter().map(|(_, y)| y.len()).sum();
    eprintln!(
        "mesh: {} services, {} files, {:.1} MiB of YAML",
        setup.services,
        files.len(),
        bytes as f64 / (1 << 20) as f64
    );
    let t = Instant::now();
    let istiod = Istiod::start_with(
        IstiodOptions {
            debounce: Some("20ms".into()),
            istio_proxy_extensions: false,
            kubernetes: false,
            ..Default::default()
        },
        &files,
    )
    .await;
    res.istiod_ready = t.elapsed().as_secs_f64();
    log_quiet(&istiod, Duration::from_secs(2), Duration::from_secs(120)).await;
    res.istiod_settled = t.elapsed().as_secs_f64() - 2.0;
    eprintln!(
        "istiod ready in {:.1} s, its log quiet from {:.1} s",
        res.istiod_ready, res.istiod_settled
    );
    let spokes: Vec<(Kind, Spoke)> = setup
        .kinds
        .iter()
        .map(|&k| (k, lab.spoke(k.name())))
        .collect();
    let spoke_of = |k: Kind| &spokes.iter().find(|(s, _)| *s == k).unwrap().1;
    let agent = PilotAgent::start(&istiod).await;
    let mut added = 0;
    for round in 0..setup.rounds {
        let mut order = setup.kinds.clone();
        let n = order.len().max(1);
        order.rotate_left(round % n);
        let mut running = Vec::new();
        for &kind in &order {
            let n = kind.name();
            eprintln!(
                "round {}/{}: {n} syncing (loadavg {})",
                round + 1,
                setup.rounds,
                loadavg()
            );
            match sync(kind, &istiod, spoke_of(kind), &agent, bins, setup.timeout).await {
                Ok((proxy, s)) => {
                    eprintln!(
                        "  {n} (pid {}) SYNCED in {:.2} s, CPU {:.2} s, RSS {:.1} MiB",
                        proxy.pid,
                        s.secs,
                        s.cpu.unwrap_or(f64::NAN),
                        s.rss_mib.unwrap_or(f64::NAN)
                    );
                    res.cells.put(n, "sync", round, Some(s.secs));
                    res.cells.put(n, "cpu", round, s.cpu);
                    res.cells.put(n, "rss", round, s.rss_mib);
                    running.push(proxy);
                }
                Err(e) => {
                    eprintln!("  error: {n}: {e}");
                    res.errors.push(format!("round {}: {n}: {e}", round + 1));
                }
            }
        }
        if running.is_empty() {
            continue;
        }
        // Both connected and steady before the first write.
        syncz_quiet(&istiod, Duration::from_secs(1), Duration::from_secs(30)).await;
        let kinds: Vec<Kind> = running.iter().map(|p| p.kind).collect();
        let mut acks: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut from_push: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for k in 0..setup.updates {
            // Spread over the mesh; a new WorkloadEntry (v1) of another service each time.
            let service = (k * 7919 + round * 104_729) % setup.services;
            added += 1;
            let name = format!("added-{added}-svc{service}");
            match push(&istiod, &kinds, &name, service, address(200, added)).await {
                Ok(p) => {
                    for (who, ms) in &p.ack {
                        acks.entry(who).or_default().push(*ms);
                        if let Some(start) = p.pushing {
                            from_push.entry(who).or_default().push(ms - start);
                        }
                    }
                    eprintln!(
                        "  push {}: {} ({}) ack {}; istiod reload {:.0}, stable {:.0}, pushing {:.0} ms; generate {:.2} ms per proxy and type",
                        k + 1,
                        name,
                        p.types.iter().cloned().collect::<Vec<_>>().join("+"),
                        p.ack
                            .iter()
                            .map(|(w, ms)| format!("{w} {ms:.0} ms"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        p.reload.unwrap_or(f64::NAN),
                        p.stable.unwrap_or(f64::NAN),
                        p.pushing.unwrap_or(f64::NAN),
                        p.generate.unwrap_or(f64::NAN),
                    );
                    res.reload.extend(p.reload);
                    res.stable.extend(p.stable);
                    res.pushing.extend(p.pushing);
                    res.generate.extend(p.generate);
                    res.context.extend(p.context);
                    res.types.extend(p.types);
                }
                Err(e) => {
                    eprintln!("  error: {e}");
                    res.errors.push(format!("round {}: {e}", round + 1));
                    break;
                }
            }
        }
        for kind in &kinds {
            let n = kind.name();
            res.cells
                .put(n, "ack", round, acks.get(n).and_then(|v| median(v)));
            res.cells.put(
                n,
                "from_push",
                round,
                from_push.get(n).and_then(|v| median(v)),
            );
        }
        for p in &running {
            let lines = p
                .strait
                .as_ref()
                .map_or(0, |s| s.stderr_text().lines().count());
            if lines > 0 {
                eprintln!(
                    "  note: strait wrote {lines} line(s) to stderr; last:\n{}",
                    p.log_tail()
                );
            }
        }
        drop(running);
        // Both disconnected before the next round's first sync.
        syncz_quiet(&istiod, Duration::from_millis(500), Duration::from_secs(10)).await;
    }
    res.istiod_rss_mib = istiod
        .pid()
        .and_then(|pid| proc_status_kib(pid, "VmRSS:"))
        .map(|k| k / 1024.0);
    let complaints: Vec<String> = setup
        .kinds
        .iter()
        .flat_map(|k| istiod.complaints_about(k.pod()))
        .collect();
    for c in complaints.iter().take(5) {
        eprintln!("istiod complained: {c}");
    }
    res
}

fn print_report(setup: &Setup, res: &Results) {
    let names: Vec<&str> = setup.kinds.iter().map(|k| k.name()).collect();
    let ratio = names.contains(&"strait") && names.contains(&"envoy");
    let rows = [
        ("sync", "initial sync (start → SYNCED)", "s"),
        ("cpu", "  proxy CPU to SYNCED", "s"),
        ("rss", "RSS after sync (settled)", "MiB"),
        ("ack", "push → ACK, median (file written)", "ms"),
        ("from_push", "  from istiod's push start", "ms"),
    ];
    print!("\n{:<40}{:<5}", "scenario", "unit");
    for n in &names {
        print!("{n:>11}");
    }
    if ratio {
        print!("{:>11}", "str/env");
    }
    println!();
    for (id, label, unit) in rows {
        print!("{label:<40}{unit:<5}");
        for n in &names {
            match res.cells.get(n, id) {
                Some(v) => print!("{v:>11.2}"),
                None => print!("{:>11}", "-"),
            }
        }
        if ratio {
            match res.cells.ratio("strait", "envoy", id) {
                Some(x) => print!("{x:>11.2}"),
                None => print!("{:>11}", "-"),
            }
        }
        println!();
    }
    let m = |v: &[f64]| median(v).map_or("-".to_string(), |x| format!("{x:.1}"));
    println!(
        "\nistiod, median over {} pushes (ms after the file's rename): file reload triggered {}, push debounce stable {}, XDS: Pushing {}; push context {} ms; generate + send (pilot_xds_push_time) {} ms per proxy and type; types pushed: {}",
        res.pushing.len(),
        m(&res.reload),
        m(&res.stable),
        m(&res.pushing),
        m(&res.context),
        m(&res.generate),
        res.types.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    println!(
        "istiod: ready {:.1} s after start, its log quiet from {:.1} s; RSS at the end {}",
        res.istiod_ready,
        res.istiod_settled,
        res.istiod_rss_mib
            .map_or("-".to_string(), |r| format!("{r:.0} MiB"))
    );
    for e in &res.errors {
        println!("\nerror: {e}");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --all-targets` runs this binary without `--bench`: a small mesh then,
    // which exercises every step; `cargo bench --bench istiod` measures.
    let smoke = !std::env::args().any(|a| a == "--bench");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the istiod bench needs root (network namespaces)");
        std::process::exit(if smoke { 0 } else { 2 });
    }
    if !on_path("taskset") {
        eprintln!("taskset (util-linux) is required to pin the proxies");
        std::process::exit(2);
    }
    if !peers_present() {
        std::process::exit(if smoke { 0 } else { 2 });
    }
    let services = env_usize(
        "STRAIT_ISTIOD_BENCH_SERVICES",
        if smoke { 50 } else { 1000 },
    )
    .max(1);
    let updates = env_usize("STRAIT_ISTIOD_BENCH_UPDATES", if smoke { 2 } else { 10 });
    let rounds = env_usize("STRAIT_ISTIOD_BENCH_ROUNDS", 1).max(1);
    let timeout = Duration::from_secs(env_usize("STRAIT_ISTIOD_BENCH_TIMEOUT", 180) as u64);
    let one_per_object = std::env::var("STRAIT_ISTIOD_BENCH_FILES")
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("many"));
    let wanted =
        std::env::var("STRAIT_ISTIOD_BENCH_PROXIES").unwrap_or_else(|_| "strait,envoy".into());
    let mut kinds = Vec::new();
    for (name, kind) in [("strait", Kind::Strait), ("envoy", Kind::Envoy)] {
        if wanted.split(',').any(|w| w.trim() == name) {
            kinds.push(kind);
        }
    }
    // Both binaries behind pinned wrappers; `envoy_gateway` runs what
    // `STRAIT_TEST_ENVOY` names.
    let dir = TempDir::new("istiod-bench");
    let real_envoy = envoy_bin().expect("checked by peers_present");
    let envoy = pinned_wrapper(&dir, "envoy", &real_envoy, PROXY_CPU);
    // SAFETY: no other thread exists yet (no runtime, no helpers started).
    unsafe { std::env::set_var("STRAIT_TEST_ENVOY", &envoy) };
    let real_strait = strait_bin();
    let bins = Binaries {
        strait: pinned_wrapper(&dir, "strait", &real_strait, PROXY_CPU),
        _dir: dir,
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        pin_self_to(BENCH_CPU);
    }
    let setup = Setup {
        services,
        updates,
        rounds,
        timeout,
        one_per_object,
        kinds,
    };
    println!(
        "strait istiod bench: the real istiod (interop/ harness), S = {services} services × (base + v1,v2,v3), 2–3 WorkloadEntries each, written as {}; {updates} pushes per round, {rounds} round(s); PILOT_DEBOUNCE_AFTER 20ms; proxies on CPU {PROXY_CPU}, istiod and the bench on CPU {BENCH_CPU}; loadavg at start {}",
        if one_per_object {
            "one file per object"
        } else {
            "one file per kind"
        },
        loadavg()
    );
    println!("strait: {}", real_strait.display());
    println!("envoy:  {}", real_envoy.display());
    let started = Instant::now();
    let lab = Lab::new("istiod-bench");
    let res = lab.run(|| run(&lab, &setup, &bins));
    print_report(&setup, &res);
    println!(
        "\nloadavg at end: {}; {:.0} s in all",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
}
