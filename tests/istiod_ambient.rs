//! What the real istiod sends an ambient east-west gateway (ambient multi-network,
//! AMBIENT.md §5), recorded with an ADS client (`interop/xdsdump`) connected as the
//! gateway's node: the facts strait's translation of it into its 15008 configuration
//! relies on (docs/ambient-xds.md describes them); then strait itself against the same
//! istiod, one process as both the `router` and the `waypoint` node (`discovery.waypoint`),
//! with Istio's own HBONE peers (`interop/hbone`) as the source and the captured pods.
//!
//! istiod runs with ambient and ambient multi-network on, its Services, Pods and
//! EndpointSlices in the in-memory Kubernetes client, and Istio's
//! `expose-services.yaml` (the classic 15443 Gateway) beside them. Skipped, loudly,
//! where the harness, xdsdump or hbone-peer is missing, except under CI.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::hbone::{HboneSource, hbone_dest, tunnel_round_trip};
use common::istiod::{
    EXPOSE_SERVICES, GATEWAY_LABELS, GATEWAY_SPIFFE, GLOBAL_SERVICE_SCOPE, ISTIOD_IP, IstioctlRow,
    Istiod, IstiodOptions, Lab, SECURE_XDS_PORT, XdsDump, ambient_env, gateway_node_metadata,
    harness_bin, hbone_peer_bin, istioctl_rows, launch_strait_gateway, proxy_config_output,
    sync_problems, xdsdump_bin,
};
use common::jwt::{AUDIENCE, TokenIssuer};
use common::{
    Strait, TempDir, TestCa, Workload, echo_once, free_port, http_get, mesh_ca, mesh_cert,
    round_trip, strait_bin, tls_connect,
};
use serde_json::{Value, json};

const ECHO: &str = "echo.echo.svc.cluster.local";
const LOCAL: &str = "local.echo.svc.cluster.local";

/// Namespaces (istio-system in network1), a global Service `echo` (two ports whose
/// target ports differ from the service ports) with three ready pods of network1 — one
/// captured by ambient (`ambient.istio.io/redirection: enabled`), one labelled
/// `networking.istio.io/tunnel: http`, one with neither (a sidecar's pod, labelled
/// `security.istio.io/tlsMode: istio`: the only one a router's SNI-DNAT cluster lists) —
/// a captured pod of network2 and
/// a captured pod that is not ready; and a Service `local` that is not global, with one
/// captured pod.
const KUBE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: istio-system
  labels: {topology.istio.io/network: network1}
---
apiVersion: v1
kind: Namespace
metadata: {name: echo}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: echo
  labels: {istio.io/global: \"true\"}
spec:
  selector: {app: echo}
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: tcp-raw, port: 9000, targetPort: 9090, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: echo}
spec:
  selector: {app: local}
  clusterIP: 10.96.0.11
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: echo
  labels: {app: echo}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {serviceAccountName: echo, nodeName: node1, containers: [{name: echo, image: echo}]}
status:
  phase: Running
  podIP: 10.0.0.21
  podIPs: [{ip: 10.0.0.21}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-2
  namespace: echo
  labels: {app: echo, security.istio.io/tlsMode: istio}
spec: {serviceAccountName: echo, nodeName: node1, containers: [{name: echo, image: echo}]}
status:
  phase: Running
  podIP: 10.0.0.22
  podIPs: [{ip: 10.0.0.22}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-3
  namespace: echo
  labels: {app: echo, networking.istio.io/tunnel: http}
spec: {serviceAccountName: echo, nodeName: node1, containers: [{name: echo, image: echo}]}
status:
  phase: Running
  podIP: 10.0.0.23
  podIPs: [{ip: 10.0.0.23}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-4
  namespace: echo
  labels: {app: echo, topology.istio.io/network: network2}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {serviceAccountName: echo, nodeName: node1, containers: [{name: echo, image: echo}]}
status:
  phase: Running
  podIP: 10.0.0.24
  podIPs: [{ip: 10.0.0.24}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-5
  namespace: echo
  labels: {app: echo}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {serviceAccountName: echo, nodeName: node1, containers: [{name: echo, image: echo}]}
status:
  phase: Running
  podIP: 10.0.0.25
  podIPs: [{ip: 10.0.0.25}]
  conditions: [{type: Ready, status: \"False\"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: local-1
  namespace: echo
  labels: {app: local}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {serviceAccountName: local, nodeName: node1, containers: [{name: local, image: local}]}
status:
  phase: Running
  podIP: 10.0.0.31
  podIPs: [{ip: 10.0.0.31}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: echo
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
endpoints:
- addresses: [10.0.0.21]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: echo-1, namespace: echo}
- addresses: [10.0.0.22]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: echo-2, namespace: echo}
- addresses: [10.0.0.23]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: echo-3, namespace: echo}
- addresses: [10.0.0.24]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: echo-4, namespace: echo}
- addresses: [10.0.0.25]
  conditions: {ready: false}
  targetRef: {kind: Pod, name: echo-5, namespace: echo}
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: tcp-raw, port: 9090, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-1
  namespace: echo
  labels: {kubernetes.io/service-name: local}
addressType: IPv4
endpoints:
- addresses: [10.0.0.31]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: local-1, namespace: echo}
ports:
- {name: http, port: 8080, protocol: TCP}
";

/// The node of an ambient east-west gateway pod (what Istio's `istio-east-west`
/// GatewayClass deploys): a `waypoint` whose labels name the east-west controller.
const WAYPOINT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
fn waypoint_id() -> String {
    format!(
        "waypoint~{WAYPOINT_IP}~istio-eastwestgateway-0.istio-system~istio-system.svc.cluster.local"
    )
}
fn east_west_labels() -> Value {
    json!({
        "gateway.istio.io/managed": "istio.io-eastwest-controller",
        "gateway.networking.k8s.io/gateway-name": "istio-eastwestgateway",
        "topology.istio.io/network": "network1",
    })
}

fn present() -> bool {
    harness_bin().is_some() && xdsdump_bin().is_some()
}

async fn start_istiod() -> Istiod {
    start_istiod_with(None).await
}

/// [`start_istiod`], verifying tokens with `jwt_rule` when given.
async fn start_istiod_with(jwt_rule: Option<String>) -> Istiod {
    let istiod = Istiod::start_with(
        IstiodOptions {
            kubernetes: true,
            env: ambient_env(),
            mesh: Some(GLOBAL_SERVICE_SCOPE.into()),
            debounce: Some("20ms".into()),
            jwt_rule,
            ..Default::default()
        },
        &[("expose-services.yaml".into(), EXPOSE_SERVICES.into())],
    )
    .await;
    istiod.apply_kube("echo.yaml", KUBE);
    istiod
}

/// Dumps what `node` is sent until `ready` holds (the Kubernetes objects are loaded
/// after istiod starts, and pushed after its debounce), at most 30 s.
async fn dump_when(
    istiod: &Istiod,
    node: &str,
    meta: &Value,
    ready: impl Fn(&XdsDump) -> bool,
) -> XdsDump {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dump = istiod.xds_dump(node, meta).await;
        match dump {
            Ok(d) if ready(&d) => return d,
            _ if Instant::now() >= deadline => {
                panic!(
                    "istiod never sent {node} what was awaited: {dump:?}\n{}",
                    istiod.log()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The HEALTHY endpoints of a ClusterLoadAssignment.
fn healthy(cla: &Value) -> Vec<Value> {
    cla["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["lbEndpoints"].as_array().into_iter().flatten())
        .filter(|e| e["healthStatus"] == "HEALTHY")
        .cloned()
        .collect()
}

fn inbound_vip(port: u16, host: &str) -> String {
    format!("inbound-vip|{port}|tcp|{host}")
}

/// The `typedConfig` of the first network filter named `filter` in `chain`.
fn filter<'a>(chain: &'a Value, filter: &str) -> &'a Value {
    chain["filters"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == filter))
        .map(|f| &f["typedConfig"])
        .unwrap_or_else(|| panic!("no {filter} in {chain}"))
}

/// The ambient east-west gateway's configuration: `connect_terminate` on 15008 (mTLS
/// 1.3, ALPN h2, any SPIFFE ID of the trust domain, HTTP/2 CONNECT) into the internal
/// listener `main_internal`, whose exact map from `:authority` (`<host>:<service port>`)
/// picks one chain per global service port, `inbound-vip|<port>|tcp|<host>`, a
/// `tcp_proxy` to the EDS cluster of that name; HBONE endpoints arrive as internal
/// addresses of `forward_inner_connect` carrying `<pod IP>:<target port>` in
/// `envoy.filters.listener.original_dst`, and `forward_inner_connect` dials that address
/// with its port replaced by 15008. A Service that is not global is left out, and so is
/// 15443: the node's labels do not match the classic Gateway's selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_gives_the_ambient_east_west_gateway_connect_terminate_and_the_authority_map() {
    if !present() {
        return;
    }
    let lab = Lab::new("amb-xds");
    lab.run(|| async {
        let istiod = start_istiod().await;
        let meta = gateway_node_metadata(WAYPOINT_IP, east_west_labels());
        let eds_80 = inbound_vip(80, ECHO);
        let dump = dump_when(&istiod, &waypoint_id(), &meta, |d| {
            d.get("endpoints", &eds_80).is_some_and(|e| healthy(e).len() == 3)
        })
        .await;

        // Listeners: exactly these three; no 0.0.0.0_15443.
        assert_eq!(
            dump.names("listeners"),
            ["connect_terminate", "forward_inner_connect", "main_internal"]
        );

        // connect_terminate: the outer TLS and HTTP/2 CONNECT.
        let ct = dump.get("listeners", "connect_terminate").unwrap();
        assert_eq!(ct["address"]["socketAddress"]["portValue"], 15008);
        let chains = ct["filterChains"].as_array().unwrap();
        assert_eq!(chains.len(), 1, "{ct}");
        let tls = &chains[0]["transportSocket"]["typedConfig"];
        assert_eq!(tls["requireClientCertificate"], true);
        let common = &tls["commonTlsContext"];
        assert_eq!(common["alpnProtocols"], json!(["h2"]));
        assert_eq!(
            common["tlsParams"],
            json!({"tlsMinimumProtocolVersion": "TLSv1_3", "tlsMaximumProtocolVersion": "TLSv1_3"})
        );
        assert_eq!(
            common["combinedValidationContext"]["defaultValidationContext"]
                ["matchTypedSubjectAltNames"],
            json!([{"sanType": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}])
        );
        // The certificate and the root come over SDS from pilot-agent, by these names.
        assert_eq!(common["tlsCertificateSdsSecretConfigs"][0]["name"], "default");
        assert_eq!(
            common["combinedValidationContext"]["validationContextSdsSecretConfig"]["name"],
            "ROOTCA"
        );
        let hcm = filter(&chains[0], "envoy.filters.network.http_connection_manager");
        assert_eq!(hcm["upgradeConfigs"], json!([{"upgradeType": "CONNECT"}]));
        assert_eq!(hcm["http2ProtocolOptions"]["allowConnect"], true);
        assert_eq!(hcm["http2ProtocolOptions"]["maxConcurrentStreams"], 100);
        assert_eq!(
            hcm["http2ProtocolOptions"]["connectionKeepalive"],
            json!({"interval": "10s", "timeout": "20s"})
        );
        assert_eq!(hcm["streamIdleTimeout"], "0s");
        let route = &hcm["routeConfig"]["virtualHosts"][0]["routes"][0];
        assert_eq!(route["match"], json!({"connectMatcher": {}}));
        assert_eq!(route["route"]["cluster"], "main_internal");
        // The :authority travels to main_internal as filter state.
        let set_state = hcm["httpFilters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "connect_authority")
            .expect("the connect_authority filter");
        assert!(
            set_state["typedConfig"]["onRequestHeaders"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["objectKey"] == "io.istio.connect_authority"
                    && s["formatString"]["textFormatSource"]["inlineString"]
                        == "%REQ(:AUTHORITY)%"),
            "{set_state}"
        );

        // main_internal: the authority map, one chain per global service port.
        let main = dump.get("listeners", "main_internal").unwrap();
        assert!(main["internalListener"].is_object(), "{main}");
        let tree = &main["filterChainMatcher"]["matcherTree"];
        assert_eq!(tree["input"]["typedConfig"]["key"], "io.istio.connect_authority");
        let map = tree["exactMatchMap"]["map"].as_object().unwrap();
        let mut authorities: Vec<(&str, &str)> = map
            .iter()
            .map(|(k, v)| (k.as_str(), v["action"]["name"].as_str().unwrap()))
            .collect();
        authorities.sort();
        let (vip_80, vip_9000) = (inbound_vip(80, ECHO), inbound_vip(9000, ECHO));
        assert_eq!(
            authorities,
            [
                (format!("{ECHO}:80").as_str(), vip_80.as_str()),
                (format!("{ECHO}:9000").as_str(), vip_9000.as_str()),
            ],
            "service ports, not target ports; the non-global {LOCAL} left out"
        );
        // Failing the authority, the Service's VIP and port pick the same chains.
        let by_ip = &main["filterChainMatcher"]["onNoMatch"]["matcher"]["matcherTree"];
        assert_eq!(
            by_ip["customMatch"]["typedConfig"]["rangeMatchers"][0]["ranges"],
            json!([{"addressPrefix": "10.96.0.10", "prefixLen": 32}])
        );
        let mut chains: Vec<(String, String)> = main["filterChains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let tcp = filter(c, "envoy.filters.network.tcp_proxy");
                (
                    c["name"].as_str().unwrap().to_string(),
                    tcp["cluster"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        chains.sort();
        assert_eq!(
            chains,
            [
                (vip_80.clone(), vip_80.clone()),
                (vip_9000.clone(), vip_9000.clone())
            ]
        );

        // Clusters.
        assert_eq!(
            dump.names("clusters"),
            [
                "BlackHoleCluster",
                "encap",
                "forward_inner_connect",
                vip_80.as_str(),
                vip_9000.as_str(),
                "main_internal",
            ]
        );
        let vip = dump.get("clusters", &vip_80).unwrap();
        assert_eq!(vip["type"], "EDS");
        assert_eq!(vip["lbPolicy"], "LEAST_REQUEST");
        assert_eq!(
            vip["metadata"]["filterMetadata"]["istio"]["services"],
            json!([{"host": ECHO, "name": "echo", "namespace": "echo"}])
        );
        let fic = dump.get("clusters", "forward_inner_connect").unwrap();
        assert_eq!(fic["type"], "ORIGINAL_DST");
        assert_eq!(fic["originalDstLbConfig"]["upstreamPortOverride"], 15008);

        // Endpoints: HBONE pods as internal addresses with the pod's address and target
        // port in the original_dst metadata; the pod that is neither captured nor
        // labelled comes as a plain socket address (its application port).
        let cla = dump.get("endpoints", &vip_80).unwrap();
        let mut seen: Vec<Value> = healthy(cla)
            .into_iter()
            .map(|e| {
                json!([
                    e["endpoint"]["address"],
                    e["metadata"]["filterMetadata"]["envoy.filters.listener.original_dst"]
                ])
            })
            .collect();
        // In pod order, by the address each form carries.
        seen.sort_by_key(|e| {
            let a = &e[0];
            a["envoyInternalAddress"]["endpointId"]
                .as_str()
                .or(a["socketAddress"]["address"].as_str())
                .unwrap_or_default()
                .to_string()
        });
        let hbone = |ip: &str| {
            json!([
                {"envoyInternalAddress": {"serverListenerName": "forward_inner_connect", "endpointId": format!("{ip}:8080")}},
                {"local": format!("{ip}:8080")}
            ])
        };
        assert_eq!(
            seen,
            [
                hbone("10.0.0.21"),
                json!([{"socketAddress": {"address": "10.0.0.22", "portValue": 8080}}, null]),
                hbone("10.0.0.23"),
            ]
        );
        // The pod of network2 is not sent: the gateway gets its own network's endpoints
        // only. The pod that is not ready is not sent as healthy.
        let all = cla["endpoints"][0]["lbEndpoints"].as_array().unwrap();
        let of = |ip: &str| -> Vec<&Value> {
            all.iter()
                .filter(|e| e.to_string().contains(&format!("\"{ip}")))
                .collect()
        };
        assert!(of("10.0.0.24").is_empty(), "{cla}");
        assert!(
            of("10.0.0.25").iter().all(|e| e["healthStatus"] != "HEALTHY"),
            "{cla}"
        );
        let on_9000 = dump.get("endpoints", &vip_9000).unwrap()["endpoints"][0]["lbEndpoints"][0]
            ["metadata"]["filterMetadata"]["envoy.filters.listener.original_dst"]["local"]
            .clone();
        assert_eq!(on_9000, "10.0.0.21:9090", "the target port of each service port");
    });
}

/// The two configurations go to two identities: a `router` node with the classic
/// east-west labels gets `0.0.0.0_15443` and none of the 15008 configuration; the
/// `waypoint` node of the ambient east-west gateway gets no 15443 listener. Where one
/// waypoint node also carries the classic labels (`istio: eastwestgateway`), istiod
/// does send it `0.0.0.0_15443`, but without the clusters its chains name: that node
/// cannot serve 15443, so one gateway serving both keeps two xDS streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_waypoint_nodes_get_one_configuration_each() {
    if !present() {
        return;
    }
    let lab = Lab::new("amb-two");
    lab.run(|| async {
        let istiod = start_istiod().await;
        let classic = json!({
            "istio": "eastwestgateway",
            "app": "istio-eastwestgateway",
            "topology.istio.io/network": "network1",
        });
        let sni_80 = format!("outbound_.80_._.{ECHO}");
        let router = dump_when(
            &istiod,
            "router~10.0.0.8~istio-eastwestgateway-1.istio-system~istio-system.svc.cluster.local",
            &gateway_node_metadata(Ipv4Addr::new(10, 0, 0, 8), classic.clone()),
            |d| d.get("clusters", &sni_80).is_some(),
        )
        .await;
        assert!(router.get("listeners", "0.0.0.0_15443").is_some());
        for name in [
            "connect_terminate",
            "main_internal",
            "forward_inner_connect",
        ] {
            assert!(router.get("listeners", name).is_none(), "router got {name}");
        }
        assert!(
            !router
                .names("clusters")
                .iter()
                .any(|c| c.starts_with("inbound-vip|")),
            "{:?}",
            router.names("clusters")
        );

        let waypoint = dump_when(
            &istiod,
            &waypoint_id(),
            &gateway_node_metadata(WAYPOINT_IP, east_west_labels()),
            |d| d.get("clusters", &inbound_vip(80, ECHO)).is_some(),
        )
        .await;
        assert!(waypoint.get("listeners", "0.0.0.0_15443").is_none());
        assert!(waypoint.get("clusters", &sni_80).is_none());

        // Both label sets on one waypoint node: 15443 chains without their clusters.
        let mut both = east_west_labels();
        both.as_object_mut()
            .unwrap()
            .extend(classic.as_object().unwrap().clone());
        let mixed = dump_when(
            &istiod,
            "waypoint~10.0.0.7~istio-eastwestgateway-2.istio-system~istio-system.svc.cluster.local",
            &gateway_node_metadata(Ipv4Addr::new(10, 0, 0, 7), both),
            |d| d.get("clusters", &inbound_vip(80, ECHO)).is_some(),
        )
        .await;
        let l15443 = mixed
            .get("listeners", "0.0.0.0_15443")
            .expect("the classic Gateway selects the node's labels");
        let named: Vec<&str> = l15443["filterChains"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                filter(c, "envoy.filters.network.tcp_proxy")["cluster"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert!(named.contains(&sni_80.as_str()), "{named:?}");
        for cluster in &named {
            assert!(
                mixed.get("clusters", cluster).is_none(),
                "{cluster} was sent to a waypoint node"
            );
        }
        assert!(mixed.get("listeners", "connect_terminate").is_some());
    });
}

const SOURCE_ID: &str = "spiffe://cluster.local/ns/sleep/sa/sleep";
const ECHO_ID: &str = "spiffe://cluster.local/ns/echo/sa/echo";
const POD: &str = "istio-eastwestgateway-0";

/// A plain TCP listener on `addr` that counts the connections it accepts (and closes
/// them): a pod port that must never be dialled.
async fn counting_listener(addr: SocketAddr) -> Arc<AtomicU64> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    accepted
}

/// The syncz entries of the gateway pod: one per stream.
async fn syncz_of(istiod: &Istiod, proxy: &str) -> Vec<Value> {
    istiod
        .syncz()
        .await
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["proxy"] == proxy)
        .cloned()
        .collect()
}

/// strait as network1's gateway pod [`POD`] in `spoke`, with both streams (`discovery.waypoint`)
/// and the SVID in `certs`, once ready.
fn ready_waypoint_gateway(spoke: &common::istiod::Spoke, certs: &Path) -> Strait {
    let strait = launch_strait_gateway(
        spoke,
        POD,
        &format!(
            "    waypoint: {{}}\n  certificates: {{dir: {}}}\n",
            certs.display()
        ),
        Path::new(strait_bin()),
        &[],
    );
    spoke.ns.run(|| strait.wait_ready(Duration::from_secs(30)));
    strait
}

fn config_dump(strait: &Strait) -> Value {
    let (code, body) = http_get(strait.admin, "/config_dump").expect("config_dump");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("config_dump is JSON")
}

/// One strait, two identities: with `discovery.waypoint`, it keeps a `router` stream (the
/// 15443 configuration) and a `waypoint` stream as the ambient east-west gateway's node
/// (the 15008 configuration), both SYNCED in istiod's syncz. Istio's own source ztunnel
/// (`hbone-peer source`) tunnels through strait's 15008 to Istio's destination ztunnel
/// (`hbone-peer dest`) standing in for the captured pods at their Pod IPs: the bytes come
/// back, the destination sees the source's identity (the inner TLS is end to end) and the
/// authority the source sent. The pod of the same Service that takes no HBONE is never
/// dialled; an authority the waypoint stream does not serve gets 404 on its stream, even
/// one the router stream serves on 15443 (a Service that is not global); and an SNI
/// connection on 15443 of the same process still routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_strait_serves_15008_from_the_waypoint_stream_and_15443_from_the_router_stream() {
    if harness_bin().is_none() || hbone_peer_bin().is_none() {
        return;
    }
    let lab = Lab::new("amb-gw");
    let spoke = lab.spoke("amb-gw-s");
    lab.run(|| async {
        let istiod = start_istiod().await;
        let dir = TempDir::new("amb-gw");
        let ca = mesh_ca(dir.path(), "cluster.local");
        let gateway_certs = mesh_cert(&ca, GATEWAY_SPIFFE, &dir.path().join("gateway"));
        let source_certs = mesh_cert(&ca, SOURCE_ID, &dir.path().join("source"));
        let dest_certs = mesh_cert(&ca, ECHO_ID, &dir.path().join("dest"));

        // The captured pods' ztunnels, at the Pod IPs of echo-1 and echo-3; echo-2 takes no
        // HBONE: its 15008 and its application port count what reaches them.
        let dest = |ip: [u8; 4], name: &'static str| {
            let certs = dest_certs.clone();
            async move {
                hbone_dest(SocketAddr::from((ip, 15008)), &certs, name, None)
                    .await
                    .expect("hbone-peer")
            }
        };
        let echo_1 = dest([10, 0, 0, 21], "echo-1").await;
        let echo_3 = dest([10, 0, 0, 23], "echo-3").await;
        let plain_15008 = counting_listener(SocketAddr::from(([10, 0, 0, 22], 15008))).await;
        // The application ports, for 15443 (AUTO_PASSTHROUGH: the client's TLS end to end).
        let test_ca = TestCa::new();
        let mut apps = Vec::new();
        for last in [21, 22, 23] {
            apps.push(
                Workload::start_at(
                    &test_ca,
                    ECHO_ID,
                    SocketAddr::from(([10, 0, 0, last], 8080)),
                )
                .await,
            );
        }

        let strait = ready_waypoint_gateway(&spoke, &gateway_certs);

        // Both identities SYNCED at istiod.
        let proxy = format!("{POD}.istio-system");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let entries = syncz_of(&istiod, &proxy).await;
            let synced = entries.len() == 2 && entries.iter().all(|e| sync_problems(e).is_empty());
            if synced {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not both streams SYNCED: {entries:#?}\n{}",
                strait.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // config_dump says which stream is which, each with its own node and resources.
        let dump = config_dump(&strait);
        let router = &dump["discovery"];
        let waypoint = &dump["waypointDiscovery"];
        assert_eq!(router["stream"], "router");
        assert_eq!(router["node"]["id"], spoke.node_id(POD));
        assert_eq!(waypoint["stream"], "waypoint");
        assert_eq!(
            waypoint["node"]["id"],
            format!(
                "waypoint~{}~{POD}.istio-system~istio-system.svc.cluster.local",
                spoke.ip
            )
        );
        assert_eq!(
            waypoint["node"]["labels"]["gateway.istio.io/managed"],
            "istio.io-eastwest-controller"
        );
        assert_eq!(
            waypoint["node"]["metadata"]["REQUESTED_NETWORK_VIEW"],
            "network1"
        );
        assert!(
            router["accepted"]["lds"]
                .as_array()
                .unwrap()
                .contains(&json!("0.0.0.0_15443")),
            "{router:#}"
        );
        let waypoint_lds = waypoint["accepted"]["lds"].as_array().unwrap();
        assert!(
            waypoint_lds.contains(&json!("connect_terminate")),
            "{waypoint:#}"
        );
        assert!(
            !waypoint_lds.contains(&json!("0.0.0.0_15443")),
            "{waypoint:#}"
        );
        // In Envoy's shape (what istioctl proxy-config reads), one proxy serving both.
        let listeners: Vec<&str> = dump["configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c["@type"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("ListenersConfigDump")
            })
            .flat_map(|c| c["dynamic_listeners"].as_array().unwrap())
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        assert!(
            listeners.contains(&"0.0.0.0_15443") && listeners.contains(&"connect_terminate"),
            "{listeners:?}"
        );
        for (stream, d) in [("router", router), ("waypoint", waypoint)] {
            for (t, s) in d["types"].as_object().unwrap() {
                assert_eq!(s["nacks"], 0, "{stream} {t}: {d:#}");
            }
        }
        // The strait_xds_* series carry the stream.
        for stream in ["router", "waypoint"] {
            assert_eq!(
                strait.metric("strait_xds_connected", &[("stream", stream)]),
                1.0,
                "{stream}"
            );
            // Each stream sends its ACK before it counts it: SYNCED at istiod can come
            // first.
            strait.wait_metric(
                "strait_xds_responses_total",
                &[("stream", stream), ("type", "eds"), ("result", "ack")],
                |v| v >= 1.0,
            );
        }

        // 15008: Istio's source ztunnel through strait to the captured pods.
        let gateway_hbone = SocketAddr::from((spoke.ip, 15008));
        let via_echo = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_nope = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_local = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_vip = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_vip_9000 = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_vip_81 = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_local_vip = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut source = HboneSource::new(gateway_hbone, &source_certs);
        source.gateway_id = Some(GATEWAY_SPIFFE.into());
        source.dest_id = Some(ECHO_ID.into());
        source.maps = vec![
            (via_echo, format!("{ECHO}:80")),
            (via_nope, "nope.echo.svc.cluster.local:80".into()),
            (via_local, format!("{LOCAL}:80")),
            (via_vip, "10.96.0.10:80".into()),
            (via_vip_9000, "10.96.0.10:9000".into()),
            (via_vip_81, "10.96.0.10:81".into()),
            (via_local_vip, "10.96.0.11:80".into()),
        ];
        let source = source.start(None).await.expect("hbone-peer");
        let mut to_echo_1 = 0;
        for i in 0..6 {
            let payload = format!("tunnel {i}\n");
            let back = tunnel_round_trip(via_echo, payload.as_bytes(), Duration::from_secs(10))
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "tunnel {i} did not come back:\n{}\n{}",
                        source.lines().join("\n"),
                        strait.stderr_text()
                    )
                });
            let text = String::from_utf8_lossy(&back);
            assert!(
                text == format!("[echo-1] {payload}") || text == format!("[echo-3] {payload}"),
                "{text:?}; echo-2's 15008 accepted {}",
                plain_15008.load(Ordering::SeqCst)
            );
            to_echo_1 += usize::from(text.starts_with("[echo-1]"));
        }
        // Each pod prints a stream before it answers, and a thread of the test reads
        // that pipe: awaited.
        let wait = Duration::from_secs(10);
        let streams: Vec<_> = echo_1
            .wait_streams(to_echo_1, wait)
            .await
            .into_iter()
            .chain(echo_3.wait_streams(6 - to_echo_1, wait).await)
            .collect();
        assert_eq!(streams.len(), 6, "{streams:?}");
        for s in &streams {
            assert_eq!(s.authority, format!("{ECHO}:80"));
            assert_eq!(
                s.peer, SOURCE_ID,
                "the inner TLS runs from the source to the pod"
            );
        }
        // Balanced per stream (LEAST_REQUEST over both HBONE pods, tunnels one at a time).
        assert!(
            !echo_1.streams().is_empty() && !echo_3.streams().is_empty(),
            "{streams:?}"
        );
        assert_eq!(
            plain_15008.load(Ordering::SeqCst),
            0,
            "echo-2 takes no HBONE"
        );

        // A Service's VIP and service port, as istiod's main_internal takes them after
        // the names (its fallback on the destination address): the same service port,
        // and the pod's ztunnel sees the authority as the source sent it.
        for (via, port) in [(via_vip, 80), (via_vip_9000, 9000)] {
            let back = tunnel_round_trip(via, b"vip\n", Duration::from_secs(10))
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "10.96.0.10:{port} did not come back:\n{}\n{}",
                        source.lines().join("\n"),
                        strait.stderr_text()
                    )
                });
            let text = String::from_utf8_lossy(&back);
            assert!(
                text == "[echo-1] vip\n" || text == "[echo-3] vip\n",
                "10.96.0.10:{port}: {text:?}"
            );
        }
        let by_vip = || {
            let mut seen: Vec<String> = echo_1
                .streams()
                .into_iter()
                .chain(echo_3.streams())
                .map(|s| s.authority)
                .filter(|a| a.starts_with("10.96.0.10:"))
                .collect();
            seen.sort();
            seen
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while by_vip().len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(by_vip(), ["10.96.0.10:80", "10.96.0.10:9000"]);

        // Names and addresses the waypoint stream does not serve: 404 on their stream
        // (a port the Service lacks on its VIP, the VIP of a Service that is not global).
        for (via, authority) in [
            (via_nope, "nope.echo.svc.cluster.local:80".to_string()),
            (via_local, format!("{LOCAL}:80")),
            (via_vip_81, "10.96.0.10:81".to_string()),
            (via_local_vip, "10.96.0.11:80".to_string()),
        ] {
            let back = tunnel_round_trip(via, b"x", Duration::from_secs(10)).await;
            assert!(
                back.as_ref().is_none_or(|b| b.is_empty()),
                "{authority}: {back:?}"
            );
            let errors = source
                .wait_lines(1, Duration::from_secs(10), |l| {
                    l.starts_with("TUNNEL-ERROR") && l.contains(&format!("authority={authority} "))
                })
                .await;
            assert!(
                errors.iter().any(|l| l.contains("status=404")),
                "{authority}: {:?}",
                source.lines()
            );
        }

        // 15443 on the same process: the router stream's SNI route still serves, to the
        // one pod istiod gave the router (the sidecar's); the HBONE pods the waypoint
        // stream added to the same service port are tunnel destinations only.
        let sni = format!("outbound_.80_._.{ECHO}");
        for _ in 0..4 {
            let seen = round_trip(spoke.gateway(), &test_ca, &sni)
                .await
                .unwrap_or_else(|e| panic!("15443 {sni}: {e}\n{}", strait.stderr_text()));
            assert_eq!(seen, ECHO_ID);
        }
        let accepted: Vec<u64> = apps.iter().map(Workload::accepted).collect();
        assert_eq!(accepted, [0, 4, 0], "echo-1, echo-2, echo-3 on 8080");
        assert_eq!(plain_15008.load(Ordering::SeqCst), 0);
    });
}

/// The router's own servers for the Service `echo`: ISTIO_MUTUAL on 15444 (a `tcp`
/// route) and PASSTHROUGH on 15445 (a `tls` route on the SNI), both to `echo:80`.
const ECHO_SERVERS: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: echo-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15444, name: tls-mutual, protocol: TLS}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*\"]
  - port: {number: 15445, name: tls-passthrough, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: istio-system}
spec:
  hosts: [\"*\"]
  gateways: [istio-system/echo-gateway]
  tcp:
  - match: [{port: 15444}]
    route: [{destination: {host: echo.echo.svc.cluster.local, port: {number: 80}}}]
  tls:
  - match: [{port: 15445, sniHosts: [echo.echo.svc.cluster.local]}]
    route: [{destination: {host: echo.echo.svc.cluster.local, port: {number: 80}}}]
";

/// One mTLS connection to an ISTIO_MUTUAL server with the certificate in `client`: a line
/// sent and whatever comes back (the upstream leg may fail: only where it went matters).
async fn through_mutual(gateway: SocketAddr, client: &Path) {
    use strait::tls::{TrustConfig, client_config, load_identity};
    let id = load_identity(client).expect("client identity");
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: Vec::new(),
        federated: Default::default(),
    };
    let config = client_config(&id, &trust, None, &[b"istio".as_slice()]).expect("client config");
    let tcp = tokio::net::TcpStream::connect(gateway)
        .await
        .unwrap_or_else(|e| panic!("connect {gateway}: {e}"));
    let name = rustls::pki_types::ServerName::try_from(ECHO).unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake in time");
    let mut tls = tls.unwrap_or_else(|e| panic!("ISTIO_MUTUAL handshake: {e}"));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tls.write_all(b"who\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
}

/// A Service whose pods are partly ambient-only: istiod lists the sidecar's pod (echo-2)
/// in the router's clusters and the captured pods (echo-1, echo-3) only in the waypoint
/// stream's `inbound-vip` cluster. The router's ISTIO_MUTUAL and PASSTHROUGH servers and
/// its 15443 route to the same service port reach echo-2 alone, as Envoy's router
/// clusters would; the captured pods' application ports never see a connection, and 15008
/// still tunnels to them. `config_dump` and `/clusters` say which paths may dial each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_servers_never_dial_the_pods_only_the_waypoint_stream_lists() {
    if harness_bin().is_none() || hbone_peer_bin().is_none() {
        return;
    }
    let lab = Lab::new("amb-only");
    let spoke = lab.spoke("amb-only-s");
    lab.run(|| async {
        let istiod = start_istiod().await;
        istiod.apply("echo-servers.yaml", ECHO_SERVERS);
        let dir = TempDir::new("amb-only");
        let ca = mesh_ca(dir.path(), "cluster.local");
        let gateway_certs = mesh_cert(&ca, GATEWAY_SPIFFE, &dir.path().join("gateway"));
        let source_certs = mesh_cert(&ca, SOURCE_ID, &dir.path().join("source"));
        let dest_certs = mesh_cert(&ca, ECHO_ID, &dir.path().join("dest"));
        let echo_1 = hbone_dest(
            SocketAddr::from(([10, 0, 0, 21], 15008)),
            &dest_certs,
            "echo-1",
            None,
        )
        .await
        .expect("hbone-peer");
        let echo_3 = hbone_dest(
            SocketAddr::from(([10, 0, 0, 23], 15008)),
            &dest_certs,
            "echo-3",
            None,
        )
        .await
        .expect("hbone-peer");
        // Every pod's application port, counting what reaches it.
        let test_ca = TestCa::new();
        let mut apps = Vec::new();
        for last in [21, 22, 23] {
            apps.push(
                Workload::start_at(
                    &test_ca,
                    ECHO_ID,
                    SocketAddr::from(([10, 0, 0, last], 8080)),
                )
                .await,
            );
        }
        let strait = ready_waypoint_gateway(&spoke, &gateway_certs);
        // Both streams' endpoints of echo:80 are in: the router's pod and the captured ones.
        let joined = strait.eventually(Duration::from_secs(30), || {
            let dump = config_dump(&strait);
            let listening = dump["listeners"].as_array().is_some_and(|ls| {
                ls.iter()
                    .any(|l| l["address"].as_str().is_some_and(|a| a.ends_with(":15445")))
            });
            let count = dump["services"]
                .as_array()
                .and_then(|ss| ss.iter().find(|s| s["host"] == ECHO && s["port"] == 80))
                .and_then(|s| s["endpoints"].as_array())
                .map_or(0, |e| e.len());
            listening && count == 3
        });
        assert!(
            joined,
            "{:#}\n{}",
            config_dump(&strait)["services"],
            strait.stderr_text()
        );

        // config_dump: which paths may dial each endpoint of echo:80.
        let dump = config_dump(&strait);
        let echo = dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["host"] == ECHO && s["port"] == 80)
            .unwrap();
        let mut paths: Vec<(String, Value, Value)> = echo["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["address"].as_str().unwrap().to_string(),
                    e["reach"].clone(),
                    e["dialledBy"].clone(),
                )
            })
            .collect();
        paths.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            paths,
            [
                ("10.0.0.21".to_string(), json!("Tunnels"), json!(["HBONE"])),
                (
                    "10.0.0.22".to_string(),
                    json!("Any"),
                    json!(["AUTO_PASSTHROUGH", "PASSTHROUGH", "ISTIO_MUTUAL", "BRIDGE"])
                ),
                ("10.0.0.23".to_string(), json!("Tunnels"), json!(["HBONE"])),
            ]
        );
        // /clusters: the router paths' cluster holds echo-2 alone, the tunnels' the two
        // captured pods.
        let (code, body) = http_get(strait.admin, "/clusters").unwrap();
        assert_eq!(code, 200, "{body}");
        let clusters: Value = serde_json::from_str(&body).unwrap();
        let members = |name: &str| -> Vec<String> {
            clusters["clusters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("no cluster {name}: {clusters:#}"))["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["address"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            members(&format!("outbound_.80_._.{ECHO}")),
            ["10.0.0.22:8080"]
        );
        let mut tunnels = members(&inbound_vip(80, ECHO));
        tunnels.sort();
        assert_eq!(tunnels, ["10.0.0.21:8080", "10.0.0.23:8080"]);

        // ISTIO_MUTUAL, PASSTHROUGH and AUTO_PASSTHROUGH to echo:80, six each.
        let mutual = SocketAddr::from((spoke.ip, 15444));
        let passthrough = SocketAddr::from((spoke.ip, 15445));
        let sni = format!("outbound_.80_._.{ECHO}");
        for i in 0..6 {
            through_mutual(mutual, &source_certs).await;
            let seen = round_trip(passthrough, &test_ca, ECHO)
                .await
                .unwrap_or_else(|e| panic!("PASSTHROUGH {i}: {e}\n{}", strait.stderr_text()));
            assert_eq!(seen, ECHO_ID);
            let seen = round_trip(spoke.gateway(), &test_ca, &sni)
                .await
                .unwrap_or_else(|e| panic!("15443 {i}: {e}\n{}", strait.stderr_text()));
            assert_eq!(seen, ECHO_ID);
        }
        // Each connection dialled echo-2's 8080 (once, or more where an upstream
        // handshake was retried), and nothing else.
        let all_at_echo_2 = strait.eventually(Duration::from_secs(10), || apps[1].accepted() >= 18);
        let accepted: Vec<u64> = apps.iter().map(Workload::accepted).collect();
        assert!(all_at_echo_2, "{accepted:?}\n{}", strait.stderr_text());
        assert_eq!(
            (accepted[0], accepted[2]),
            (0, 0),
            "echo-1 and echo-3 on 8080: {accepted:?}"
        );

        // 15008 still tunnels to the captured pods, and only to them.
        let via = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut source = HboneSource::new(SocketAddr::from((spoke.ip, 15008)), &source_certs);
        source.gateway_id = Some(GATEWAY_SPIFFE.into());
        source.dest_id = Some(ECHO_ID.into());
        source.maps = vec![(via, format!("{ECHO}:80"))];
        let source = source.start(None).await.expect("hbone-peer");
        let mut to_echo_1 = 0;
        for i in 0..4 {
            let back = tunnel_round_trip(via, b"hi\n", Duration::from_secs(10))
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "tunnel {i}:\n{}\n{}",
                        source.lines().join("\n"),
                        strait.stderr_text()
                    )
                });
            let text = String::from_utf8_lossy(&back);
            assert!(
                text == "[echo-1] hi\n" || text == "[echo-3] hi\n",
                "{text:?}"
            );
            to_echo_1 += usize::from(text.starts_with("[echo-1]"));
        }
        // Each pod prints a stream before it answers; the test's reader is awaited.
        let wait = Duration::from_secs(10);
        let streams = echo_1.wait_streams(to_echo_1, wait).await.len()
            + echo_3.wait_streams(4 - to_echo_1, wait).await.len();
        assert_eq!(streams, 4);
    });
}

/// A DestinationRule on `echo`: a connection limit of one, outlier detection, and a TCP
/// idle timeout.
const ECHO_RULE: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: echo}
spec:
  host: echo.echo.svc.cluster.local
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1, idleTimeout: 7m}}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
";

/// Through Istio's source `via`: one tunnel held open after its first answer, the name of
/// the pod that answered, or `None` when the tunnel was refused.
async fn held_tunnel(via: SocketAddr) -> Option<(tokio::net::TcpStream, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(via).await.ok()?;
    stream.write_all(b"hi\n").await.ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    while !out.ends_with(b"hi\n") {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    Some((stream, text))
}

/// istiod gives an ambient east-west gateway's `inbound-vip` clusters no DestinationRule
/// policy ("east-west gateways don't respect DestinationRule": LEAST_REQUEST, unlimited
/// circuit breakers, no outlier detection) and puts only the rule's TCP idle timeout on
/// `main_internal`'s `tcp_proxy`, while the router's cluster of the same service port
/// takes the whole rule. strait serves each stream's as sent: the connection limit of one
/// holds on 15443 (a second connection is refused, `UO`) and not on the tunnels (two held
/// at once through Istio's source), and `/clusters` and `config_dump` show each cluster's
/// policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_shapes_the_routers_cluster_and_not_the_tunnels() {
    if !present() || hbone_peer_bin().is_none() {
        return;
    }
    let lab = Lab::new("amb-dr");
    let spoke = lab.spoke("amb-dr-s");
    lab.run(|| async {
        let istiod = start_istiod().await;
        istiod.apply("echo-rule.yaml", ECHO_RULE);
        let sni = format!("outbound_.80_._.{ECHO}");
        let vip_80 = inbound_vip(80, ECHO);

        // What istiod sends each node.
        let router = dump_when(
            &istiod,
            "router~10.0.0.8~istio-eastwestgateway-1.istio-system~istio-system.svc.cluster.local",
            &gateway_node_metadata(
                Ipv4Addr::new(10, 0, 0, 8),
                json!({
                    "istio": "eastwestgateway",
                    "app": "istio-eastwestgateway",
                    "topology.istio.io/network": "network1",
                }),
            ),
            |d| {
                d.get("clusters", &sni)
                    .is_some_and(|c| c["outlierDetection"].is_object())
            },
        )
        .await;
        let routers = router.get("clusters", &sni).unwrap();
        assert_eq!(
            routers["circuitBreakers"]["thresholds"][0]["maxConnections"], 1,
            "{routers:#}"
        );
        let waypoint = dump_when(
            &istiod,
            &waypoint_id(),
            &gateway_node_metadata(WAYPOINT_IP, east_west_labels()),
            |d| {
                d.get("listeners", "main_internal").is_some_and(|l| {
                    l["filterChains"].as_array().into_iter().flatten().any(|c| {
                        filter(c, "envoy.filters.network.tcp_proxy")["idleTimeout"] == "420s"
                    })
                })
            },
        )
        .await;
        let tunnels = waypoint.get("clusters", &vip_80).unwrap();
        assert_eq!(tunnels["lbPolicy"], "LEAST_REQUEST", "{tunnels:#}");
        assert!(tunnels["outlierDetection"].is_null(), "{tunnels:#}");
        assert_eq!(
            tunnels["circuitBreakers"]["thresholds"][0]["maxConnections"],
            u32::MAX,
            "{tunnels:#}"
        );

        // strait on the same istiod, both streams.
        let dir = TempDir::new("amb-dr");
        let ca = mesh_ca(dir.path(), "cluster.local");
        let gateway_certs = mesh_cert(&ca, GATEWAY_SPIFFE, &dir.path().join("gateway"));
        let source_certs = mesh_cert(&ca, SOURCE_ID, &dir.path().join("source"));
        let dest_certs = mesh_cert(&ca, ECHO_ID, &dir.path().join("dest"));
        let mut dests = Vec::new();
        for (last, name) in [(21, "echo-1"), (23, "echo-3")] {
            dests.push(
                hbone_dest(
                    SocketAddr::from(([10, 0, 0, last], 15008)),
                    &dest_certs,
                    name,
                    None,
                )
                .await
                .expect("hbone-peer"),
            );
        }
        let test_ca = TestCa::new();
        let echo_2 =
            Workload::start_at(&test_ca, ECHO_ID, SocketAddr::from(([10, 0, 0, 22], 8080))).await;
        let strait = ready_waypoint_gateway(&spoke, &gateway_certs);
        let policies = || {
            let (code, body) = http_get(strait.admin, "/clusters").unwrap();
            assert_eq!(code, 200, "{body}");
            let clusters: Value = serde_json::from_str(&body).unwrap();
            let of = |name: &str| {
                clusters["clusters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["name"] == name)
                    .map(|c| c["policy"].clone())
            };
            (of(&sni), of(&vip_80))
        };
        let both = strait.eventually(Duration::from_secs(30), || {
            matches!(policies(), (Some(r), Some(t))
                if r["maxConnections"] == 1 && t["idleTimeout"] == "420s")
        });
        assert!(both, "{:?}\n{}", policies(), strait.stderr_text());
        let (Some(routers), Some(tunnels)) = policies() else {
            unreachable!("awaited above")
        };
        assert_eq!(
            routers["outlierDetection"]["consecutiveErrors"], 1,
            "{routers:#}"
        );
        assert_eq!(
            (
                &tunnels["loadBalancer"],
                &tunnels["maxConnections"],
                &tunnels["outlierDetection"],
            ),
            (&json!("LeastRequest"), &Value::Null, &Value::Null),
            "{tunnels:#}"
        );
        let dump = config_dump(&strait);
        let port = dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["host"] == ECHO && s["port"] == 80)
            .unwrap();
        assert_eq!(port["policy"], routers);
        assert_eq!(port["tunnelPolicy"], tunnels);

        // 15443: one connection held to echo-2; the next is refused at the limit.
        let uo = [
            ("response_flag", "UO"),
            ("reason", "cluster_max_connections"),
        ];
        let (mut held, seen) = tls_connect(spoke.gateway(), &test_ca, &sni, &["istio"])
            .await
            .unwrap_or_else(|e| panic!("15443: {e}\n{}", strait.stderr_text()));
        assert_eq!(seen, ECHO_ID);
        assert_eq!(echo_once(&mut held, b"held\n").await, b"held\n");
        let _ = round_trip(spoke.gateway(), &test_ca, &sni).await;
        strait.wait_metric("strait_refusals_total", &uo, |v| v == 1.0);
        assert_eq!(echo_2.accepted(), 1);

        // 15008 meanwhile: two tunnels held at once, neither refused.
        let via = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut source = HboneSource::new(SocketAddr::from((spoke.ip, 15008)), &source_certs);
        source.gateway_id = Some(GATEWAY_SPIFFE.into());
        source.dest_id = Some(ECHO_ID.into());
        source.maps = vec![(via, format!("{ECHO}:80"))];
        let source = source.start(None).await.expect("hbone-peer");
        let mut open = Vec::new();
        for i in 0..2 {
            let (stream, text) = held_tunnel(via).await.unwrap_or_else(|| {
                panic!(
                    "tunnel {i} refused:\n{}\n{}",
                    source.lines().join("\n"),
                    strait.stderr_text()
                )
            });
            assert!(
                text == "[echo-1] hi\n" || text == "[echo-3] hi\n",
                "{text:?}"
            );
            open.push(stream);
        }
        assert_eq!(strait.metric("strait_refusals_total", &uo), 1.0);
        drop(open);
        drop(held);
    });
}

/// Readiness waits for both streams: with a waypoint node istiod refuses (an id that is
/// not `<type>~<ip>~<pod>.<ns>~<domain>`), the router stream's configuration arrives and
/// is served, and readiness stays 503, naming the waypoint node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_waypoint_stream_too() {
    if harness_bin().is_none() {
        return;
    }
    let lab = Lab::new("amb-rdy");
    let spoke = lab.spoke("amb-rdy-s");
    lab.run(|| async {
        let _istiod = start_istiod().await;
        let strait = launch_strait_gateway(
            &spoke,
            POD,
            "    waypoint: {id: \"waypoint~refused\"}\n",
            Path::new(strait_bin()),
            &[],
        );
        // The router stream is complete …
        let router_ready = strait.eventually(Duration::from_secs(30), || {
            http_get(strait.admin, "/config_dump")
                .ok()
                .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                .is_some_and(|d| d["discovery"]["ready"] == true)
        });
        assert!(router_ready, "{}", strait.stderr_text());
        // … and readiness still waits, for the waypoint node.
        let (code, body) = http_get(strait.status, "/healthz/ready").unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("config not received from XDS server for the waypoint node"),
            "{body}"
        );
        let dump = config_dump(&strait);
        assert_eq!(dump["waypointDiscovery"]["ready"], false);
        // The waypoint stream's refusal is counted by its own task: waited for.
        assert!(
            strait.eventually(Duration::from_secs(30), || strait.metric(
                "strait_xds_stream_failures_total",
                &[("stream", "waypoint")]
            ) >= 1.0),
            "{}",
            strait.metrics_text()
        );
    });
}

/// Both streams the way a pod meets istiod: 15012 with TLS verified by the mesh root and
/// the pod's projected token, which istiod checks against each node's namespace and
/// service account; the SVID 15008 presents comes from istiod's CA over the router
/// stream's connection. Istio's source ztunnel, holding a certificate of the same CA,
/// tunnels through to a captured pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_streams_on_15012_with_the_pods_token_and_istiods_ca() {
    if harness_bin().is_none() || hbone_peer_bin().is_none() {
        return;
    }
    let lab = Lab::new("amb-sec");
    let spoke = lab.spoke("amb-sec-s");
    lab.run(|| async {
        let dir = TempDir::new("amb-sec");
        let issuer = TokenIssuer::start(dir.path()).await;
        let istiod = start_istiod_with(Some(issuer.rule())).await;
        let token = dir.write(
            "istio-token",
            &issuer.token("istio-system", "istio-eastwestgateway", AUDIENCE, 3600),
        );
        let root = istiod.ca_dir().join("root-cert.pem");
        let source_certs = mesh_cert(&istiod.ca_dir(), SOURCE_ID, &dir.path().join("source"));
        let dest_certs = mesh_cert(&istiod.ca_dir(), ECHO_ID, &dir.path().join("dest"));
        let echo_1 = hbone_dest(
            SocketAddr::from(([10, 0, 0, 21], 15008)),
            &dest_certs,
            "echo-1",
            None,
        )
        .await
        .expect("hbone-peer");
        let _echo_3 = hbone_dest(
            SocketAddr::from(([10, 0, 0, 23], 15008)),
            &dest_certs,
            "echo-3",
            None,
        )
        .await
        .expect("hbone-peer");
        let config = format!(
            "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {{name: strait}}
spec:
  status: 0.0.0.0:15021
  metrics: 0.0.0.0:15090
  admin: 0.0.0.0:15000
  network: network1
  cluster: cluster1
  labels: {GATEWAY_LABELS}
  discovery:
    address: {ISTIOD_IP}:{SECURE_XDS_PORT}
    serverName: istiod.istio-system.svc
    rootCert: {root}
    token: {token}
    initialFetchTimeout: 5s
    node: {{ip: {ip}, podName: {POD}, namespace: istio-system, serviceAccount: istio-eastwestgateway}}
    waypoint: {{}}
  certificates:
    ca: {{}}
",
            root = root.display(),
            token = token.display(),
            ip = spoke.ip,
        );
        let ports = common::Ports {
            gateway: 15443,
            status: 15021,
            metrics: 15090,
            admin: 15000,
        };
        let strait = Strait::launch_in_at(
            &spoke.ns,
            std::net::IpAddr::V4(spoke.ip),
            ports,
            &config,
            Path::new(strait_bin()),
            &[],
        );
        spoke.ns.run(|| strait.wait_ready(Duration::from_secs(30)));
        let proxy = format!("{POD}.istio-system");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let entries = syncz_of(&istiod, &proxy).await;
            let mut types: Vec<String> = entries
                .iter()
                .filter(|e| sync_problems(e).is_empty())
                .map(|e| e["proxy_type"].as_str().unwrap_or("").to_string())
                .collect();
            types.sort();
            if types == ["router", "waypoint"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not both streams SYNCED: {entries:#?}\n{}",
                strait.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            strait.metric("strait_xds_stream_failures_total", &[("reason", "auth")]),
            0.0
        );

        let via = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut source = HboneSource::new(SocketAddr::from((spoke.ip, 15008)), &source_certs);
        source.gateway_id = Some(GATEWAY_SPIFFE.into());
        source.dest_id = Some(ECHO_ID.into());
        source.maps = vec![(via, format!("{ECHO}:80"))];
        let source = source.start(None).await.expect("hbone-peer");
        let back = tunnel_round_trip(via, b"hello\n", Duration::from_secs(10))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no tunnel:\n{}\n{}",
                    source.lines().join("\n"),
                    strait.stderr_text()
                )
            });
        let text = String::from_utf8_lossy(&back);
        assert!(
            text == "[echo-1] hello\n" || text == "[echo-3] hello\n",
            "{text:?}"
        );
        let _ = echo_1;
    });
}

/// `istioctl proxy-config <what> --file <dump>`: the lines of the table it prints, below
/// the header, each with its runs of spaces made one (the padding depends on the widest
/// cell; a column left empty in one table would shift a split on the spaces), sorted.
fn proxy_config_lines(istioctl: &Path, what: &str, file: &Path) -> Vec<String> {
    let stdout = proxy_config_output(istioctl, what, file);
    let mut lines: Vec<String> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

/// The connection ids istiod gives `pod`'s streams (`/debug/adsz`), by node type
/// (`router`, `waypoint`): what its `/debug/config_dump?proxyID=` takes to dump one
/// stream of a pod that holds two.
async fn connection_ids(istiod: &Istiod, pod: &str) -> Vec<(String, String)> {
    let (code, body) = istiod.debug("/debug/adsz").await.expect("adsz");
    assert_eq!(code, 200, "{body}");
    let adsz: Value = serde_json::from_str(&body).expect("adsz is JSON");
    let mut ids: Vec<(String, String)> = adsz["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let id = c["connectionId"].as_str()?;
            id.starts_with(&format!("{pod}.istio-system-")).then(|| {
                let kind =
                    if c["labels"]["gateway.istio.io/managed"] == "istio.io-eastwest-controller" {
                        "waypoint"
                    } else {
                        "router"
                    };
                (kind.to_string(), id.to_string())
            })
        })
        .collect();
    ids.sort();
    ids
}

/// `istioctl proxy-status`, built from the same Istio module and asking the harness's
/// istiod as an operator does (`--xds-address`, 15012, an operator certificate), lists
/// the one strait holding both streams as two rows of the same name (`<pod>.<namespace>`:
/// istiod's syncz names a proxy by pod, not by node type), each SYNCED on every type
/// istiod sent it. One row reads as an Envoy `router` on the same istiod reads, column
/// for column; the other holds the waypoint stream's types, as syncz has them. And
/// `istioctl proxy-config listener|cluster --file` on strait's one dump prints the rows
/// it prints for istiod's own dumps of the two streams (`/debug/config_dump` of each
/// connection: what an Envoy holding each would hold), together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istioctl_proxy_status_lists_the_router_and_the_waypoint_stream_synced() {
    if !common::istiod::peers_present() {
        return;
    }
    let Some(istioctl) = common::istiod::istioctl_bin() else {
        return;
    };
    const ENVOY_POD: &str = "istio-eastwestgateway-envoy";
    let lab = Lab::new("amb-ps");
    let spoke = lab.spoke("amb-ps-s");
    let envoy_spoke = lab.spoke("amb-ps-e");
    lab.run(|| async {
        let istiod = start_istiod().await;
        let dir = TempDir::new("amb-ps");
        let ca = mesh_ca(dir.path(), "cluster.local");
        let gateway_certs = mesh_cert(&ca, GATEWAY_SPIFFE, &dir.path().join("gateway"));
        let strait = launch_strait_gateway(
            &spoke,
            POD,
            &format!(
                "    waypoint: {{}}\n  certificates: {{dir: {}}}\n",
                gateway_certs.display()
            ),
            Path::new(strait_bin()),
            &[],
        );
        let agent = common::istiod::PilotAgent::start(&istiod).await;
        let envoy = common::istiod::envoy_gateway(&envoy_spoke, ENVOY_POD, &agent)
            .await
            .expect("envoy (checked by peers_present)");
        spoke.ns.run(|| strait.wait_ready(Duration::from_secs(30)));

        let proxy = format!("{POD}.istio-system");
        let envoy_proxy = format!("{ENVOY_POD}.istio-system");
        // What istiod sent each stream (syncz), once both are SYNCED, and Envoy too.
        let deadline = Instant::now() + Duration::from_secs(30);
        let sent = loop {
            let entries = syncz_of(&istiod, &proxy).await;
            let envoy_synced = syncz_of(&istiod, &envoy_proxy)
                .await
                .iter()
                .any(|e| sync_problems(e).is_empty());
            if entries.len() == 2
                && entries.iter().all(|e| sync_problems(e).is_empty())
                && envoy_synced
            {
                break entries;
            }
            assert!(
                Instant::now() < deadline,
                "not SYNCED: {entries:#?}\n{}\n{}",
                strait.stderr_text(),
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The short type names istioctl prints for the types a stream was sent.
        let types_of = |kind: &str| -> Vec<String> {
            let entry = sent
                .iter()
                .find(|e| e["proxy_type"] == kind)
                .unwrap_or_else(|| panic!("no {kind} stream in {sent:#?}"));
            let mut types: Vec<String> = entry["resources"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, s)| s["sent"].as_str().is_some_and(|n| !n.is_empty()))
                .map(|(t, _)| {
                    let short = t.rsplit('.').next().unwrap_or(t);
                    match short {
                        "Cluster" => "CDS",
                        "Listener" => "LDS",
                        "ClusterLoadAssignment" => "EDS",
                        "RouteConfiguration" => "RDS",
                        other => other,
                    }
                    .to_string()
                })
                .collect();
            types.sort();
            types
        };
        let waypoint_types = types_of("waypoint");
        assert!(
            ["CDS", "EDS", "LDS"]
                .iter()
                .all(|t| waypoint_types.iter().any(|w| w == t)),
            "{waypoint_types:?}"
        );

        let stdout = istiod.istioctl_proxy_status(&istioctl, &["--verbosity", "1"]);
        eprintln!("istioctl proxy-status --verbosity 1:\n{stdout}");
        let rows = istioctl_rows(&stdout);
        let ours: Vec<&IstioctlRow> = rows
            .iter()
            .filter(|r| r.get("NAME") == Some(&proxy))
            .collect();
        assert_eq!(ours.len(), 2, "one row per stream:\n{stdout}");
        let envoy_row = rows
            .iter()
            .find(|r| r.get("NAME") == Some(&envoy_proxy))
            .unwrap_or_else(|| panic!("no row for {envoy_proxy}:\n{stdout}"));
        // "SYNCED (3s)": the state, without how long ago.
        let state = |v: &str| v.split_whitespace().next().unwrap_or("").to_string();
        let fixed = ["NAME", "CLUSTER", "ISTIOD", "VERSION"];
        // The type columns a row shows a state for (IGNORED: never asked, never sent).
        let shown = |row: &IstioctlRow| -> Vec<String> {
            let mut t: Vec<String> = row
                .iter()
                .filter(|(c, v)| !fixed.contains(&c.as_str()) && state(v) != "IGNORED")
                .map(|(c, _)| c.clone())
                .collect();
            t.sort();
            t
        };
        for row in &ours {
            for (column, value) in row.iter() {
                if !fixed.contains(&column.as_str()) {
                    assert!(
                        ["SYNCED", "IGNORED"].contains(&state(value).as_str()),
                        "{column}: {value}:\n{stdout}"
                    );
                }
            }
            assert_eq!(row.get("CLUSTER"), envoy_row.get("CLUSTER"), "{stdout}");
            assert_eq!(row.get("ISTIOD"), envoy_row.get("ISTIOD"), "{stdout}");
            assert_eq!(
                row.get("VERSION").map(String::as_str),
                Some(common::istiod::PROXY_ISTIO_VERSION),
                "{stdout}"
            );
        }
        // One row is the router's, as Envoy's reads; the other the waypoint's.
        let as_envoy = |row: &IstioctlRow| {
            envoy_row
                .iter()
                .filter(|(c, _)| !["NAME", "VERSION"].contains(&c.as_str()))
                .all(|(c, v)| row.get(c).map(|s| state(s)) == Some(state(v)))
        };
        let router = ours.iter().position(|r| as_envoy(r)).unwrap_or_else(|| {
            panic!("no row of {proxy} reads as the Envoy router's:\n{stdout}")
        });
        assert_eq!(shown(ours[router]), types_of("router"), "{stdout}");
        assert_eq!(shown(ours[1 - router]), waypoint_types, "{stdout}");
        let brief = istiod.istioctl_proxy_status(&istioctl, &[]);
        eprintln!("istioctl proxy-status:\n{brief}");
        let brief_rows = istioctl_rows(&brief);
        assert_eq!(
            brief_rows
                .iter()
                .filter(|r| r.get("NAME") == Some(&proxy))
                .count(),
            2,
            "{brief}"
        );

        // istioctl proxy-config: strait's one dump against istiod's dump of each stream.
        let ids = connection_ids(&istiod, POD).await;
        let kinds: Vec<&str> = ids.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["router", "waypoint"], "{ids:?}");
        let files = TempDir::new("amb-ps-dumps");
        for (kind, id) in &ids {
            let (code, body) = istiod
                .debug(&format!("/debug/config_dump?proxyID={id}"))
                .await
                .expect("istiod config_dump");
            assert_eq!(code, 200, "{body}");
            files.write(&format!("istiod-{kind}.json"), &body);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for what in ["listener", "cluster"] {
            loop {
                let (code, body) = http_get(strait.admin, "/config_dump").expect("config_dump");
                assert_eq!(code, 200, "{body}");
                let strait_file = files.write("strait.json", &body);
                let of_strait = proxy_config_lines(&istioctl, what, &strait_file);
                let mut of_istiod: Vec<String> = ids
                    .iter()
                    .flat_map(|(kind, _)| {
                        proxy_config_lines(
                            &istioctl,
                            what,
                            &files.path().join(format!("istiod-{kind}.json")),
                        )
                    })
                    .collect();
                of_istiod.sort();
                of_istiod.dedup();
                let of_waypoint = proxy_config_lines(
                    &istioctl,
                    what,
                    &files.path().join("istiod-waypoint.json"),
                );
                if of_strait == of_istiod && !of_waypoint.is_empty() {
                    eprintln!(
                        "istioctl proxy-config {what} (the waypoint stream's):\n{of_waypoint:#?}"
                    );
                    break;
                }
                if Instant::now() >= deadline {
                    // The dumps outlive the test's folder, for reading.
                    let kept = std::env::temp_dir()
                        .join(format!("strait-amb-proxy-config-{}", std::process::id()));
                    let _ = std::fs::create_dir_all(&kept);
                    for f in ["strait", "istiod-router", "istiod-waypoint"] {
                        let f = format!("{f}.json");
                        let _ = std::fs::copy(files.path().join(&f), kept.join(&f));
                    }
                    eprintln!("dumps kept in {}", kept.display());
                }
                assert!(
                    Instant::now() < deadline,
                    "istioctl proxy-config {what}: rows differ\nonly strait: {:#?}\nonly istiod: {:#?}",
                    of_strait
                        .iter()
                        .filter(|r| !of_istiod.contains(r))
                        .collect::<Vec<_>>(),
                    of_istiod
                        .iter()
                        .filter(|r| !of_strait.contains(r))
                        .collect::<Vec<_>>(),
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}

const RATINGS: &str = "ratings.echo.svc.cluster.local";
const WAYPOINT: &str = "waypoint.echo.svc.cluster.local";

/// A Service with a waypoint, beside [`KUBE`]: the global Service `ratings` (VIP
/// 10.96.0.12, port 80 → 8080, one captured pod at 10.0.0.32) labelled
/// `istio.io/use-waypoint: waypoint`, and `details` (VIP 10.96.0.13, one captured pod at
/// 10.0.0.33) with the same waypoint and `istio.io/ingress-use-waypoint: "true"`; the
/// waypoint as Istio deploys it for a Gateway of
/// class `istio-waypoint`: the Gateway (its address in `status.addresses`, which istiod
/// waits for), its GatewayClass, its Service (`waypoint`, VIP 10.96.0.20, port 15008) and
/// one ready pod at 10.0.0.41 labelled as a waypoint's (`gateway.istio.io/managed:
/// istio.io-mesh-controller`), with their EndpointSlices.
const WAYPOINT_KUBE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint}
spec: {controllerName: istio.io/mesh-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: echo
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
status:
  addresses:
  - {type: Hostname, value: waypoint.echo.svc.cluster.local}
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: echo
  labels:
    gateway.istio.io/managed: istio.io-mesh-controller
    gateway.networking.k8s.io/gateway-name: waypoint
    istio.io/waypoint-for: service
spec:
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  clusterIP: 10.96.0.20
  ports:
  - {name: mesh, port: 15008, targetPort: 15008, protocol: TCP, appProtocol: all}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-1
  namespace: echo
  labels:
    gateway.istio.io/managed: istio.io-mesh-controller
    gateway.networking.k8s.io/gateway-name: waypoint
spec: {serviceAccountName: waypoint, nodeName: node1, containers: [{name: istio-proxy, image: proxyv2}]}
status:
  phase: Running
  podIP: 10.0.0.41
  podIPs: [{ip: 10.0.0.41}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: waypoint-1
  namespace: echo
  labels: {kubernetes.io/service-name: waypoint}
addressType: IPv4
endpoints:
- addresses: [10.0.0.41]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: waypoint-1, namespace: echo}
ports:
- {name: mesh, port: 15008, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: ratings
  namespace: echo
  labels: {istio.io/global: \"true\", istio.io/use-waypoint: waypoint}
spec:
  selector: {app: ratings}
  clusterIP: 10.96.0.12
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: ratings-1
  namespace: echo
  labels: {app: ratings}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {serviceAccountName: ratings, nodeName: node1, containers: [{name: ratings, image: ratings}]}
status:
  phase: Running
  podIP: 10.0.0.32
  podIPs: [{ip: 10.0.0.32}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ratings-1
  namespace: echo
  labels: {kubernetes.io/service-name: ratings}
addressType: IPv4
endpoints:
- addresses: [10.0.0.32]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: ratings-1, namespace: echo}
ports:
- {name: http, port: 8080, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata:
  name: details
  namespace: echo
  labels: {istio.io/global: \"true\", istio.io/use-waypoint: waypoint, istio.io/ingress-use-waypoint: \"true\"}
spec:
  selector: {app: details}
  clusterIP: 10.96.0.13
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: details-1
  namespace: echo
  labels: {app: details}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {serviceAccountName: details, nodeName: node1, containers: [{name: details, image: details}]}
status:
  phase: Running
  podIP: 10.0.0.33
  podIPs: [{ip: 10.0.0.33}]
  conditions: [{type: Ready, status: \"True\"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: details-1
  namespace: echo
  labels: {kubernetes.io/service-name: details}
addressType: IPv4
endpoints:
- addresses: [10.0.0.33]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: details-1, namespace: echo}
ports:
- {name: http, port: 8080, protocol: TCP}
";

const DETAILS: &str = "details.echo.svc.cluster.local";

/// The action (a filter chain's name) of a matcher's `OnMatch`.
fn action(on_match: &Value) -> &str {
    on_match["action"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("not an action: {on_match}"))
}

/// What istiod sends the ambient east-west gateway for a Service with a waypoint (the
/// waypoint Gateway reaches istiod through the harness's in-memory Gateway API client):
/// `connect_terminate` copies the outer CONNECT's `x-istio-source` into the filter state
/// `io.istio.source`, and `main_internal`'s entry for the Service (its name, and its VIP
/// port) is not a chain but a matcher on that state: `waypoint` and `gateway` (the
/// Service does not set `istio.io/ingress-use-waypoint`) go to the Service's own chain,
/// any other value (or none) to the waypoint's chain `inbound-vip|15008|tcp|<waypoint>`,
/// whose EDS lists the waypoint's pod. A Service without a waypoint keeps its chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_dispatches_a_service_with_a_waypoint_on_x_istio_source() {
    if !present() {
        return;
    }
    let lab = Lab::new("amb-wp-xds");
    lab.run(|| async {
        let istiod = start_istiod().await;
        istiod.apply_kube("waypoint.yaml", WAYPOINT_KUBE);
        let meta = gateway_node_metadata(WAYPOINT_IP, east_west_labels());
        let waypoint_chain = inbound_vip(15008, WAYPOINT);
        let dump = dump_when(&istiod, &waypoint_id(), &meta, |d| {
            d.get("endpoints", &waypoint_chain)
                .is_some_and(|e| healthy(e).len() == 1)
                && d.get("listeners", "main_internal").is_some_and(|m| {
                    m["filterChainMatcher"]["matcherTree"]["exactMatchMap"]["map"]
                        [format!("{RATINGS}:80")]["matcher"]
                        .is_object()
                })
        })
        .await;

        let ct = dump.get("listeners", "connect_terminate").unwrap();
        let hcm = filter(
            &ct["filterChains"][0],
            "envoy.filters.network.http_connection_manager",
        );
        let source = hcm["httpFilters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "request_source")
            .expect("the request_source filter");
        assert_eq!(
            source["typedConfig"]["onRequestHeaders"][0]["objectKey"],
            "io.istio.source"
        );
        assert_eq!(
            source["typedConfig"]["onRequestHeaders"][0]["formatString"]["textFormatSource"]
                ["inlineString"],
            "%REQ(x-istio-source)%"
        );

        let main = dump.get("listeners", "main_internal").unwrap();
        let map = &main["filterChainMatcher"]["matcherTree"]["exactMatchMap"]["map"];
        let ratings_chain = inbound_vip(80, RATINGS);
        let by_source = |m: &Value| {
            let tree = &m["matcher"]["matcherTree"];
            assert_eq!(tree["input"]["typedConfig"]["key"], "io.istio.source", "{m}");
            let mut values: Vec<(String, String)> = tree["exactMatchMap"]["map"]
                .as_object()
                .unwrap_or_else(|| panic!("not an exact map: {m}"))
                .iter()
                .map(|(k, v)| (k.clone(), action(v).to_string()))
                .collect();
            values.sort();
            (values, action(&m["matcher"]["onNoMatch"]).to_string())
        };
        let want = (
            vec![
                ("gateway".to_string(), ratings_chain.clone()),
                ("waypoint".to_string(), ratings_chain.clone()),
            ],
            waypoint_chain.clone(),
        );
        assert_eq!(by_source(&map[format!("{RATINGS}:80")]), want);
        // With istio.io/ingress-use-waypoint, an ingress gateway's tunnels take the
        // waypoint too.
        let details_chain = inbound_vip(80, DETAILS);
        assert_eq!(
            by_source(&map[format!("{DETAILS}:80")]),
            (
                vec![
                    ("gateway".to_string(), waypoint_chain.clone()),
                    ("waypoint".to_string(), details_chain),
                ],
                waypoint_chain.clone(),
            )
        );
        // The waypoint serves under its own name; echo keeps its chain.
        assert_eq!(action(&map[format!("{WAYPOINT}:15008")]), waypoint_chain);
        assert_eq!(action(&map[format!("{ECHO}:80")]), inbound_vip(80, ECHO));
        // The VIP port dispatches the same way.
        let ranges = main["filterChainMatcher"]["onNoMatch"]["matcher"]["matcherTree"]
            ["customMatch"]["typedConfig"]["rangeMatchers"]
            .as_array()
            .unwrap();
        let vip = ranges
            .iter()
            .find(|r| r["ranges"][0]["addressPrefix"] == "10.96.0.12")
            .unwrap_or_else(|| panic!("no range for ratings' VIP: {ranges:?}"));
        assert_eq!(
            by_source(&vip["onMatch"]["matcher"]["matcherTree"]["exactMatchMap"]["map"]["80"]),
            want
        );
        // The waypoint's chain goes to its pod's 15008.
        let wp = healthy(dump.get("endpoints", &waypoint_chain).unwrap());
        assert_eq!(
            wp[0]["metadata"]["filterMetadata"]["envoy.filters.listener.original_dst"]["local"],
            "10.0.0.41:15008",
            "{wp:?}"
        );
        assert!(dump.get("endpoints", &ratings_chain).is_some());
    });
}

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/echo/sa/waypoint";
const RATINGS_ID: &str = "spiffe://cluster.local/ns/echo/sa/ratings";

/// A pod's 15008 that counts the connections it accepts and splices each to `to` (the
/// destination ztunnel standing in for the pod, on another port of the same address).
async fn counting_relay(addr: SocketAddr, to: SocketAddr) -> Arc<AtomicU64> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut up).await;
                }
            });
        }
    });
    accepted
}

/// One `CONNECT` for `authority` through the gateway's 15008 with `headers`, from a Rust
/// HTTP/2 client on a fresh outer connection as a source ztunnel opens it (mTLS 1.3, ALPN
/// h2, no SNI, the source's SVID, the gateway's SPIFFE ID checked): the response status.
/// Unlike Istio's dialer, it can send `x-istio-source`, as a waypoint does.
async fn connect_with(
    gateway: SocketAddr,
    certs: &Path,
    authority: &str,
    headers: &[(&str, &str)],
) -> Result<u16, String> {
    use strait::tls::{SpiffeId, TrustConfig, client_config, load_identity};
    let id = load_identity(certs).map_err(|e| e.to_string())?;
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: vec![],
        federated: Default::default(),
    };
    let expected = SpiffeId::parse(GATEWAY_SPIFFE).unwrap();
    let config = client_config(&id, &trust, Some(&expected), &[b"h2"]).unwrap();
    let mut config = (*config).clone();
    config.enable_sni = false;
    let tcp = tokio::net::TcpStream::connect(gateway)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("gateway").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let task = tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let (resp, _stream) = send
        .send_request(req.body(()).unwrap(), false)
        .map_err(|e| e.to_string())?;
    let status = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .map_err(|_| "no response".to_string())?
        .map_err(|e| e.to_string())?
        .status()
        .as_u16();
    task.abort();
    Ok(status)
}

/// A Service with a waypoint through strait's 15008, as istiod configures it: a tunnel
/// from a source ztunnel (Istio's own dialer, no `x-istio-source`) to `ratings` goes to
/// the waypoint's pod (the destination standing in for the waypoint sees the authority
/// and the source's identity), by name and by VIP; a `CONNECT` carrying
/// `x-istio-source: waypoint` (as a waypoint sends it once it applied the Service's
/// policies) or `gateway` goes to the Service's own pod, any other value to the waypoint;
/// `echo`, which has no waypoint, is unchanged. The Rust client and Istio's dialer are
/// shown alike on the plain case first. `/config_dump` and `strait route --source` show
/// the dispatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_a_waypoint_is_tunnelled_to_its_waypoint_unless_the_waypoint_sent_it() {
    if harness_bin().is_none() || hbone_peer_bin().is_none() {
        return;
    }
    let lab = Lab::new("amb-wp");
    let spoke = lab.spoke("amb-wp-s");
    lab.run(|| async {
        let istiod = start_istiod().await;
        istiod.apply_kube("waypoint.yaml", WAYPOINT_KUBE);
        let dir = TempDir::new("amb-wp");
        let ca = mesh_ca(dir.path(), "cluster.local");
        let gateway_certs = mesh_cert(&ca, GATEWAY_SPIFFE, &dir.path().join("gateway"));
        let source_certs = mesh_cert(&ca, SOURCE_ID, &dir.path().join("source"));
        let dest = |id: &str, dir_name: &str| mesh_cert(&ca, id, &dir.path().join(dir_name));
        let (echo_certs, waypoint_certs, ratings_certs) = (
            dest(ECHO_ID, "echo"),
            dest(WAYPOINT_ID, "waypoint"),
            dest(RATINGS_ID, "ratings"),
        );
        let peer = |listen: SocketAddr, certs: std::path::PathBuf, name: &'static str| async move {
            hbone_dest(listen, &certs, name, None)
                .await
                .expect("hbone-peer")
        };
        let echo_1 = peer(SocketAddr::from(([10, 0, 0, 21], 15008)), echo_certs.clone(), "echo-1").await;
        let echo_3 = peer(SocketAddr::from(([10, 0, 0, 23], 15008)), echo_certs, "echo-3").await;
        // The waypoint's pod and ratings' pod: a counting relay on each 15008, to a
        // destination ztunnel beside it.
        let waypoint = peer(SocketAddr::from(([10, 0, 0, 41], 15009)), waypoint_certs, "waypoint").await;
        let ratings = peer(SocketAddr::from(([10, 0, 0, 32], 15009)), ratings_certs, "ratings-1").await;
        let to_waypoint = counting_relay(
            SocketAddr::from(([10, 0, 0, 41], 15008)),
            SocketAddr::from(([10, 0, 0, 41], 15009)),
        )
        .await;
        let to_ratings = counting_relay(
            SocketAddr::from(([10, 0, 0, 32], 15008)),
            SocketAddr::from(([10, 0, 0, 32], 15009)),
        )
        .await;
        let to_details = counting_listener(SocketAddr::from(([10, 0, 0, 33], 15008))).await;

        let strait = launch_strait_gateway(
            &spoke,
            POD,
            &format!(
                "    waypoint: {{}}\n  certificates: {{dir: {}}}\n",
                gateway_certs.display()
            ),
            Path::new(strait_bin()),
            &[],
        );
        spoke.ns.run(|| strait.wait_ready(Duration::from_secs(30)));
        // Served once the waypoint stream brought the waypoint's own name.
        let ratings_80 = format!("{RATINGS}:80");
        let waypoint_15008 = format!("{WAYPOINT}:15008");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dump = config_dump(&strait);
            let hosts: Vec<Value> = dump["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|l| l["servers"].as_array().unwrap())
                .filter(|s| s["mode"] == "HBONE")
                .flat_map(|s| s["hosts"].as_array().unwrap().clone())
                .collect();
            if hosts.contains(&json!(WAYPOINT)) && hosts.contains(&json!(ECHO)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{WAYPOINT} not served: {dump:#}\n{}",
                strait.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Istio's source ztunnel: no x-istio-source, so ratings' tunnels go to the
        // waypoint, by name and by VIP; echo's to its pods.
        let gateway_hbone = SocketAddr::from((spoke.ip, 15008));
        let via_ratings = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_ratings_vip = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let via_echo = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut source = HboneSource::new(gateway_hbone, &source_certs);
        source.gateway_id = Some(GATEWAY_SPIFFE.into());
        source.maps = vec![
            (via_ratings, ratings_80.clone()),
            (via_ratings_vip, "10.96.0.12:80".into()),
            (via_echo, format!("{ECHO}:80")),
        ];
        let source = source.start(None).await.expect("hbone-peer");
        // Every case runs; the mismatches are reported together.
        let mut wrong: Vec<String> = Vec::new();
        let round_trip = |via: SocketAddr, what: &'static str| async move {
            tunnel_round_trip(via, what.as_bytes(), Duration::from_secs(10))
                .await
                .map(|b| String::from_utf8_lossy(&b).to_string())
        };
        for (via, what, want) in [
            (via_ratings, "by name\n", "[waypoint] by name\n"),
            (via_ratings_vip, "by vip\n", "[waypoint] by vip\n"),
        ] {
            let got = round_trip(via, what).await;
            if got.as_deref() != Some(want) {
                wrong.push(format!("Istio's dialer {what:?}: {got:?}, want {want:?}"));
            }
        }
        let echoed = round_trip(via_echo, "echo\n").await;
        assert!(
            echoed.as_deref() == Some("[echo-1] echo\n") || echoed.as_deref() == Some("[echo-3] echo\n"),
            "{echoed:?}"
        );
        if wrong.is_empty() {
            let streams = waypoint.wait_streams(2, Duration::from_secs(10)).await;
            let mut seen: Vec<(String, String)> = streams
                .iter()
                .map(|s| (s.authority.clone(), s.peer.clone()))
                .collect();
            seen.sort();
            assert_eq!(
                seen,
                [
                    ("10.96.0.12:80".to_string(), SOURCE_ID.to_string()),
                    (ratings_80.clone(), SOURCE_ID.to_string()),
                ],
                "the waypoint sees the source's authority and identity: the inner TLS is end to end"
            );
        }
        let dialled = (
            to_waypoint.load(Ordering::SeqCst),
            to_ratings.load(Ordering::SeqCst),
        );
        if dialled != (2, 0) {
            wrong.push(format!(
                "Istio's dialer: (waypoint, ratings-1) dialled {dialled:?}, want (2, 0)"
            ));
        }
        assert!(ratings.streams().is_empty());
        let echo_streams = echo_1.streams().len() + echo_3.streams().len();
        assert!(echo_streams <= 1, "one tunnel to echo");

        // The Rust client behaves as Istio's dialer on the plain case, then sends
        // x-istio-source: each CONNECT is answered 200 once the pod it went to accepted.
        let counts = || {
            (
                to_waypoint.load(Ordering::SeqCst),
                to_ratings.load(Ordering::SeqCst),
            )
        };
        let mut want = counts();
        let cases: [(&str, Option<&str>, bool); 7] = [
            (ratings_80.as_str(), None, true),
            (ratings_80.as_str(), Some("waypoint"), false),
            (ratings_80.as_str(), Some("gateway"), false),
            (ratings_80.as_str(), Some("sidecar"), true),
            (ratings_80.as_str(), Some("Waypoint"), true),
            ("10.96.0.12:80", Some("waypoint"), false),
            ("10.96.0.12:80", None, true),
        ];
        for (authority, source_value, to_the_waypoint) in cases {
            let headers: Vec<(&str, &str)> = source_value
                .map(|v| vec![("x-istio-source", v)])
                .unwrap_or_default();
            let status = connect_with(gateway_hbone, &source_certs, authority, &headers).await;
            if status != Ok(200) {
                wrong.push(format!(
                    "{authority} x-istio-source {source_value:?}: {status:?}, want 200"
                ));
                continue;
            }
            if to_the_waypoint {
                want.0 += 1;
            } else {
                want.1 += 1;
            }
            // The relay counts from its own task: awaited.
            let deadline = Instant::now() + Duration::from_secs(10);
            while counts() != want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if counts() != want {
                wrong.push(format!(
                    "{authority} x-istio-source {source_value:?}: (waypoint, ratings-1) dialled {:?}, want {want:?}",
                    counts()
                ));
                want = counts();
            }
        }
        assert!(
            wrong.is_empty(),
            "{wrong:#?}\n{}\n{}",
            source.lines().join("\n"),
            strait.stderr_text()
        );
        // details sets istio.io/ingress-use-waypoint: an ingress gateway's tunnel goes to
        // the waypoint, a waypoint's to details' pod.
        let before = (to_waypoint.load(Ordering::SeqCst), to_details.load(Ordering::SeqCst));
        let details_80 = format!("{DETAILS}:80");
        for (value, want) in [
            ("gateway", (before.0 + 1, before.1)),
            ("waypoint", (before.0 + 1, before.1 + 1)),
        ] {
            let status = connect_with(
                gateway_hbone,
                &source_certs,
                &details_80,
                &[("x-istio-source", value)],
            )
            .await;
            let now = || (to_waypoint.load(Ordering::SeqCst), to_details.load(Ordering::SeqCst));
            let deadline = Instant::now() + Duration::from_secs(10);
            while now() != want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                (status, now()),
                (Ok(200), want),
                "{details_80} x-istio-source {value}: (waypoint, details-1) dials"
            );
        }

        // A Service without a waypoint ignores the header.
        let status = connect_with(
            gateway_hbone,
            &source_certs,
            &format!("{ECHO}:80"),
            &[("x-istio-source", "waypoint")],
        )
        .await;
        assert_eq!(status, Ok(200));

        // The dispatch, as config_dump shows it, once istiod sent it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let hbone_server = loop {
            let dump = config_dump(&strait);
            let server = dump["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|l| l["servers"].as_array().unwrap())
                .find(|s| s["mode"] == "HBONE" && s["bySource"][&ratings_80].is_object())
                .cloned();
            if let Some(s) = server {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "no dispatch for {ratings_80}: {dump:#}\n{}",
                strait.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let want = json!({
            "header": "x-istio-source",
            "filterState": "io.istio.source",
            "exact": {"gateway": ratings_80, "waypoint": ratings_80},
            "prefix": {},
            "onNoMatch": waypoint_15008,
        });
        assert_eq!(hbone_server["bySource"][&ratings_80], want, "{hbone_server:#}");
        let vip = hbone_server["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["range"] == "10.96.0.12/32" && v["port"] == 80)
            .unwrap_or_else(|| panic!("{hbone_server:#}"));
        assert_eq!(vip["bySource"], want);
        for (stream, d) in [("router", "discovery"), ("waypoint", "waypointDiscovery")] {
            let dump = config_dump(&strait);
            for (t, s) in dump[d]["types"].as_object().unwrap() {
                assert_eq!(s["nacks"], 0, "{stream} {t}: {:#}", dump[d]);
            }
        }

        // strait route explains the dispatch, with a source and without.
        let route = |source: Option<&str>| {
            let admin = strait.admin.to_string();
            let mut args = vec!["route", "--admin", admin.as_str(), ratings_80.as_str()];
            if let Some(s) = source {
                args.extend(["--source", s]);
            }
            let out = std::process::Command::new(strait_bin())
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let text = route(Some("waypoint"));
        assert!(
            text.contains(&format!(
                "dispatch   on x-istio-source (filter state io.istio.source): \"waypoint\" takes exact \"waypoint\" -> {ratings_80}"
            )) && text.contains(&format!("service    {ratings_80} ")),
            "{text}"
        );
        let text = route(None);
        assert!(
            text.contains(&format!(
                "dispatch   on x-istio-source (filter state io.istio.source): absent takes on_no_match -> {waypoint_15008}"
            )) && text.contains(&format!("service    {waypoint_15008} ")),
            "{text}"
        );
    });
}
