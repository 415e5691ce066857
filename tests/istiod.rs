//! strait on Istio's own control plane, beside Envoy: the real istiod (the Go harness
//! in `interop/`) generates the east-west gateway's configuration from Istio YAML and
//! Kubernetes objects, and strait and a real Envoy, both connected to it as `router`
//! nodes of network1, must route and refuse alike. istiod's `/debug/syncz` must show
//! strait SYNCED on every type, with no error.
//!
//! Each test builds a [`Lab`]: istiod, the workloads and the clients in a hub network
//! namespace; strait and Envoy each in a spoke of their own (both bind istiod's
//! `0.0.0.0_15443`). Skipped, loudly, where the harness or Envoy is missing, except
//! under CI.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::istiod::{
    EXPOSE_SERVICES, Istiod, IstiodOptions, Lab, PROXY_ISTIO_VERSION, PilotAgent, Spoke,
    envoy_gateway, istioctl_rows, peers_present, proxy_config_rows, strait_gateway,
};
use common::xds::Envoy;
use common::{Strait, TestCa, Workload, echo_once, tls_connect};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(30);

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

fn sni(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";
const RATINGS: &str = "ratings.default.svc.cluster.local";
const DETAILS: &str = "details.default.svc.cluster.local";

/// The address of hub workload `n` (`10.0.0.n`).
fn hub(n: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, n), 9080))
}

/// A WorkloadEntry of `reviews` at `addr`.
fn reviews_entry(name: &str, version: &str, network: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: default}}
spec:
  address: {ip}
  network: {network}
  serviceAccount: reviews-{version}
  labels: {{app: reviews, version: {version}}}
  ports: {{tcp-reviews: {port}}}
",
        ip = addr.ip(),
        port = addr.port()
    )
}

/// The reviews service (ServiceEntry selecting WorkloadEntries) with subsets v1–v3.
const REVIEWS_SERVICE: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 9080, name: tcp-reviews, protocol: TCP}]
  resolution: STATIC
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

/// details: a DNS-resolved ServiceEntry whose endpoint is a name the gateways'
/// namespaces resolve (`details.hub.test`).
const DETAILS_SERVICE: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details, namespace: default}
spec:
  hosts: [details.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 9080, name: tcp-details, protocol: TCP}]
  resolution: DNS
  endpoints:
  - address: details.hub.test
    network: network1
    serviceAccount: details
    labels: {app: details, security.istio.io/tlsMode: istio}
    ports: {tcp-details: 9080}
";

/// ratings: the production path, a Kubernetes Service with a Pod and an EndpointSlice.
const RATINGS_KUBE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
  labels: {topology.istio.io/network: network1}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  clusterIP: 10.96.0.21
  ports:
  - {name: tcp-ratings, port: 9080, targetPort: 9080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: ratings-1
  namespace: default
  labels: {app: ratings, security.istio.io/tlsMode: istio, topology.istio.io/network: network1}
spec:
  serviceAccountName: ratings
  nodeName: node1
  containers:
  - name: ratings
    image: ratings
    ports: [{containerPort: 9080}]
status:
  phase: Running
  podIP: 10.0.0.21
  podIPs: [{ip: 10.0.0.21}]
  conditions:
  - {type: Ready, status: \"True\"}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ratings-1
  namespace: default
  labels: {kubernetes.io/service-name: ratings}
addressType: IPv4
endpoints:
- addresses: [10.0.0.21]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: ratings-1, namespace: default}
ports:
- {name: tcp-ratings, port: 9080, protocol: TCP}
";

/// How one connection through a gateway ended: the workload that answered (its
/// SPIFFE ID), or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Reached(String),
    Refused,
}

/// One TLS connection to `gateway` with `sni` and `alpn`, echoing a line.
async fn attempt(gateway: SocketAddr, ca: &TestCa, sni: &str, alpn: &[&str]) -> Outcome {
    let exchange = async {
        let (mut tls, seen) = tls_connect(gateway, ca, sni, alpn).await.ok()?;
        let echoed = echo_once(&mut tls, b"ping\n").await;
        let _ = tls.shutdown().await;
        (echoed == b"ping\n").then_some(seen)
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Some(seen)) => Outcome::Reached(seen),
        _ => Outcome::Refused,
    }
}

/// The set of outcomes `tries` connections see.
async fn outcomes(
    gateway: SocketAddr,
    ca: &TestCa,
    sni: &str,
    alpn: &[&str],
    tries: usize,
) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..tries {
        seen.insert(match attempt(gateway, ca, sni, alpn).await {
            Outcome::Reached(id) => id,
            Outcome::Refused => "refused".to_string(),
        });
    }
    seen
}

/// Polls until every gateway gives `want` for `sni`, or `within` passes; what each
/// gave last on failure.
async fn settle(
    gateways: &[(&str, SocketAddr)],
    ca: &TestCa,
    sni: &str,
    alpn: &[&str],
    want: &Outcome,
    within: Duration,
) -> Result<(), Vec<(String, Outcome)>> {
    let deadline = Instant::now() + within;
    loop {
        let mut got = Vec::new();
        for (who, gw) in gateways {
            got.push((who.to_string(), attempt(*gw, ca, sni, alpn).await));
        }
        if got.iter().all(|(_, o)| o == want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(got);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`settle`] for each row of `table`; panics naming the row and what each gateway did.
async fn settle_table(
    gateways: &[(&str, SocketAddr)],
    ca: &TestCa,
    table: &[Row],
    context: impl Fn() -> String,
) {
    for (name, alpn, want) in table {
        if let Err(got) = settle(gateways, ca, name, alpn, want, WAIT).await {
            panic!(
                "{name} (ALPN {alpn:?}): want {want:?}; got {got:?}\n{}",
                context()
            );
        }
    }
}

/// An SNI, the ALPN offered, and how the connection must end.
type Row = (String, &'static [&'static str], Outcome);

const ISTIO_ALPN: &[&str] = &["istio"];

/// The names of the AUTO_PASSTHROUGH table: each subset, no subset, the production
/// (Kubernetes) and DNS services, a name in upper case; a subset only network2 has,
/// undeclared subsets, ports and hosts, and a ClientHello without an Istio ALPN.
fn routing_table(w: &Workloads) -> Vec<Row> {
    let reached = |w: &Workload| Outcome::Reached(w.spiffe.clone());
    vec![
        (sni(9080, "v1", REVIEWS), ISTIO_ALPN, reached(&w.v1)),
        (sni(9080, "v2", REVIEWS), ISTIO_ALPN, reached(&w.v2)),
        (sni(9080, "", RATINGS), ISTIO_ALPN, reached(&w.ratings)),
        (sni(9080, "", DETAILS), ISTIO_ALPN, reached(&w.details)),
        (
            sni(9080, "v1", REVIEWS).to_uppercase(),
            ISTIO_ALPN,
            reached(&w.v1),
        ),
        // Only network2 has v3: istiod sends no endpoint for it.
        (sni(9080, "v3", REVIEWS), ISTIO_ALPN, Outcome::Refused),
        (sni(9080, "v9", REVIEWS), ISTIO_ALPN, Outcome::Refused),
        (sni(9999, "", REVIEWS), ISTIO_ALPN, Outcome::Refused),
        (
            sni(9080, "", "nosuch.default.svc.cluster.local"),
            ISTIO_ALPN,
            Outcome::Refused,
        ),
        (sni(9080, "v1", REVIEWS), &["h2"], Outcome::Refused),
    ]
}

/// Everything a side-by-side test has: istiod, both gateways, and what they say when a
/// test fails.
struct SideBySide {
    istiod: Istiod,
    strait: Strait,
    envoy: Envoy,
    strait_spoke: Spoke,
    envoy_spoke: Spoke,
    _agent: PilotAgent,
}

const STRAIT_POD: &str = "istio-eastwestgateway-strait";
const ENVOY_POD: &str = "istio-eastwestgateway-envoy";

impl SideBySide {
    /// The proxy ids istiod gives the gateways (`<pod>.<namespace>`, as
    /// `istioctl proxy-status` lists them).
    fn strait_id(&self) -> String {
        format!("{STRAIT_POD}.istio-system")
    }

    fn envoy_id(&self) -> String {
        format!("{ENVOY_POD}.istio-system")
    }

    /// Logs of all three, for a failure message.
    fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- strait stderr\n{}\n--- envoy\n{}\n--- istiod\n{}",
            tail(self.strait.stderr_text()),
            tail(self.envoy.log()),
            tail(self.istiod.log())
        )
    }
}

/// The mesh of the AUTO_PASSTHROUGH test: reviews v1 and v2 (network1) and their
/// network2 peers, ratings from Kubernetes, details by DNS.
struct Workloads {
    v1: Workload,
    v2: Workload,
    v2_remote: Workload,
    v3_remote: Workload,
    ratings: Workload,
    details: Workload,
}

async fn start_workloads(ca: &TestCa) -> Workloads {
    Workloads {
        v1: Workload::start_at(ca, &spiffe("reviews-v1"), hub(11)).await,
        v2: Workload::start_at(ca, &spiffe("reviews-v2"), hub(12)).await,
        v2_remote: Workload::start_at(ca, &spiffe("reviews-v2-remote"), hub(13)).await,
        v3_remote: Workload::start_at(ca, &spiffe("reviews-v3-remote"), hub(14)).await,
        ratings: Workload::start_at(ca, &spiffe("ratings"), hub(21)).await,
        details: Workload::start_at(ca, &spiffe("details"), hub(31)).await,
    }
}

/// istiod with the multi-network mesh written; with or without the extensions only
/// istio-proxy has ([`IstiodOptions::istio_proxy_extensions`]).
async fn mesh_istiod(istio_proxy_extensions: bool) -> Istiod {
    let istiod = Istiod::start(IstiodOptions {
        kubernetes: true,
        debounce: Some("20ms".into()),
        istio_proxy_extensions,
        ..Default::default()
    })
    .await;
    istiod.apply("expose-services.yaml", EXPOSE_SERVICES);
    istiod.apply("reviews.yaml", REVIEWS_SERVICE);
    istiod.apply(
        "reviews-v1.yaml",
        &reviews_entry("reviews-v1", "v1", "network1", hub(11)),
    );
    istiod.apply(
        "reviews-v2.yaml",
        &reviews_entry("reviews-v2", "v2", "network1", hub(12)),
    );
    istiod.apply(
        "reviews-v2-remote.yaml",
        &reviews_entry("reviews-v2-remote", "v2", "network2", hub(13)),
    );
    istiod.apply(
        "reviews-v3-remote.yaml",
        &reviews_entry("reviews-v3-remote", "v3", "network2", hub(14)),
    );
    istiod.apply("details.yaml", DETAILS_SERVICE);
    istiod.apply_kube("ratings.yaml", RATINGS_KUBE);
    istiod
}

/// A gateway's spoke, with the DNS service's name resolvable in it.
fn gateway_spoke(lab: &Lab, tag: &str) -> Spoke {
    let spoke = lab.spoke(tag);
    spoke.hosts(&[("details.hub.test", Ipv4Addr::new(10, 0, 0, 31))]);
    spoke
}

/// istiod with the multi-network mesh written (for upstream Envoy), then strait and
/// Envoy connected to it.
async fn side_by_side(lab: &Lab) -> SideBySide {
    side_by_side_with(lab, &[], false).await
}

/// [`side_by_side`] with `extra` Istio YAML written too, and strait given the SVID
/// pilot-agent serves Envoy (as files) when `strait_certs`.
async fn side_by_side_with(lab: &Lab, extra: &[(&str, &str)], strait_certs: bool) -> SideBySide {
    let istiod = mesh_istiod(false).await;
    for (name, yaml) in extra {
        istiod.apply(name, yaml);
    }
    let strait_spoke = gateway_spoke(lab, "strait");
    let envoy_spoke = gateway_spoke(lab, "envoy");
    let agent = PilotAgent::start(&istiod).await;
    let certs = if strait_certs {
        format!("  certificates: {{dir: {}}}\n", agent.certs.display())
    } else {
        String::new()
    };
    let strait = strait_gateway(&strait_spoke, STRAIT_POD, &certs);
    let envoy = envoy_gateway(&envoy_spoke, ENVOY_POD, &agent)
        .await
        .expect("envoy (checked by peers_present)");
    SideBySide {
        istiod,
        strait,
        envoy,
        strait_spoke,
        envoy_spoke,
        _agent: agent,
    }
}

/// Istio's multi-network AUTO_PASSTHROUGH, generated by the real istiod: for each name
/// in the table, strait reaches the workload Envoy reaches, or both refuse; network2's
/// endpoints are never dialled; istiod sees strait SYNCED on every type it sent, with
/// no error.
#[test]
fn auto_passthrough_from_the_real_istiod_routes_as_envoy_does() {
    if !peers_present() {
        return;
    }
    let lab = Lab::new("ap");
    lab.run(|| async {
        let ca = TestCa::new();
        let w = start_workloads(&ca).await;
        let s = side_by_side(&lab).await;
        let (strait, envoy) = (s.strait_spoke.gateway(), s.envoy_spoke.gateway());

        let both = [("strait", strait), ("envoy", envoy)];
        settle_table(&both, &ca, &routing_table(&w), || s.logs()).await;
        // The service without a subset spreads over network1's two and nothing else.
        let local = [w.v1.spiffe.clone(), w.v2.spiffe.clone()].into();
        for (who, gw) in both {
            let seen = outcomes(gw, &ca, &sni(9080, "", REVIEWS), ISTIO_ALPN, 20).await;
            assert_eq!(seen, local, "{who}: reviews without a subset\n{}", s.logs());
        }
        assert_eq!(w.v2_remote.accepted(), 0, "network2's v2 was dialled");
        assert_eq!(w.v3_remote.accepted(), 0, "network2's v3 was dialled");

        for id in [s.strait_id(), s.envoy_id()] {
            let entry = s
                .istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
            assert_eq!(
                entry["istio_version"], PROXY_ISTIO_VERSION,
                "{id}: {entry:#}"
            );
            assert_eq!(entry["cluster_id"], "cluster1", "{id}: {entry:#}");
        }
        // istiod parses strait's node as it parses Envoy's: nothing it says of strait
        // (a metadata field of the wrong type, an unknown version) that it does not
        // say of Envoy.
        let of_strait = s.istiod.complaints_about(STRAIT_POD);
        let of_envoy = s.istiod.complaints_about(ENVOY_POD);
        let only_strait: Vec<_> = of_strait.difference(&of_envoy).collect();
        assert!(
            only_strait.is_empty(),
            "istiod complains of strait only: {only_strait:#?}"
        );
    });
}

/// strait's admin `config_dump`, fetched from the hub.
fn config_dump(strait: &Strait) -> serde_json::Value {
    let (status, body) = common::http_get(strait.admin, "/config_dump").expect("admin");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config_dump is JSON")
}

/// The xDS types strait has NACKed, with the last rejection of each.
fn nacks(dump: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    dump["discovery"]["types"]
        .as_object()
        .map(|types| {
            types
                .iter()
                .filter(|(_, t)| t["nacks"].as_u64().unwrap_or(0) > 0)
                .map(|(name, t)| (name.clone(), t["lastRejection"].clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// What a production istiod sends, `istio.stats` before every `tcp_proxy` and the
/// `istio.metadata_exchange` cluster filter included (extensions only istio-proxy
/// has): strait acknowledges all of it, routes the same table as on the output Envoy
/// was compared on, and lists what it acknowledged without acting on it.
#[test]
fn istiods_production_output_is_acknowledged_and_routed() {
    if common::istiod::harness_bin().is_none() {
        return;
    }
    let lab = Lab::new("prod");
    lab.run(|| async {
        let ca = TestCa::new();
        let w = start_workloads(&ca).await;
        let istiod = mesh_istiod(true).await;
        let spoke = gateway_spoke(&lab, "strait");
        let strait = strait_gateway(&spoke, STRAIT_POD, "");
        let context = || {
            format!(
                "--- strait\n{}\n--- istiod\n{}",
                strait.stderr_text(),
                istiod.log()
            )
        };
        settle_table(
            &[("strait", spoke.gateway())],
            &ca,
            &routing_table(&w),
            context,
        )
        .await;
        if let Err(e) = istiod
            .wait_synced(&format!("{STRAIT_POD}.istio-system"), WAIT)
            .await
        {
            panic!("{e}\n{}", context());
        }
        // strait ACKs a response before it records what it made of it: wait for the
        // record.
        let ignored_stats = |d: &serde_json::Value| {
            d["discovery"]["ignoredFilters"]["0.0.0.0_15443"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "istio.stats"))
        };
        let noted_exchange = |d: &serde_json::Value| {
            d["discovery"]["clusterNotes"][sni(9080, "v1", REVIEWS)]
                .as_array()
                .is_some_and(|n| {
                    n.iter().any(|n| {
                        n.as_str()
                            .is_some_and(|n| n.contains("istio.metadata_exchange"))
                    })
                })
        };
        let deadline = Instant::now() + WAIT;
        let mut dump = config_dump(&strait);
        while !(ignored_stats(&dump) && noted_exchange(&dump)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            dump = config_dump(&strait);
        }
        assert_eq!(nacks(&dump), vec![], "{:#}", dump["discovery"]);
        assert!(
            ignored_stats(&dump),
            "istio.stats is not listed as acknowledged and not run: {:#}",
            dump["discovery"]
        );
        assert!(
            noted_exchange(&dump),
            "the metadata exchange cluster filter is not listed as not run: {:#}",
            dump["discovery"]
        );
        assert_eq!(w.v2_remote.accepted() + w.v3_remote.accepted(), 0);
    });
}

/// Opens a TLS session to `sni` through `gateway` that stays open; checks it echoes.
async fn open_tunnel(
    gateway: SocketAddr,
    ca: &TestCa,
    sni: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let (mut tls, _) = tls_connect(gateway, ca, sni, ISTIO_ALPN)
        .await
        .unwrap_or_else(|e| panic!("tunnel through {gateway}: {e}"));
    assert_eq!(echo_once(&mut tls, b"open\n").await, b"open\n");
    tls
}

/// Round trips to `sni` through every gateway, over and over until `stop`; counts the
/// ones that failed, per gateway.
fn steady_traffic(
    gateways: &[(&'static str, SocketAddr)],
    ca: &std::sync::Arc<TestCa>,
    sni: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(&'static str, u64, u64)>> {
    let gateways = gateways.to_vec();
    let ca = ca.clone();
    tokio::spawn(async move {
        let mut tally: Vec<(&'static str, u64, u64)> =
            gateways.iter().map(|(who, _)| (*who, 0, 0)).collect();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (i, (_, gw)) in gateways.iter().enumerate() {
                tally[i].1 += 1;
                if matches!(attempt(*gw, &ca, &sni, ISTIO_ALPN).await, Outcome::Refused) {
                    tally[i].2 += 1;
                }
            }
        }
        tally
    })
}

/// Editing istiod's YAML while traffic flows: a WorkloadEntry added and removed, a
/// subset added, a service removed, the Gateway's hosts narrowed. strait and Envoy
/// follow alike, connections to what did not change never fail, tunnels opened before
/// survive every change, and nothing is NACKed.
#[test]
fn istiod_edits_under_traffic_are_followed_alike() {
    if !peers_present() {
        return;
    }
    let lab = Lab::new("edit");
    lab.run(|| async {
        let ca = std::sync::Arc::new(TestCa::new());
        let w = start_workloads(&ca).await;
        let v1b = Workload::start_at(&ca, &spiffe("reviews-v1b"), hub(15)).await;
        let s = side_by_side(&lab).await;
        let both = [
            ("strait", s.strait_spoke.gateway()),
            ("envoy", s.envoy_spoke.gateway()),
        ];
        let v1 = sni(9080, "v1", REVIEWS);
        settle_table(&both, &ca, &routing_table(&w), || s.logs()).await;
        let mut tunnels = Vec::new();
        for (_, gw) in both {
            tunnels.push(open_tunnel(gw, &ca, &v1).await);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = steady_traffic(&both, &ca, sni(9080, "v2", REVIEWS), stop.clone());

        // A WorkloadEntry added: v1 now also reaches v1b, through both.
        s.istiod.apply(
            "reviews-v1b.yaml",
            &reviews_entry("reviews-v1b", "v1", "network1", hub(15)),
        );
        for (who, gw) in both {
            let deadline = Instant::now() + WAIT;
            while attempt(gw, &ca, &v1, ISTIO_ALPN).await != Outcome::Reached(v1b.spiffe.clone()) {
                assert!(
                    Instant::now() < deadline,
                    "{who} never reached the added v1b\n{}",
                    s.logs()
                );
            }
        }
        // ... and removed: v1 reaches only v1 again.
        s.istiod.delete("reviews-v1b.yaml");
        settle(
            &both,
            &ca,
            &v1,
            ISTIO_ALPN,
            &Outcome::Reached(w.v1.spiffe.clone()),
            WAIT,
        )
        .await
        .unwrap_or_else(|got| panic!("v1b removed: {got:?}\n{}", s.logs()));
        let before = v1b.accepted();
        for (who, gw) in both {
            let seen = outcomes(gw, &ca, &v1, ISTIO_ALPN, 10).await;
            assert_eq!(
                seen,
                [w.v1.spiffe.clone()].into(),
                "{who} after v1b was removed"
            );
        }
        assert_eq!(v1b.accepted(), before, "a removed endpoint was dialled");

        // A subset added.
        s.istiod.apply(
            "reviews.yaml",
            &format!("{REVIEWS_SERVICE}  - {{name: v2b, labels: {{version: v2}}}}\n"),
        );
        let v2b = sni(9080, "v2b", REVIEWS);
        settle(
            &both,
            &ca,
            &v2b,
            ISTIO_ALPN,
            &Outcome::Reached(w.v2.spiffe.clone()),
            WAIT,
        )
        .await
        .unwrap_or_else(|got| panic!("subset v2b added: {got:?}\n{}", s.logs()));

        // A service removed.
        s.istiod.delete("details.yaml");
        settle(
            &both,
            &ca,
            &sni(9080, "", DETAILS),
            ISTIO_ALPN,
            &Outcome::Refused,
            WAIT,
        )
        .await
        .unwrap_or_else(|got| panic!("details removed: {got:?}\n{}", s.logs()));

        // The Gateway's hosts narrowed to reviews alone.
        s.istiod.apply(
            "expose-services.yaml",
            &EXPOSE_SERVICES.replace("\"*.local\"", "reviews.default.svc.cluster.local"),
        );
        settle(
            &both,
            &ca,
            &sni(9080, "", RATINGS),
            ISTIO_ALPN,
            &Outcome::Refused,
            WAIT,
        )
        .await
        .unwrap_or_else(|got| panic!("hosts narrowed: {got:?}\n{}", s.logs()));
        settle(
            &both,
            &ca,
            &v1,
            ISTIO_ALPN,
            &Outcome::Reached(w.v1.spiffe.clone()),
            WAIT,
        )
        .await
        .unwrap_or_else(|got| panic!("reviews after narrowing: {got:?}\n{}", s.logs()));

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let tally = traffic.await.unwrap();
        for (who, made, failed) in tally {
            assert!(made > 0, "{who}: no steady traffic was sent");
            assert_eq!(
                failed,
                0,
                "{who}: {failed} of {made} connections to v2 failed during the edits\n{}",
                s.logs()
            );
        }
        for (tunnel, (who, _)) in tunnels.iter_mut().zip(both) {
            assert_eq!(
                echo_once(tunnel, b"still here\n").await,
                b"still here\n",
                "{who}: a tunnel opened before the edits was cut"
            );
        }
        for id in [s.strait_id(), s.envoy_id()] {
            s.istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        }
        let dump = config_dump(&s.strait);
        assert_eq!(nacks(&dump), vec![], "{:#}", dump["discovery"]);
    });
}

/// istiod stopped and started again (same CA, files and ports) under traffic: both
/// gateways keep serving what they had, tunnels survive, and both streams resume and
/// are SYNCED again.
#[test]
fn istiod_restarted_under_traffic_changes_nothing_serving() {
    if !peers_present() {
        return;
    }
    let lab = Lab::new("restart");
    lab.run(|| async {
        let ca = std::sync::Arc::new(TestCa::new());
        let w = start_workloads(&ca).await;
        let mut s = side_by_side(&lab).await;
        let both = [
            ("strait", s.strait_spoke.gateway()),
            ("envoy", s.envoy_spoke.gateway()),
        ];
        let table = routing_table(&w);
        settle_table(&both, &ca, &table, || s.logs()).await;
        for id in [s.strait_id(), s.envoy_id()] {
            s.istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        }
        let v1 = sni(9080, "v1", REVIEWS);
        let mut tunnels = Vec::new();
        for (_, gw) in both {
            tunnels.push(open_tunnel(gw, &ca, &v1).await);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let traffic = steady_traffic(&both, &ca, sni(9080, "v2", REVIEWS), stop.clone());

        assert_eq!(s.istiod.stop(), Some(0), "istiod's exit on SIGTERM");
        // While it is away, everything routes as before and strait stays ready.
        for (name, alpn, want) in &table {
            for (who, gw) in both {
                let got = attempt(gw, &ca, name, alpn).await;
                assert_eq!(&got, want, "{who}, {name}, istiod stopped\n{}", s.logs());
            }
        }
        let (status, _) = common::http_get(s.strait.status, "/healthz/ready").unwrap();
        assert_eq!(status, 200, "strait left ready while istiod was away");

        s.istiod.restart().await;
        for id in [s.strait_id(), s.envoy_id()] {
            s.istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", s.logs()));
        }
        settle_table(&both, &ca, &table, || s.logs()).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for (who, made, failed) in traffic.await.unwrap() {
            assert!(made > 0, "{who}: no steady traffic was sent");
            assert_eq!(
                failed,
                0,
                "{who}: {failed} of {made} connections failed across the restart\n{}",
                s.logs()
            );
        }
        for (tunnel, (who, _)) in tunnels.iter_mut().zip(both) {
            assert_eq!(
                echo_once(tunnel, b"still here\n").await,
                b"still here\n",
                "{who}: a tunnel was cut by istiod's restart"
            );
        }
        assert_eq!(s.istiod.starts(), 2);
        let dump = config_dump(&s.strait);
        assert!(
            dump["discovery"]["streams"].as_u64().unwrap_or(0) >= 2,
            "strait did not open a new stream: {:#}",
            dump["discovery"]
        );
        assert_eq!(nacks(&dump), vec![], "{:#}", dump["discovery"]);
    });
}

/// Istio's `samples/multicluster/expose-istiod.yaml`: PASSTHROUGH servers on 15012 and
/// 15017 and the VirtualService `tls` routes to istiod's Service.
const EXPOSE_ISTIOD: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: istiod-gateway
  namespace: istio-system
spec:
  selector:
    istio: eastwestgateway
  servers:
    - port:
        name: tls-istiod
        number: 15012
        protocol: tls
      tls:
        mode: PASSTHROUGH
      hosts:
        - \"*\"
    - port:
        name: tls-istiodwebhook
        number: 15017
        protocol: tls
      tls:
        mode: PASSTHROUGH
      hosts:
        - \"*\"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: istiod-vs
  namespace: istio-system
spec:
  hosts:
  - \"*\"
  gateways:
  - istiod-gateway
  tls:
  - match:
    - port: 15012
      sniHosts:
      - \"*\"
    route:
    - destination:
        host: istiod.istio-system.svc.cluster.local
        port:
          number: 15012
  - match:
    - port: 15017
      sniHosts:
      - \"*\"
    route:
    - destination:
        host: istiod.istio-system.svc.cluster.local
        port:
          number: 443
";

/// istiod's Service as a cluster has it (a Pod at 10.0.0.41 behind 15012 and 443 →
/// 15017), for the routes of `expose-istiod.yaml`.
const ISTIOD_KUBE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
  labels: {topology.istio.io/network: network1}
---
apiVersion: v1
kind: Service
metadata: {name: istiod, namespace: istio-system}
spec:
  selector: {app: istiod}
  clusterIP: 10.96.0.10
  ports:
  - {name: grpc-xds, port: 15012, targetPort: 15012, protocol: TCP}
  - {name: https-webhook, port: 443, targetPort: 15017, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: istiod-1
  namespace: istio-system
  labels: {app: istiod, topology.istio.io/network: network1}
spec:
  serviceAccountName: istiod
  nodeName: node1
  containers:
  - name: discovery
    image: pilot
    ports: [{containerPort: 15012}, {containerPort: 15017}]
status:
  phase: Running
  podIP: 10.0.0.41
  podIPs: [{ip: 10.0.0.41}]
  conditions:
  - {type: Ready, status: \"True\"}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: istiod-1
  namespace: istio-system
  labels: {kubernetes.io/service-name: istiod}
addressType: IPv4
endpoints:
- addresses: [10.0.0.41]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: istiod-1, namespace: istio-system}
ports:
- {name: grpc-xds, port: 15012, protocol: TCP}
- {name: https-webhook, port: 15017, protocol: TCP}
";

/// An ISTIO_MUTUAL server on 15444 whose `tcp` route splits 80/20 between two
/// sidecar-less workloads of `echo` (subsets a and b).
const MUTUAL_ECHO: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mutual-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15444, name: tls-mutual, protocol: TLS}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [\"*\"]
  gateways: [istio-system/mutual-gateway]
  tcp:
  - match: [{port: 15444}]
    route:
    - {destination: {host: echo.default.svc.cluster.local, subset: a, port: {number: 7070}}, weight: 80}
    - {destination: {host: echo.default.svc.cluster.local, subset: b, port: {number: 7070}}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 7070, name: tcp-echo, protocol: TCP}]
  resolution: STATIC
  workloadSelector: {labels: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo.default.svc.cluster.local
  subsets:
  - {name: a, labels: {version: a}}
  - {name: b, labels: {version: b}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-a, namespace: default}
spec:
  address: 10.0.0.51
  network: network1
  labels: {app: echo, version: a}
  ports: {tcp-echo: 7070}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-b, namespace: default}
spec:
  address: 10.0.0.52
  network: network1
  labels: {app: echo, version: b}
  ports: {tcp-echo: 7070}
";

/// AuthorizationPolicies selecting the gateway: ALLOW namespace foo, DENY foo/banned.
const GATEWAY_POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-foo, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: eastwestgateway}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [foo]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-banned, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: eastwestgateway}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/banned]}}]
";

/// Who answered an mTLS connection to an ISTIO_MUTUAL server (the named workload), or
/// `refused`.
async fn mutual_who(gw: SocketAddr, certs: &std::path::Path, sni: &str) -> String {
    common::mtls_who(gw, certs, sni)
        .await
        .unwrap_or_else(|_| "refused".into())
}

/// `expose-istiod.yaml` (PASSTHROUGH with VirtualService `tls` routes) and an
/// ISTIO_MUTUAL server with a weighted `tcp` route, then AuthorizationPolicies selecting
/// the gateway (ALLOW by namespace, DENY by principal): on istiod's listeners, istiod's
/// own RBAC filters included, strait and Envoy route, split and refuse alike.
#[test]
fn passthrough_and_istio_mutual_from_the_real_istiod_alike() {
    if !peers_present() {
        return;
    }
    let lab = Lab::new("mutual");
    lab.run(|| async {
        let ca = TestCa::new();
        let xds = Workload::start_at(
            &ca,
            &spiffe("istiod-xds"),
            "10.0.0.41:15012".parse().unwrap(),
        )
        .await;
        let webhook = Workload::start_at(
            &ca,
            &spiffe("istiod-webhook"),
            "10.0.0.41:15017".parse().unwrap(),
        )
        .await;
        let _a = common::named_server_at("echo-a", "10.0.0.51:7070".parse().unwrap()).await;
        let _b = common::named_server_at("echo-b", "10.0.0.52:7070".parse().unwrap()).await;

        let istiod = Istiod::start(IstiodOptions {
            kubernetes: true,
            debounce: Some("20ms".into()),
            ..Default::default()
        })
        .await;
        istiod.apply_kube("istiod.yaml", ISTIOD_KUBE);
        istiod.apply("expose-istiod.yaml", EXPOSE_ISTIOD);
        istiod.apply("mutual.yaml", MUTUAL_ECHO);
        let agent = PilotAgent::start(&istiod).await;
        let strait_spoke = lab.spoke("strait");
        let envoy_spoke = lab.spoke("envoy");
        let strait = strait_gateway(
            &strait_spoke,
            STRAIT_POD,
            &format!("  certificates: {{dir: {}}}\n", agent.certs.display()),
        );
        let envoy = envoy_gateway(&envoy_spoke, ENVOY_POD, &agent)
            .await
            .expect("envoy (checked by peers_present)");
        let logs = || {
            format!(
                "--- strait\n{}\n--- envoy\n{}\n--- istiod\n{}",
                strait.stderr_text(),
                envoy.log(),
                istiod.log()
            )
        };
        let at = |spoke: &Spoke, port: u16| SocketAddr::from((spoke.ip, port));
        let gateways = [("strait", &strait_spoke), ("envoy", &envoy_spoke)];

        // PASSTHROUGH: any name on 15012 reaches istiod's 15012, on 15017 its webhook.
        for (port, workload) in [(15012, &xds), (15017, &webhook)] {
            let want = Outcome::Reached(workload.spiffe.clone());
            let on_port: Vec<(&str, SocketAddr)> = gateways
                .iter()
                .map(|(who, s)| (*who, at(s, port)))
                .collect();
            for name in ["istiod.istio-system.svc", "anything.example"] {
                settle(&on_port, &ca, name, &["h2"], &want, WAIT)
                    .await
                    .unwrap_or_else(|got| panic!("{name} on {port}: {got:?}\n{}", logs()));
            }
        }

        // ISTIO_MUTUAL: a sidecar of namespace foo is split 80/20 between a and b.
        let pki = common::TempDir::new("clients");
        let client =
            |id: &str, name: &str| common::mesh_cert(&istiod.ca_dir(), id, &pki.path().join(name));
        let sleep = client("spiffe://cluster.local/ns/foo/sa/sleep", "sleep");
        let banned = client("spiffe://cluster.local/ns/foo/sa/banned", "banned");
        let stranger = client("spiffe://cluster.local/ns/bar/sa/sleep", "stranger");
        let echo = "echo.default.svc.cluster.local";
        for (who, spoke) in gateways {
            let gw = at(spoke, 15444);
            let deadline = Instant::now() + WAIT;
            while mutual_who(gw, &sleep, echo).await == "refused" {
                assert!(
                    Instant::now() < deadline,
                    "{who}: ISTIO_MUTUAL never served\n{}",
                    logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut to_a = 0;
            let total = 200;
            for _ in 0..total {
                match mutual_who(gw, &sleep, echo).await.as_str() {
                    "echo-a" => to_a += 1,
                    "echo-b" => {}
                    other => panic!("{who}: {other}\n{}", logs()),
                }
            }
            assert!(
                (140..=180).contains(&to_a),
                "{who}: {to_a} of {total} to subset a, where the route says 80 %"
            );
        }

        // Policies selecting the gateway: ALLOW foo, DENY foo/banned.
        istiod.apply("policies.yaml", GATEWAY_POLICIES);
        let matrix = [
            (&banned, "refused"),
            (&stranger, "refused"),
            (&sleep, "echo"),
        ];
        for (certs, want) in matrix {
            for (who, spoke) in gateways {
                let gw = at(spoke, 15444);
                let deadline = Instant::now() + WAIT;
                loop {
                    let got = mutual_who(gw, certs, echo).await;
                    if got.starts_with(want) {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{who}: {} got {got}, want {want}\n{}",
                        certs.display(),
                        logs()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // istiod puts the same RBAC on the PASSTHROUGH chains, where no TLS is
        // terminated and so no principal is seen: ALLOW by namespace admits nobody
        // there, on either gateway.
        for port in [15012u16, 15017] {
            let on_port: Vec<(&str, SocketAddr)> = gateways
                .iter()
                .map(|(who, s)| (*who, at(s, port)))
                .collect();
            settle(
                &on_port,
                &ca,
                "istiod.istio-system.svc",
                &["h2"],
                &Outcome::Refused,
                WAIT,
            )
            .await
            .unwrap_or_else(|got| panic!("port {port} under the policies: {got:?}\n{}", logs()));
        }
        for id in [
            format!("{STRAIT_POD}.istio-system"),
            format!("{ENVOY_POD}.istio-system"),
        ] {
            istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        }
        let dump = config_dump(&strait);
        assert_eq!(nacks(&dump), vec![], "{:#}", dump["discovery"]);
    });
}

/// `istioctl proxy-status --verbosity 1`, built from the same Istio module, asking the
/// harness's istiod directly (`--xds-address`, as for an out-of-cluster control plane):
/// strait is listed (istiod lists only nodes that send `PROXY_CONFIG`), and its row reads
/// as Envoy's does: SYNCED for CDS, LDS and EDS, the same istiod, cluster and version.
#[test]
fn istioctl_proxy_status_shows_strait_as_it_shows_envoy() {
    if !peers_present() {
        return;
    }
    let Some(istioctl) = common::istiod::istioctl_bin() else {
        return;
    };
    let lab = Lab::new("ps");
    lab.run(|| async {
        let ca = TestCa::new();
        let w = start_workloads(&ca).await;
        let s = side_by_side(&lab).await;
        let both = [
            ("strait", s.strait_spoke.gateway()),
            ("envoy", s.envoy_spoke.gateway()),
        ];
        settle_table(&both, &ca, &routing_table(&w)[..1], || s.logs()).await;
        for id in [s.strait_id(), s.envoy_id()] {
            s.istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        }
        let stdout = s
            .istiod
            .istioctl_proxy_status(&istioctl, &["--verbosity", "1"]);
        let rows = istioctl_rows(&stdout);
        let row = |id: &str| {
            rows.iter()
                .find(|r| r.get("NAME").is_some_and(|n| n == id))
                .cloned()
                .unwrap_or_else(|| panic!("no row for {id}:\n{stdout}"))
        };
        let (strait, envoy) = (row(&s.strait_id()), row(&s.envoy_id()));
        // "SYNCED (3s)": the state, without how long ago.
        let state = |v: &String| v.split_whitespace().next().unwrap_or("").to_string();
        for column in ["CDS", "LDS", "EDS"] {
            assert_eq!(
                strait.get(column).map(state).as_deref(),
                Some("SYNCED"),
                "{column}:\n{stdout}"
            );
        }
        for (column, value) in &envoy {
            if column == "NAME" || column == "VERSION" {
                continue;
            }
            assert_eq!(
                strait.get(column).map(state),
                Some(state(value)),
                "{column} differs:\n{stdout}"
            );
        }
        assert_eq!(
            strait.get("VERSION").map(String::as_str),
            Some(PROXY_ISTIO_VERSION),
            "{stdout}"
        );
    });
}

/// An admin endpoint's JSON, fetched from the hub.
async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = common::xds::http11_get(admin, path).await.expect("admin");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
}

/// Envoy's dumps without what its bootstrap declares (the xDS and SDS clusters, the
/// admin-side listeners): what istiod sent is what both gateways are compared on.
fn dynamic_only(mut dump: serde_json::Value) -> serde_json::Value {
    if let Some(configs) = dump["configs"].as_array_mut() {
        configs.retain(|c| {
            !c["@type"]
                .as_str()
                .unwrap_or("")
                .ends_with("BootstrapConfigDump")
        });
        for c in configs {
            if let Some(o) = c.as_object_mut() {
                o.remove("static_clusters");
                o.remove("static_listeners");
                o.remove("static_secrets");
            }
        }
    }
    if let Some(statuses) = dump["cluster_statuses"].as_array_mut() {
        statuses.retain(|c| c["added_via_api"] == true);
    }
    dump
}

/// Which of Envoy's rows a comparison keeps: for a table (`listener`, `cluster`, …),
/// given strait's and Envoy's config dumps, a test on the row's cluster name, or `None`
/// for every row.
type RowFilter = Box<dyn Fn(&str) -> bool>;

/// Until [`WAIT`] passes: `istioctl proxy-config listener|cluster|endpoint|secret
/// --file` prints the same rows for strait's admin dumps as for Envoy's (Envoy's rows
/// restricted by `keep`). strait records what it accepted just after it acknowledges,
/// so a first read may be behind.
async fn same_proxy_config_rows(
    istioctl: &std::path::Path,
    strait_admin: SocketAddr,
    envoy_admin: SocketAddr,
    keep: impl Fn(&str, &serde_json::Value, &serde_json::Value) -> Option<RowFilter>,
) {
    type Rows = Vec<std::collections::BTreeMap<String, String>>;
    let dir = common::TempDir::new("proxy-config");
    let deadline = Instant::now() + WAIT;
    for what in ["listener", "cluster", "endpoint", "secret"] {
        loop {
            let mut dumps = Vec::new();
            for (who, admin) in [("strait", strait_admin), ("envoy", envoy_admin)] {
                let mut dump = admin_json(admin, "/config_dump?include_eds").await;
                let mut clusters = admin_json(admin, "/clusters?format=json").await;
                if who == "envoy" {
                    (dump, clusters) = (dynamic_only(dump), dynamic_only(clusters));
                }
                dir.write(&format!("{who}-config.json"), &dump.to_string());
                dir.write(&format!("{who}-clusters.json"), &clusters.to_string());
                dumps.push(dump);
            }
            let rows = |who: &str| {
                let file = if what == "endpoint" {
                    "clusters"
                } else {
                    "config"
                };
                proxy_config_rows(
                    istioctl,
                    what,
                    &dir.path().join(format!("{who}-{file}.json")),
                )
            };
            let of_strait = rows("strait");
            let mut of_envoy = rows("envoy");
            if let Some(keep) = keep(what, &dumps[0], &dumps[1]) {
                of_envoy.retain(|r| row_cluster(r).is_none_or(|c| keep(&c)));
            }
            if of_strait == of_envoy && !of_envoy.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let only = |a: &Rows, b: &Rows| -> Rows {
                    a.iter().filter(|r| !b.contains(r)).cloned().collect()
                };
                // The dumps outlive the test's folder, for reading.
                let kept = std::env::temp_dir()
                    .join(format!("strait-proxy-config-{}", std::process::id()));
                let _ = std::fs::create_dir_all(&kept);
                for f in [
                    "strait-config",
                    "strait-clusters",
                    "envoy-config",
                    "envoy-clusters",
                ] {
                    let f = format!("{f}.json");
                    let _ = std::fs::copy(dir.path().join(&f), kept.join(&f));
                }
                panic!(
                    "istioctl proxy-config {what}: rows differ (dumps kept in {})\nonly strait: {:#?}\nonly envoy: {:#?}",
                    kept.display(),
                    only(&of_strait, &of_envoy),
                    only(&of_envoy, &of_strait),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The cluster an `istioctl proxy-config` row is about: the `CLUSTER` column of the
/// endpoint table; in the cluster table the name itself, or for a sidecar-style
/// cluster `outbound|<PORT>|<SUBSET>|<SERVICE FQDN>` put back together.
fn row_cluster(row: &std::collections::BTreeMap<String, String>) -> Option<String> {
    if let Some(c) = row.get("CLUSTER") {
        return Some(c.clone());
    }
    let fqdn = row.get("SERVICE FQDN")?;
    let port = row.get("PORT").map(String::as_str).unwrap_or("-");
    if port == "-" {
        return Some(fqdn.clone());
    }
    let subset = row.get("SUBSET").map(String::as_str).unwrap_or("-");
    let direction = row
        .get("DIRECTION")
        .map(String::as_str)
        .unwrap_or("outbound");
    Some(format!(
        "{direction}|{port}|{}|{fqdn}",
        if subset == "-" { "" } else { subset }
    ))
}

/// The clusters the listeners of a config dump send connections to (`tcp_proxy`'s
/// `cluster` and `weighted_clusters`).
fn routed_clusters(dump: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for c in dump["configs"].as_array().into_iter().flatten() {
        for l in c["dynamic_listeners"].as_array().into_iter().flatten() {
            let chains = l["active_state"]["listener"]["filter_chains"].as_array();
            for f in chains
                .into_iter()
                .flatten()
                .flat_map(|fc| fc["filters"].as_array().into_iter().flatten())
            {
                let cfg = &f["typed_config"];
                if let Some(name) = cfg["cluster"].as_str() {
                    out.push(name.to_string());
                }
                for w in cfg["weighted_clusters"]["clusters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if let Some(name) = w["name"].as_str() {
                        out.push(name.to_string());
                    }
                }
            }
        }
    }
    out
}

/// The EDS clusters of a config dump whose endpoints it does not hold.
fn eds_clusters_without_endpoints(dump: &serde_json::Value) -> Vec<String> {
    let configs = dump["configs"].as_array().cloned().unwrap_or_default();
    let of = |t: &str| {
        configs
            .iter()
            .find(|c| c["@type"].as_str().is_some_and(|s| s.ends_with(t)))
            .cloned()
            .unwrap_or_default()
    };
    let held: Vec<String> = of("EndpointsConfigDump")["dynamic_endpoint_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e["endpoint_config"]["cluster_name"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    of("ClustersConfigDump")["dynamic_active_clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| &c["cluster"])
        .filter(|c| c["type"] == "EDS")
        .filter(|c| {
            let eds = c["eds_cluster_config"]["service_name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .or(c["name"].as_str())
                .unwrap_or("");
            !held.iter().any(|h| h == eds)
        })
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

/// `istioctl proxy-config listener|cluster|endpoint|secret --file`, built from the same
/// Istio module, prints for strait the rows it prints for an Envoy gateway fed by the
/// same istiod: strait's admin serves what it accepted in Envoy's `ConfigDump` shape
/// (`/config_dump?include_eds`) and Envoy's `/clusters?format=json`, and its secrets
/// are the gateway's own SVID and mesh roots, the private key redacted.
#[test]
fn istioctl_proxy_config_reads_strait_as_it_reads_envoy() {
    if !peers_present() {
        return;
    }
    let Some(istioctl) = common::istiod::istioctl_bin() else {
        return;
    };
    let lab = Lab::new("pc");
    lab.run(|| async {
        let ca = TestCa::new();
        let w = start_workloads(&ca).await;
        let s = side_by_side_with(&lab, &[("mutual.yaml", MUTUAL_ECHO)], true).await;
        let both = [
            ("strait", s.strait_spoke.gateway()),
            ("envoy", s.envoy_spoke.gateway()),
        ];
        settle_table(&both, &ca, &routing_table(&w), || s.logs()).await;
        for id in [s.strait_id(), s.envoy_id()] {
            s.istiod
                .wait_synced(&id, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        }

        same_proxy_config_rows(
            &istioctl,
            s.strait.admin,
            s.envoy.admin,
            |what, strait, _| {
                if what != "endpoint" {
                    return None;
                }
                // strait asks istiod for the endpoints of the clusters it routes to; the
                // sidecar-style `outbound|<port>||<host>` clusters istiod also sends a
                // gateway are shown without endpoints.
                let unasked = eds_clusters_without_endpoints(strait);
                assert!(
                    unasked.iter().all(|c| c.starts_with("outbound|")),
                    "strait asked no endpoints for {unasked:?}"
                );
                Some(Box::new(move |cluster: &str| {
                    !unasked.iter().any(|u| u == cluster)
                }))
            },
        )
        .await;
    });
}

/// For a configuration from files, strait's admin dumps hold what istiod would send
/// for the same Istio YAML: `istioctl proxy-config` prints for strait (files, no
/// control plane) the listener rows it prints for an Envoy gateway that istiod feeds
/// that YAML, and the cluster and endpoint rows of every cluster those listeners send
/// connections to; the secrets are the same SVID and roots.
#[test]
fn istioctl_proxy_config_reads_a_file_configuration_as_istiods() {
    if !peers_present() {
        return;
    }
    let Some(istioctl) = common::istiod::istioctl_bin() else {
        return;
    };
    let lab = Lab::new("pcf");
    lab.run(|| async {
        let ca = TestCa::new();
        let w = start_workloads(&ca).await;
        let mut yaml = vec![
            EXPOSE_SERVICES.to_string(),
            REVIEWS_SERVICE.to_string(),
            reviews_entry("reviews-v1", "v1", "network1", hub(11)),
            reviews_entry("reviews-v2", "v2", "network1", hub(12)),
            reviews_entry("reviews-v2-remote", "v2", "network2", hub(13)),
            reviews_entry("reviews-v3-remote", "v3", "network2", hub(14)),
            DETAILS_SERVICE.to_string(),
            // With a service account, as sidecars' entries have: istiod puts only
            // endpoints it would reach with mTLS in the SNI clusters, where strait's
            // files leave out only those labelled `security.istio.io/tlsMode: disabled`.
            MUTUAL_ECHO.replace("  network: network1\n  labels: {app: echo", "  network: network1\n  serviceAccount: echo\n  labels: {app: echo"),
        ];
        let istiod = Istiod::start(IstiodOptions {
            debounce: Some("20ms".into()),
            istio_proxy_extensions: false,
            ..Default::default()
        })
        .await;
        for (i, doc) in yaml.iter().enumerate() {
            istiod.apply(&format!("doc-{i}.yaml"), doc);
        }
        let agent = PilotAgent::start(&istiod).await;
        let envoy_spoke = gateway_spoke(&lab, "envoy");
        let envoy = envoy_gateway(&envoy_spoke, ENVOY_POD, &agent)
            .await
            .expect("envoy (checked by peers_present)");
        let strait_spoke = gateway_spoke(&lab, "strait");
        yaml.insert(
            0,
            format!(
                "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: strait}}\nspec:\n  status: 0.0.0.0:15021\n  metrics: 0.0.0.0:15090\n  admin: 0.0.0.0:15000\n  network: network1\n  cluster: cluster1\n  certificates: {{dir: {}}}\n",
                agent.certs.display()
            ),
        );
        let ports = common::Ports {
            gateway: common::istiod::GATEWAY_PORT,
            status: 15021,
            metrics: 15090,
            admin: 15000,
        };
        let strait = Strait::start_in_at(
            &strait_spoke.ns,
            std::net::IpAddr::V4(strait_spoke.ip),
            ports,
            &yaml.join("---\n"),
        );
        let logs = || format!("--- strait\n{}\n--- envoy\n{}", strait.stderr_text(), envoy.log());
        // A connection through each to details resolves its name, so the DNS cluster's
        // hosts are addresses on both.
        let both = [("strait", strait_spoke.gateway()), ("envoy", envoy_spoke.gateway())];
        let to_details = [(sni(9080, "", DETAILS), ISTIO_ALPN, Outcome::Reached(w.details.spiffe.clone()))];
        settle_table(&both, &ca, &to_details, logs).await;

        same_proxy_config_rows(&istioctl, strait.admin, envoy.admin, |what, strait, envoy| {
            if what == "listener" || what == "secret" {
                return None;
            }
            let routed = routed_clusters(envoy);
            assert_eq!(
                {
                    let mut r = routed_clusters(strait);
                    r.sort();
                    r.dedup();
                    r
                },
                {
                    let mut r = routed.clone();
                    r.sort();
                    r.dedup();
                    r
                },
                "the listeners send to other clusters"
            );
            Some(Box::new(move |cluster: &str| routed.iter().any(|r| r == cluster)))
        })
        .await;
    });
}
