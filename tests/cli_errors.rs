//! Errors a user can cause: each prints one line naming the cause and exits non-zero, and
//! none ends in a panic or a backtrace. Argument errors are clap's: an `error:` line, perhaps
//! a short usage, a pointer to `--help`, exit 2.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, strait_bin};

/// Runs the binary with `args`, optionally as `nobody` (via `setpriv`), bounded in time.
fn strait_as(nobody: bool, args: &[&str], cwd: &Path) -> Output {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            strait_bin(),
        ]);
        c
    } else {
        Command::new(strait_bin())
    };
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        // A panic would print its backtrace; the assertions look for one.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn strait");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "strait {args:?} still running after 15 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn strait(args: &[&str], cwd: &Path) -> Output {
    strait_as(false, args, cwd)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn no_panic(out: &Output) {
    let all = text(&out.stderr) + &text(&out.stdout);
    assert!(
        !all.contains("panicked")
            && !all.contains("stack backtrace")
            && !all.contains("RUST_BACKTRACE"),
        "a panic instead of an error message:\n{all}"
    );
}

/// Asserts exit 1 and exactly one line on stderr, `strait: …`, containing every `needle`.
fn one_line_error(out: &Output, needles: &[&str]) -> String {
    no_panic(out);
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{stderr}\nstdout:\n{}",
        text(&out.stdout)
    );
    let line = lines[0];
    assert!(line.starts_with("strait: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "{line:?} does not mention {n:?}");
    }
    assert_eq!(out.status.code(), Some(1), "{line}");
    line.to_string()
}

/// Whether commands can be run as an unprivileged user; says why not when they cannot.
fn can_drop_privileges(dir: &Path) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: not root, so cannot switch to an unprivileged user to test this");
        return false;
    }
    let probe = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            strait_bin(),
            "--version",
        ])
        .current_dir(dir)
        .output();
    match probe {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED: `setpriv --reuid=65534 strait --version` failed (is the binary readable by nobody?): {}",
                text(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!(
                "SKIPPED: setpriv is not available ({e}); install util-linux to run this test"
            );
            false
        }
    }
}

/// A full configuration: Bootstrap with these status/metrics/admin ports and one
/// AUTO_PASSTHROUGH server on 127.0.0.1:`gateway`.
fn config(gateway: u16, status: u16, metrics: u16, admin: u16) -> String {
    format!(
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: t}}\nspec:\n  status: 127.0.0.1:{status}\n  metrics: 127.0.0.1:{metrics}\n  admin: 127.0.0.1:{admin}\n  accessLog: \"off\"\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g, namespace: istio-system}}\nspec:\n  servers:\n  - port: {{number: {gateway}}}\n    bind: 127.0.0.1\n    tls: {{mode: AUTO_PASSTHROUGH}}\n    hosts: [\"*.local\"]\n"
    )
}

fn free() -> u16 {
    common::free_port()
}

#[test]
fn a_bad_flag_is_clap_error_and_usage_with_exit_2() {
    let dir = TempDir::new("cli");
    for args in [
        &["--bogus"][..],
        &["run"][..],
        &["run", "-c"][..],
        &["route", "-c", "x.yaml"][..],
        &["demo", "--port", "many"][..],
        &["frobnicate"][..],
    ] {
        let out = strait(args, dir.path());
        no_panic(&out);
        let stderr = text(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains("try '--help'"), "{args:?}: {stderr}");
        assert!(
            stderr.lines().count() <= 8,
            "{args:?}: not short:\n{stderr}"
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    }
    let out = strait(&["demo", "--port", "many"], dir.path());
    assert!(text(&out.stderr).contains("invalid value 'many' for '--port <PORT>'"));
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = TempDir::new("cli");
    for cmd in ["run", "check", "route"] {
        let mut args = vec![cmd, "-c", "missing.yaml"];
        if cmd == "route" {
            args.push("outbound_.9080_._.reviews.default.svc.cluster.local");
        }
        let out = strait(&args, dir.path());
        one_line_error(
            &out,
            &["cannot read missing.yaml", "No such file or directory"],
        );
    }
}

#[test]
fn an_unreadable_config_directory_is_named() {
    let dir = TempDir::new("cli");
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::write(
        locked.join("a.yaml"),
        config(free(), free(), free(), free()),
    )
    .unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    if !can_drop_privileges(dir.path()) {
        return;
    }
    let locked = locked.display().to_string();
    for cmd in ["run", "check"] {
        let out = strait_as(true, &[cmd, "-c", &locked], dir.path());
        one_line_error(
            &out,
            &[&format!("cannot read {locked}"), "Permission denied"],
        );
    }
}

#[test]
fn a_yaml_syntax_error_points_at_file_line_and_column() {
    let dir = TempDir::new("cli");
    dir.write(
        "broken.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g\nspec: {}\n",
    );
    let out = strait(&["run", "-c", "broken.yaml"], dir.path());
    let line = one_line_error(&out, &["broken.yaml:", "YAML syntax error"]);
    let at = line.split("broken.yaml:").nth(1).unwrap();
    let mut parts = at.splitn(3, ':');
    let (l, c) = (parts.next().unwrap(), parts.next().unwrap());
    assert!(
        l.parse::<u32>().unwrap() >= 3 && c.parse::<u32>().is_ok(),
        "not FILE:LINE:COL: {line}"
    );

    let out = strait(&["check", "-c", "broken.yaml"], dir.path());
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("broken.yaml:") && l.contains(": error: YAML syntax error")),
        "{stdout}"
    );
    assert_eq!(
        text(&out.stderr).trim(),
        "configuration invalid: 1 error(s)"
    );
}

#[test]
fn an_invalid_configuration_fails_check_with_exit_1_and_run_with_one_line() {
    let dir = TempDir::new("cli");
    dir.write(
        "invalid.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  servers:\n  - port: {number: 70000}\n    tls: {mode: AUTO_PASSTHROUGH}\n    hosts: [\"*.local\"]\n",
    );
    let out = strait(&["check", "-c", "invalid.yaml"], dir.path());
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout).trim(),
        "invalid.yaml:6:20: error: spec.servers[0].port.number: port 70000 is out of range (1 to 65535)"
    );
    assert_eq!(
        text(&out.stderr).trim(),
        "configuration invalid: 1 error(s)"
    );

    let out = strait(&["run", "-c", "invalid.yaml"], dir.path());
    one_line_error(
        &out,
        &["invalid.yaml:6:20: error: spec.servers[0].port.number: port 70000 is out of range"],
    );
}

#[test]
fn a_gateway_port_in_use_is_named() {
    let dir = TempDir::new("cli");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    dir.write("c.yaml", &config(port, free(), free(), free()));
    let out = strait(&["run", "-c", "c.yaml"], dir.path());
    one_line_error(
        &out,
        &[&format!("cannot listen on 127.0.0.1:{port}"), "in use"],
    );
}

#[test]
fn a_status_metrics_or_admin_port_in_use_is_named() {
    let dir = TempDir::new("cli");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for (which, yaml) in [
        ("status", config(free(), port, free(), free())),
        ("metrics", config(free(), free(), port, free())),
        ("admin", config(free(), free(), free(), port)),
    ] {
        dir.write("c.yaml", &yaml);
        let out = strait(&["run", "-c", "c.yaml"], dir.path());
        one_line_error(
            &out,
            &[
                &format!("cannot listen on 127.0.0.1:{port} for {which}"),
                "in use",
            ],
        );
    }
}

#[test]
fn a_low_port_without_privilege_is_named() {
    let dir = TempDir::new("cli");
    // The configuration must be readable by the unprivileged user.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    if !can_drop_privileges(dir.path()) {
        return;
    }
    for (which, yaml) in [
        ("gateway", config(80, free(), free(), free())),
        ("status", config(free(), 81, free(), free())),
    ] {
        let path = dir.write(&format!("{which}.yaml"), &yaml);
        let out = strait_as(
            true,
            &["run", "-c", &path.display().to_string()],
            dir.path(),
        );
        let port = if which == "gateway" { 80 } else { 81 };
        let line = one_line_error(&out, &[&format!("cannot listen on 127.0.0.1:{port}")]);
        assert!(
            line.to_lowercase().contains("permission denied"),
            "{which}: {line}"
        );
    }
}

#[test]
fn route_exits_1_for_a_name_that_does_not_route() {
    let dir = TempDir::new("cli");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/passthrough.yaml");
    let example = example.display().to_string();
    let out = strait(
        &[
            "route",
            "-c",
            &example,
            "outbound_.9080_.v3_.reviews.default.svc.cluster.local",
        ],
        dir.path(),
    );
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("does not route"),
        "{}",
        text(&out.stdout)
    );

    let out = strait(&["route", "-c", &example, "not-an-sni-key"], dir.path());
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));

    let out = strait(
        &[
            "route",
            "-c",
            &example,
            "outbound_.9080_.v2_.reviews.default.svc.cluster.local",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn ca_init_refuses_to_overwrite_an_existing_ca() {
    let dir = TempDir::new("cli");
    let out = strait(&["ca", "init", "--out", "ca"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let root = std::fs::read(dir.path().join("ca/root-cert.pem")).unwrap();
    let out = strait(&["ca", "init", "--out", "ca"], dir.path());
    one_line_error(&out, &["ca/root-cert.pem", "already exists"]);
    assert_eq!(
        std::fs::read(dir.path().join("ca/root-cert.pem")).unwrap(),
        root
    );
}

#[test]
fn cert_issue_names_a_bad_spiffe_id_a_missing_ca_and_a_bad_duration() {
    let dir = TempDir::new("cli");
    let out = strait(&["ca", "init", "--out", "ca"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = strait(
        &[
            "cert",
            "issue",
            "--ca",
            "ca",
            "--id",
            "spiffe://Cluster.local/ns/a/sa/b",
            "--out",
            "svid",
        ],
        dir.path(),
    );
    one_line_error(
        &out,
        &["--id \"spiffe://Cluster.local/ns/a/sa/b\"", "lower-case"],
    );
    let out = strait(
        &[
            "cert", "issue", "--ca", "ca", "--id", "reviews", "--out", "svid",
        ],
        dir.path(),
    );
    one_line_error(&out, &["--id \"reviews\"", "spiffe://"]);

    let out = strait(
        &[
            "cert",
            "issue",
            "--ca",
            "nowhere",
            "--id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--out",
            "svid",
        ],
        dir.path(),
    );
    one_line_error(&out, &["nowhere", "strait ca init"]);

    let out = strait(
        &[
            "cert",
            "issue",
            "--ca",
            "ca",
            "--id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--out",
            "svid",
            "--valid-for",
            "forever",
        ],
        dir.path(),
    );
    one_line_error(&out, &["--valid-for \"forever\"", "invalid duration"]);
    let out = strait(
        &["ca", "init", "--out", "ca2", "--valid-for", "10"],
        dir.path(),
    );
    one_line_error(&out, &["--valid-for \"10\"", "missing unit"]);
    assert!(!dir.path().join("svid").exists());
    assert!(!dir.path().join("ca2").exists());
}

/// `strait check` judges `discovery.waypoint` (the ambient east-west gateway's node): an
/// id that istiod would not treat as a waypoint, labels without the east-west
/// controller's, or no network, each named on its line.
#[test]
fn check_judges_the_waypoint_node() {
    let dir = TempDir::new("cli");
    let bootstrap = |network: &str, waypoint: &str| {
        format!(
            "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: b}}\nspec:\n{network}  discovery:\n    address: http://127.0.0.1:15010\n    node: {{ip: 10.0.0.2, podName: gw-0}}\n    waypoint: {waypoint}\n"
        )
    };
    dir.write("ok.yaml", &bootstrap("  network: network1\n", "{}"));
    let out = strait(&["check", "-c", "ok.yaml"], dir.path());
    no_panic(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    dir.write(
        "bad.yaml",
        &bootstrap(
            "",
            "{id: router~10.0.0.2~gw-0.istio-system~istio-system.svc.cluster.local, labels: {gateway.istio.io/managed: other}}",
        ),
    );
    let out = strait(&["check", "-c", "bad.yaml"], dir.path());
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    for expected in [
        "error: spec.discovery.waypoint.id: \"router~10.0.0.2~gw-0.istio-system~istio-system.svc.cluster.local\" is not a waypoint node id",
        "error: spec.discovery.waypoint.labels.gateway.istio.io/managed: must be istio.io-eastwest-controller",
        "error: spec.discovery.waypoint: the waypoint node id is the router's",
        "warning: spec.discovery.waypoint: the gateway's network is unknown",
    ] {
        assert!(stdout.contains(expected), "{expected}\n{stdout}");
    }
}
