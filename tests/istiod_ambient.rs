//! What the real istiod sends an ambient east-west gateway (ambient multi-network,
//! AMBIENT.md §5), recorded with an ADS client (`interop/xdsdump`) connected as the
//! gateway's node: the facts a translation of it into strait's 15008 configuration
//! relies on (docs/ambient-xds.md describes them).
//!
//! istiod runs with ambient and ambient multi-network on, its Services, Pods and
//! EndpointSlices in the in-memory Kubernetes client, and Istio's
//! `expose-services.yaml` (the classic 15443 Gateway) beside them. Skipped, loudly,
//! where the harness or xdsdump is missing, except under CI.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::istiod::{
    EXPOSE_SERVICES, GLOBAL_SERVICE_SCOPE, Istiod, IstiodOptions, Lab, XdsDump, ambient_env,
    gateway_node_metadata, harness_bin, xdsdump_bin,
};
use serde_json::{Value, json};

const ECHO: &str = "echo.echo.svc.cluster.local";
const LOCAL: &str = "local.echo.svc.cluster.local";

/// Namespaces (istio-system in network1), a global Service `echo` (two ports whose
/// target ports differ from the service ports) with three ready pods of network1 — one
/// captured by ambient (`ambient.istio.io/redirection: enabled`), one labelled
/// `networking.istio.io/tunnel: http`, one with neither — a captured pod of network2 and
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
  labels: {app: echo}
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
    let istiod = Istiod::start_with(
        IstiodOptions {
            kubernetes: true,
            env: ambient_env(),
            mesh: Some(GLOBAL_SERVICE_SCOPE.into()),
            debounce: Some("20ms".into()),
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
