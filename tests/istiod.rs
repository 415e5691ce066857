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
    Istiod, IstiodOptions, Lab, PilotAgent, Spoke, envoy_gateway, peers_present, strait_gateway,
};
use common::xds::Envoy;
use common::{Strait, TestCa, Workload, echo_once, tls_connect};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(30);

/// Istio's `samples/multicluster/expose-services.yaml`, unchanged.
const EXPOSE_SERVICES: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: cross-network-gateway
  namespace: istio-system
spec:
  selector:
    istio: eastwestgateway
  servers:
    - port:
        number: 15443
        name: tls
        protocol: TLS
      tls:
        mode: AUTO_PASSTHROUGH
      hosts:
        - \"*.local\"
";

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

/// Polls until both gateways give `want` for `sni`, or `within` passes; the last pair
/// seen on failure.
async fn both_settle(
    strait: SocketAddr,
    envoy: SocketAddr,
    ca: &TestCa,
    sni: &str,
    alpn: &[&str],
    want: &Outcome,
    within: Duration,
) -> Result<(), (Outcome, Outcome)> {
    let deadline = Instant::now() + within;
    loop {
        let s = attempt(strait, ca, sni, alpn).await;
        let e = attempt(envoy, ca, sni, alpn).await;
        if &s == want && &e == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err((s, e));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// istiod with the multi-network mesh written, then strait and Envoy connected to it.
async fn side_by_side(lab: &Lab) -> SideBySide {
    let istiod = Istiod::start(IstiodOptions {
        kubernetes: true,
        debounce: Some("20ms".into()),
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

    let strait_spoke = lab.spoke("strait");
    let envoy_spoke = lab.spoke("envoy");
    let details_ip = Ipv4Addr::new(10, 0, 0, 31);
    strait_spoke.hosts(&[("details.hub.test", details_ip)]);
    envoy_spoke.hosts(&[("details.hub.test", details_ip)]);
    let agent = PilotAgent::start(&istiod).await;
    let strait = strait_gateway(&strait_spoke, STRAIT_POD, "");
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

        let istio = ["istio"];
        let reached = |w: &Workload| Outcome::Reached(w.spiffe.clone());
        let table: Vec<(String, &[&str], Outcome)> = vec![
            (sni(9080, "v1", REVIEWS), &istio, reached(&w.v1)),
            (sni(9080, "v2", REVIEWS), &istio, reached(&w.v2)),
            (sni(9080, "", RATINGS), &istio, reached(&w.ratings)),
            (sni(9080, "", DETAILS), &istio, reached(&w.details)),
            (
                sni(9080, "v1", REVIEWS).to_uppercase(),
                &istio,
                reached(&w.v1),
            ),
            // Only network2 has v3: istiod sends no endpoint for it.
            (sni(9080, "v3", REVIEWS), &istio, Outcome::Refused),
            (sni(9080, "v9", REVIEWS), &istio, Outcome::Refused),
            (sni(9999, "", REVIEWS), &istio, Outcome::Refused),
            (
                sni(9080, "", "nosuch.default.svc.cluster.local"),
                &istio,
                Outcome::Refused,
            ),
            (sni(9080, "v1", REVIEWS), &["h2"], Outcome::Refused),
        ];
        // First, each name as the reference decides it, once istiod has pushed.
        for (name, alpn, want) in &table {
            if let Err((got_strait, got_envoy)) =
                both_settle(strait, envoy, &ca, name, alpn, want, WAIT).await
            {
                panic!(
                    "{name} (ALPN {alpn:?}): want {want:?}; strait {got_strait:?}, envoy {got_envoy:?}\n{}",
                    s.logs()
                );
            }
        }
        // The service without a subset spreads over network1's two and nothing else.
        let local = [w.v1.spiffe.clone(), w.v2.spiffe.clone()].into();
        for (who, gw) in [("strait", strait), ("envoy", envoy)] {
            let seen = outcomes(gw, &ca, &sni(9080, "", REVIEWS), &istio, 20).await;
            assert_eq!(seen, local, "{who}: reviews without a subset\n{}", s.logs());
        }
        assert_eq!(w.v2_remote.accepted(), 0, "network2's v2 was dialled");
        assert_eq!(w.v3_remote.accepted(), 0, "network2's v3 was dialled");

        for id in [s.strait_id(), s.envoy_id()] {
            if let Err(e) = s.istiod.wait_synced(&id, WAIT).await {
                panic!("{e}\n{}", s.logs());
            }
        }
    });
}
