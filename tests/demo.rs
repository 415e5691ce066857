//! `strait demo` as a newcomer meets it: start it, paste the commands its banner prints,
//! see the workload answer through the gateway, the workload's SPIFFE certificate, the
//! connections counted in metrics, `strait route` explaining a name, then Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, http_get, metric_value, strait_bin};

/// The last line of the banner.
const BANNER_END: &str = "Ctrl-C drains and exits.";

struct Demo {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(r: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

impl Demo {
    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for the whole banner and returns it.
    fn banner(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            {
                let out = self.stdout.lock().unwrap();
                if let Some(end) = out.iter().position(|l| l.contains(BANNER_END)) {
                    return out[..=end].to_vec();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no demo banner within {within:?}; stderr:\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tool_present(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs one pasted command line with `sh -c`, killing its whole process group after `within`.
fn sh(cmd: &str, within: Duration) -> Output {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let out = child.wait_with_output().unwrap();
            panic!(
                "`{cmd}` did not finish within {within:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one banner line starting with `prefix` and containing `part`.
fn command<'a>(banner: &'a [String], prefix: &str, part: &str) -> &'a str {
    let found: Vec<&String> = banner
        .iter()
        .filter(|l| l.starts_with(prefix) && l.contains(part))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one command starting with {prefix:?} containing {part:?} in the banner:\n{}",
        banner.join("\n")
    );
    found[0]
}

#[test]
fn the_commands_the_demo_prints_work_as_printed() {
    let (gw, status, metrics, admin) = (free_port(), free_port(), free_port(), free_port());
    let mut child = Command::new(strait_bin())
        .args(["demo", "--port", &gw.to_string()])
        .args(["--status-port", &status.to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .args(["--admin-port", &admin.to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    pump(child.stdout.take().unwrap(), stdout.clone());
    pump(child.stderr.take().unwrap(), stderr.clone());
    let mut demo = Demo {
        child,
        stdout,
        stderr,
    };
    let banner = demo.banner(Duration::from_secs(20));
    let ready = http_get(SocketAddr::from(([127, 0, 0, 1], status)), "/healthz/ready");
    assert_eq!(ready.unwrap().0, 200, "banner printed before readiness");

    // The CA the commands trust lives in the demo's scratch directory, removed at exit.
    let echo = command(&banner, "(echo hello through strait", "openssl s_client");
    let ca_file = echo
        .split_whitespace()
        .skip_while(|w| *w != "-CAfile")
        .nth(1)
        .expect("-CAfile in the first command");
    let scratch = PathBuf::from(ca_file)
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf();
    assert!(PathBuf::from(ca_file).is_file(), "{ca_file} does not exist");

    assert!(
        tool_present("openssl"),
        "openssl is not installed; .ci/run installs it (apt-get install openssl)"
    );
    {
        // TLS end to end: the reviews-v2 workload answers, through the gateway.
        let out = sh(echo, Duration::from_secs(15));
        assert!(
            text(&out.stdout).contains("[reviews-v2] hello through strait"),
            "`{echo}` printed:\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(out.status.success(), "`{echo}`: {}", text(&out.stderr));

        // The certificate seen through the gateway is the ratings workload's SVID.
        let cert = command(&banner, "openssl s_client", "x509");
        let out = sh(cert, Duration::from_secs(15));
        assert!(
            text(&out.stdout).contains("URI:spiffe://cluster.local/ns/default/sa/ratings"),
            "`{cert}` printed:\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    // Metrics, with the command as printed when curl is there.
    let curl = command(&banner, "curl -s 127.0.0.1:", "/stats/prometheus");
    let counted = if tool_present("curl") {
        let out = sh(curl, Duration::from_secs(10));
        text(&out.stdout)
    } else {
        eprintln!(
            "NOTE: curl is not installed; fetching the metrics URL of `{curl}` with the test's own HTTP client and applying its grep"
        );
        let (code, body) = http_get(
            SocketAddr::from(([127, 0, 0, 1], metrics)),
            "/stats/prometheus",
        )
        .unwrap();
        assert_eq!(code, 200);
        body.lines()
            .filter(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    || l.starts_with("strait_refusals_total")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let opened = |service: &str, version: &str| {
        metric_value(
            &counted,
            "istio_tcp_connections_opened_total",
            &[
                ("destination_service", service),
                ("destination_version", version),
            ],
        )
    };
    assert_eq!(
        opened("reviews.default.svc.cluster.local", "v2"),
        1.0,
        "{counted}"
    );
    assert_eq!(
        metric_value(
            &counted,
            "istio_tcp_connections_opened_total",
            &[("destination_service", "ratings.default.svc.cluster.local")]
        ),
        1.0,
        "{counted}"
    );

    // `strait route`, as printed: the v2 subset routes, v3 does not.
    let routes: Vec<&String> = banner.iter().filter(|l| l.contains(" route -c ")).collect();
    assert_eq!(routes.len(), 2, "{}", banner.join("\n"));
    let v2 = sh(routes[0], Duration::from_secs(10));
    assert!(routes[0].ends_with("outbound_.9080_.v2_.reviews.default.svc.cluster.local"));
    assert_eq!(v2.status.code(), Some(0), "{}", text(&v2.stdout));
    assert!(text(&v2.stdout).contains("reviews.default.svc.cluster.local"));
    let v3 = sh(routes[1], Duration::from_secs(10));
    assert!(routes[1].ends_with("outbound_.9080_.v3_.reviews.default.svc.cluster.local"));
    assert_eq!(v3.status.code(), Some(1), "{}", text(&v3.stdout));
    assert!(
        text(&v3.stdout).contains("does not route"),
        "{}",
        text(&v3.stdout)
    );

    // The admin command names the endpoint state it promises.
    let clusters = command(&banner, "curl -s 127.0.0.1:", "/clusters");
    assert!(
        clusters.ends_with(&format!("127.0.0.1:{admin}/clusters")),
        "{clusters}"
    );
    let body = if tool_present("curl") {
        text(&sh(clusters, Duration::from_secs(10)).stdout)
    } else {
        http_get(SocketAddr::from(([127, 0, 0, 1], admin)), "/clusters")
            .unwrap()
            .1
    };
    assert!(body.contains("reviews.default.svc.cluster.local"), "{body}");

    // The access log has the echo connection, after the banner.
    let log: Vec<serde_json::Value> = demo
        .stdout
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        log.iter()
            .any(|e| e["subset"] == "v2" && e["response_flag"] == "-"),
        "{log:?}"
    );

    // Ctrl-C drains (drainDuration 5s) and exits 0, cleaning up after itself.
    unsafe {
        libc::kill(demo.child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = demo.child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "demo still running 10 s after SIGINT; stderr:\n{}",
            demo.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "stderr:\n{}", demo.stderr_text());
    assert!(!scratch.exists(), "{} left behind", scratch.display());
}
