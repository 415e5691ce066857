//! PASSTHROUGH servers with VirtualService `tls` routes, as Istio's
//! `samples/multicluster/expose-istiod.yaml` exposes istiod through the east-west gateway:
//! any TLS name routed by `sniHosts`, the ClientHello replayed, TLS end to end with the
//! destination.

mod common;

use common::*;

const ISTIOD: &str = "istiod.istio-system.svc.cluster.local";
const XDS_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istiod";
const WEBHOOK_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istiod-webhook";

/// Istio's expose-istiod Gateway and VirtualService on two loopback ports, the webhook
/// route narrowed to istiod's own name, and the ServiceEntry Kubernetes would declare
/// for istiod (15012, and 443 in front of the webhook port).
fn config(ports: &Ports, webhook_port: u16, xds: u16, webhook: u16) -> String {
    format!(
        r#"{bootstrap}---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: istiod-gateway, namespace: istio-system}}
spec:
  selector: {{istio: eastwestgateway}}
  servers:
  - port: {{name: tls-istiod, number: {xds_port}, protocol: tls}}
    bind: 127.0.0.1
    tls: {{mode: PASSTHROUGH}}
    hosts: ["*"]
  - port: {{name: tls-istiodwebhook, number: {webhook_port}, protocol: tls}}
    bind: 127.0.0.1
    tls: {{mode: PASSTHROUGH}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: istiod-vs, namespace: istio-system}}
spec:
  hosts: ["*"]
  gateways: [istiod-gateway]
  tls:
  - match:
    - port: {xds_port}
      sniHosts: ["*"]
    route:
    - destination:
        host: {ISTIOD}
        port: {{number: 15012}}
  - match:
    - port: {webhook_port}
      sniHosts: [istiod.istio-system.svc, "*.istiod.test"]
    route:
    - destination:
        host: {ISTIOD}
        port: {{number: 443}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: istiod, namespace: istio-system}}
spec:
  hosts: [{ISTIOD}]
  resolution: STATIC
  ports:
  - {{number: 15012, name: tls-xds, targetPort: {xds}}}
  - {{number: 443, name: https-webhook, targetPort: {webhook}}}
  endpoints:
  - address: 127.0.0.1
    labels: {{security.istio.io/tlsMode: disabled}}
"#,
        bootstrap = ports.bootstrap(""),
        xds_port = ports.gateway,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_servers_route_any_tls_name_by_sni_hosts_and_refuse_the_rest() {
    let ca = TestCa::new();
    // TLS servers standing in for istiod's gRPC port and its webhook port, each with a
    // certificate of its own that the client verifies end to end.
    let xds = Workload::start(&ca, XDS_ID).await;
    let webhook = Workload::start(&ca, WEBHOOK_ID).await;
    let ports = Ports::new();
    let webhook_port = free_port();
    let gw = Strait::start(
        ports,
        &config(&ports, webhook_port, xds.addr.port(), webhook.addr.port()),
    );
    let xds_gw = gw.gateway;
    let webhook_gw = std::net::SocketAddr::from(([127, 0, 0, 1], webhook_port));

    // 15012 takes any name, with any ALPN (gRPC's h2, none at all): `sniHosts: ["*"]`.
    for (sni, alpn) in [
        ("istiod.istio-system.svc", &["h2"][..]),
        ("istiod-remote.example.com", &[][..]),
    ] {
        let (mut tls, seen) = tls_connect(xds_gw, &ca, sni, alpn)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}; stderr:\n{}", gw.stderr_text()));
        assert_eq!(seen, XDS_ID, "{sni}");
        assert_eq!(echo_once(&mut tls, b"discovery\n").await, b"discovery\n");
    }
    // The webhook port has its own destination, and only the names its route lists.
    for sni in ["istiod.istio-system.svc", "a.istiod.test"] {
        let (mut tls, seen) = tls_connect(webhook_gw, &ca, sni, &["h2"])
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(seen, WEBHOOK_ID, "{sni}");
        assert_eq!(echo_once(&mut tls, b"admission\n").await, b"admission\n");
    }
    let before = webhook.accepted();
    let refused = tls_connect(webhook_gw, &ca, "other.example.com", &["h2"]).await;
    let err = refused.expect_err("a name no sniHosts lists must be refused");
    assert!(
        err.to_string().to_lowercase().contains("unrecognisedname"),
        "expected an unrecognized_name alert, got: {err}"
    );
    assert_eq!(
        webhook.accepted(),
        before,
        "the refused name reached the webhook"
    );

    // Metrics and the access log name the VirtualService and the destination chosen.
    assert!(
        gw.eventually(std::time::Duration::from_secs(5), || {
            gw.metric(
                "strait_route_destination_total",
                &[
                    ("virtual_service", "istio-system/istiod-vs"),
                    ("destination_service", ISTIOD),
                    ("destination_port", "15012"),
                ],
            ) == 2.0
                && gw.metric(
                    "strait_route_destination_total",
                    &[
                        ("virtual_service", "istio-system/istiod-vs"),
                        ("destination_port", "443"),
                    ],
                ) == 2.0
                && gw.metric(
                    "strait_refusals_total",
                    &[("response_flag", "NR"), ("reason", "no_tls_route")],
                ) == 1.0
        }),
        "{}",
        gw.metrics_text()
    );
    assert!(gw.eventually(std::time::Duration::from_secs(5), || {
        gw.access_log().iter().any(|l| {
            l["sni"] == "a.istiod.test"
                && l["virtual_service"] == "istio-system/istiod-vs"
                && l["service"] == ISTIOD
                && l["upstream"] == webhook.addr.to_string()
        })
    }));

    // `strait route` explains a name against the same files.
    let out = std::process::Command::new(strait_bin())
        .args(["route", "-c"])
        .arg(gw.config_path())
        .arg("istiod.istio-system.svc")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("route      VirtualService istio-system/istiod-vs tls route sniHosts [*]"),
        "{text}"
    );
    assert!(
        text.contains(&format!("  -> {ISTIOD}:443 weight 100")),
        "{text}"
    );
}
