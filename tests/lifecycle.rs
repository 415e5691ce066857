//! Lifecycle under change, against the real binary: hot reload (files and ConfigMap-style
//! directories), drain on SIGTERM, restart by handing the listening sockets to a second process,
//! connection limits, descriptor exhaustion and a slow reader.
//!
//! Load comes from verified streams: each sends a ClientHello, then a known byte pattern
//! that a plain TCP echo upstream returns, so a lost, repeated or reordered byte shows.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

fn sni(host: &str) -> String {
    format!("outbound_.9080_._.{host}")
}

fn bootstrap(ports: &Ports, extra: &str) -> String {
    format!(
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: test}}\nspec:\n  status: 127.0.0.1:{}\n  metrics: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  connectTimeout: 1s\n{extra}",
        ports.status, ports.metrics, ports.admin
    )
}

/// A Gateway named `name` with one AUTO_PASSTHROUGH server on 127.0.0.1:`port`.
fn gateway(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: istio-system}}\nspec:\n  selector: {{istio: eastwestgateway}}\n  servers:\n  - port: {{number: {port}, name: tls, protocol: TLS}}\n    bind: 127.0.0.1\n    tls: {{mode: AUTO_PASSTHROUGH}}\n    hosts: [\"*.local\"]\n"
    )
}

/// A ServiceEntry for `host` port 9080 with one endpoint on 127.0.0.1:`port`.
fn service(host: &str, port: u16) -> String {
    let name = host.split('.').next().unwrap();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: 9080, name: tcp, protocol: TCP}}\n  endpoints:\n  - address: 127.0.0.1\n    ports: {{tcp: {port}}}\n    labels: {{security.istio.io/tlsMode: istio}}\n"
    )
}

fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts `n` long verified streams of `chunks` × `chunk` bytes, `pause` apart.
fn long_streams(
    gateway: SocketAddr,
    host: &str,
    n: u64,
    chunks: usize,
    chunk: usize,
    pause: Duration,
) -> Vec<JoinHandle<Result<u64, StreamFailure>>> {
    (0..n)
        .map(|seed| {
            let sni = sni(host);
            tokio::spawn(
                async move { echo_stream(gateway, &sni, seed, chunks, chunk, pause).await },
            )
        })
        .collect()
}

async fn expect_intact(streams: Vec<JoinHandle<Result<u64, StreamFailure>>>, bytes: u64) {
    for (i, s) in streams.into_iter().enumerate() {
        match s.await.unwrap() {
            Ok(n) => assert_eq!(n, bytes, "stream {i} verified {n} of {bytes} bytes"),
            Err(e) => panic!("stream {i} failed: {e:?}"),
        }
    }
}

/// Retries a short verified stream until it succeeds, up to `within`.
async fn route_works(gateway: SocketAddr, host: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let sni = sni(host);
    while Instant::now() < deadline {
        if echo_stream(gateway, &sni, 99, 2, 4096, Duration::ZERO)
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn refused_within(gateway: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(gateway).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

fn reloads(gw: &Strait, result: &str) -> f64 {
    gw.metric("strait_config_reloads_total", &[("result", result)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_a_drain_under_load_break_no_stream() {
    let reviews = RawEcho::start().await;
    let ratings = RawEcho::start().await;
    let ports = Ports::new();
    let second = free_port();
    let boot = bootstrap(&ports, "  drainDuration: 10s\n");
    let v1 = docs(&[
        boot.clone(),
        gateway("east-west", ports.gateway),
        service(REVIEWS, reviews.addr.port()),
    ]);
    let gw = Strait::start(ports, &v1);
    let path = gw.config_path();

    // Steady load: 16 streams of 56 × 8 KiB, 100 ms apart (about 6 s each).
    let streams = long_streams(
        gw.gateway,
        REVIEWS,
        16,
        56,
        8192,
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // (a) A valid reload adds a service and a second listener.
    let v2 = docs(&[
        boot.clone(),
        gateway("east-west", ports.gateway),
        gateway("east-west-2", second),
        service(REVIEWS, reviews.addr.port()),
        service(RATINGS, ratings.addr.port()),
    ]);
    replace_file(&path, &v2);
    assert!(
        route_works(addr(second), RATINGS, Duration::from_secs(5)).await,
        "the new listener and service should serve after the reload; stderr:\n{}",
        gw.stderr_text()
    );
    assert!(route_works(gw.gateway, RATINGS, Duration::from_secs(1)).await);
    assert!(ratings.accepted() >= 2);
    // The counter moves just after the new listener starts serving.
    assert!(gw.eventually(Duration::from_secs(5), || reloads(&gw, "success") >= 2.0));
    assert_eq!(reloads(&gw, "failure"), 0.0);

    // (b) An invalid reload keeps the previous configuration serving, says where, and
    // is counted.
    let broken = v2.replacen(
        "{number: 9080, name: tcp, protocol: TCP}",
        "{number: ninety, name: tcp, protocol: TCP}",
        1,
    );
    let bad_line = line_of(&broken, "ninety");
    replace_file(&path, &broken);
    assert!(
        gw.eventually(Duration::from_secs(5), || reloads(&gw, "failure") >= 1.0),
        "invalid reload not counted; stderr:\n{}",
        gw.stderr_text()
    );
    // The counter moves just before the log line is written.
    assert!(
        gw.eventually(Duration::from_secs(5), || gw
            .stderr_text()
            .contains("reload rejected")),
        "{}",
        gw.stderr_text()
    );
    let stderr = gw.stderr_text();
    assert!(
        stderr.contains(&format!("strait.yaml:{bad_line}:")),
        "the rejection should name file and line {bad_line}:\n{stderr}"
    );
    assert!(route_works(gw.gateway, REVIEWS, Duration::from_secs(1)).await);
    assert!(route_works(addr(second), RATINGS, Duration::from_secs(1)).await);

    // (c) SIGTERM: readiness fails at once, new connections are refused after the
    // accept overlap, live streams finish intact, and the exit is 0 inside drainDuration.
    let mut gw = gw;
    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    assert!(gw.eventually(Duration::from_millis(500), || {
        matches!(http_get(gw.status, "/healthz/ready"), Ok((503, _)))
    }));
    assert!(
        refused_within(gw.gateway, Duration::from_secs(3)).await,
        "still accepting 3 s after SIGTERM"
    );
    assert!(refused_within(addr(second), Duration::from_secs(1)).await);
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited while streams were still live"
    );
    expect_intact(streams, 56 * 8192).await;
    let code = gw.wait_exit(Duration::from_secs(10).saturating_sub(term.elapsed()));
    assert_eq!(
        code,
        Some(0),
        "no clean exit within drainDuration; stderr:\n{}",
        gw.stderr_text()
    );
}

/// Eight clients connecting back to back, each a short verified stream through
/// `gateway`, until `stop`; returns how many were served and every failure.
fn connect_continuously(
    gateway: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<(u64, Vec<StreamFailure>)>> {
    (0..8u64)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let sni = sni(REVIEWS);
                let (mut ok, mut failed) = (0u64, Vec::new());
                let mut seed = 1000 * (w + 1);
                while !stop.load(Ordering::Relaxed) {
                    seed += 1;
                    match echo_stream(gateway, &sni, seed, 2, 4096, Duration::ZERO).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

async fn served_and_failed(
    workers: Vec<JoinHandle<(u64, Vec<StreamFailure>)>>,
) -> (u64, Vec<StreamFailure>) {
    let mut served = 0;
    let mut failures = Vec::new();
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        served += ok;
        failures.extend(failed);
    }
    (served, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_takes_the_sockets_over_and_no_connection_is_refused() {
    let reviews = RawEcho::start().await;
    let ports = Ports::new();
    let config = docs(&[
        bootstrap(&ports, "  drainDuration: 10s\n"),
        gateway("east-west", ports.gateway),
        service(REVIEWS, reviews.addr.port()),
    ]);
    let sockets = TempDir::new("handover");
    let socket = sockets.path().join("strait.sock");
    let old_dir = TempDir::new("gw-old");
    let old_path = old_dir.write("strait.yaml", &config);
    let mut old = Strait::launch_handover(ports, old_dir, &[old_path], &socket);
    old.wait_ready(Duration::from_secs(20));
    assert!(
        !old.stderr_text().contains("handed over"),
        "a first process has nothing to inherit; stderr:\n{}",
        old.stderr_text()
    );

    // Long streams that must survive the old process's drain.
    let streams = long_streams(
        old.gateway,
        REVIEWS,
        8,
        40,
        8192,
        Duration::from_millis(100),
    );
    // New connections back to back through the whole hand-over, so the accept queue is
    // rarely empty at the moment the old process stops accepting.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = connect_continuously(old.gateway, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let new_dir = TempDir::new("gw-new");
    let new_path = new_dir.write("strait.yaml", &config);
    let new = Strait::launch_handover(ports, new_dir, &[new_path], &socket);
    assert!(
        new.wait_stderr("strait ready", Duration::from_secs(20)),
        "the second process did not start; stderr:\n{}",
        new.stderr_text()
    );
    assert!(
        new.stderr_text()
            .contains("listening on the socket handed over"),
        "the second process bound its own socket; stderr:\n{}",
        new.stderr_text()
    );
    // The old process drains without being signalled.
    assert!(
        old.wait_stderr("took the listeners over; draining", Duration::from_secs(5)),
        "old process stderr:\n{}",
        old.stderr_text()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);

    let (served, failures) = served_and_failed(workers).await;
    assert!(
        failures.is_empty(),
        "{} of {} connections failed during the hand-over: {:?}",
        failures.len(),
        served + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(served > 100, "only {served} connections made");
    expect_intact(streams, 40 * 8192).await;
    assert_eq!(
        old.wait_exit(Duration::from_secs(10)),
        Some(0),
        "old process stderr:\n{}",
        old.stderr_text()
    );
    // The new process took the traffic over and serves on its own, and holds the
    // hand-over socket for the next replacement.
    assert!(new.eventually(Duration::from_secs(5), || !new.access_log().is_empty()));
    assert!(route_works(new.gateway, REVIEWS, Duration::from_secs(1)).await);
    assert_eq!(http_get(new.status, "/healthz/ready").unwrap().0, 200);
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the hand-over socket is for its owner only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_cannot_start_leaves_the_old_process_serving() {
    let reviews = RawEcho::start().await;
    let ports = Ports::new();
    let good = docs(&[
        bootstrap(&ports, "  drainDuration: 5s\n"),
        gateway("east-west", ports.gateway),
        service(REVIEWS, reviews.addr.port()),
    ]);
    let sockets = TempDir::new("handover");
    let socket = sockets.path().join("strait.sock");
    let old_dir = TempDir::new("gw-old");
    let old_path = old_dir.write("strait.yaml", &good);
    let mut old = Strait::launch_handover(ports, old_dir, &[old_path], &socket);
    old.wait_ready(Duration::from_secs(20));

    // The replacement takes the sockets, then fails to bind a second listener on a port
    // another program holds, and exits before confirming.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let bad = docs(&[good.clone(), gateway("taken", taken)]);
    let bad_dir = TempDir::new("gw-bad");
    let bad_path = bad_dir.write("strait.yaml", &bad);
    let mut bad = Strait::launch_handover(ports, bad_dir, &[bad_path], &socket);
    let code = bad.wait_exit(Duration::from_secs(20));
    assert_ne!(code, Some(0), "stderr:\n{}", bad.stderr_text());
    // Exited, but its stderr may still be on its way through the pipe.
    assert!(
        bad.wait_stderr("address already in use", Duration::from_secs(5)),
        "stderr:\n{}",
        bad.stderr_text()
    );
    assert!(
        old.wait_stderr(
            "did not confirm the hand-over; still serving",
            Duration::from_secs(5)
        ),
        "old process stderr:\n{}",
        old.stderr_text()
    );
    // The old process still accepts, is still ready, and still hands over.
    assert!(route_works(old.gateway, REVIEWS, Duration::from_secs(1)).await);
    assert_eq!(http_get(old.status, "/healthz/ready").unwrap().0, 200);
    let new_dir = TempDir::new("gw-new");
    let new_path = new_dir.write("strait.yaml", &good);
    let new = Strait::launch_handover(ports, new_dir, &[new_path], &socket);
    assert!(
        new.wait_stderr(
            "listening on the socket handed over",
            Duration::from_secs(20)
        ),
        "stderr:\n{}",
        new.stderr_text()
    );
    assert_eq!(
        old.wait_exit(Duration::from_secs(10)),
        Some(0),
        "old process stderr:\n{}",
        old.stderr_text()
    );
    assert!(route_works(new.gateway, REVIEWS, Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_closes_open_connections_and_logs_each() {
    let reviews = RawEcho::start().await;
    let ports = Ports::new();
    let mut gw = Strait::start(
        ports,
        &docs(&[
            bootstrap(&ports, "  drainDuration: 1s\n"),
            gateway("east-west", ports.gateway),
            service(REVIEWS, reviews.addr.port()),
        ]),
    );
    // Three connections that stay open and silent through the drain.
    let hello = client_hello_bytes(&sni(REVIEWS), &["istio"]);
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.gateway).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut back = vec![0; hello.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, hello, "the echo upstream returns the ClientHello");
        open.push(s);
    }
    let term = Instant::now();
    gw.signal(libc::SIGTERM);
    for s in &mut open {
        assert!(
            read_until_close(s, Duration::from_secs(5)).await.is_some(),
            "a connection outlived the drain deadline"
        );
    }
    assert!(
        term.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the 1 s drainDuration",
        term.elapsed()
    );
    assert_eq!(
        gw.wait_exit(Duration::from_secs(5)),
        Some(0),
        "stderr:\n{}",
        gw.stderr_text()
    );
    // Each connection closed by the deadline still has its access-log line, with its
    // bytes counted (read once the pipe has delivered all three).
    let reviews_lines = || {
        gw.access_log()
            .into_iter()
            .filter(|l| l["sni"] == sni(REVIEWS).as_str())
            .collect::<Vec<_>>()
    };
    gw.eventually(Duration::from_secs(5), || reviews_lines().len() >= 3);
    let lines = reviews_lines();
    assert_eq!(lines.len(), 3, "access log: {lines:?}");
    for l in &lines {
        assert_eq!(l["bytes_received"], hello.len() as u64, "{l}");
        assert_eq!(l["bytes_sent"], hello.len() as u64, "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_only_the_excess_with_uo() {
    let reviews = RawEcho::start().await;
    let ratings = RawEcho::start().await;
    let ports = Ports::new();
    let pool = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  host: {RATINGS}\n  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 2}}\n"
    );
    let gw = Strait::start(
        ports,
        &docs(&[
            bootstrap(&ports, "  maxConnections: 4\n"),
            gateway("east-west", ports.gateway),
            service(REVIEWS, reviews.addr.port()),
            service(RATINGS, ratings.addr.port()),
            pool,
        ]),
    );
    let gateway = gw.gateway;
    let open = |seed: u64, host: &'static str| async move {
        RawSession::open(gateway, &sni(host), seed, Duration::from_secs(5)).await
    };

    // Process-wide: four connections fit, the fifth is closed at once.
    let mut held = Vec::new();
    for seed in 0..4 {
        let mut s = open(seed, REVIEWS).await.expect("within maxConnections");
        s.exchange(1024).await.unwrap();
        held.push(s);
    }
    let refused_at = Instant::now();
    let fifth = open(4, REVIEWS).await;
    assert!(
        matches!(fifth, Err(StreamFailure::NotServed(_))),
        "{:?}",
        fifth.as_ref().err()
    );
    assert!(refused_at.elapsed() < Duration::from_secs(1));
    for s in &mut held {
        s.exchange(64 * 1024)
            .await
            .expect("the first four are unaffected");
    }
    assert!(gw.eventually(Duration::from_secs(2), || {
        gw.metric(
            "strait_refusals_total",
            &[("response_flag", "UO"), ("reason", "max_connections")],
        ) == 1.0
    }));
    assert!(gw.eventually(Duration::from_secs(2), || {
        gw.access_log()
            .iter()
            .any(|l| l["response_flag"] == "UO" && l["reason"] == "max_connections")
    }));
    // The limit is on connections open now: one closes, one more fits.
    held.pop().unwrap().finish().await.unwrap();
    let mut again = None;
    for _ in 0..40 {
        if let Ok(s) = open(5, REVIEWS).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut again = again.expect("a slot freed by a close is usable");
    again.exchange(1024).await.unwrap();
    drop(again);
    for s in held.drain(..) {
        s.finish().await.unwrap();
    }

    // Per service: ratings takes two; the third is refused while reviews still serves.
    // First every connection above must be closed on the gateway's side too.
    assert!(gw.eventually(Duration::from_secs(10), || {
        gw.metric("strait_active_connections", &[]) == 0.0
    }));
    let mut r1 = open(10, RATINGS).await.unwrap();
    let mut r2 = open(11, RATINGS).await.unwrap();
    let r3 = open(12, RATINGS).await;
    assert!(
        matches!(r3, Err(StreamFailure::NotServed(_))),
        "{:?}",
        r3.as_ref().err()
    );
    let mut other = open(13, REVIEWS)
        .await
        .expect("another service is not limited");
    other.exchange(4096).await.unwrap();
    r1.exchange(4096).await.unwrap();
    r2.exchange(4096).await.unwrap();
    assert!(gw.eventually(Duration::from_secs(2), || {
        gw.metric(
            "strait_refusals_total",
            &[
                ("response_flag", "UO"),
                ("reason", "cluster_max_connections"),
            ],
        ) == 1.0
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_pauses_accepting_and_recovers() {
    let reviews = RawEcho::start().await;
    let ports = Ports::new();
    let dir = TempDir::new("gw-fd");
    let path = dir.write(
        "strait.yaml",
        &docs(&[
            bootstrap(&ports, "  clientHelloTimeout: 20s\n"),
            gateway("east-west", ports.gateway),
            service(REVIEWS, reviews.addr.port()),
        ]),
    );
    let gw = Strait::launch(ports, dir, &[path], Some(64));
    gw.wait_ready(Duration::from_secs(20));
    assert!(route_works(gw.gateway, REVIEWS, Duration::from_secs(2)).await);

    // Silent clients hold one descriptor each in the gateway (waiting for a
    // ClientHello) until accept fails with EMFILE; the rest wait in the kernel's queue.
    let mut silent = Vec::new();
    for _ in 0..80 {
        silent.push(TcpStream::connect(gw.gateway).await.unwrap());
    }
    assert!(
        gw.wait_stderr("out of file descriptors", Duration::from_secs(5)),
        "descriptors never ran out ({} open); stderr:\n{}",
        gw.fd_count(),
        gw.stderr_text()
    );

    // Exhausted, the accept loop waits instead of spinning.
    let before = gw.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = gw.cpu_ticks() - before;
    assert!(
        used < 30,
        "{used} CPU ticks in 1 s while out of descriptors"
    );

    // A real client arriving now waits in the queue...
    let waiting = tokio::spawn(async move {
        let mut s =
            RawSession::open(gw_addr(ports), &sni(REVIEWS), 7, Duration::from_secs(20)).await?;
        s.exchange(64 * 1024).await?;
        s.finish().await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "served while descriptors were exhausted?"
    );

    // ...and is served once descriptors free up.
    let released = Instant::now();
    drop(silent);
    let verified = waiting.await.unwrap().expect("served after recovery");
    assert_eq!(verified, 64 * 1024);
    assert!(released.elapsed() < Duration::from_secs(5));
    assert!(route_works(gw.gateway, REVIEWS, Duration::from_secs(2)).await);
    let mut gw = gw;
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway died");
    assert!(gw.metric("strait_accept_errors_total", &[("kind", "fd_exhausted")]) >= 1.0);
}

fn gw_addr(ports: Ports) -> SocketAddr {
    addr(ports.gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_costs_bounded_memory_not_buffering() {
    const CONNECTIONS: usize = 16;
    const PER_CONNECTION: u64 = 64 << 20;
    const VERIFY: usize = 4 << 20;
    let firehose = Firehose::start(PER_CONNECTION).await;
    let ports = Ports::new();
    let gw = Strait::start(
        ports,
        &docs(&[
            bootstrap(&ports, ""),
            gateway("east-west", ports.gateway),
            service(REVIEWS, firehose.addr.port()),
        ]),
    );

    async fn open_reader(gateway: SocketAddr) -> TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut s = TcpStream::connect(gateway).await.unwrap();
        s.write_all(&client_hello_bytes(&sni(REVIEWS), &["istio"]))
            .await
            .unwrap();
        s
    }
    async fn read_verified(s: &mut TcpStream, len: usize) {
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.unwrap();
        let mut want = vec![0u8; len];
        fill_pattern(0, 0, &mut want);
        assert!(buf == want, "stream corrupted");
    }

    // Warm up: one full-speed reader, so buffers and lazy state exist before measuring.
    let mut warm = open_reader(gw.gateway).await;
    read_verified(&mut warm, VERIFY).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = gw.rss_kib();

    // Readers that read nothing while the upstream pushes as fast as it can.
    let mut readers = Vec::new();
    for _ in 0..CONNECTIONS {
        readers.push(open_reader(gw.gateway).await);
    }
    let pushed_before = firehose.pushed();
    let mut last = firehose.pushed();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = firehose.pushed();
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let pushed = firehose.pushed() - pushed_before;
    let grown = gw.rss_kib().saturating_sub(baseline);
    eprintln!(
        "slow readers: upstream pushed {} MiB in total; gateway RSS grew {} KiB ({} KiB per connection)",
        pushed >> 20,
        grown,
        grown / CONNECTIONS as u64
    );
    // Backpressure held the upstream back: it could not push all it had.
    assert!(
        pushed < CONNECTIONS as u64 * PER_CONNECTION / 2,
        "upstream pushed {pushed} bytes: the gateway kept reading for readers that do not read"
    );
    // Two copy buffers of at most 256 KiB each bound a connection's share.
    assert!(
        grown < CONNECTIONS as u64 * 1024,
        "RSS grew {grown} KiB for {CONNECTIONS} stalled connections"
    );

    // Nothing was lost while stalled: each reader resumes and gets the pattern intact.
    for r in &mut readers {
        read_verified(r, VERIFY).await;
    }
}

/// Writes one ConfigMap "version" directory the way the kubelet does.
fn write_version(root: &Path, version: &str, files: &[(&str, &str)]) {
    let d = root.join(version);
    std::fs::create_dir_all(&d).unwrap();
    for (name, text) in files {
        std::fs::write(d.join(name), text).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_directory_swap_reloads_and_hidden_entries_are_skipped() {
    use std::os::unix::fs::symlink;
    let reviews = RawEcho::start().await;
    let ratings = RawEcho::start().await;
    let ports = Ports::new();
    let second = free_port();
    let dir = TempDir::new("configmap");
    let root = dir.path().to_path_buf();

    // The kubelet's layout: real files in a hidden timestamped directory, `..data`
    // pointing at it, and one visible symlink per key through `..data`.
    let boot = bootstrap(&ports, "  drainDuration: 10s\n");
    let gateways_v1 = docs(&[
        gateway("east-west", ports.gateway),
        gateway("east-west-2", second),
    ]);
    write_version(
        &root,
        "..2024_01_01_00_00_00.000000001",
        &[
            ("bootstrap.yaml", &boot),
            ("gateways.yaml", &gateways_v1),
            ("services.yaml", &service(REVIEWS, reviews.addr.port())),
        ],
    );
    symlink("..2024_01_01_00_00_00.000000001", root.join("..data")).unwrap();
    for key in ["bootstrap.yaml", "gateways.yaml", "services.yaml"] {
        symlink(format!("..data/{key}"), root.join(key)).unwrap();
    }
    // A hidden file that would break the load if it were read.
    std::fs::write(root.join(".services.yaml"), "{{{ not yaml").unwrap();

    let gw = Strait::launch(ports, dir, std::slice::from_ref(&root), None);
    gw.wait_ready(Duration::from_secs(20));
    assert!(route_works(gw.gateway, REVIEWS, Duration::from_secs(2)).await);
    assert!(route_works(addr(second), REVIEWS, Duration::from_secs(2)).await);

    // A live stream on the listener the new version removes.
    let on_removed = long_streams(
        addr(second),
        REVIEWS,
        2,
        30,
        8192,
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The swap: a new version directory, `..data` replaced by an atomic rename, the old
    // version removed.
    write_version(
        &root,
        "..2024_01_01_00_01_00.000000002",
        &[
            ("bootstrap.yaml", &boot),
            ("gateways.yaml", &gateway("east-west", ports.gateway)),
            (
                "services.yaml",
                &docs(&[
                    service(REVIEWS, reviews.addr.port()),
                    service(RATINGS, ratings.addr.port()),
                ]),
            ),
        ],
    );
    symlink("..2024_01_01_00_01_00.000000002", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2024_01_01_00_00_00.000000001")).unwrap();

    assert!(
        route_works(gw.gateway, RATINGS, Duration::from_secs(5)).await,
        "the swap did not reload; stderr:\n{}",
        gw.stderr_text()
    );
    assert!(gw.eventually(Duration::from_secs(5), || reloads(&gw, "success") >= 2.0));
    assert_eq!(reloads(&gw, "failure"), 0.0, "{}", gw.stderr_text());
    // Each service once: the version directories and hidden files were not read.
    let dump: serde_json::Value =
        serde_json::from_str(&http_get(gw.admin, "/config_dump").unwrap().1).unwrap();
    let hosts: Vec<&str> = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, [RATINGS, REVIEWS], "{dump}");

    // The removed listener refuses new connections; its live streams run to the end.
    assert!(refused_within(addr(second), Duration::from_secs(3)).await);
    expect_intact(on_removed, 30 * 8192).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_second_signal_exits_at_once() {
    let reviews = RawEcho::start().await;
    let ports = Ports::new();
    let mut gw = Strait::start(
        ports,
        &docs(&[
            bootstrap(&ports, "  drainDuration: 30s\n"),
            gateway("east-west", ports.gateway),
            service(REVIEWS, reviews.addr.port()),
        ]),
    );
    assert_eq!(reloads(&gw, "success"), 1.0);
    gw.signal(libc::SIGHUP);
    // The files are as they were: the reload runs and finds nothing to change.
    assert!(
        gw.eventually(Duration::from_secs(10), || reloads(&gw, "unchanged") == 1.0),
        "{} unchanged reloads; stderr:\n{}",
        reloads(&gw, "unchanged"),
        gw.stderr_text()
    );
    assert_eq!(reloads(&gw, "success"), 1.0);

    // A connection that would hold the drain for its whole 30 s.
    let mut held = RawSession::open(gw.gateway, &sni(REVIEWS), 1, Duration::from_secs(5))
        .await
        .unwrap();
    held.exchange(1024).await.unwrap();
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_stderr("draining", Duration::from_secs(2)));
    assert!(gw.child.try_wait().unwrap().is_none());
    let second = Instant::now();
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_exit(Duration::from_secs(3)).is_some(),
        "a second signal should exit at once"
    );
    assert!(second.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_nothing_is_counted_as_unchanged_and_keeps_cluster_state() {
    let reviews = RawEcho::start().await;
    let ports = Ports::new();
    let pool = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: {REVIEWS}\n  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 1}}\n"
    );
    let config = docs(&[
        bootstrap(&ports, ""),
        gateway("east-west", ports.gateway),
        service(REVIEWS, reviews.addr.port()),
        pool,
    ]);
    let gw = Strait::start(ports, &config);
    let gateway = gw.gateway;
    let open = |seed: u64| async move {
        RawSession::open(gateway, &sni(REVIEWS), seed, Duration::from_secs(5)).await
    };
    let mut held = open(1).await.expect("the one connection allowed");
    held.exchange(1024).await.unwrap();

    // The same text written again: a file event, an unchanged configuration.
    replace_file(&gw.config_path(), &config);
    assert!(
        gw.eventually(Duration::from_secs(10), || reloads(&gw, "unchanged") == 1.0),
        "stderr:\n{}",
        gw.stderr_text()
    );
    assert_eq!(
        reloads(&gw, "success"),
        1.0,
        "only the start counts as a success"
    );
    assert_eq!(reloads(&gw, "failure"), 0.0);

    // The cluster was not rebuilt: it still counts the open connection against its
    // limit of one.
    let second = open(2).await;
    assert!(
        matches!(second, Err(StreamFailure::NotServed(_))),
        "a rebuilt cluster forgot the open connection: {:?}",
        second.as_ref().err()
    );
    held.exchange(1024).await.unwrap();
    held.finish().await.unwrap();

    // A real change is still a success.
    let changed = config.replace("maxConnections: 1", "maxConnections: 2");
    replace_file(&gw.config_path(), &changed);
    assert!(gw.eventually(Duration::from_secs(10), || reloads(&gw, "success") == 2.0));
    assert_eq!(reloads(&gw, "unchanged"), 1.0);
}
