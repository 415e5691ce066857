//! The bridge across real networks: two Linux network namespaces joined by a veth pair
//! (10.213.N.1/30 ↔ 10.213.N.2/30). network1 holds the app and the bridge; network2
//! holds the east-west gateway and the workload, reachable only through the gateway's
//! address on the veth. 32 MiB each way, in both far-end modes.
//!
//! Needs root (CAP_SYS_ADMIN) and iproute2; where namespaces cannot be created the
//! tests say so loudly and pass, and `tests/bridge.rs` covers the same path on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const MIB: u64 = 1024 * 1024;
const SNI: &str = "outbound_.9080_.v1_.reviews.default.svc.cluster.local";

fn str_of<'a>(line: &'a serde_json::Value, key: &str) -> &'a str {
    line[key].as_str().unwrap_or("")
}

/// Two namespaces joined by a veth pair, or `None` (after a loud message) when this
/// environment cannot create them.
fn two_networks(subnet: u8) -> Option<(NetNs, NetNs)> {
    let made = NetNs::create("n1").and_then(|n1| {
        let n2 = NetNs::create("n2")?;
        NetNs::link(
            &n1,
            &format!("10.213.{subnet}.1/30"),
            &n2,
            &format!("10.213.{subnet}.2/30"),
        )?;
        Ok((n1, n2))
    });
    match made {
        Ok(pair) => Some(pair),
        Err(e) => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: cannot create network namespaces ({e}).\n\
                 !!! Run as root with iproute2 installed (.ci/run does) to test the bridge\n\
                 !!! across real networks; tests/bridge.rs covers it on loopback.\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            None
        }
    }
}

async fn across_namespaces(far: FarEnd, subnet: u8) {
    let Some((net1, net2)) = two_networks(subnet) else {
        return;
    };
    let mesh = Mesh::new();

    // network2: the workload on its loopback, the gateway on the veth address.
    let wl = net2.listen("127.0.0.1:0");
    let (plain, meshed) = match far {
        FarEnd::IstioMutual => (Some(raw_echo_on(wl)), None),
        FarEnd::AutoPassthrough => (
            None,
            Some(MeshedEcho::start_on(wl, &mesh.workload, "cluster.local")),
        ),
    };
    let workload = plain
        .as_ref()
        .map(|e| e.addr)
        .or(meshed.as_ref().map(|e| e.addr))
        .unwrap();
    let gw_ports = Ports::new();
    let gw_ip = format!("10.213.{subnet}.2");
    let gateway = Strait::start_in(
        &net2,
        gw_ports,
        &network2_gateway(&gw_ports, &gw_ip, &mesh.gateway, far, workload),
    );
    let gw_addr: SocketAddr = format!("{gw_ip}:{}", gw_ports.gateway).parse().unwrap();

    // network1: the bridge on its loopback, for a local app.
    let br_ports = Ports::new();
    let listen: SocketAddr = format!("127.0.0.1:{}", br_ports.gateway).parse().unwrap();
    let expected = match far {
        FarEnd::IstioMutual => GATEWAY_ID,
        FarEnd::AutoPassthrough => WORKLOAD_ID,
    };
    let bridge = Strait::start_in(
        &net1,
        br_ports,
        &network1_bridge(&br_ports, listen, &mesh.bridge, gw_addr, expected, &[], ""),
    );

    // The workload is not reachable from network1 except through the gateway.
    assert!(
        net1.connect(workload).is_err(),
        "network2's loopback must not be reachable from network1"
    );

    let app = net1.connect(listen).unwrap();
    let moved = bulk_echo(app, 11, 32 * MIB).await;
    assert_eq!(
        moved,
        Ok(32 * MIB),
        "bridge stderr:\n{}\ngateway stderr:\n{}",
        bridge.stderr_text(),
        gateway.stderr_text()
    );

    let b = bridge
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "listener") == listen.to_string()
        })
        .expect("bridge access log line");
    assert_eq!(str_of(&b, "response_flag"), "-", "{b}");
    assert_eq!(str_of(&b, "upstream"), gw_addr.to_string());
    assert_eq!(str_of(&b, "upstream_network"), "network2");
    assert_eq!(str_of(&b, "peer_identity"), expected);
    assert_eq!(b["bytes_received"], 32 * MIB);
    assert_eq!(b["bytes_sent"], 32 * MIB);
    let g = gateway
        .wait_log(Duration::from_secs(5), |l| str_of(l, "sni") == SNI)
        .expect("gateway access log line");
    assert_eq!(str_of(&g, "response_flag"), "-", "{g}");
    // The gateway saw the bridge arrive over the veth from network1's address.
    assert!(
        str_of(&g, "downstream").starts_with(&format!("10.213.{subnet}.1:")),
        "{g}"
    );
    match far {
        FarEnd::IstioMutual => {
            assert_eq!(str_of(&g, "peer_identity"), BRIDGE_ID);
            let sent = net2.run(|| {
                gateway.metric(
                    "istio_tcp_sent_bytes_total",
                    &[
                        ("destination_service", REVIEWS),
                        ("source_principal", BRIDGE_ID),
                    ],
                )
            });
            assert_eq!(sent, (32 * MIB) as f64);
        }
        FarEnd::AutoPassthrough => {
            let m = meshed.as_ref().unwrap();
            assert_eq!(*m.peers.lock().unwrap(), vec![BRIDGE_ID.to_string()]);
        }
    }
    let received = net1.run(|| {
        bridge.metric(
            "istio_tcp_received_bytes_total",
            &[
                ("destination_service", REVIEWS),
                ("destination_principal", expected),
            ],
        )
    });
    assert_eq!(received, (32 * MIB) as f64);
    // Processes end before their namespaces are deleted.
    drop((bridge, gateway));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_across_namespaces_to_an_istio_mutual_gateway() {
    across_namespaces(FarEnd::IstioMutual, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_across_namespaces_through_an_auto_passthrough_gateway() {
    across_namespaces(FarEnd::AutoPassthrough, 2).await;
}
