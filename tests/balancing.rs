//! Endpoint selection and resilience end to end: load balancers and weights, locality
//! failover, outlier detection on connect failures, per-service timeouts, DNS endpoints
//! and the passthrough network view, through the `strait` binary over loopback.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const DOMAIN: &str = "default.svc.cluster.local";

fn host(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

fn sni(name: &str, subset: &str) -> String {
    format!("outbound_.9080_.{subset}_.{}", host(name))
}

fn spiffe(i: usize) -> String {
    format!("spiffe://cluster.local/ns/default/sa/w{i}")
}

/// `count` echo workloads, `w0`…, each with its own SPIFFE ID.
async fn workloads(ca: &TestCa, count: usize) -> Vec<Workload> {
    let mut out = Vec::new();
    for i in 0..count {
        out.push(Workload::start(ca, &spiffe(i)).await);
    }
    out
}

/// One `endpoints[]` item on 127.0.0.1 (or `address`) with extra flow-style fields.
fn ep(address: &str, port: u16, extra: &str) -> String {
    let labels = if extra.contains("labels:") {
        ""
    } else {
        "    labels: {security.istio.io/tlsMode: istio}\n"
    };
    format!(
        "  - address: {address}\n    ports: {{tcp: {port}}}\n{labels}{}",
        extra
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .map(|s| format!("    {}\n", s.trim()))
            .collect::<String>()
    )
}

fn wl(w: &Workload, extra: &str) -> String {
    ep("127.0.0.1", w.addr.port(), extra)
}

/// A ServiceEntry `name` on port 9080 with `endpoints`, and a DestinationRule whose spec
/// (below `host`) is `dr` when not empty.
fn service(name: &str, resolution: &str, endpoints: &[String], dr: &str) -> String {
    let mut out = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{}]\n  resolution: {resolution}\n  ports:\n  - {{number: 9080, name: tcp, protocol: TCP}}\n  endpoints:\n{}",
        host(name),
        endpoints.concat()
    );
    if !dr.is_empty() {
        out.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  host: {}\n{dr}",
            host(name)
        ));
    }
    out
}

fn gateway(ports: Ports, bootstrap_extra: &str, services: &[String]) -> Strait {
    let config = format!(
        "{}---\n{}{}",
        ports.bootstrap(bootstrap_extra),
        ports.gateway_doc(&["*.local"]),
        services.concat()
    );
    Strait::start(ports, &config)
}

/// `n` sequential round trips; the SPIFFE ID of each answering workload, in order.
async fn answers(gw: &Strait, ca: &TestCa, sni: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        let seen = round_trip(gw.gateway, ca, sni)
            .await
            .unwrap_or_else(|e| panic!("connection {i} to {sni} failed: {e}"));
        out.push(seen);
    }
    out
}

fn tally(seen: &[String]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for s in seen {
        *out.entry(s.clone()).or_default() += 1;
    }
    out
}

fn count(t: &HashMap<String, usize>, i: usize) -> usize {
    t.get(&spiffe(i)).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_and_weights_hold_for_every_balancer() {
    let ca = TestCa::new();
    let w = workloads(&ca, 5).await;
    let lb = |simple: &str| format!("  trafficPolicy:\n    loadBalancer: {{simple: {simple}}}\n");
    let weighted = [wl(&w[3], "weight: 80"), wl(&w[4], "weight: 20")];
    let gw = gateway(
        Ports::new(),
        "",
        &[
            service(
                "rr",
                "STATIC",
                &[wl(&w[0], ""), wl(&w[1], ""), wl(&w[2], "")],
                &lb("ROUND_ROBIN"),
            ),
            service("rrw", "STATIC", &weighted, &lb("ROUND_ROBIN")),
            service("random", "STATIC", &weighted, &lb("RANDOM")),
            service("least", "STATIC", &weighted, &lb("LEAST_REQUEST")),
        ],
    );

    // Round robin: each endpoint in turn, exactly.
    let seen = answers(&gw, &ca, &sni("rr", ""), 30).await;
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(*s, seen[i % 3], "position {i} breaks the cycle: {seen:?}");
    }
    let t = tally(&seen);
    assert_eq!((count(&t, 0), count(&t, 1), count(&t, 2)), (10, 10, 10));

    // Weighted round robin is exact too: 80/20 over 50 connections is 40/10.
    let t = tally(&answers(&gw, &ca, &sni("rrw", ""), 50).await);
    assert_eq!((count(&t, 3), count(&t, 4)), (40, 10));

    // Random: 150 connections at 80%, standard deviation 4.9 connections; allow 3.5 of
    // them.
    let t = tally(&answers(&gw, &ca, &sni("random", ""), 150).await);
    let heavy = count(&t, 3);
    assert_eq!(heavy + count(&t, 4), 150);
    assert!(
        (103..=137).contains(&heavy),
        "{heavy}/150 on the weight-80 endpoint"
    );

    // Least-request balances active connections per unit of weight: with 50 held open,
    // the weight-80 endpoint holds four times as many as the weight-20 one.
    let mut held = Vec::new();
    for _ in 0..50 {
        let (mut tls, seen) = tls_connect(gw.gateway, &ca, &sni("least", ""), &["istio"])
            .await
            .unwrap();
        assert_eq!(echo_once(&mut tls, b"hi\n").await, b"hi\n");
        held.push((seen, tls));
    }
    let heavy = held.iter().filter(|(s, _)| *s == spiffe(3)).count();
    assert!(
        (38..=42).contains(&heavy),
        "{heavy}/50 held on the weight-80 endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_new_connections_away_from_long_lived_ones() {
    let ca = TestCa::new();
    let w = workloads(&ca, 2).await;
    let gw = gateway(
        Ports::new(),
        "",
        &[service(
            "lr",
            "STATIC",
            &[wl(&w[0], ""), wl(&w[1], "")],
            "  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST}\n",
        )],
    );
    // Twenty long-lived connections, spread over both; then those on w1 close.
    let mut held = Vec::new();
    for _ in 0..20 {
        let (mut tls, seen) = tls_connect(gw.gateway, &ca, &sni("lr", ""), &["istio"])
            .await
            .unwrap();
        assert_eq!(echo_once(&mut tls, b"hi\n").await, b"hi\n");
        held.push((seen, tls));
    }
    let on_w0 = held.iter().filter(|(s, _)| *s == spiffe(0)).count();
    assert_eq!(on_w0, 10, "least-request balances active connections");
    let mut kept = Vec::new();
    for (seen, mut tls) in held {
        if seen == spiffe(0) {
            kept.push(tls);
        } else {
            let _ = tls.shutdown().await;
        }
    }
    let w1 = format!("127.0.0.1:{}", w[1].addr.port());
    assert!(
        gw.eventually(Duration::from_secs(5), || gw
            .endpoint_state(&sni("lr", ""), &w1)["activeConnections"]
            == 0),
        "closed connections are released"
    );
    // w0 holds the long-lived ones: every new connection goes to w1.
    let t = tally(&answers(&gw, &ca, &sni("lr", ""), 20).await);
    assert_eq!(count(&t, 1), 20, "{t:?}");
    drop(kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_stays_local_fails_over_by_priority_and_comes_back() {
    let ca = TestCa::new();
    let mut w = workloads(&ca, 4).await;
    let endpoints = [
        wl(&w[0], "locality: r1/z1/s1"), // the gateway's own
        wl(&w[1], "locality: r1/z2/s1"), // same region
        wl(&w[2], "locality: r2/z1/s1"), // elsewhere
        wl(&w[3], "locality: r3/z1/s1"), // the failover region
    ];
    let dr = "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n      localityLbSetting:\n        enabled: true\n        failover: [{from: r1, to: r3}]\n    outlierDetection: {consecutiveErrors: 1, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}\n";
    let gw = gateway(
        Ports::new(),
        "  locality: r1/z1/s1\n",
        &[service("geo", "STATIC", &endpoints, dr)],
    );
    let key = sni("geo", "");
    let local = format!("127.0.0.1:{}", w[0].addr.port());

    let t = tally(&answers(&gw, &ca, &key, 12).await);
    assert_eq!(count(&t, 0), 12, "all local while local is healthy: {t:?}");

    // The local endpoint dies: the first connection that meets it retries elsewhere, so
    // no client sees an error, and it is ejected.
    let local_addr = w[0].addr;
    w.remove(0).stop().await;
    let t = tally(&answers(&gw, &ca, &key, 12).await);
    assert_eq!(count(&t, 1), 12, "same region next: {t:?}");
    let state = gw.endpoint_state(&key, &local);
    assert!(state["ejections"].as_u64().unwrap() >= 1, "{state}");

    // The same-region endpoint dies too: the failover rule's region before the others.
    w.remove(0).stop().await;
    let t = tally(&answers(&gw, &ca, &key, 12).await);
    assert_eq!(count(&t, 3), 12, "failover r1 -> r3: {t:?}");
    let failed = gw.metric(
        "strait_upstream_connect_failures_total",
        &[("reason", "refused")],
    );
    assert!(failed >= 2.0, "refused attempts counted: {failed}");
    let refusals = gw.metric("strait_refusals_total", &[]);
    assert_eq!(refusals, 0.0, "no client saw an error");

    // The local endpoint comes back and, once its ejection is over, takes the traffic.
    let _back = Workload::start_at(&ca, &spiffe(0), local_addr).await;
    let started = Instant::now();
    let mut back_after = None;
    while started.elapsed() < Duration::from_secs(10) {
        if round_trip(gw.gateway, &ca, &key).await.unwrap() == spiffe(0) {
            back_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back_after = back_after.expect("the local endpoint returns after its ejection");
    // Ejected at most twice (1 s, then 2 s) while dead.
    assert!(back_after < Duration::from_secs(4), "{back_after:?}");
    let t = tally(&answers(&gw, &ca, &key, 12).await);
    assert_eq!(count(&t, 0), 12, "local again: {t:?}");
    assert_eq!(gw.endpoint_state(&key, &local)["health"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribute_splits_traffic_between_localities() {
    let ca = TestCa::new();
    let w = workloads(&ca, 3).await;
    let endpoints = [
        wl(&w[0], "locality: r1/z1/s1"),
        wl(&w[1], "locality: r1/z2/s1"),
        wl(&w[2], "locality: r2/z1/s1"),
    ];
    let dr = "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n      localityLbSetting:\n        distribute:\n        - from: r1/z1/*\n          to: {\"r1/z1/*\": 80, \"r1/z2/*\": 20}\n";
    let gw = gateway(
        Ports::new(),
        "  locality: r1/z1/s1\n",
        &[service("split", "STATIC", &endpoints, dr)],
    );
    let t = tally(&answers(&gw, &ca, &sni("split", ""), 150).await);
    assert_eq!(count(&t, 2), 0, "r2 is named by no rule: {t:?}");
    let near = count(&t, 0);
    assert!((103..=137).contains(&near), "{near}/150 to r1/z1 (80%)");
}

/// A server that accepts, reads the first bytes and resets the connection.
async fn resetter() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
            // Linger 0: close with a reset instead of a FIN.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_accepts_then_resets_is_a_failure_and_is_ejected() {
    let ca = TestCa::new();
    let w = workloads(&ca, 1).await;
    let (bad, task) = resetter().await;
    let dr = "  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}\n";
    let gw = gateway(
        Ports::new(),
        "",
        &[service(
            "flaky",
            "STATIC",
            &[ep("127.0.0.1", bad.port(), ""), wl(&w[0], "")],
            dr,
        )],
    );
    // Every client is served by the healthy endpoint: a reset before the answer is
    // retried on the next endpoint.
    let t = tally(&answers(&gw, &ca, &sni("flaky", ""), 10).await);
    assert_eq!(count(&t, 0), 10, "{t:?}");
    let state = gw.endpoint_state(&sni("flaky", ""), &bad.to_string());
    assert_eq!(state["health"], "ejected", "{state}");
    assert_eq!(state["connectFailures"], 2, "{state}");
    let resets = gw.metric(
        "strait_upstream_connect_failures_total",
        &[("reason", "reset")],
    );
    assert_eq!(resets, 2.0);
    assert_eq!(gw.metric("strait_refusals_total", &[]), 0.0);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_attempts_are_bounded_and_go_to_distinct_endpoints() {
    let ca = TestCa::new();
    let reserved: Vec<_> = (0..5).map(|_| dead_port()).collect();
    let dead: Vec<u16> = reserved.iter().map(|(p, _)| *p).collect();
    let endpoints: Vec<String> = dead.iter().map(|&p| ep("127.0.0.1", p, "")).collect();
    let gw = gateway(
        Ports::new(),
        "",
        &[service("dead", "STATIC", &endpoints, "")],
    );
    let err = round_trip(gw.gateway, &ca, &sni("dead", "")).await;
    assert!(err.is_err(), "no endpoint answers");
    assert_eq!(
        gw.metric("strait_upstream_connect_attempts_total", &[]),
        3.0
    );
    let tried: Vec<u64> = dead
        .iter()
        .map(|p| {
            gw.endpoint_state(&sni("dead", ""), &format!("127.0.0.1:{p}"))["connectFailures"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(tried.iter().filter(|&&n| n == 1).count(), 3, "{tried:?}");
    assert_eq!(tried.iter().sum::<u64>(), 3, "{tried:?}");
}

/// A listener whose accept queue is full, so further connection attempts hang.
fn black_hole() -> (SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    (addr, fillers, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_from_the_destination_rule_overrides_bootstrap() {
    let ca = TestCa::new();
    let (hole, _fillers, _socket) = black_hole();
    let endpoint = ep("127.0.0.1", hole.port(), "");
    // Bootstrap says 5s (the test harness default).
    let gw = gateway(
        Ports::new(),
        "",
        &[
            service(
                "quick",
                "STATIC",
                std::slice::from_ref(&endpoint),
                "  trafficPolicy:\n    connectionPool: {tcp: {connectTimeout: 200ms}}\n",
            ),
            service("patient", "STATIC", &[endpoint], ""),
        ],
    );
    let timed = |name: &'static str| {
        let ca = &ca;
        let gw = &gw;
        async move {
            let started = Instant::now();
            assert!(round_trip(gw.gateway, ca, &sni(name, "")).await.is_err());
            started.elapsed()
        }
    };
    let quick = timed("quick").await;
    let patient = timed("patient").await;
    assert!(
        quick >= Duration::from_millis(190) && quick < Duration::from_millis(700),
        "{quick:?}"
    );
    assert!(patient >= Duration::from_millis(4990), "{patient:?}");
    assert_eq!(
        gw.metric(
            "strait_upstream_connect_failures_total",
            &[("reason", "timeout")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_resolve_and_route_and_a_bad_name_is_a_counted_failure() {
    let ca = TestCa::new();
    let w = workloads(&ca, 1).await;
    // A 70-byte label is over DNS's 63-byte limit: the resolver refuses it without
    // sending a query anywhere.
    let unresolvable = format!("{}.test", "x".repeat(70));
    let gw = gateway(
        Ports::new(),
        "",
        &[
            service("named", "DNS", &[ep("localhost", w[0].addr.port(), "")], ""),
            service("nowhere", "DNS", &[ep(&unresolvable, 9, "")], ""),
        ],
    );
    let t = tally(&answers(&gw, &ca, &sni("named", ""), 5).await);
    assert_eq!(count(&t, 0), 5);
    for _ in 0..2 {
        assert!(
            round_trip(gw.gateway, &ca, &sni("nowhere", ""))
                .await
                .is_err()
        );
    }
    assert_eq!(
        gw.metric(
            "strait_upstream_connect_failures_total",
            &[("reason", "resolve")]
        ),
        2.0
    );
    let state = gw.endpoint_state(&sni("nowhere", ""), &format!("{unresolvable}:9"));
    assert_eq!(state["connectFailures"], 2);
    // Still serving.
    assert_eq!(
        round_trip(gw.gateway, &ca, &sni("named", ""))
            .await
            .unwrap(),
        spiffe(0)
    );
}

/// Reads until the gateway closes; returns how long that took, or `None` past `within`.
async fn closed_after(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within.saturating_sub(started.elapsed()), tls.read(&mut buf))
            .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lifetime_limits_per_service_and_subset() {
    let ca = TestCa::new();
    let w = workloads(&ca, 1).await;
    // Bootstrap idle 400ms; the service: idle 5s and at most 1s per connection; subset
    // `short`: its own connectionPool (idle 150ms), which replaces the service's.
    let dr = "  trafficPolicy:\n    connectionPool: {tcp: {idleTimeout: 5s, maxConnectionDuration: 1s}}\n  subsets:\n  - name: short\n    labels: {version: v1}\n    trafficPolicy:\n      connectionPool: {tcp: {idleTimeout: 150ms}}\n";
    let gw = gateway(
        Ports::new(),
        "  idleTimeout: 400ms\n",
        &[service(
            "limits",
            "STATIC",
            &[wl(
                &w[0],
                "labels: {version: v1, security.istio.io/tlsMode: istio}",
            )],
            dr,
        )],
    );

    // Connections live no longer than maxConnectionDuration (plus jitter).
    let mut conns = Vec::new();
    for _ in 0..8 {
        let (tls, _) = tls_connect(gw.gateway, &ca, &sni("limits", ""), &["istio"])
            .await
            .unwrap();
        conns.push((Instant::now(), tls));
    }
    // Idle for 600ms (past Bootstrap's 400ms): the service's idleTimeout keeps them.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (_, tls) in conns.iter_mut() {
        assert_eq!(echo_once(tls, b"alive\n").await, b"alive\n");
    }
    let mut lifetimes = Vec::new();
    for (opened, tls) in conns.iter_mut() {
        closed_after(tls, Duration::from_secs(3))
            .await
            .expect("closed by maxConnectionDuration");
        lifetimes.push(opened.elapsed());
    }
    // Each within [1s, 1.1s] of its start, with slack for timers and for observing the
    // closes one after another.
    for l in &lifetimes {
        assert!(
            *l >= Duration::from_millis(950) && *l < Duration::from_millis(1400),
            "{lifetimes:?}"
        );
    }
    let limited = || {
        gw.access_log()
            .iter()
            .filter(|l| l["reason"] == "max_connection_duration")
            .count()
    };
    assert!(
        gw.eventually(Duration::from_secs(2), || limited() == 8),
        "access log names the duration limit: {}",
        limited()
    );

    // Subset `short`: closed after 150ms idle, well before Bootstrap's 400ms.
    let (mut tls, _) = tls_connect(gw.gateway, &ca, &sni("limits", "short"), &["istio"])
        .await
        .unwrap();
    let closed = closed_after(&mut tls, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(closed < Duration::from_millis(380), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_is_jittered() {
    let ca = TestCa::new();
    let w = workloads(&ca, 1).await;
    let gw = gateway(
        Ports::new(),
        "",
        &[service(
            "jitter",
            "STATIC",
            &[wl(&w[0], "")],
            "  trafficPolicy:\n    connectionPool: {tcp: {maxConnectionDuration: 500ms}}\n",
        )],
    );
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (mut tls, _) = tls_connect(gw.gateway, &ca, &sni("jitter", ""), &["istio"])
            .await
            .unwrap();
        let opened = Instant::now();
        tasks.push(tokio::spawn(async move {
            closed_after(&mut tls, Duration::from_secs(3))
                .await
                .unwrap();
            opened.elapsed()
        }));
    }
    let mut lifetimes = Vec::new();
    for t in tasks {
        lifetimes.push(t.await.unwrap());
    }
    let min = *lifetimes.iter().min().unwrap();
    let max = *lifetimes.iter().max().unwrap();
    assert!(min >= Duration::from_millis(480), "{lifetimes:?}");
    assert!(max < Duration::from_millis(800), "{lifetimes:?}");
    // Jitter spreads them over 50ms; ten uniform draws all within 8ms of each other
    // happen about once in 10^6 runs.
    assert!(max - min > Duration::from_millis(8), "{lifetimes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_never_dials_endpoints_of_another_network() {
    let ca = TestCa::new();
    let w = workloads(&ca, 3).await;
    let gw = gateway(
        Ports::new(),
        "  network: net-a\n",
        &[
            service(
                "mixed",
                "STATIC",
                &[
                    wl(&w[0], "network: net-a"),
                    wl(&w[1], "network: net-b"),
                    wl(&w[2], ""),
                ],
                "",
            ),
            service("remote", "STATIC", &[wl(&w[1], "network: net-b")], ""),
        ],
    );
    let t = tally(&answers(&gw, &ca, &sni("mixed", ""), 10).await);
    assert_eq!((count(&t, 0), count(&t, 2)), (5, 5), "{t:?}");
    assert!(
        round_trip(gw.gateway, &ca, &sni("remote", ""))
            .await
            .is_err()
    );
    assert_eq!(w[1].accepted(), 0, "the net-b endpoint is never dialled");
    // The refusal is recorded when the gateway's side of the connection ends.
    assert!(gw.eventually(Duration::from_secs(2), || {
        gw.metric("strait_refusals_total", &[("response_flag", "UH")]) == 1.0
    }));
}
