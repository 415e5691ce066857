//! One AuthorizationPolicy, two ways in: the same YAML given to a strait gateway in its
//! files and, through the real istiod (the Go harness in `interop/`), to a strait gateway
//! fed over xDS. For each policy of a table, every peer of a matrix (identities from the
//! mesh trust domain and from an alias, two namespaces and service accounts, two source
//! addresses, two ISTIO_MUTUAL ports, and a PASSTHROUGH port where no identity is seen)
//! must get the same decision from both: echoed, or refused with the reason a user reads
//! in the metrics. Both gateways must also show the same RBAC in `config_dump`: the files compile
//! to what istiod sends.
//!
//! The lab is the one of the istiod tests (`common::istiod`): istiod, the workload and the
//! clients in a hub network namespace, each gateway in a spoke of its own. Skipped, loudly,
//! where the harness is missing, except under CI.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::istiod::{
    GATEWAY_LABELS, GATEWAY_SPIFFE, Istiod, IstiodOptions, Lab, harness_bin, strait_gateway,
};
use common::{Ports, Strait};

const WAIT: Duration = Duration::from_secs(30);
const STRAIT_POD: &str = "strait-policy-0";

/// Two ISTIO_MUTUAL servers, 15443 and 15444, whose `tcp` route sends every connection to
/// the sidecar-less workload `echo` (10.0.0.51:7070), and a PASSTHROUGH server, 15445,
/// whose `tls` route sends SNI `echo.example` there.
const MUTUAL_ECHO: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mutual-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15443, name: tls-a, protocol: TLS}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*\"]
  - port: {number: 15444, name: tls-b, protocol: TLS}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*\"]
  - port: {number: 15445, name: tls-passthrough, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [\"*\"]
  gateways: [istio-system/mutual-gateway]
  tcp:
  - route:
    - destination: {host: echo.default.svc.cluster.local, port: {number: 7070}}
  tls:
  - match: [{port: 15445, sniHosts: [echo.example]}]
    route:
    - destination: {host: echo.default.svc.cluster.local, port: {number: 7070}}
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
kind: WorkloadEntry
metadata: {name: echo, namespace: default}
spec:
  address: 10.0.0.51
  network: network1
  labels: {app: echo}
  ports: {tcp-echo: 7070}
";

/// What a peer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Admitted: the workload answers.
    Echo,
    /// Refused by a DENY policy (`reason="denied_by_policy"`).
    Denied,
    /// Refused for want of a matching ALLOW policy (`reason="not_allowed_by_policy"`).
    NotAllowed,
}

use Want::{Denied as D, Echo as E, NotAllowed as N};

/// The peers: SPIFFE ID and source address.
const PEERS: [(&str, Ipv4Addr); 4] = [
    (
        "spiffe://cluster.local/ns/foo/sa/sleep",
        Ipv4Addr::new(10, 0, 0, 61),
    ),
    // The same identity from the alias trust domain.
    (
        "spiffe://old.local/ns/foo/sa/sleep",
        Ipv4Addr::new(10, 0, 0, 61),
    ),
    (
        "spiffe://cluster.local/ns/bar/sa/curl",
        Ipv4Addr::new(10, 0, 0, 62),
    ),
    (
        "spiffe://cluster.local/ns/foo/sa/curl",
        Ipv4Addr::new(10, 0, 0, 62),
    ),
];

const PORTS: [u16; 2] = [15443, 15444];

/// The PASSTHROUGH server, where no TLS is terminated: a client has no identity there,
/// only its address.
const PASSTHROUGH: u16 = 15445;
const SOURCES: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 61), Ipv4Addr::new(10, 0, 0, 62)];

/// A row: what it shows, its policies (YAML documents, names starting `c<row>-`), per
/// peer of [`PEERS`] what it gets on each of [`PORTS`], and per source of [`SOURCES`]
/// what it gets on [`PASSTHROUGH`].
struct Case {
    what: &'static str,
    policies: &'static str,
    want: [[Want; 2]; 4],
    passthrough: [Want; 2],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            what: "no policy: everyone",
            policies: "",
            want: [[E, E], [E, E], [E, E], [E, E]],
            passthrough: [E, E],
        },
        Case {
            what: "ALLOW one principal, which also matches from the alias trust domain",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c1-allow, namespace: istio-system}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
",
            want: [[E, E], [E, E], [N, N], [N, N]],
            passthrough: [N, N],
        },
        Case {
            what: "ALLOW written with the alias; DENY a namespace on one port, judged first",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c2-allow, namespace: istio-system}
spec:
  rules:
  - from: [{source: {principals: [old.local/ns/foo/sa/sleep]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c2-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [bar]}}]
    to: [{operation: {ports: [\"15444\"]}}]
",
            want: [[E, E], [E, E], [N, D], [N, N]],
            passthrough: [N, N],
        },
        Case {
            what: "ALLOW a namespace but notPrincipals, on one port",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c3-allow, namespace: istio-system}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [foo], notPrincipals: [\"*/sa/curl\"]}}]
    to: [{operation: {ports: [\"15443\"]}}]
",
            want: [[E, N], [E, N], [N, N], [N, N]],
            passthrough: [N, N],
        },
        Case {
            what: "ALLOW a principal with a wildcard: istiod does not expand it to the alias",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c4-allow, namespace: istio-system}
spec:
  rules:
  - from: [{source: {principals: [\"cluster.local/ns/foo/*\"]}}]
",
            want: [[E, E], [N, N], [N, N], [E, E]],
            passthrough: [N, N],
        },
        Case {
            what: "ALLOW a source address",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c5-allow, namespace: istio-system}
spec:
  rules:
  - from: [{source: {ipBlocks: [10.0.0.61/32]}}]
",
            want: [[E, E], [E, E], [N, N], [N, N]],
            passthrough: [E, N],
        },
        Case {
            what: "DENY a remote address on one port",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c6-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: [10.0.0.62]}}]
    to: [{operation: {ports: [\"15444\"]}}]
",
            want: [[E, E], [E, E], [E, D], [E, D]],
            passthrough: [E, E],
        },
        Case {
            what: "an ALLOW policy without rules: no one",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c7-allow, namespace: istio-system}
spec: {}
",
            want: [[N, N], [N, N], [N, N], [N, N]],
            passthrough: [N, N],
        },
        Case {
            what: "ALLOW a service account, in either trust domain, except on one port",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c8-allow, namespace: istio-system}
spec:
  rules:
  - from: [{source: {serviceAccounts: [foo/sleep]}}]
    to: [{operation: {notPorts: [\"15444\"]}}]
",
            want: [[E, N], [E, N], [N, N], [N, N]],
            passthrough: [N, N],
        },
        Case {
            what: "ALLOW when the peer's namespace is foo and the port is not 15444",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c9-allow, namespace: istio-system}
spec:
  rules:
  - when:
    - {key: source.namespace, values: [foo]}
    - {key: destination.port, notValues: [\"15444\"]}
",
            want: [[E, N], [E, N], [N, N], [E, N]],
            passthrough: [N, N],
        },
        Case {
            what: "DENY when the server name is under example",
            policies: "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: c10-deny, namespace: istio-system}
spec:
  action: DENY
  rules:
  - when: [{key: connection.sni, values: [\"*.example\"]}]
",
            want: [[E, E], [E, E], [E, E], [E, E]],
            passthrough: [D, D],
        },
    ]
}

/// A gateway under test and the refusals it has made so far, by reason.
struct Gateway {
    who: &'static str,
    strait: Strait,
    at: Ipv4Addr,
    denied: f64,
    not_allowed: f64,
}

fn config_dump(strait: &Strait) -> serde_json::Value {
    match common::http_get(strait.admin, "/config_dump") {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

/// The RBAC filters of the server on `port` in a `config_dump`, without their names
/// (istiod's `stat_prefix`, or the file policies'); `None` while there is no such server.
fn rbac_on(dump: &serde_json::Value, port: u16) -> Option<Vec<serde_json::Value>> {
    let listener = dump["listeners"].as_array()?.iter().find(|l| {
        l["address"]
            .as_str()
            .is_some_and(|a| a.ends_with(&format!(":{port}")))
    })?;
    let filters = listener["servers"][0]["rbac"].as_array()?;
    Some(
        filters
            .iter()
            .map(|f| serde_json::json!({"action": f["action"], "policies": f["policies"]}))
            .collect(),
    )
}

/// Whether every policy of `filters` belongs to row `row` (and, for a row with policies,
/// there is one).
fn in_force(filters: &[serde_json::Value], row: usize, has_policies: bool) -> bool {
    let names: Vec<&String> = filters
        .iter()
        .filter_map(|f| f["policies"].as_object())
        .flat_map(|p| p.keys())
        .collect();
    let mine = format!("-policy[c{row}-");
    names.iter().all(|n| n.contains(&mine)) && (names.is_empty() != has_policies)
}

/// A ClientHello for `echo.example` through the PASSTHROUGH server from `from`: the
/// workload's name when it answers (it answers any bytes), an error when the gateway
/// closes first.
async fn passthrough_who(gw: SocketAddr, from: Ipv4Addr) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let mut tcp = socket.connect(gw).await?;
    tcp.write_all(&common::client_hello_bytes("echo.example", &["istio"]))
        .await?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tcp);
    let read = reader.read_line(&mut line);
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(n)) if n > 0 => Ok(line.trim_end().to_string()),
        Ok(Ok(_)) => Err(std::io::Error::other("closed without an answer")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("no answer in 10 s")),
    }
}

fn peers_certs(ca: &Path, dir: &Path) -> Vec<PathBuf> {
    PEERS
        .iter()
        .enumerate()
        .map(|(i, (id, _))| common::mesh_cert(ca, id, &dir.join(format!("peer{i}"))))
        .collect()
}

#[test]
fn the_same_authorization_policy_from_files_and_from_istiod_decides_alike() {
    if harness_bin().is_none() {
        return;
    }
    let lab = Lab::new("policy");
    lab.run(|| async {
        let _echo = common::named_server_at("echo", "10.0.0.51:7070".parse().unwrap()).await;
        let istiod = Istiod::start(IstiodOptions {
            debounce: Some("20ms".into()),
            mesh: Some("trustDomainAliases: [old.local]\n".into()),
            ..Default::default()
        })
        .await;
        istiod.apply("mutual.yaml", MUTUAL_ECHO);
        let pki = common::TempDir::new("policy-pki");
        let certs = common::mesh_cert(&istiod.ca_dir(), GATEWAY_SPIFFE, &pki.path().join("gw"));
        let peers = peers_certs(&istiod.ca_dir(), pki.path());
        let shared = format!(
            "  certificates: {{dir: {}}}\n  trustDomainAliases: [old.local]\n",
            certs.display()
        );

        let xds_spoke = lab.spoke("xds");
        let files_spoke = lab.spoke("files");
        let from_istiod = strait_gateway(&xds_spoke, STRAIT_POD, &shared);
        let bootstrap = format!(
            "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: strait}}\nspec:\n  status: 0.0.0.0:15021\n  metrics: 0.0.0.0:15090\n  admin: 0.0.0.0:15000\n  clientHelloTimeout: 2s\n  network: network1\n  labels: {GATEWAY_LABELS}\n{shared}---\n{MUTUAL_ECHO}"
        );
        let ports = Ports {
            gateway: 15443,
            status: 15021,
            metrics: 15090,
            admin: 15000,
        };
        let from_files = Strait::start_in_at(
            &files_spoke.ns,
            IpAddr::V4(files_spoke.ip),
            ports,
            &bootstrap,
        );
        let mut gateways = [
            Gateway {
                who: "files",
                strait: from_files,
                at: files_spoke.ip,
                denied: 0.0,
                not_allowed: 0.0,
            },
            Gateway {
                who: "istiod",
                strait: from_istiod,
                at: xds_spoke.ip,
                denied: 0.0,
                not_allowed: 0.0,
            },
        ];
        let logs = |gws: &[Gateway]| {
            let mut text = String::new();
            for g in gws {
                text.push_str(&format!(
                    "--- strait from {}\n{}\n",
                    g.who,
                    g.strait.stderr_text()
                ));
            }
            text + "--- istiod\n" + &istiod.log()
        };

        for (row, case) in cases().iter().enumerate() {
            if !case.policies.is_empty() {
                istiod.apply("policy.yaml", case.policies);
                common::replace_file(
                    &gateways[0].strait.config_path(),
                    &format!("{bootstrap}---\n{}", case.policies),
                );
            }
            // Both have the row's policies in force, and show the same RBAC for them (istiod
            // may push a row's policies one by one: the files give them all at once).
            let deadline = Instant::now() + WAIT;
            loop {
                // Per gateway: the ISTIO_MUTUAL server's filters, then the PASSTHROUGH one's.
                let seen: Vec<[Option<Vec<serde_json::Value>>; 2]> = gateways
                    .iter()
                    .map(|g| {
                        let dump = config_dump(&g.strait);
                        [rbac_on(&dump, 15444), rbac_on(&dump, PASSTHROUGH)]
                    })
                    .collect();
                let in_force_on_both = seen.iter().flatten().all(|s| {
                    s.as_ref()
                        .is_some_and(|f| in_force(f, row, !case.policies.is_empty()))
                });
                if in_force_on_both && seen[0] == seen[1] {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "row {row} ({}): the policies are not in force, or the files compile to \
                     other RBAC than istiod's (files, then istiod): {seen:#?}\n{}",
                    case.what,
                    logs(&gateways)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            for g in &mut gateways {
                for (p, (id, from)) in PEERS.iter().enumerate() {
                    for (i, port) in PORTS.iter().enumerate() {
                        let want = case.want[p][i];
                        let gw = SocketAddr::from((g.at, *port));
                        let got = common::mtls_who_from(
                            gw,
                            &peers[p],
                            "echo.default.svc.cluster.local",
                            IpAddr::V4(*from),
                        )
                        .await;
                        assert_eq!(
                            got.as_deref().ok() == Some("echo"),
                            want == E,
                            "row {row} ({}), from {}: {id} from {from} on {port} got {got:?}, want {want:?}",
                            case.what,
                            g.who
                        );
                        match want {
                            E => {}
                            D => g.denied += 1.0,
                            N => g.not_allowed += 1.0,
                        }
                    }
                }
                for (i, from) in SOURCES.iter().enumerate() {
                    let want = case.passthrough[i];
                    let got = passthrough_who(SocketAddr::from((g.at, PASSTHROUGH)), *from).await;
                    assert_eq!(
                        got.as_deref().ok() == Some("echo"),
                        want == E,
                        "row {row} ({}), from {}: PASSTHROUGH from {from} got {got:?}, want {want:?}",
                        case.what,
                        g.who
                    );
                    match want {
                        E => {}
                        D => g.denied += 1.0,
                        N => g.not_allowed += 1.0,
                    }
                }
                // Each refusal is counted under its reason.
                let (denied, not_allowed) = (g.denied, g.not_allowed);
                let refused = |reason: &str| {
                    g.strait
                        .metric("strait_refusals_total", &[("reason", reason)])
                };
                assert!(
                    g.strait.eventually(Duration::from_secs(10), || {
                        refused("denied_by_policy") == denied
                            && refused("not_allowed_by_policy") == not_allowed
                    }),
                    "row {row} ({}), from {}: refusals {} denied, {} not allowed; want {denied}, {not_allowed}",
                    case.what,
                    g.who,
                    refused("denied_by_policy"),
                    refused("not_allowed_by_policy"),
                );
            }
        }
    });
}
