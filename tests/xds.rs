//! strait configured by a fake istiod over ADS: the listeners, clusters and endpoints of
//! an AUTO_PASSTHROUGH east-west gateway, shaped as istiod builds them (`common::xds`),
//! over TLS with a token and a `clusterid` header, in delta and state-of-the-world.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::xds::*;
use common::*;
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.test-token.sig";
const CLUSTER_ID: &str = "cluster-east";

fn key(subset: &str, host: &str) -> String {
    format!("outbound_.9080_.{subset}_.{host}")
}

/// A mesh: a fake istiod, reviews v1/v2 and ratings workloads, and a gateway port.
struct Mesh {
    istiod: FakeIstiod,
    ca: TestCa,
    v1: Workload,
    v2: Workload,
    ratings: Workload,
    ports: Ports,
    dir: TempDir,
}

impl Mesh {
    async fn start() -> Mesh {
        Self::start_with(IstiodOptions::tls()).await
    }

    async fn start_with(opts: IstiodOptions) -> Mesh {
        let istiod = FakeIstiod::start(opts.token(TOKEN).cluster_id(CLUSTER_ID)).await;
        let ca = TestCa::new();
        let v1 = Workload::start(&ca, "spiffe://cluster.local/ns/default/sa/reviews-v1").await;
        let v2 = Workload::start(&ca, "spiffe://cluster.local/ns/default/sa/reviews-v2").await;
        let ratings = Workload::start(&ca, "spiffe://cluster.local/ns/default/sa/ratings").await;
        let dir = TempDir::new("xds");
        dir.write("istio-token", TOKEN);
        Mesh {
            istiod,
            ca,
            v1,
            v2,
            ratings,
            ports: Ports::new(),
            dir,
        }
    }

    fn gateway(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.gateway))
    }

    /// What istiod sends for reviews (with subset v1) and ratings.
    fn serve_all(&self) {
        let reviews = key("", REVIEWS);
        let reviews_v1 = key("v1", REVIEWS);
        let ratings = key("", RATINGS);
        let listener = ListenerSpec::new(
            self.gateway(),
            &[
                (&reviews, &reviews),
                (&reviews_v1, &reviews_v1),
                (&ratings, &ratings),
            ],
        )
        .name("0.0.0.0_15443")
        .telemetry(Telemetry::IstioStats)
        .build();
        self.istiod.set_listener(&listener);
        for c in [&reviews, &reviews_v1, &ratings] {
            self.istiod.set_cluster(&eds_cluster(c, None));
        }
        // istiod also sends a router the sidecar-style cluster of every service.
        self.istiod
            .set_cluster(&eds_cluster(&format!("outbound|9080||{REVIEWS}"), None));
        self.set_endpoints(&reviews, &[self.v1.addr, self.v2.addr]);
        self.set_endpoints(&reviews_v1, &[self.v1.addr]);
        self.set_endpoints(&ratings, &[self.ratings.addr]);
    }

    fn set_endpoints(&self, cluster: &str, addrs: &[SocketAddr]) {
        let members: Vec<EndpointSpec> = addrs
            .iter()
            .map(|a| (*a, 1, HealthStatus::Healthy))
            .collect();
        self.istiod
            .set_cla(&cla(cluster, &[("us-east", "a", 0, &members)]));
    }

    /// istiod moves reviews v1's endpoint to the v2 workload; waits until new connections
    /// follow, failing with `why` and the gateway's stderr.
    async fn move_v1_to_v2(&self, gw: &Strait, why: &str) {
        let reviews_v1 = key("v1", REVIEWS);
        self.set_endpoints(&reviews_v1, &[self.v2.addr]);
        self.istiod.push();
        let moved = routes_to(
            self.gateway(),
            &self.ca,
            &reviews_v1,
            &self.v2.spiffe,
            Duration::from_secs(10),
        )
        .await;
        assert!(moved, "{why}; stderr:\n{}", gw.stderr_text());
    }

    fn config(&self, protocol: &str, extra: &str) -> String {
        let root = self.istiod.root_pem_path().expect("TLS fake istiod");
        self.ports.bootstrap(&format!(
            "  discovery:\n    address: {addr}\n    serverName: {ISTIOD_SERVER_NAME}\n    rootCert: {root}\n    token: {token}\n    clusterId: {CLUSTER_ID}\n    protocol: {protocol}\n    initialFetchTimeout: 30s\n    node:\n      ip: 127.0.0.1\n      podName: istio-eastwestgateway-1\n      namespace: istio-system\n      serviceAccount: istio-eastwestgateway\n      labels: {{istio: eastwestgateway}}\n{extra}",
            addr = self.istiod.addr,
            root = root.display(),
            token = self.dir.path().join("istio-token").display(),
        ))
    }
}

async fn spiffe_through(gw: SocketAddr, ca: &TestCa, sni: &str) -> String {
    round_trip(gw, ca, sni)
        .await
        .unwrap_or_else(|e| panic!("{sni} through {gw}: {e}"))
}

/// Polls until `sni` reaches the workload with `spiffe`, or `within` passes.
async fn routes_to(gw: SocketAddr, ca: &TestCa, sni: &str, spiffe: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if round_trip(gw, ca, sni).await.ok().as_deref() == Some(spiffe) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn initial_sync(protocol: &str) {
    let mesh = Mesh::start().await;
    // Listeners and clusters, but no endpoints yet: bound, not ready.
    let reviews = key("", REVIEWS);
    let reviews_v1 = key("v1", REVIEWS);
    let ratings = key("", RATINGS);
    mesh.serve_all();
    mesh.istiod.remove(EDS_TYPE, &reviews_v1);
    mesh.istiod.push();
    let gw = Strait::spawn(mesh.ports, &mesh.config(protocol, ""), &[], &[], &[]);
    assert!(
        mesh.istiod
            .wait_ack(LDS_TYPE, Duration::from_secs(20))
            .await
            .is_some(),
        "no LDS ACK; stderr:\n{}",
        gw.stderr_text()
    );
    assert!(
        mesh.istiod
            .wait_ack(CDS_TYPE, Duration::from_secs(10))
            .await
            .is_some()
    );
    // Once the other endpoints are in, readiness names the one cluster still missing.
    let waiting_for_v1 = format!("waiting for the endpoints of 1 cluster(s): {reviews_v1}");
    assert!(
        gw.eventually(Duration::from_secs(10), || {
            // A request that fails (a busy machine's read timeout) is "not yet": the
            // message below shows the last answer.
            http_get(gw.status, "/healthz/ready").is_ok_and(|(code, body)| {
                code == 503
                    && body.contains("config not received from XDS server")
                    && body.contains(&waiting_for_v1)
            })
        }),
        "{:?}",
        http_get(gw.status, "/healthz/ready")
    );

    // The endpoints arrive: ready.
    mesh.set_endpoints(&reviews_v1, &[mesh.v1.addr]);
    mesh.istiod.push();
    gw.wait_ready(Duration::from_secs(10));

    // What istiod saw: the token, the cluster id, and a router node.
    let streams = mesh.istiod.streams();
    let first = &streams[0];
    assert_eq!(
        first.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(first.cluster_id.as_deref(), Some(CLUSTER_ID));
    assert_eq!(first.delta, protocol == "DELTA");
    let node = mesh.istiod.node().expect("a node");
    assert_eq!(
        node.id,
        "router~127.0.0.1~istio-eastwestgateway-1.istio-system~istio-system.svc.cluster.local"
    );
    let meta = node.metadata.expect("metadata");
    let text = |k: &str| match meta.fields.get(k).and_then(|v| v.kind.clone()) {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(text("NAMESPACE"), "istio-system");
    assert_eq!(text("SERVICE_ACCOUNT"), "istio-eastwestgateway");
    assert_eq!(text("CLUSTER_ID"), CLUSTER_ID);
    assert_eq!(text("INSTANCE_IPS"), "127.0.0.1");
    assert!(!text("ISTIO_VERSION").is_empty());
    match meta.fields.get("LABELS").and_then(|v| v.kind.clone()) {
        Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(s)) => {
            assert!(s.fields.contains_key("istio"), "{s:?}");
        }
        other => panic!("LABELS: {other:?}"),
    }

    // Every name routes to the right workload; a name istiod did not list does not.
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &reviews_v1).await,
        mesh.v1.spiffe
    );
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &ratings).await,
        mesh.ratings.spiffe
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        seen.insert(spiffe_through(mesh.gateway(), &mesh.ca, &reviews).await);
    }
    assert_eq!(
        seen.len(),
        2,
        "both reviews endpoints take traffic: {seen:?}"
    );
    let unlisted = key("v2", REVIEWS);
    assert!(
        round_trip(mesh.gateway(), &mesh.ca, &unlisted)
            .await
            .is_err(),
        "a subset istiod did not list must not route"
    );
    assert!(gw.eventually(Duration::from_secs(5), || {
        gw.metric("strait_refusals_total", &[("response_flag", "NR")]) >= 1.0
    }));

    // The telemetry filter in front of tcp_proxy is accepted and named.
    let (_, dump) = http_get(gw.admin, "/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let d = &dump["discovery"];
    assert_eq!(d["source"], "xds");
    assert_eq!(d["ready"], true);
    assert!(
        d["ignoredFilters"]["0.0.0.0_15443"]
            .as_array()
            .is_some_and(|f| f.iter().any(|n| n == "istio.stats")),
        "{d}"
    );
    for t in ["lds", "cds", "eds"] {
        assert!(d["types"][t]["acks"].as_u64().unwrap() >= 1, "{t}: {d}");
        assert!(d["types"][t]["nacks"] == 0, "{t}: {d}");
    }
    assert_eq!(
        gw.metric(
            "strait_xds_responses_total",
            &[("type", "cds"), ("result", "nack")]
        ),
        0.0
    );
    assert_eq!(gw.metric("strait_xds_resources", &[("type", "cds")]), 4.0);
    // The cluster no listener routes to is acknowledged, its endpoints never asked for.
    let records = mesh.istiod.records();
    let asked: Vec<&String> = records
        .of_type(EDS_TYPE)
        .flat_map(|q| q.resource_names.iter())
        .collect();
    assert!(
        asked.iter().all(|n| !n.starts_with("outbound|")),
        "{asked:?}"
    );
    assert!(asked.contains(&&reviews_v1), "{asked:?}");
    assert_eq!(gw.metric("strait_xds_connected", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_over_delta_routes_every_listed_name_and_readiness_waits_for_endpoints() {
    initial_sync("DELTA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_over_state_of_the_world_routes_the_same() {
    initial_sync("SOTW").await;
}

/// A TLS session through the gateway that stays open: writes a line, reads it back.
struct Held {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl Held {
    async fn open(gw: SocketAddr, ca: &TestCa, sni: &str) -> (Held, String) {
        let (tls, peer) = tls_connect(gw, ca, sni, &["istio"]).await.unwrap();
        (Held { tls }, peer)
    }

    async fn echo(&mut self, line: &[u8]) -> bool {
        if self.tls.write_all(line).await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; line.len()];
        tokio::time::timeout(Duration::from_secs(5), self.tls.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
            && buf == line
    }
}

async fn endpoint_changes(protocol: &str) {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config(protocol, ""));
    let reviews_v1 = key("v1", REVIEWS);
    let (mut held, peer) = Held::open(mesh.gateway(), &mesh.ca, &reviews_v1).await;
    assert_eq!(peer, mesh.v1.spiffe);
    assert!(held.echo(b"before\n").await);

    // v1's endpoint moves from the v1 workload to the v2 workload: new connections
    // follow, the open one stays on v1.
    mesh.move_v1_to_v2(&gw, "new connections did not move")
        .await;
    assert!(held.echo(b"after an endpoint was removed\n").await);

    // An endpoint marked unhealthy takes no new connections.
    let members = [
        (mesh.v2.addr, 1, HealthStatus::Unhealthy),
        (mesh.v1.addr, 1, HealthStatus::Healthy),
    ];
    mesh.istiod
        .set_cla(&cla(&reviews_v1, &[("us-east", "a", 0, &members)]));
    mesh.istiod.push();
    assert!(
        routes_to(
            mesh.gateway(),
            &mesh.ca,
            &reviews_v1,
            &mesh.v1.spiffe,
            Duration::from_secs(10)
        )
        .await
    );
    for _ in 0..6 {
        assert_eq!(
            spiffe_through(mesh.gateway(), &mesh.ca, &reviews_v1).await,
            mesh.v1.spiffe,
            "an unhealthy endpoint was dialled"
        );
    }

    // A service removed (its chain and cluster gone): new connections are refused, the
    // open one carries on.
    let (mut ratings_held, _) = Held::open(mesh.gateway(), &mesh.ca, &key("", RATINGS)).await;
    let reviews = key("", REVIEWS);
    let listener = ListenerSpec::new(
        mesh.gateway(),
        &[(&reviews, &reviews), (&reviews_v1, &reviews_v1)],
    )
    .name("0.0.0.0_15443")
    .build();
    mesh.istiod.set_listener(&listener);
    mesh.istiod.remove(CDS_TYPE, &key("", RATINGS));
    mesh.istiod.remove(EDS_TYPE, &key("", RATINGS));
    mesh.istiod.push();
    let deadline = Instant::now() + Duration::from_secs(10);
    while round_trip(mesh.gateway(), &mesh.ca, &key("", RATINGS))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "ratings still routes after its removal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ratings_held.echo(b"still here\n").await);
    assert!(held.echo(b"and here\n").await);
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_and_service_changes_move_new_connections_and_keep_open_ones_delta() {
    endpoint_changes("DELTA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_and_service_changes_move_new_connections_and_keep_open_ones_sotw() {
    endpoint_changes("SOTW").await;
}

async fn bad_cluster(protocol: &str) {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    let bad = key("", "details.default.svc.cluster.local");
    mesh.istiod
        .set_cluster(&eds_cluster(&bad, Some(Duration::ZERO)));
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config(protocol, ""));
    let nack = mesh
        .istiod
        .wait_nack(CDS_TYPE, Duration::from_secs(10))
        .await
        .expect("the bad cluster is rejected");
    let error = nack.error.unwrap_or_default();
    assert!(
        error.contains(&bad) && error.contains("connect_timeout"),
        "{error}"
    );
    // The rest was applied: the 15443 listener serves every good name.
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &key("v1", REVIEWS)).await,
        mesh.v1.spiffe
    );
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &key("", RATINGS)).await,
        mesh.ratings.spiffe
    );
    assert!(
        gw.metric(
            "strait_xds_responses_total",
            &[("type", "cds"), ("result", "nack")]
        ) >= 1.0
    );
    let (_, dump) = http_get(gw.admin, "/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let rejection = &dump["discovery"]["types"]["cds"]["lastRejection"];
    assert!(
        rejection["error"]
            .as_str()
            .is_some_and(|e| e.contains(&bad)),
        "{rejection}"
    );
    assert!(
        gw.wait_stderr("rejected part of an xDS response", Duration::from_secs(5)),
        "{}",
        gw.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cluster_is_rejected_with_a_reason_and_the_rest_applied_delta() {
    bad_cluster("DELTA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cluster_is_rejected_with_a_reason_and_the_rest_applied_sotw() {
    bad_cluster("SOTW").await;
}

async fn lost_stream(protocol: &str) {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config(protocol, ""));
    let reviews_v1 = key("v1", REVIEWS);
    let (mut held, _) = Held::open(mesh.gateway(), &mesh.ca, &reviews_v1).await;

    // The stream dies: strait reopens it at once and says what it has.
    let before = mesh.istiod.streams_opened();
    assert!(mesh.istiod.kill_streams() >= 1);
    assert!(
        mesh.istiod
            .wait_for(Duration::from_secs(5), |r| r.streams.len() > before
                && r.requests
                    .iter()
                    .any(|q| q.stream as usize > before && q.type_url == EDS_TYPE))
            .await,
        "no new stream with an endpoint subscription; stderr:\n{}",
        gw.stderr_text()
    );
    let records = mesh.istiod.records();
    let second = records.streams.last().unwrap().id;
    let resubscribed: Vec<&XdsRequest> = records
        .requests
        .iter()
        .filter(|q| q.stream == second && q.kind == RequestKind::Initial)
        .collect();
    if protocol == "DELTA" {
        let cds = resubscribed
            .iter()
            .find(|q| q.type_url == CDS_TYPE)
            .expect("CDS re-subscribed");
        assert_eq!(cds.initial_resource_versions.len(), 4, "{cds:?}");
        let eds = resubscribed
            .iter()
            .find(|q| q.type_url == EDS_TYPE)
            .expect("EDS re-subscribed");
        assert!(
            eds.initial_resource_versions.contains_key(&reviews_v1),
            "{eds:?}"
        );
    } else {
        let cds = resubscribed
            .iter()
            .find(|q| q.type_url == CDS_TYPE)
            .expect("CDS re-subscribed");
        assert!(!cds.version_info.is_empty(), "{cds:?}");
    }
    assert!(held.echo(b"across a lost stream\n").await);

    // istiod goes away entirely: the last configuration keeps serving and ready.
    mesh.istiod.stop().await;
    assert!(gw.eventually(
        Duration::from_secs(5),
        || gw.metric("strait_xds_connected", &[]) == 0.0
    ));
    assert_eq!(http_get(gw.status, "/healthz/ready").unwrap().0, 200);
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &reviews_v1).await,
        mesh.v1.spiffe
    );
    assert!(held.echo(b"while istiod is down\n").await);

    // It comes back with a change made meanwhile: strait reconnects and applies it.
    mesh.set_endpoints(&reviews_v1, &[mesh.v2.addr]);
    mesh.istiod.restart().await;
    mesh.istiod.push();
    assert!(
        routes_to(
            mesh.gateway(),
            &mesh.ca,
            &reviews_v1,
            &mesh.v2.spiffe,
            Duration::from_secs(30)
        )
        .await,
        "the change made while istiod was down never arrived; stderr:\n{}",
        gw.stderr_text()
    );
    assert!(held.echo(b"after istiod came back\n").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stream_reconnects_with_the_versions_held_and_nothing_is_cut_delta() {
    lost_stream("DELTA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stream_reconnects_with_the_versions_held_and_nothing_is_cut_sotw() {
    lost_stream("SOTW").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiods_max_connection_age_goaway_is_followed_at_once_and_nothing_notices() {
    // istiod ends every connection after keepaliveMaxServerConnectionAge (30 min): GOAWAY,
    // then, after the grace period, what is still open. Here 1.5 s, with 0.5 s of grace.
    let mesh =
        Mesh::start_with(IstiodOptions::tls().max_connection_age(Duration::from_millis(1500)))
            .await;
    mesh.serve_all();
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config("DELTA", ""));
    let reviews_v1 = key("v1", REVIEWS);
    let (mut held, _) = Held::open(mesh.gateway(), &mesh.ca, &reviews_v1).await;

    // Readiness and routing are sampled while three connections come and go.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut samples = 0;
    while mesh.istiod.streams_opened() < 4 && Instant::now() < deadline {
        assert_eq!(
            http_get(gw.status, "/healthz/ready").unwrap().0,
            200,
            "not ready across a connection's end; stderr:\n{}",
            gw.stderr_text()
        );
        assert_eq!(
            spiffe_through(mesh.gateway(), &mesh.ca, &reviews_v1).await,
            mesh.v1.spiffe
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = mesh.istiod.records();
    assert!(
        records.streams.len() >= 4,
        "{} streams in 15 s; stderr:\n{}",
        records.streams.len(),
        gw.stderr_text()
    );
    assert!(samples > 20, "{samples}");
    // Each connection after the first asked for what it holds, versions included.
    for stream in records.streams.iter().skip(1) {
        let eds = records
            .requests
            .iter()
            .find(|q| {
                q.stream == stream.id && q.type_url == EDS_TYPE && q.kind == RequestKind::Initial
            })
            .unwrap_or_else(|| panic!("stream {} did not re-subscribe to endpoints", stream.id));
        assert!(
            eds.initial_resource_versions.contains_key(&reviews_v1),
            "{eds:?}"
        );
    }
    // Reopened at once, not after a backoff: 4 streams of 2 s each in well under 15 s.
    assert!(Instant::now() < deadline);
    assert!(held.echo(b"across three connections to istiod\n").await);

    // The stream in use still takes updates.
    mesh.move_v1_to_v2(&gw, "an update after the reconnects never arrived")
        .await;
    assert!(held.echo(b"after the update\n").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_logged_with_its_cause_and_retried_with_backoff() {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    mesh.istiod.push();
    mesh.dir.write("istio-token", "not-the-token");
    let gw = Strait::spawn(mesh.ports, &mesh.config("DELTA", ""), &[], &[], &[]);
    assert!(
        gw.wait_stderr("Unauthenticated", Duration::from_secs(10)),
        "{}",
        gw.stderr_text()
    );
    let started = Instant::now();
    let at_start = mesh.istiod.streams_opened();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = mesh.istiod.streams_opened() - at_start;
    assert!(
        attempts <= 8,
        "{attempts} attempts in {:?}: not backing off",
        started.elapsed()
    );
    let (code, body) = http_get(gw.status, "/healthz/ready").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(gw.metric("strait_xds_stream_failures_total", &[("reason", "auth")]) >= 1.0);

    // A missing token file is named as such.
    std::fs::remove_file(mesh.dir.path().join("istio-token")).unwrap();
    assert!(
        gw.wait_stderr(
            "missing (is the projected istio-token volume mounted?)",
            Duration::from_secs(20)
        ),
        "{}",
        gw.stderr_text()
    );

    // The rotated token is read on the next attempt.
    mesh.dir.write("istio-token", TOKEN);
    gw.wait_ready(Duration::from_secs(30));
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &key("v1", REVIEWS)).await,
        mesh.v1.spiffe
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_istiod_certificate_is_named_as_the_cause() {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    mesh.istiod.push();
    let other = TestCa::new();
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            other.root.as_ref()
        )
    );
    let other_root = mesh.dir.write("other-root.pem", &pem);
    let config = mesh.config("DELTA", "").replace(
        &mesh.istiod.root_pem_path().unwrap().display().to_string(),
        &other_root.display().to_string(),
    );
    let gw = Strait::spawn(mesh.ports, &config, &[], &[], &[]);
    assert!(
        gw.wait_stderr("TLS handshake with", Duration::from_secs(10)),
        "{}",
        gw.stderr_text()
    );
    assert!(
        gw.stderr_text().contains("invalid peer certificate"),
        "{}",
        gw.stderr_text()
    );
    assert_eq!(http_get(gw.status, "/healthz/ready").unwrap().0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strait_route_explains_a_name_against_the_running_xds_snapshot() {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config("DELTA", ""));
    let run = |sni: &str| {
        std::process::Command::new(strait_bin())
            .args(["route", "--admin", &gw.admin.to_string(), sni])
            .output()
            .unwrap()
    };
    let out = run(&key("v1", REVIEWS));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("xds/0.0.0.0_15443/0"), "{text}");
    assert!(text.contains(&mesh.v1.addr.to_string()), "{text}");
    let out = run(&key("v2", REVIEWS));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("does not route"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_from_istiod_are_applied_as_sent_and_dns_clusters_resolve() {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    // reviews: v1 at priority 0, v2 at priority 1 (another region): v1 takes it all.
    let reviews = key("", REVIEWS);
    let p0 = [(mesh.v1.addr, 1, HealthStatus::Healthy)];
    let p1 = [(mesh.v2.addr, 1, HealthStatus::Healthy)];
    mesh.istiod.set_cla(&cla(
        &reviews,
        &[("us-east", "a", 0, &p0), ("us-west", "b", 1, &p1)],
    ));
    // ratings as a DNS ServiceEntry: a STRICT_DNS cluster with its endpoint inline.
    let ratings = key("", RATINGS);
    mesh.istiod.set_cluster(&dns_cluster(
        &ratings,
        "localhost",
        mesh.ratings.addr.port(),
    ));
    mesh.istiod.remove(EDS_TYPE, &ratings);
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config("DELTA", ""));
    for _ in 0..8 {
        assert_eq!(
            spiffe_through(mesh.gateway(), &mesh.ca, &reviews).await,
            mesh.v1.spiffe,
            "priority 1 took traffic while priority 0 was healthy"
        );
    }
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &ratings).await,
        mesh.ratings.spiffe,
        "{}",
        gw.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_filter_chain_is_reported_and_never_takes_the_listener_down() {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    // Two chains with the same match (istio#42050: duplicate DestinationRule subsets).
    let reviews = key("", REVIEWS);
    let reviews_v1 = key("v1", REVIEWS);
    let ratings = key("", RATINGS);
    let listener = ListenerSpec::new(
        mesh.gateway(),
        &[
            (&reviews, &reviews),
            (&reviews_v1, &reviews_v1),
            (&reviews_v1, &reviews),
            (&ratings, &ratings),
        ],
    )
    .name("0.0.0.0_15443")
    .build();
    mesh.istiod.set_listener(&listener);
    mesh.istiod.push();
    let gw = Strait::start(mesh.ports, &mesh.config("DELTA", ""));
    let nack = mesh
        .istiod
        .wait_nack(LDS_TYPE, Duration::from_secs(10))
        .await
        .expect("the duplicate is reported");
    let error = nack.error.unwrap_or_default();
    assert!(
        error.contains("same match") && error.contains(&reviews_v1),
        "{error}"
    );
    // The listener serves, the first of the two chains wins.
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &reviews_v1).await,
        mesh.v1.spiffe
    );
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &ratings).await,
        mesh.ratings.spiffe
    );
    assert!(
        gw.metric(
            "strait_xds_responses_total",
            &[("type", "lds"), ("result", "nack")]
        ) >= 1.0
    );
}

/// Connections through `gw` with `sni`: how many reached each identity (refusals as
/// "refused").
async fn tally(
    gw: SocketAddr,
    ca: &TestCa,
    sni: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let id = match tls_connect(gw, ca, sni, &["h2"]).await {
            Ok((mut tls, id)) => {
                assert_eq!(echo_once(&mut tls, b"x\n").await, b"x\n");
                id
            }
            Err(_) => "refused".to_string(),
        };
        *seen.entry(id).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_listeners_from_istiod_route_any_name_and_split_weighted_clusters() {
    let mesh = Mesh::start().await;
    mesh.serve_all();
    let xds = Workload::start(&mesh.ca, "spiffe://cluster.local/ns/istio-system/sa/istiod").await;
    let webhook = Workload::start(
        &mesh.ca,
        "spiffe://cluster.local/ns/istio-system/sa/istiod-webhook",
    )
    .await;
    let any = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let split = SocketAddr::from(([127, 0, 0, 1], free_port()));
    serve_expose_istiod(&mesh.istiod, any, split, xds.addr, webhook.addr);
    let gw = Strait::start(mesh.ports, &mesh.config("DELTA", ""));
    let ack = mesh
        .istiod
        .wait_ack(LDS_TYPE, Duration::from_secs(10))
        .await;
    assert!(
        ack.is_some(),
        "listeners not accepted: {:?}",
        mesh.istiod.requests(LDS_TYPE)
    );
    assert!(mesh.istiod.requests(LDS_TYPE).iter().all(|q| !q.is_nack()));

    // Any name on the `*` listener reaches istiod's 15012, with any ALPN.
    for sni in ["istiod.istio-system.svc", "istiod-remote.example.com"] {
        let t = tally(any, &mesh.ca, sni, 3).await;
        assert_eq!(
            t.get(&xds.spiffe),
            Some(&3),
            "{sni}: {t:?}; stderr:\n{}",
            gw.stderr_text()
        );
    }
    // The listed name is split 80/20 between 15012 and 443; another name is refused.
    let t = tally(split, &mesh.ca, "istiod.istio-system.svc", 500).await;
    let to_xds = t.get(&xds.spiffe).copied().unwrap_or(0);
    assert_eq!(
        to_xds + t.get(&webhook.spiffe).copied().unwrap_or(0),
        500,
        "{t:?}"
    );
    assert!(
        (360..=440).contains(&to_xds),
        "{t:?}: 80 % expected on 15012"
    );
    let t = tally(split, &mesh.ca, "other.example.com", 1).await;
    assert_eq!(t.get("refused"), Some(&1), "{t:?}");
    // The 15443 listener is served as before, beside them.
    assert_eq!(
        spiffe_through(mesh.gateway(), &mesh.ca, &key("v1", REVIEWS)).await,
        mesh.v1.spiffe
    );
    assert_eq!(
        gw.metric(
            "strait_route_destination_total",
            &[
                ("virtual_service", &format!("xds/0.0.0.0_{}", split.port())),
                ("destination_port", "15012"),
            ],
        ),
        to_xds as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_listeners_from_istiod_terminate_split_by_weight_and_apply_rbac() {
    let mesh = Mesh::start().await;
    let pki = MutualPki::new(mesh.dir.path());
    let (gw_certs, sleep, banned, outsider) = (pki.gateway, pki.sleep, pki.banned, pki.outsider);
    let (a, _a) = named_server("a").await;
    let (b, _b) = named_server("b").await;
    let split = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let opaque = SocketAddr::from(([127, 0, 0, 1], free_port()));
    serve_mutual_split(&mesh.istiod, split, opaque, a, b);
    // Only istiod asks for an ISTIO_MUTUAL server: the files name just the certificates.
    let gw = Strait::start(
        mesh.ports,
        &mesh.config(
            "DELTA",
            &format!("  certificates: {{dir: {}}}\n", gw_certs.display()),
        ),
    );
    assert!(
        mesh.istiod
            .wait_ack(LDS_TYPE, Duration::from_secs(10))
            .await
            .is_some()
    );
    assert!(
        mesh.istiod.requests(LDS_TYPE).iter().all(|q| !q.is_nack()),
        "{:?}",
        mesh.istiod.requests(LDS_TYPE)
    );

    // 1,000 connections, 8 at a time, through the 80/20 `tcp` route.
    const N: usize = 1000;
    let sni = "outbound_.9080_._.a.default.svc.cluster.local";
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (next, sleep) = (next.clone(), sleep.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                got.push(mtls_who(split, &sleep, sni).await);
            }
            got
        }));
    }
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        for who in t.await.unwrap() {
            let who = who.unwrap_or_else(|e| panic!("{e}\n{}", gw.stderr_text()));
            *count.entry(who).or_default() += 1;
        }
    }
    let to = |who: &str| count.get(who).copied().unwrap_or(0);
    assert_eq!(to("a") + to("b"), N, "{count:?}");
    assert!(
        (750..=850).contains(&to("a")),
        "{count:?}: 80 % expected on a"
    );
    let picks = |svc: &str| {
        gw.metric(
            "strait_route_destination_total",
            &[
                ("virtual_service", &format!("xds/0.0.0.0_{}", split.port())),
                ("destination_service", svc),
            ],
        )
    };
    assert_eq!(picks("a.default.svc.cluster.local"), to("a") as f64);
    assert_eq!(picks("b.default.svc.cluster.local"), to("b") as f64);

    // istiod's RBAC: DENY by principal, ALLOW by namespace; each refusal counted.
    assert!(mtls_who(split, &banned, sni).await.is_err());
    assert!(mtls_who(split, &outsider, sni).await.is_err());
    assert!(gw.eventually(Duration::from_secs(5), || {
        gw.metric("strait_refusals_total", &[("reason", "denied_by_policy")]) == 1.0
            && gw.metric(
                "strait_refusals_total",
                &[("reason", "not_allowed_by_policy")],
            ) == 1.0
    }));
    // A chain whose policy strait cannot evaluate is not served, and says why.
    assert!(mtls_who(opaque, &sleep, sni).await.is_err());
    let (_, dump) = http_get(gw.admin, "/config_dump").unwrap();
    assert!(
        dump.contains("not served, as a policy that cannot be evaluated"),
        "{dump}"
    );
    assert!(
        dump.contains("ns[istio-system]-policy[deny-banned]-rule[0]"),
        "the served server lists its RBAC: {dump}"
    );
}

/// Regenerates the seeds of the `xds_resources` fuzz target from these fixtures (records
/// of a kind byte, a little-endian u16 length and the encoded resource; see the target):
/// `cargo test --test xds regenerate_xds_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus/xds_resources; run with --ignored after changing the fixtures"]
fn regenerate_xds_fuzz_seeds() {
    use prost::Message;
    fn record(out: &mut Vec<u8>, kind: u8, m: &impl Message) {
        let body = m.encode_to_vec();
        out.push(kind);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&body);
    }
    fn clusters(out: &mut Vec<u8>, names: &[&str], at: SocketAddr) {
        for c in names {
            record(out, 1, &eds_cluster(c, None));
            let far = SocketAddr::new(at.ip(), at.port() + 1);
            record(
                out,
                2,
                &cla(
                    c,
                    &[
                        ("us-east", "a", 0, &[(at, 1, HealthStatus::Healthy)]),
                        ("us-west", "b", 1, &[(far, 2, HealthStatus::Healthy)]),
                    ],
                ),
            );
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/xds_resources");
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let a = "outbound_.9080_._.a.default.svc.cluster.local";
    let b = "outbound_.9080_.v2_.b.default.svc.cluster.local";

    let mut seed = Vec::new();
    record(&mut seed, 0, &listener_15443(at(15443), &[(a, a), (b, b)]));
    clusters(&mut seed, &[a, b], at(9080));
    std::fs::write(dir.join("auto_passthrough"), &seed).unwrap();

    let mut seed = Vec::new();
    let any: &[&str] = &["*"];
    let istiod: &[&str] = &["istiod.istio-system.svc"];
    let split = [(ISTIOD_XDS, 80), (ISTIOD_WEBHOOK, 20)];
    record(
        &mut seed,
        0,
        &passthrough_listener("0.0.0.0_15012", at(15012), &[(any, &[(ISTIOD_XDS, 1)])]),
    );
    record(
        &mut seed,
        0,
        &passthrough_listener("0.0.0.0_443", at(443), &[(istiod, &split)]),
    );
    clusters(&mut seed, &[ISTIOD_XDS, ISTIOD_WEBHOOK], at(15012));
    std::fs::write(dir.join("passthrough"), &seed).unwrap();

    let mut seed = Vec::new();
    let deny = istiod_rbac(
        RbacAction::Deny,
        "deny",
        vec![(
            Vec::new(),
            vec![principals(&["spiffe://cluster.local/ns/x/sa/y"])],
        )],
    );
    let allow = istiod_rbac(
        RbacAction::Allow,
        "allow",
        vec![(vec![ports(&[8443])], vec![namespaces(&["foo"])])],
    );
    let mut mixed = mutual_listener(
        "0.0.0.0_8443",
        at(8443),
        &["*.local"],
        &["spiffe://cluster.local/ns/foo/sa/sleep"],
        &[(MUTUAL_A, 80), (MUTUAL_B, 20)],
        &[deny, allow],
    );
    mixed.filter_chains.extend(
        passthrough_listener("0.0.0.0_8443", at(8443), &[(istiod, &[(ISTIOD_XDS, 1)])])
            .filter_chains,
    );
    record(&mut seed, 0, &mixed);
    clusters(&mut seed, &[MUTUAL_A, MUTUAL_B, ISTIOD_XDS], at(9080));
    std::fs::write(dir.join("istio_mutual_rbac"), &seed).unwrap();
}
