//! The container recipe (`Dockerfile`) and the Kubernetes manifests (`deploy/`) agree with
//! each other and with what the gateway serves (SPEC §6, §7): the image runs
//! `strait run -c DIR` as a non-root user from the binary the builder stage produced, the
//! Deployment mounts DIR and probes the status port, the drain fits in the grace period,
//! and the Service, PodDisruptionBudget and autoscaler all point at the gateway's pods.
//!
//! These tests read files only: no Docker engine or cluster is needed. Each check is a
//! function returning the problems it found, so that the tests below can also prove that
//! a broken copy of the files is caught.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use saphyr::{LoadableYamlNode, YamlOwned};

const DATA_PORT: i64 = 15443;
/// Ambient's double HBONE (a Gateway API `istio-east-west` Gateway's listener).
const HBONE_PORT: i64 = 15008;
/// istiod's xDS/CA and webhook ports, as Istio's `expose-istiod.yaml` serves them through
/// the east-west gateway (PASSTHROUGH) for remote clusters.
const ISTIOD_PORT: i64 = 15012;
const WEBHOOK_PORT: i64 = 15017;
const STATUS_PORT: i64 = 15021;
const METRICS_PORT: i64 = 15090;
const READY_PATH: &str = "/healthz/ready";
const METRICS_PATH: &str = "/stats/prometheus";
const NETWORK_LABEL: &str = "topology.istio.io/network";
const MANIFEST: &str = "deploy/strait-eastwest.yaml";
const XDS_MANIFEST: &str = "deploy/strait-eastwest-xds.yaml";
/// Istio's Gateway for the xDS flavour, applied to istiod.
const EXPOSE_SERVICES: &str = "deploy/expose-services.yaml";
/// The xDS manifest's ConfigMap with a waypoint stream, applied over it.
const AMBIENT_CONFIG: &str = "deploy/strait-eastwest-ambient.yaml";
const MANIFESTS: [(&str, Flavour); 2] = [(MANIFEST, Flavour::Files), (XDS_MANIFEST, Flavour::Xds)];
/// strait's `spec.discovery` defaults, which are Istio's gateway pod layout.
const ISTIO_TOKEN: &str = "/var/run/secrets/tokens/istio-token";
const ISTIOD_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// istiod's `TOKEN_AUDIENCES` default.
const TOKEN_AUDIENCE: &str = "istio-ca";
/// The ConfigMap istiod writes into every namespace, and its key.
const ROOT_CERT_CONFIG_MAP: &str = "istio-ca-root-cert";
const ROOT_CERT_KEY: &str = "root-cert.pem";
const BINARY: &str = "strait";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Durations in Istio's forms ("500ms", "45s", "1m30s", "1h").

fn parse_duration_secs(text: &str) -> Option<f64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(total)
}

// ---------------------------------------------------------------------------------------
// Dockerfile reading: instructions, stages, exec-form arrays.

#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
    line: usize,
}

/// Splits a Dockerfile into instructions: joins `\` continuations, drops comments
/// (also those inside a continued instruction, as Docker does) and blank lines.
fn parse_dockerfile(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(body) => (true, body.trim_end()),
            None => (false, trimmed),
        };
        let (start, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        if !joined.is_empty() && !body.is_empty() {
            joined.push(' ');
        }
        joined.push_str(body);
        if continues {
            pending = Some((start, joined));
            continue;
        }
        if joined.trim().is_empty() {
            continue;
        }
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((&joined, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
            line: start,
        });
    }
    if let Some((start, joined)) = pending {
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((&joined, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
            line: start,
        });
    }
    out
}

#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &Instruction> {
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }

    fn last(&self, keyword: &str) -> Option<&Instruction> {
        self.all(keyword).last()
    }
}

fn stages(instructions: &[Instruction]) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::new();
    for instruction in instructions {
        if instruction.keyword == "FROM" {
            let words: Vec<&str> = instruction
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            out.push(Stage {
                base: words.first().map(|w| w.to_string()).unwrap_or_default(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = out.last_mut() {
            stage.instructions.push(instruction.clone());
        }
    }
    out
}

/// An exec-form array (`["a", "b"]`); `None` for the shell form.
fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(args.trim()).ok()
}

/// Source and destination of a COPY, and its `--from` stage if any.
fn copy_parts(args: &str) -> (Option<String>, Vec<String>, String) {
    let mut from = None;
    let mut words = Vec::new();
    for word in args.split_whitespace() {
        if let Some(stage) = word.strip_prefix("--from=") {
            from = Some(stage.to_string());
        } else if !word.starts_with("--") {
            words.push(word.to_string());
        }
    }
    let dest = words.pop().unwrap_or_default();
    (from, words, dest)
}

fn join_path(base: &str, rel: &str) -> String {
    let joined = if rel.starts_with('/') {
        rel.to_string()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), rel)
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where `cargo build` in `command`, run in `workdir` with `target_dir` (if set by ENV),
/// writes the binary.
fn cargo_output(command: &str, workdir: &str, target_dir: Option<&str>) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    let flag_value = |flag: &str| -> Option<String> {
        words.iter().enumerate().find_map(|(i, w)| {
            if let Some(v) = w.strip_prefix(&format!("{flag}=")) {
                Some(v.to_string())
            } else if *w == flag {
                words.get(i + 1).map(|v| v.to_string())
            } else {
                None
            }
        })
    };
    let profile = match flag_value("--profile") {
        Some(p) if p == "dev" || p == "test" => "debug".to_string(),
        Some(p) => p,
        None if words.contains(&"--release") || words.contains(&"-r") => "release".to_string(),
        None => "debug".to_string(),
    };
    let base = match flag_value("--target-dir").or(target_dir.map(str::to_string)) {
        Some(dir) => join_path(workdir, &dir),
        None => join_path(workdir, "target"),
    };
    match flag_value("--target") {
        Some(triple) => format!("{base}/{triple}/{profile}/{BINARY}"),
        None => format!("{base}/{profile}/{BINARY}"),
    }
}

/// The names of the binaries Cargo.toml builds.
fn cargo_binaries(cargo_toml: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut package_name = None;
    let mut bins = BTreeSet::new();
    for line in cargo_toml.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && key.trim() == "name"
        {
            let value = value.trim().trim_matches('"').to_string();
            match section.as_str() {
                "[package]" => package_name = Some(value),
                "[[bin]]" => {
                    bins.insert(value);
                }
                _ => {}
            }
        }
    }
    if bins.is_empty()
        && let Some(name) = package_name
    {
        bins.insert(name);
    }
    bins
}

/// What the Deployment gives the image: the container's `command`/`args` overrides and
/// the directory holding the strait-config ConfigMap.
#[derive(Debug, Default)]
struct PodView {
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
    config_mount: Option<String>,
    run_as_user: Option<i64>,
}

fn pod_view(manifest: &str) -> Result<PodView, String> {
    let docs = load_docs(manifest)?;
    let deployment = docs
        .iter()
        .find(|d| str_at(d, &["kind"]) == Some("Deployment"))
        .ok_or("no Deployment in the manifest")?;
    let container = at(deployment, &["spec", "template", "spec", "containers", "0"])
        .ok_or("the Deployment has no container")?;
    let strings = |node: Option<&YamlOwned>| {
        node.and_then(YamlOwned::as_vec).map(|items| {
            items
                .iter()
                .map(|i| scalar_string(i).unwrap_or_default())
                .collect::<Vec<_>>()
        })
    };
    let config_map_name = docs
        .iter()
        .find(|d| str_at(d, &["kind"]) == Some("ConfigMap"))
        .and_then(|d| str_at(d, &["metadata", "name"]));
    let pod_spec = at(deployment, &["spec", "template", "spec"]).ok_or("no pod spec")?;
    let config_volume = seq(pod_spec, &["volumes"]).iter().find_map(|v| {
        let name = str_at(v, &["name"])?;
        (str_at(v, &["configMap", "name"]).is_some()
            && str_at(v, &["configMap", "name"]) == config_map_name)
            .then_some(name)
    });
    let config_mount = config_volume.and_then(|volume| {
        seq(container, &["volumeMounts"])
            .iter()
            .find(|m| str_at(m, &["name"]) == Some(volume))
            .and_then(|m| str_at(m, &["mountPath"]))
            .map(str::to_string)
    });
    Ok(PodView {
        command: strings(at(container, &["command"])),
        args: strings(at(container, &["args"])),
        config_mount,
        run_as_user: int_at(container, &["securityContext", "runAsUser"])
            .or_else(|| int_at(pod_spec, &["securityContext", "runAsUser"])),
    })
}

fn dockerfile_problems(dockerfile: &str, manifest: &str, cargo_toml: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let stages = stages(&parse_dockerfile(dockerfile));
    if stages.len() < 2 {
        problems.push(format!(
            "Dockerfile is not multi-stage ({} FROM): build in one stage, copy the binary into a small final stage",
            stages.len()
        ));
        return problems;
    }
    let last = stages.len() - 1;
    let runtime = &stages[last];
    if !(runtime.base.starts_with("gcr.io/distroless/") && runtime.base.contains("nonroot")) {
        problems.push(format!(
            "final stage FROM {} is not a distroless nonroot image (gcr.io/distroless/cc-debian12:nonroot)",
            runtime.base
        ));
    }
    if let Some(run) = runtime.last("RUN") {
        problems.push(format!(
            "final stage has RUN at line {}: distroless has no shell to run it",
            run.line
        ));
    }

    // USER: numeric and not root, so that Kubernetes' runAsNonRoot can verify it.
    let pod = match pod_view(manifest) {
        Ok(pod) => Some(pod),
        Err(e) => {
            problems.push(format!("cannot read the Deployment: {e}"));
            None
        }
    };
    match runtime.last("USER") {
        None => problems.push("final stage sets no USER: the image would run as root".into()),
        Some(user) => {
            let uid = user.args.split(':').next().unwrap_or("").trim();
            match uid.parse::<i64>() {
                Ok(0) => problems.push(format!("USER {} is root", user.args)),
                Ok(uid) => {
                    if let Some(pod_uid) = pod.as_ref().and_then(|p| p.run_as_user)
                        && pod_uid != uid
                    {
                        problems.push(format!(
                            "USER {uid} in the Dockerfile but runAsUser {pod_uid} in the Deployment"
                        ));
                    }
                }
                Err(_) => problems.push(format!(
                    "USER {} is not numeric: runAsNonRoot cannot verify a user name",
                    user.args
                )),
            }
        }
    }

    // EXPOSE: exactly the data ports (15443, 15008 for ambient, and 15012/15017 for istiod
    // behind a PASSTHROUGH Gateway), status and metrics (admin stays on loopback).
    let exposed: BTreeSet<i64> = runtime
        .all("EXPOSE")
        .flat_map(|e| e.args.split_whitespace())
        .filter_map(|p| p.split('/').next()?.parse().ok())
        .collect();
    let wanted: BTreeSet<i64> = [
        DATA_PORT,
        HBONE_PORT,
        ISTIOD_PORT,
        WEBHOOK_PORT,
        STATUS_PORT,
        METRICS_PORT,
    ]
    .into();
    if exposed != wanted {
        problems.push(format!(
            "EXPOSE lists {exposed:?}; the gateway serves {wanted:?} (admin 15000 is loopback-only)"
        ));
    }

    // ENTRYPOINT + CMD, as overridden by the Deployment, run `strait run -c DIR`.
    let entrypoint = runtime.last("ENTRYPOINT").map(|i| exec_form(&i.args));
    let cmd = runtime.last("CMD").map(|i| exec_form(&i.args));
    let (entrypoint, cmd) = match (entrypoint, cmd) {
        (Some(Some(e)), Some(Some(c))) => (e, c),
        (Some(None), _) | (_, Some(None)) => {
            problems.push(
                "ENTRYPOINT/CMD in shell form need /bin/sh, which distroless lacks: use the exec form [\"...\"]"
                    .into(),
            );
            return problems;
        }
        _ => {
            problems.push("final stage needs both ENTRYPOINT and CMD".into());
            return problems;
        }
    };
    let binary_path = entrypoint.first().cloned().unwrap_or_default();
    let argv: Vec<String> = match &pod {
        Some(PodView {
            command: Some(command),
            args,
            ..
        }) => command
            .iter()
            .chain(args.iter().flatten())
            .cloned()
            .collect(),
        Some(PodView {
            args: Some(args), ..
        }) => entrypoint.iter().chain(args).cloned().collect(),
        _ => entrypoint.iter().chain(&cmd).cloned().collect(),
    };
    let config_dir = match argv.as_slice() {
        [bin, run, flag, dir]
            if bin.ends_with(&format!("/{BINARY}"))
                && run == "run"
                && (flag == "-c" || flag == "--config") =>
        {
            Some(dir.clone())
        }
        _ => {
            problems.push(format!(
                "the container runs {argv:?}; expected [\"/usr/local/bin/{BINARY}\", \"run\", \"-c\", DIR]"
            ));
            None
        }
    };
    if let (Some(dir), Some(pod)) = (&config_dir, &pod) {
        match &pod.config_mount {
            Some(mount) if mount.trim_end_matches('/') == dir.trim_end_matches('/') => {}
            Some(mount) => problems.push(format!(
                "the image reads its config from {dir} but the Deployment mounts the ConfigMap at {mount}"
            )),
            None => problems.push("the Deployment does not mount the strait ConfigMap".into()),
        }
    }

    // The binary COPY'd into the final stage is the one the builder stage produced.
    let Some(copy) = runtime
        .all("COPY")
        .map(|c| copy_parts(&c.args))
        .find(|(from, _, dest)| from.is_some() && *dest == binary_path)
    else {
        problems.push(format!(
            "no COPY --from=<builder> puts the binary at {binary_path}, the ENTRYPOINT"
        ));
        return problems;
    };
    let (from, sources, _) = copy;
    let from = from.unwrap_or_default();
    let Some(builder_index) = stages[..last]
        .iter()
        .position(|s| {
            s.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(&from))
        })
        .or_else(|| from.parse::<usize>().ok().filter(|i| *i < last))
    else {
        problems.push(format!("COPY --from={from} names no earlier stage"));
        return problems;
    };
    let builder = &stages[builder_index];
    if runtime.base.contains("debian12") && !builder.base.contains("bookworm") {
        problems.push(format!(
            "builder FROM {} is not Debian 12 (bookworm): its glibc must not be newer than the runtime's",
            builder.base
        ));
    }
    let builds: Vec<usize> = builder
        .instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "RUN" && i.args.contains("cargo build"))
        .map(|(n, _)| n)
        .collect();
    let Some(&build_at) = builds.last() else {
        problems.push(format!(
            "builder stage FROM {} runs no cargo build",
            builder.base
        ));
        return problems;
    };
    let build = &builder.instructions[build_at];
    let command = build.args[build.args.find("cargo build").unwrap_or(0)..]
        .split("&&")
        .next()
        .unwrap_or("");
    for flag in ["--release", "--locked"] {
        if !command.split_whitespace().any(|w| w == flag) {
            problems.push(format!(
                "`{}` (line {}) lacks {flag}",
                command.trim(),
                build.line
            ));
        }
    }
    let before_build = &builder.instructions[..build_at];
    if !before_build.iter().any(|i| {
        i.keyword == "COPY" && {
            let (from, sources, _) = copy_parts(&i.args);
            from.is_none() && sources.iter().any(|s| s == "." || s == "./")
        }
    }) {
        problems.push(format!(
            "the builder's last cargo build (line {}) does not follow a COPY of the sources (COPY . .)",
            build.line
        ));
    }
    let workdir = before_build
        .iter()
        .filter(|i| i.keyword == "WORKDIR")
        .fold("/".to_string(), |dir, i| join_path(&dir, &i.args));
    let target_dir = before_build
        .iter()
        .filter(|i| i.keyword == "ENV")
        .filter_map(|i| {
            let (key, value) = i.args.split_once(['=', ' '])?;
            (key.trim() == "CARGO_TARGET_DIR").then(|| value.trim().trim_matches('"').to_string())
        })
        .next_back();
    let produced = cargo_output(command, &workdir, target_dir.as_deref());
    let copied: Vec<String> = sources.iter().map(|s| join_path(&workdir, s)).collect();
    if copied != [produced.clone()] {
        problems.push(format!(
            "the final stage copies {copied:?} but `{}` in WORKDIR {workdir} produces {produced}",
            command.trim()
        ));
    }
    let binaries = cargo_binaries(cargo_toml);
    if !binaries.contains(BINARY) {
        problems.push(format!("Cargo.toml builds {binaries:?}, not {BINARY}"));
    }
    problems
}

fn dockerignore_problems(dockerignore: &str) -> Vec<String> {
    let entries: BTreeSet<String> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .collect();
    ["target", "fuzz/target", ".git"]
        .iter()
        .filter(|wanted| !entries.contains(**wanted))
        .map(|wanted| format!(".dockerignore does not exclude {wanted}"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// YAML access.

fn load_docs(text: &str) -> Result<Vec<YamlOwned>, String> {
    YamlOwned::load_from_str(text).map_err(|e| format!("YAML does not parse: {e}"))
}

fn at<'a>(node: &'a YamlOwned, path: &[&str]) -> Option<&'a YamlOwned> {
    path.iter().try_fold(node, |node, key| match node {
        YamlOwned::Sequence(items) => items.get(key.parse::<usize>().ok()?),
        _ => node.as_mapping_get(key),
    })
}

fn str_at<'a>(node: &'a YamlOwned, path: &[&str]) -> Option<&'a str> {
    at(node, path)?.as_str()
}

fn int_at(node: &YamlOwned, path: &[&str]) -> Option<i64> {
    at(node, path)?.as_integer()
}

fn seq<'a>(node: &'a YamlOwned, path: &[&str]) -> &'a [YamlOwned] {
    at(node, path)
        .and_then(YamlOwned::as_vec)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn scalar_string(node: &YamlOwned) -> Option<String> {
    if let Some(s) = node.as_str() {
        Some(s.to_string())
    } else if let Some(i) = node.as_integer() {
        Some(i.to_string())
    } else {
        node.as_bool().map(|b| b.to_string())
    }
}

fn labels(node: Option<&YamlOwned>) -> BTreeMap<String, String> {
    node.and_then(YamlOwned::as_mapping)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((scalar_string(k)?, scalar_string(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// A Service or probe port (number or container-port name) as a container port number.
fn resolve_port(port: &YamlOwned, container: &YamlOwned) -> Option<i64> {
    if let Some(n) = port.as_integer() {
        return Some(n);
    }
    let name = port.as_str()?;
    seq(container, &["ports"])
        .iter()
        .find(|p| str_at(p, &["name"]) == Some(name))
        .and_then(|p| int_at(p, &["containerPort"]))
}

/// Whether an Istio Gateway `hosts` entry admits `host` (ns/ prefixes ignored, as istiod does).
fn gateway_host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.rsplit('/').next().unwrap_or(pattern);
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

// ---------------------------------------------------------------------------------------
// Manifest checks.

/// The two ways the manifests run strait: on files only (`strait-eastwest.yaml`: the
/// ConfigMap carries the Gateway and the services) or on istiod's xDS
/// (`strait-eastwest-xds.yaml`: the ConfigMap carries only a Bootstrap with `discovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Files,
    Xds,
}

/// What the Bootstrap's `spec.discovery` makes strait read from the pod.
struct DiscoveryView {
    plaintext: bool,
    /// The projected token file; `None` when the Bootstrap turns it off.
    token: Option<String>,
    root_cert: String,
    cluster_id: Option<String>,
}

struct Embedded {
    network: Option<String>,
    cluster: String,
    drain_secs: f64,
    status_port: i64,
    metrics_port: i64,
    certs_dir: String,
    /// `spec.certificates.ca` is set: the SVID comes from the mesh CA, no Secret is needed.
    certs_from_ca: bool,
    /// `spec.labels` with `spec.discovery.node.labels` added: the node `LABELS`.
    labels: BTreeMap<String, String>,
    discovery: Option<DiscoveryView>,
}

fn port_of(address: &str) -> Option<i64> {
    address.rsplit(':').next()?.parse().ok()
}

/// The documents of every `.yaml` key of a ConfigMap, as `strait run -c DIR` reads them.
fn config_map_docs(config_map: &YamlOwned, problems: &mut Vec<String>) -> Vec<YamlOwned> {
    let mut docs = Vec::new();
    let data = at(config_map, &["data"]).and_then(YamlOwned::as_mapping);
    for (key, value) in data.into_iter().flatten() {
        let key = scalar_string(key).unwrap_or_default();
        if !(key.ends_with(".yaml") || key.ends_with(".yml")) {
            problems.push(format!(
                "ConfigMap key {key} is not a .yaml file name, so `strait run -c DIR` would skip it"
            ));
            continue;
        }
        match load_docs(value.as_str().unwrap_or("")) {
            Ok(d) => docs.extend(d),
            Err(e) => problems.push(format!("ConfigMap key {key}: {e}")),
        }
    }
    docs
}

/// Reads `spec.discovery` with strait's defaults (docs/fields.md).
fn discovery_view(
    discovery: &YamlOwned,
    container_env: &BTreeMap<String, String>,
) -> DiscoveryView {
    let plaintext = str_at(discovery, &["address"]).is_some_and(|a| a.starts_with("http://"));
    let token = match at(discovery, &["token"]) {
        Some(t) if t.is_null() => None,
        Some(t) => t.as_str().filter(|t| !t.is_empty()).map(str::to_string),
        None if plaintext => None,
        None => Some(ISTIO_TOKEN.to_string()),
    };
    DiscoveryView {
        plaintext,
        token,
        root_cert: str_at(discovery, &["rootCert"])
            .unwrap_or(ISTIOD_ROOT_CERT)
            .to_string(),
        cluster_id: str_at(discovery, &["clusterId"])
            .map(str::to_string)
            .or_else(|| container_env.get("ISTIO_META_CLUSTER_ID").cloned()),
    }
}

/// Checks the Gateways among `docs`: each selects the gateway pods, and one serves Istio's
/// expose-services (port 15443, AUTO_PASSTHROUGH, `*.local`). Returns the passthrough hosts.
fn passthrough_gateway_problems(
    docs: &[YamlOwned],
    pod_labels: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> Vec<String> {
    let mut passthrough_hosts: Vec<String> = Vec::new();
    for gateway in docs
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("Gateway"))
    {
        let selector = labels(at(gateway, &["spec", "selector"]));
        if !selects(&selector, pod_labels) {
            problems.push(format!(
                "Gateway {} selects {selector:?}, which does not match the gateway's labels {pod_labels:?}",
                str_at(gateway, &["metadata", "name"]).unwrap_or("?")
            ));
        }
        for server in seq(gateway, &["spec", "servers"]) {
            if int_at(server, &["port", "number"]) == Some(DATA_PORT)
                && str_at(server, &["tls", "mode"]) == Some("AUTO_PASSTHROUGH")
            {
                passthrough_hosts.extend(
                    seq(server, &["hosts"])
                        .iter()
                        .filter_map(|h| h.as_str().map(str::to_string)),
                );
            }
        }
    }
    if !passthrough_hosts.iter().any(|h| h == "*.local") {
        problems.push(format!(
            "no Gateway server on port {DATA_PORT} with tls.mode AUTO_PASSTHROUGH and hosts [\"*.local\"] (Istio's expose-services)"
        ));
    }
    passthrough_hosts
}

/// Checks the gateway configuration held in the ConfigMap and returns what the pod must agree with.
fn embedded_config_problems(
    config_map: &YamlOwned,
    pod_labels: &BTreeMap<String, String>,
    container_env: &BTreeMap<String, String>,
    flavour: Flavour,
    problems: &mut Vec<String>,
) -> Embedded {
    let docs = config_map_docs(config_map, problems);
    let bootstraps: Vec<&YamlOwned> = docs
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("Bootstrap"))
        .collect();
    let mut embedded = Embedded {
        network: None,
        cluster: "Kubernetes".into(),
        drain_secs: 45.0,
        status_port: STATUS_PORT,
        metrics_port: METRICS_PORT,
        certs_dir: "/etc/certs".into(),
        certs_from_ca: false,
        labels: BTreeMap::new(),
        discovery: None,
    };
    match bootstraps.as_slice() {
        [bootstrap] => {
            if str_at(bootstrap, &["apiVersion"]) != Some("strait.dev/v1alpha1") {
                problems.push("the Bootstrap's apiVersion is not strait.dev/v1alpha1".into());
            }
            embedded.network = str_at(bootstrap, &["spec", "network"]).map(str::to_string);
            if let Some(cluster) = str_at(bootstrap, &["spec", "cluster"]) {
                embedded.cluster = cluster.to_string();
            }
            if let Some(drain) = at(bootstrap, &["spec", "drainDuration"]) {
                match drain.as_str().and_then(parse_duration_secs) {
                    Some(secs) => embedded.drain_secs = secs,
                    None => problems.push(format!(
                        "Bootstrap drainDuration {} is not a duration like 45s",
                        scalar_string(drain).unwrap_or_else(|| "(not a scalar)".into())
                    )),
                }
            }
            if let Some(addr) = str_at(bootstrap, &["spec", "status"]) {
                embedded.status_port = port_of(addr).unwrap_or(0);
            }
            if let Some(addr) = str_at(bootstrap, &["spec", "metrics"]) {
                embedded.metrics_port = port_of(addr).unwrap_or(0);
            }
            if let Some(dir) = str_at(bootstrap, &["spec", "certificates", "dir"]) {
                embedded.certs_dir = dir.to_string();
            }
            embedded.certs_from_ca = at(bootstrap, &["spec", "certificates", "ca"]).is_some();
            embedded.labels = labels(at(bootstrap, &["spec", "labels"]));
            if let Some(discovery) = at(bootstrap, &["spec", "discovery"]) {
                embedded
                    .labels
                    .extend(labels(at(discovery, &["node", "labels"])));
                embedded.discovery = Some(discovery_view(discovery, container_env));
            }
        }
        [] => problems.push("the ConfigMap holds no strait.dev/v1alpha1 Bootstrap".into()),
        more => problems.push(format!(
            "the ConfigMap holds {} Bootstraps; strait takes at most one",
            more.len()
        )),
    }
    match &embedded.network {
        None => problems.push(
            "the Bootstrap sets no spec.network: the gateway must know which network it serves"
                .into(),
        ),
        Some(net) if pod_labels.get(NETWORK_LABEL) != Some(net) => problems.push(format!(
            "the Bootstrap says network {net} but the pods are labelled {NETWORK_LABEL}={:?}",
            pod_labels.get(NETWORK_LABEL)
        )),
        Some(_) => {}
    }

    match flavour {
        Flavour::Files => {
            if embedded.discovery.is_some() {
                problems.push(format!(
                    "the Bootstrap sets spec.discovery: this manifest runs strait on its files; {XDS_MANIFEST} is the one for istiod"
                ));
            }
            // The expose-services Gateway, and every declared service admitted by it.
            let passthrough_hosts = passthrough_gateway_problems(&docs, pod_labels, problems);
            for entry in docs
                .iter()
                .filter(|d| str_at(d, &["kind"]) == Some("ServiceEntry"))
            {
                for host in seq(entry, &["spec", "hosts"])
                    .iter()
                    .filter_map(|h| h.as_str())
                {
                    if !passthrough_hosts
                        .iter()
                        .any(|p| gateway_host_matches(p, host))
                    {
                        problems.push(format!(
                            "ServiceEntry host {host} is not admitted by the passthrough Gateway's hosts {passthrough_hosts:?}"
                        ));
                    }
                }
            }
        }
        Flavour::Xds => {
            if embedded.discovery.is_none() {
                problems.push(
                    "the Bootstrap sets no spec.discovery: strait would serve its files, not istiod's configuration"
                        .into(),
                );
            }
            // A file-declared listener or service port replaces istiod's on the same
            // address or port (xds::merge), so the files must not declare them.
            for doc in &docs {
                let kind = str_at(doc, &["kind"]).unwrap_or("");
                let why = match kind {
                    "Gateway" => format!(
                        "apply it to istiod ({EXPOSE_SERVICES}): a Gateway in the files replaces istiod's listener on the same port"
                    ),
                    "ServiceEntry" | "WorkloadEntry" => "istiod sends the services and endpoints; one declared in the files replaces istiod's on the same port".to_string(),
                    _ => continue,
                };
                problems.push(format!(
                    "the ConfigMap declares {kind} {}: {why}",
                    str_at(doc, &["metadata", "name"]).unwrap_or("?")
                ));
            }
            // The node LABELS must carry what the Gateway selects, and agree with the pods.
            let network = embedded.network.clone().unwrap_or_default();
            for (key, value) in [
                ("istio", "eastwestgateway"),
                ("app", "istio-eastwestgateway"),
                (NETWORK_LABEL, network.as_str()),
            ] {
                if embedded.labels.get(key).map(String::as_str) != Some(value) {
                    problems.push(format!(
                        "the Bootstrap's labels lack {key}: {value}; istiod falls back to these node LABELS to match the Gateway selector"
                    ));
                }
            }
            for (key, value) in &embedded.labels {
                if pod_labels.get(key) != Some(value) {
                    problems.push(format!(
                        "the Bootstrap's label {key}: {value} is not the pods' ({:?})",
                        pod_labels.get(key)
                    ));
                }
            }
        }
    }
    embedded
}

/// The file a container path falls in: the volume, its mount and the path inside the volume.
fn mounted_file<'a>(
    pod_spec: &'a YamlOwned,
    container: &'a YamlOwned,
    path: &str,
) -> Option<(&'a YamlOwned, &'a YamlOwned, String)> {
    let (mount, inner) = seq(container, &["volumeMounts"])
        .iter()
        .filter_map(|m| {
            let mount_path = str_at(m, &["mountPath"])?.trim_end_matches('/');
            if let Some(sub) = str_at(m, &["subPath"]) {
                return (mount_path == path).then(|| (m, sub.to_string(), usize::MAX));
            }
            let rest = path.strip_prefix(mount_path)?.strip_prefix('/')?;
            Some((m, rest.to_string(), mount_path.len()))
        })
        .max_by_key(|(_, _, len)| *len)
        .map(|(m, inner, _)| (m, inner))?;
    let name = str_at(mount, &["name"])?;
    let volume = seq(pod_spec, &["volumes"])
        .iter()
        .find(|v| str_at(v, &["name"]) == Some(name))?;
    Some((volume, mount, inner))
}

/// The xDS flavour's pod: the token, the root and the identity istiod checks.
fn xds_pod_problems(
    pod_spec: &YamlOwned,
    container: &YamlOwned,
    embedded: &Embedded,
    problems: &mut Vec<String>,
) {
    let Some(discovery) = &embedded.discovery else {
        return;
    };
    if discovery.plaintext {
        problems.push(
            "spec.discovery.address is plaintext http://, which istiod serves without authentication: use its TLS port 15012"
                .into(),
        );
    }

    // The projected token strait sends as authorization: Bearer.
    match &discovery.token {
        None if !discovery.plaintext => problems.push(
            "spec.discovery.token is turned off: istiod on 15012 rejects a stream without a token"
                .into(),
        ),
        None => {}
        Some(token) => match mounted_file(pod_spec, container, token) {
            None => problems.push(format!(
                "the Bootstrap's discovery token {token} is in no volume mount: mount the projected istio-token volume there"
            )),
            Some((volume, mount, inner)) => {
                if str_at(mount, &["subPath"]).is_some() {
                    problems.push(format!(
                        "the token {token} is mounted with subPath, which the kubelet never updates: the token would expire"
                    ));
                }
                let source = seq(volume, &["projected", "sources"]).iter().find(|s| {
                    str_at(s, &["serviceAccountToken", "path"]) == Some(inner.as_str())
                });
                match source {
                    None => problems.push(format!(
                        "volume {} projects no serviceAccountToken at path {inner}, where the Bootstrap reads the token {token}",
                        str_at(volume, &["name"]).unwrap_or("?")
                    )),
                    Some(s) => {
                        let audience = str_at(s, &["serviceAccountToken", "audience"]);
                        if audience != Some(TOKEN_AUDIENCE) {
                            problems.push(format!(
                                "the projected token's audience is {}; istiod accepts {TOKEN_AUDIENCE} (TOKEN_AUDIENCES)",
                                audience.unwrap_or("not set")
                            ));
                        }
                    }
                }
            }
        },
    }

    // The mesh root that verifies istiod: key root-cert.pem of istiod's ConfigMap.
    let root = &discovery.root_cert;
    match mounted_file(pod_spec, container, root) {
        None => problems.push(format!(
            "the Bootstrap's discovery rootCert {root} is in no volume mount: mount ConfigMap {ROOT_CERT_CONFIG_MAP} there"
        )),
        Some((volume, mount, inner)) => {
            if str_at(mount, &["subPath"]).is_some() {
                problems.push(format!(
                    "the root {root} is mounted with subPath, which the kubelet never updates: a rotated root would not arrive"
                ));
            }
            let sources: Vec<&YamlOwned> = at(volume, &["configMap"])
                .into_iter()
                .chain(
                    seq(volume, &["projected", "sources"])
                        .iter()
                        .filter_map(|s| at(s, &["configMap"])),
                )
                .collect();
            let provides = sources.iter().any(|cm| {
                str_at(cm, &["name"]) == Some(ROOT_CERT_CONFIG_MAP) && {
                    let items = seq(cm, &["items"]);
                    if items.is_empty() {
                        inner == ROOT_CERT_KEY
                    } else {
                        items.iter().any(|i| {
                            str_at(i, &["key"]) == Some(ROOT_CERT_KEY)
                                && str_at(i, &["path"]) == Some(inner.as_str())
                        })
                    }
                }
            });
            if !provides {
                problems.push(format!(
                    "the Bootstrap's discovery rootCert {root} is not key {ROOT_CERT_KEY} of ConfigMap {ROOT_CERT_CONFIG_MAP} (volume {})",
                    str_at(volume, &["name"]).unwrap_or("?")
                ));
            }
        }
    }

    // The node identity, from the downward API as Istio's injection template sets it.
    let env = seq(container, &["env"]);
    let entry = |name: &str| env.iter().find(|e| str_at(e, &["name"]) == Some(name));
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        let found = entry(name).and_then(|e| str_at(e, &["valueFrom", "fieldRef", "fieldPath"]));
        if found != Some(field) {
            problems.push(format!(
                "env {name} comes from {found:?}; it must be the downward API's {field} (node id and the identity istiod checks)"
            ));
        }
    }
    let literal = |name: &str| entry(name).and_then(|e| str_at(e, &["value"]));
    let network = embedded.network.as_deref().unwrap_or("");
    for name in ["ISTIO_META_NETWORK", "ISTIO_META_REQUESTED_NETWORK_VIEW"] {
        if let Some(value) = literal(name)
            && value != network
        {
            problems.push(format!(
                "env {name} is {value}, but the Bootstrap's network is {network}: the gateway must see only its own network"
            ));
        }
    }
    let cluster_id = discovery
        .cluster_id
        .clone()
        .unwrap_or_else(|| embedded.cluster.clone());
    if cluster_id != embedded.cluster {
        problems.push(format!(
            "istiod would know the gateway as cluster {cluster_id} (ISTIO_META_CLUSTER_ID or discovery.clusterId) but the Bootstrap's cluster is {}",
            embedded.cluster
        ));
    }
}

/// The literal env of the gateway container (`value:` entries).
fn literal_env(container: &YamlOwned) -> BTreeMap<String, String> {
    seq(container, &["env"])
        .iter()
        .filter_map(|e| {
            Some((
                str_at(e, &["name"])?.to_string(),
                scalar_string(at(e, &["value"])?)?,
            ))
        })
        .collect()
}

fn manifest_problems(manifest: &str, flavour: Flavour) -> Vec<String> {
    let mut problems = Vec::new();
    let docs = match load_docs(manifest) {
        Ok(docs) => docs,
        Err(e) => return vec![e],
    };
    let mut by_kind: BTreeMap<String, Vec<&YamlOwned>> = BTreeMap::new();
    for (index, doc) in docs.iter().enumerate() {
        let kind = str_at(doc, &["kind"]).unwrap_or("");
        for field in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
            if str_at(doc, field).is_none_or(str::is_empty) {
                problems.push(format!(
                    "document {index} ({kind}) has no {}",
                    field.join(".")
                ));
            }
        }
        if str_at(doc, &["metadata", "namespace"]) != Some("istio-system") {
            problems.push(format!(
                "{kind} {} is not in namespace istio-system",
                str_at(doc, &["metadata", "name"]).unwrap_or("?")
            ));
        }
        by_kind.entry(kind.to_string()).or_default().push(doc);
    }
    let expected = [
        ("ServiceAccount", "v1"),
        ("ConfigMap", "v1"),
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
    ];
    let mut one = BTreeMap::new();
    for (kind, api_version) in expected {
        match by_kind.get(kind).map(Vec::as_slice) {
            Some([doc]) => {
                if str_at(doc, &["apiVersion"]) != Some(api_version) {
                    problems.push(format!("{kind} should be apiVersion {api_version}"));
                }
                one.insert(kind, *doc);
            }
            Some(docs) => problems.push(format!("{} {kind} documents; expected one", docs.len())),
            None => problems.push(format!("no {kind} in the manifest")),
        }
    }
    let (Some(deployment), Some(config_map), Some(service), Some(pdb), Some(hpa), Some(account)) = (
        one.get("Deployment"),
        one.get("ConfigMap"),
        one.get("Service"),
        one.get("PodDisruptionBudget"),
        one.get("HorizontalPodAutoscaler"),
        one.get("ServiceAccount"),
    ) else {
        return problems;
    };
    let deployment_name = str_at(deployment, &["metadata", "name"]).unwrap_or("");

    // Deployment: replicas, labels, placement.
    let pod_labels = labels(at(deployment, &["spec", "template", "metadata", "labels"]));
    let replicas = int_at(deployment, &["spec", "replicas"]).unwrap_or(1);
    if replicas < 2 {
        problems.push(format!(
            "Deployment replicas is {replicas}; run 2 or more so one pod can drain while another serves"
        ));
    }
    for (key, value) in [
        ("istio", "eastwestgateway"),
        ("app", "istio-eastwestgateway"),
    ] {
        if pod_labels.get(key).map(String::as_str) != Some(value) {
            problems.push(format!("pod template lacks label {key}: {value}"));
        }
    }
    if !pod_labels.contains_key(NETWORK_LABEL) {
        problems.push(format!("pod template lacks label {NETWORK_LABEL}"));
    }
    let deployment_selector = labels(at(deployment, &["spec", "selector", "matchLabels"]));
    if !selects(&deployment_selector, &pod_labels) {
        problems.push(format!(
            "Deployment selector {deployment_selector:?} does not match its pod template labels {pod_labels:?}"
        ));
    }
    let pod_spec = at(deployment, &["spec", "template", "spec"]);
    let Some(pod_spec) = pod_spec else {
        problems.push("Deployment has no pod spec".into());
        return problems;
    };
    let anti_affinity_terms = seq(
        pod_spec,
        &[
            "affinity",
            "podAntiAffinity",
            "preferredDuringSchedulingIgnoredDuringExecution",
        ],
    )
    .iter()
    .filter_map(|t| at(t, &["podAffinityTerm"]))
    .chain(seq(
        pod_spec,
        &[
            "affinity",
            "podAntiAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
        ],
    ));
    let spreads_nodes = anti_affinity_terms.into_iter().any(|term| {
        str_at(term, &["topologyKey"]) == Some("kubernetes.io/hostname")
            && selects(
                &labels(at(term, &["labelSelector", "matchLabels"])),
                &pod_labels,
            )
    });
    if !spreads_nodes {
        problems.push(
            "no podAntiAffinity on kubernetes.io/hostname selecting the gateway pods: replicas may share a node"
                .into(),
        );
    }
    let account_name = str_at(account, &["metadata", "name"]);
    if str_at(pod_spec, &["serviceAccountName"]) != account_name {
        problems.push(format!(
            "Deployment runs as serviceAccountName {:?}, not the ServiceAccount {account_name:?}",
            str_at(pod_spec, &["serviceAccountName"])
        ));
    }
    let annotations = labels(at(
        deployment,
        &["spec", "template", "metadata", "annotations"],
    ));

    let Some(container) = seq(pod_spec, &["containers"]).first() else {
        problems.push("Deployment has no container".into());
        return problems;
    };
    let container_ports: BTreeSet<i64> = seq(container, &["ports"])
        .iter()
        .filter_map(|p| int_at(p, &["containerPort"]))
        .collect();
    for port in [
        DATA_PORT,
        HBONE_PORT,
        ISTIOD_PORT,
        WEBHOOK_PORT,
        STATUS_PORT,
        METRICS_PORT,
    ] {
        if !container_ports.contains(&port) {
            problems.push(format!("container ports {container_ports:?} lack {port}"));
        }
    }

    // The gateway config the ConfigMap carries, and that the pod mounts.
    let embedded = embedded_config_problems(
        config_map,
        &pod_labels,
        &literal_env(container),
        flavour,
        &mut problems,
    );
    let config_map_name = str_at(config_map, &["metadata", "name"]);
    let volumes = seq(pod_spec, &["volumes"]);
    let mount_of = |volume_kind: &str, source_name: Option<&str>| -> Option<String> {
        let volume = volumes.iter().find(|v| {
            at(v, &[volume_kind]).is_some()
                && (source_name.is_none()
                    || str_at(v, &[volume_kind, "name"]) == source_name
                    || str_at(v, &[volume_kind, "secretName"]) == source_name)
        })?;
        let volume_name = str_at(volume, &["name"])?;
        seq(container, &["volumeMounts"])
            .iter()
            .find(|m| str_at(m, &["name"]) == Some(volume_name))
            .and_then(|m| str_at(m, &["mountPath"]))
            .map(str::to_string)
    };
    if mount_of("configMap", config_map_name).is_none() {
        problems.push(format!(
            "the container does not mount ConfigMap {config_map_name:?}"
        ));
    }
    match (mount_of("secret", None), embedded.certs_from_ca) {
        (Some(dir), true) => problems.push(format!(
            "a Secret is mounted at {dir}, but the Bootstrap takes its certificates from the mesh CA (certificates.ca): nothing reads it"
        )),
        (None, true) => {}
        (Some(dir), false)
            if dir.trim_end_matches('/') == embedded.certs_dir.trim_end_matches('/') => {}
        (Some(dir), false) => problems.push(format!(
            "certificates Secret mounted at {dir}, but the Bootstrap reads {}",
            embedded.certs_dir
        )),
        (None, false) => problems.push(format!(
            "no certificates Secret mounted at {}",
            embedded.certs_dir
        )),
    }
    if flavour == Flavour::Xds && !embedded.certs_from_ca {
        problems.push(
            "the xDS flavour's Bootstrap has no certificates.ca: its ISTIO_MUTUAL servers and Bridges would need a strait-certs Secret"
                .into(),
        );
    }
    if let Some(secret) = volumes.iter().find_map(|v| at(v, &["secret"]))
        && at(secret, &["optional"]).and_then(YamlOwned::as_bool) != Some(true)
    {
        problems.push(
            "the certificates Secret is not optional: AUTO_PASSTHROUGH needs none, and the pods would not start until it exists"
                .into(),
        );
    }
    if flavour == Flavour::Xds {
        xds_pod_problems(pod_spec, container, &embedded, &mut problems);
    }
    if embedded.status_port != STATUS_PORT || embedded.metrics_port != METRICS_PORT {
        problems.push(format!(
            "the Bootstrap moves status/metrics to {}/{}; the probes, Service and annotations use {STATUS_PORT}/{METRICS_PORT}",
            embedded.status_port, embedded.metrics_port
        ));
    }

    // Probes: readiness is the drain signal; liveness must survive a drain.
    let readiness_port = at(container, &["readinessProbe", "httpGet", "port"])
        .and_then(|p| resolve_port(p, container));
    if readiness_port != Some(STATUS_PORT)
        || str_at(container, &["readinessProbe", "httpGet", "path"]) != Some(READY_PATH)
    {
        problems.push(format!(
            "readinessProbe must GET {READY_PATH} on {STATUS_PORT} (503 while draining takes the pod out of the Service)"
        ));
    }
    let liveness_port = at(container, &["livenessProbe", "tcpSocket", "port"])
        .or_else(|| at(container, &["livenessProbe", "httpGet", "port"]))
        .and_then(|p| resolve_port(p, container));
    if liveness_port != Some(STATUS_PORT) {
        problems.push(format!(
            "livenessProbe must check port {STATUS_PORT} (tcpSocket or httpGet)"
        ));
    }
    if str_at(container, &["livenessProbe", "httpGet", "path"]) == Some(READY_PATH) {
        problems.push(format!(
            "livenessProbe uses {READY_PATH}, which answers 503 during a drain: the kubelet would kill a draining pod"
        ));
    }

    // Drain: preStop sleep, then SIGTERM and drainDuration, all inside the grace period.
    let pre_stop = at(container, &["lifecycle", "preStop"]);
    if pre_stop.and_then(|p| at(p, &["exec"])).is_some() {
        problems.push(
            "preStop uses exec, but the distroless image has no shell or sleep binary: use lifecycle.preStop.sleep"
                .into(),
        );
    }
    let pre_stop_secs = pre_stop
        .and_then(|p| int_at(p, &["sleep", "seconds"]))
        .unwrap_or(0);
    if pre_stop_secs < 1 {
        problems.push(
            "no lifecycle.preStop.sleep: the pod would stop accepting before load balancers stop sending to it"
                .into(),
        );
    }
    let grace = int_at(pod_spec, &["terminationGracePeriodSeconds"]).unwrap_or(30);
    let needed = pre_stop_secs as f64 + embedded.drain_secs;
    if (grace as f64) <= needed {
        problems.push(format!(
            "terminationGracePeriodSeconds {grace} must exceed preStop sleep {pre_stop_secs}s + drainDuration {}s = {needed}s, or the kubelet kills live connections",
            embedded.drain_secs
        ));
    }

    // Security context: non-root, read-only, no privileges.
    let secured = |path: &[&str]| {
        at(container, &[&["securityContext"], path].concat())
            .or_else(|| at(pod_spec, &[&["securityContext"], path].concat()))
    };
    if secured(&["runAsNonRoot"]).and_then(YamlOwned::as_bool) != Some(true) {
        problems.push("securityContext.runAsNonRoot is not true".into());
    }
    if secured(&["runAsUser"]).and_then(YamlOwned::as_integer) == Some(0) {
        problems.push("securityContext.runAsUser is 0 (root)".into());
    }
    if at(container, &["securityContext", "readOnlyRootFilesystem"]).and_then(YamlOwned::as_bool)
        != Some(true)
    {
        problems.push("container securityContext.readOnlyRootFilesystem is not true".into());
    }
    if at(container, &["securityContext", "allowPrivilegeEscalation"]).and_then(YamlOwned::as_bool)
        != Some(false)
    {
        problems.push("container securityContext.allowPrivilegeEscalation is not false".into());
    }
    if !seq(container, &["securityContext", "capabilities", "drop"])
        .iter()
        .any(|c| c.as_str() == Some("ALL"))
    {
        problems.push("container securityContext.capabilities.drop lacks ALL".into());
    }
    for path in [
        ["requests", "cpu"],
        ["requests", "memory"],
        ["limits", "cpu"],
        ["limits", "memory"],
    ] {
        if at(container, &[&["resources"], &path[..]].concat()).is_none() {
            problems.push(format!("container resources.{} is not set", path.join(".")));
        }
    }

    // Prometheus scrape annotations.
    let metrics_port = METRICS_PORT.to_string();
    for (key, value) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", metrics_port.as_str()),
        ("prometheus.io/path", METRICS_PATH),
    ] {
        if annotations.get(key).map(String::as_str) != Some(value) {
            problems.push(format!("pod template annotation {key} should be {value:?}"));
        }
    }

    // Service: the network gateway istiod finds by its label.
    if str_at(service, &["metadata", "name"]) != Some("istio-eastwestgateway") {
        problems.push("the Service should be named istio-eastwestgateway, as Istio's is".into());
    }
    if str_at(service, &["spec", "type"]) != Some("LoadBalancer") {
        problems.push("the Service is not type LoadBalancer".into());
    }
    let service_selector = labels(at(service, &["spec", "selector"]));
    if !selects(&service_selector, &pod_labels) {
        problems.push(format!(
            "Service selector {service_selector:?} does not match the gateway pods {pod_labels:?}"
        ));
    }
    let service_labels = labels(at(service, &["metadata", "labels"]));
    if service_labels.get(NETWORK_LABEL) != pod_labels.get(NETWORK_LABEL)
        || !service_labels.contains_key(NETWORK_LABEL)
    {
        problems.push(format!(
            "Service label {NETWORK_LABEL}={:?} must name the pods' network {:?}: istiod finds network gateways by it",
            service_labels.get(NETWORK_LABEL),
            pod_labels.get(NETWORK_LABEL)
        ));
    }
    for (name, port) in [
        ("tls", DATA_PORT),
        ("tls-hbone", HBONE_PORT),
        ("tls-istiod", ISTIOD_PORT),
        ("tls-webhook", WEBHOOK_PORT),
        ("status-port", STATUS_PORT),
    ] {
        let found = seq(service, &["spec", "ports"])
            .iter()
            .find(|p| str_at(p, &["name"]) == Some(name) && int_at(p, &["port"]) == Some(port));
        match found {
            None => problems.push(format!("Service lacks port {name} {port}")),
            Some(p) => {
                let target = at(p, &["targetPort"])
                    .and_then(|t| resolve_port(t, container))
                    .unwrap_or(port);
                if target != port {
                    problems.push(format!(
                        "Service port {name} targets {target}; the gateway listens on {port}"
                    ));
                }
            }
        }
    }

    // PodDisruptionBudget and autoscaler.
    let pdb_selector = labels(at(pdb, &["spec", "selector", "matchLabels"]));
    if !selects(&pdb_selector, &pod_labels) {
        problems.push(format!(
            "PodDisruptionBudget selector {pdb_selector:?} does not match the gateway pods"
        ));
    }
    match int_at(pdb, &["spec", "minAvailable"]) {
        Some(n) if n >= 1 && n < replicas => {}
        other => problems.push(format!(
            "PodDisruptionBudget minAvailable {other:?} should be at least 1 and below replicas {replicas}, or node drains block"
        )),
    }
    if str_at(hpa, &["spec", "scaleTargetRef", "kind"]) != Some("Deployment")
        || str_at(hpa, &["spec", "scaleTargetRef", "apiVersion"]) != Some("apps/v1")
        || str_at(hpa, &["spec", "scaleTargetRef", "name"]) != Some(deployment_name)
    {
        problems.push(format!(
            "HorizontalPodAutoscaler scaleTargetRef must be apps/v1 Deployment {deployment_name}"
        ));
    }
    let min_replicas = int_at(hpa, &["spec", "minReplicas"]).unwrap_or(1);
    let max_replicas = int_at(hpa, &["spec", "maxReplicas"]).unwrap_or(0);
    if min_replicas < 2 || max_replicas < min_replicas {
        problems.push(format!(
            "HorizontalPodAutoscaler replicas {min_replicas}..{max_replicas}: keep at least 2"
        ));
    }
    if !seq(hpa, &["spec", "metrics"]).iter().any(|m| {
        str_at(m, &["type"]) == Some("Resource") && str_at(m, &["resource", "name"]) == Some("cpu")
    }) {
        problems.push("HorizontalPodAutoscaler does not scale on cpu".into());
    }
    problems
}

// ---------------------------------------------------------------------------------------
// `strait check` on what the manifests carry.

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "strait-deploy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The pod the Deployment's downward-API env is filled from.
const POD_IP: &str = "10.0.0.1";
const POD_NAME: &str = "istio-eastwestgateway-5d9c8b7f6-abcde";

/// Runs `strait check -c PATH` with only `env` set; any diagnostic or a failure is a problem.
fn strait_check(path: &Path, env: &BTreeMap<String, String>, what: &str) -> Vec<String> {
    let out = match std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("check")
        .arg("-c")
        .arg(path)
        .env_clear()
        .envs(env)
        .output()
    {
        Ok(out) => out,
        Err(e) => return vec![format!("cannot run strait check on {what}: {e}")],
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && stdout.trim().is_empty() {
        return Vec::new();
    }
    vec![format!(
        "strait check on {what} (env {env:?}) {}:\n{}{}",
        if out.status.success() {
            "warns"
        } else {
            "fails"
        },
        stdout,
        stderr.trim_end()
    )]
}

/// `strait check` on the ConfigMap's files, with the environment the Deployment gives the
/// container: its literal values, and the downward-API fields of a pod with IP 10.0.0.1.
fn strait_check_problems(manifest: &str) -> Vec<String> {
    let docs = match load_docs(manifest) {
        Ok(docs) => docs,
        Err(e) => return vec![e],
    };
    let find = |kind: &str| docs.iter().find(|d| str_at(d, &["kind"]) == Some(kind));
    let (Some(config_map), Some(deployment)) = (find("ConfigMap"), find("Deployment")) else {
        return vec!["the manifest needs a ConfigMap and a Deployment".into()];
    };
    let pod_spec = at(deployment, &["spec", "template", "spec"]);
    let container = pod_spec.and_then(|p| seq(p, &["containers"]).first());
    let mut env = BTreeMap::new();
    for entry in container.map(|c| seq(c, &["env"])).unwrap_or(&[]) {
        let Some(name) = str_at(entry, &["name"]) else {
            continue;
        };
        let value = match str_at(entry, &["valueFrom", "fieldRef", "fieldPath"]) {
            Some("metadata.name") => Some(POD_NAME.to_string()),
            Some("metadata.namespace") => {
                str_at(deployment, &["metadata", "namespace"]).map(str::to_string)
            }
            Some("status.podIP") => Some(POD_IP.to_string()),
            Some("spec.serviceAccountName") => pod_spec
                .and_then(|p| str_at(p, &["serviceAccountName"]))
                .map(str::to_string),
            Some(_) => None,
            None => at(entry, &["value"]).and_then(scalar_string),
        };
        if let Some(value) = value {
            env.insert(name.to_string(), value);
        }
    }
    let scratch = Scratch::new("configmap");
    for (key, value) in at(config_map, &["data"])
        .and_then(YamlOwned::as_mapping)
        .into_iter()
        .flatten()
    {
        let key = scalar_string(key).unwrap_or_default();
        if key.contains('/') || key.starts_with('.') {
            return vec![format!("ConfigMap key {key:?} is not a file name")];
        }
        std::fs::write(scratch.0.join(&key), value.as_str().unwrap_or("")).unwrap();
    }
    strait_check(&scratch.0, &env, "the ConfigMap")
}

/// The Gateway applied to istiod for the xDS flavour: Istio's expose-services, selecting
/// the xDS manifest's pods by their labels and by the node LABELS the Bootstrap sends.
fn expose_services_problems(gateway: &str, manifest: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let docs = match (load_docs(gateway), load_docs(manifest)) {
        (Ok(g), Ok(m)) => (g, m),
        (Err(e), _) | (_, Err(e)) => return vec![e],
    };
    let (gateways, manifest) = docs;
    for doc in &gateways {
        let name = str_at(doc, &["metadata", "name"]).unwrap_or("?");
        if str_at(doc, &["kind"]) != Some("Gateway")
            || str_at(doc, &["apiVersion"]) != Some("networking.istio.io/v1")
        {
            problems.push(format!(
                "{name} is not a networking.istio.io/v1 Gateway: the file holds Istio's expose-services only"
            ));
        }
        if name != "cross-network-gateway"
            || str_at(doc, &["metadata", "namespace"]) != Some("istio-system")
        {
            problems.push(format!(
                "Gateway {name} should be istio-system/cross-network-gateway, as Istio's expose-services"
            ));
        }
    }
    let deployment = manifest
        .iter()
        .find(|d| str_at(d, &["kind"]) == Some("Deployment"));
    let pod_labels =
        labels(deployment.and_then(|d| at(d, &["spec", "template", "metadata", "labels"])));
    passthrough_gateway_problems(&gateways, &pod_labels, &mut problems);
    // istiod falls back to the node LABELS when it cannot find the pod.
    if let Some(config_map) = manifest
        .iter()
        .find(|d| str_at(d, &["kind"]) == Some("ConfigMap"))
    {
        let node_labels = embedded_config_problems(
            config_map,
            &pod_labels,
            &BTreeMap::new(),
            Flavour::Xds,
            &mut Vec::new(),
        )
        .labels;
        for gateway in &gateways {
            let selector = labels(at(gateway, &["spec", "selector"]));
            if !selects(&selector, &node_labels) {
                problems.push(format!(
                    "Gateway selector {selector:?} does not match the Bootstrap's labels {node_labels:?} (node LABELS)"
                ));
            }
        }
    }
    let scratch = Scratch::new("gateway");
    let file = scratch.0.join("expose-services.yaml");
    std::fs::write(&file, gateway).unwrap();
    problems.extend(strait_check(&file, &BTreeMap::new(), EXPOSE_SERVICES));
    problems
}

// ---------------------------------------------------------------------------------------
// Tests on the files as committed.

fn assert_clean(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

#[test]
fn dockerfile_builds_strait_and_runs_it_as_nonroot_on_the_mounted_config() {
    for (manifest, _) in MANIFESTS {
        assert_clean(
            &format!("Dockerfile with {manifest}"),
            &dockerfile_problems(&read("Dockerfile"), &read(manifest), &read("Cargo.toml")),
        );
    }
}

#[test]
fn dockerignore_keeps_build_output_and_git_out_of_the_context() {
    assert_clean(
        ".dockerignore",
        &dockerignore_problems(&read(".dockerignore")),
    );
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_with_the_gateway() {
    for (manifest, flavour) in MANIFESTS {
        assert_clean(manifest, &manifest_problems(&read(manifest), flavour));
    }
}

#[test]
fn configmaps_pass_strait_check_with_the_pods_environment() {
    for (manifest, _) in MANIFESTS {
        assert_clean(manifest, &strait_check_problems(&read(manifest)));
    }
}

#[test]
fn expose_services_is_istios_gateway_and_selects_the_xds_gateway() {
    assert_clean(
        EXPOSE_SERVICES,
        &expose_services_problems(&read(EXPOSE_SERVICES), &read(XDS_MANIFEST)),
    );
}

/// `strait-eastwest-ambient.yaml` is one ConfigMap, the xDS manifest's `strait-config`
/// with `discovery.waypoint` added and nothing else changed: applied over the xDS manifest,
/// the whole still passes every xDS manifest check and `strait check` in the pod's
/// environment, and its Service exposes 15008 as `tls-hbone`.
#[test]
fn the_ambient_config_is_the_xds_configmap_with_a_waypoint_stream() {
    let overlay = read(AMBIENT_CONFIG);
    let docs = load_docs(&overlay).unwrap();
    assert_eq!(docs.len(), 1, "{AMBIENT_CONFIG}: one document");
    let config_map = &docs[0];
    assert_eq!(str_at(config_map, &["kind"]), Some("ConfigMap"));
    let xds = read(XDS_MANIFEST);
    let xds_docs = load_docs(&xds).unwrap();
    let xds_config_map = xds_docs
        .iter()
        .find(|d| str_at(d, &["kind"]) == Some("ConfigMap"))
        .unwrap();
    for field in [&["metadata", "name"][..], &["metadata", "namespace"]] {
        assert_eq!(
            str_at(config_map, field),
            str_at(xds_config_map, field),
            "{field:?}"
        );
    }
    assert_eq!(
        labels(at(config_map, &["metadata", "labels"])),
        labels(at(xds_config_map, &["metadata", "labels"]))
    );
    let bootstrap = |cm: &YamlOwned| {
        let mut problems = Vec::new();
        let docs = config_map_docs(cm, &mut problems);
        assert_clean("ConfigMap", &problems);
        docs.into_iter()
            .find(|d| str_at(d, &["kind"]) == Some("Bootstrap"))
            .expect("a Bootstrap")
    };
    let (ambient, plain) = (bootstrap(config_map), bootstrap(xds_config_map));
    let waypoint = at(&ambient, &["spec", "discovery", "waypoint"]);
    assert!(
        waypoint.is_some_and(|w| w.as_mapping().is_some()),
        "no discovery.waypoint"
    );
    // Without the waypoint, the same Bootstrap.
    let mut without = ambient.clone();
    if let Some(spec) = without
        .as_mapping_mut()
        .and_then(|m| {
            m.iter_mut()
                .find(|(k, _)| k.as_str() == Some("spec"))
                .map(|(_, v)| v)
        })
        .and_then(YamlOwned::as_mapping_mut)
    {
        for (k, v) in spec.iter_mut() {
            if k.as_str() == Some("discovery") {
                *v = load_docs("{}").unwrap().remove(0);
            }
        }
    }
    assert_eq!(without, plain, "only discovery.waypoint differs");
    // Applied over the xDS manifest.
    let applied: Vec<&str> = xds
        .split("\n---\n")
        .map(|d| {
            if d.contains("\nkind: ConfigMap\n") {
                overlay.as_str()
            } else {
                d
            }
        })
        .collect();
    let applied = applied.join("\n---\n");
    assert_clean(AMBIENT_CONFIG, &manifest_problems(&applied, Flavour::Xds));
    assert_clean(AMBIENT_CONFIG, &strait_check_problems(&applied));
    let service = load_docs(&applied)
        .unwrap()
        .into_iter()
        .find(|d| str_at(d, &["kind"]) == Some("Service"))
        .unwrap();
    assert!(
        seq(&service, &["spec", "ports"]).iter().any(|p| {
            str_at(p, &["name"]) == Some("tls-hbone") && int_at(p, &["port"]) == Some(15008)
        }),
        "the Service exposes 15008 as tls-hbone"
    );
}

#[test]
fn every_manifest_in_deploy_parses_and_names_its_objects() {
    let dir = repo_path("deploy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        seen += 1;
        let docs = load_docs(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!docs.is_empty(), "{} has no documents", path.display());
        for doc in &docs {
            for field in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
                assert!(
                    str_at(doc, field).is_some_and(|s| !s.is_empty()),
                    "{}: a document lacks {}",
                    path.display(),
                    field.join(".")
                );
            }
        }
    }
    assert!(seen >= 3, "{seen} manifests in {}", dir.display());
}

#[test]
fn deploy_readme_explains_the_drain_budget_and_the_replacement() {
    let readme = read("deploy/README.md");
    for needle in [
        "kubectl apply -f deploy/strait-eastwest.yaml",
        "drainDuration",
        "preStop",
        "terminationGracePeriodSeconds",
        "expose-services",
        NETWORK_LABEL,
        // The xDS flavour: what it needs and how to see that it works.
        "### Taking configuration from istiod (xDS)",
        "kubectl apply -f deploy/strait-eastwest-xds.yaml",
        "kubectl apply -f deploy/expose-services.yaml",
        ROOT_CERT_CONFIG_MAP,
        "audience `istio-ca`",
        "ISTIO_META_REQUESTED_NETWORK_VIEW",
        "config not received from XDS server",
        "/config_dump",
        "strait route --admin 127.0.0.1:15000",
        "strait_xds_connected",
        "strait_xds_responses_total",
        "strait_xds_resources",
        "strait_xds_last_update_timestamp_seconds",
        "strait_xds_stream_failures_total",
    ] {
        assert!(
            readme.contains(needle),
            "deploy/README.md does not mention {needle}"
        );
    }
}

/// README.md's "Running beside Istio" shows a Bootstrap with `discovery:`; it must pass
/// `strait check` in a pod's environment.
#[test]
fn readme_shows_a_discovery_bootstrap_that_checks() {
    let readme = read("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Running beside Istio"))
        .expect("README.md has a section \"Running beside Istio\"");
    assert!(
        section.contains("deploy/strait-eastwest-xds.yaml"),
        "README.md's Running beside Istio does not name deploy/strait-eastwest-xds.yaml"
    );
    let bootstrap = section
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("kind: Bootstrap") && b.contains("discovery:"))
        .expect("README.md's Running beside Istio shows no Bootstrap with discovery:");
    let scratch = Scratch::new("readme");
    let file = scratch.0.join("strait.yaml");
    std::fs::write(&file, bootstrap).unwrap();
    let env = BTreeMap::from([("INSTANCE_IP".to_string(), POD_IP.to_string())]);
    assert_clean(
        "README.md's discovery Bootstrap",
        &strait_check(&file, &env, "README.md's Bootstrap"),
    );
}

// ---------------------------------------------------------------------------------------
// Tests that the checks catch a broken copy of the files.

fn mutate(original: &str, from: &str, to: &str) -> String {
    assert!(
        original.contains(from),
        "mutation source {from:?} no longer appears in the file; update the test"
    );
    original.replacen(from, to, 1)
}

fn assert_caught(case: &str, problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "{case}: expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

/// Breaks that both manifests must catch: the same Deployment, Service, PDB and HPA.
#[test]
fn broken_manifests_are_caught() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "grace period shorter than the drain",
            "terminationGracePeriodSeconds: 60",
            "terminationGracePeriodSeconds: 50",
            "terminationGracePeriodSeconds",
        ),
        (
            "drain longer than the grace period",
            "drainDuration: 45s",
            "drainDuration: 1m",
            "terminationGracePeriodSeconds",
        ),
        (
            "unparseable drain",
            "drainDuration: 45s",
            "drainDuration: soon",
            "drainDuration",
        ),
        (
            "readiness on the wrong path",
            "path: /healthz/ready",
            "path: /healthz/live",
            "readinessProbe",
        ),
        (
            "readiness on the wrong port",
            "            path: /healthz/ready\n            port: 15021",
            "            path: /healthz/ready\n            port: 15090",
            "readinessProbe",
        ),
        (
            "liveness on the drain signal",
            "tcpSocket:\n            port: 15021",
            "httpGet:\n            path: /healthz/ready\n            port: 15021",
            "during a drain",
        ),
        (
            "metrics port not declared",
            "containerPort: 15090",
            "containerPort: 15091",
            "15090",
        ),
        (
            "Deployment selector off its pods",
            "  selector:\n    matchLabels:\n      app: istio-eastwestgateway",
            "  selector:\n    matchLabels:\n      app: istio-ingressgateway",
            "Deployment selector",
        ),
        (
            "Service selector off the pods",
            "  type: LoadBalancer\n  selector:\n    app: istio-eastwestgateway",
            "  type: LoadBalancer\n  selector:\n    app: istio-ingressgateway",
            "Service selector",
        ),
        (
            "Service in another network",
            "    topology.istio.io/network: network1\nspec:\n  type: LoadBalancer",
            "    topology.istio.io/network: network2\nspec:\n  type: LoadBalancer",
            "Service label",
        ),
        (
            "Service not a LoadBalancer",
            "type: LoadBalancer",
            "type: ClusterIP",
            "LoadBalancer",
        ),
        (
            "PDB selector off the pods",
            "  minAvailable: 1\n  selector:\n    matchLabels:\n      app: istio-eastwestgateway",
            "  minAvailable: 1\n  selector:\n    matchLabels:\n      app: other",
            "PodDisruptionBudget selector",
        ),
        (
            "HPA aimed at another Deployment",
            "    name: istio-eastwestgateway\n  minReplicas",
            "    name: istio-ingressgateway\n  minReplicas",
            "scaleTargetRef",
        ),
        (
            "Bootstrap in another network",
            "      network: network1",
            "      network: network2",
            "the Bootstrap says network",
        ),
        (
            "writable root filesystem",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
            "readOnlyRootFilesystem",
        ),
        (
            "capabilities kept",
            "drop: [ALL]",
            "drop: [NET_RAW]",
            "capabilities",
        ),
        (
            "preStop through a shell",
            "            sleep:\n              seconds: 10",
            "            exec:\n              command: [sleep, \"10\"]",
            "distroless",
        ),
        (
            "single replica",
            "  replicas: 2",
            "  replicas: 1",
            "replicas",
        ),
        (
            "no scrape annotation",
            "prometheus.io/path: /stats/prometheus",
            "prometheus.io/path: /metrics",
            "prometheus.io/path",
        ),
    ];
    for (manifest, flavour) in MANIFESTS {
        let text = read(manifest);
        for (case, from, to, needle) in cases {
            let broken = mutate(&text, from, to);
            assert_caught(
                &format!("{manifest}: {case}"),
                &manifest_problems(&broken, flavour),
                needle,
            );
        }
    }
}

#[test]
fn broken_file_manifests_are_caught() {
    let manifest = read(MANIFEST);
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "certificates elsewhere",
            "mountPath: /etc/certs",
            "mountPath: /var/run/certs",
            "certificates Secret",
        ),
        (
            "passthrough mode dropped",
            "tls: {mode: AUTO_PASSTHROUGH}",
            "tls: {mode: PASSTHROUGH}",
            "AUTO_PASSTHROUGH",
        ),
        (
            "passthrough on another port",
            "port: {number: 15443, name: tls, protocol: TLS}",
            "port: {number: 15444, name: tls, protocol: TLS}",
            "AUTO_PASSTHROUGH",
        ),
        (
            "service the Gateway does not admit",
            "hosts: [helloworld.sample.svc.cluster.local]",
            "hosts: [helloworld.example.com]",
            "not admitted",
        ),
        (
            "discovery turned on in the file flavour",
            "      drainDuration: 45s",
            "      drainDuration: 45s\n      discovery: {}",
            "spec.discovery",
        ),
    ];
    for (case, from, to, needle) in cases {
        let broken = mutate(&manifest, from, to);
        assert_caught(case, &manifest_problems(&broken, Flavour::Files), needle);
    }
}

const TOKEN_VOLUME: &str = "          - serviceAccountToken:
              path: istio-token
              audience: istio-ca";
const INSTANCE_IP_ENV: &str = "        - name: INSTANCE_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
";

#[test]
fn broken_xds_manifests_are_caught() {
    let manifest = read(XDS_MANIFEST);
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "no discovery",
            "      discovery: {}",
            "",
            "no spec.discovery",
        ),
        (
            "token for the Kubernetes API",
            "audience: istio-ca",
            "audience: https://kubernetes.default.svc",
            "audience",
        ),
        (
            "token without audience",
            TOKEN_VOLUME,
            "          - serviceAccountToken:\n              path: istio-token",
            "audience",
        ),
        (
            "token under another name",
            "path: istio-token",
            "path: token",
            "no serviceAccountToken at path istio-token",
        ),
        (
            "token mounted elsewhere",
            "mountPath: /var/run/secrets/tokens",
            "mountPath: /var/run/secrets/token",
            "/var/run/secrets/tokens/istio-token is in no volume mount",
        ),
        (
            "Bootstrap reads the token elsewhere",
            "      discovery: {}",
            "      discovery: {token: /var/run/secrets/kubernetes.io/serviceaccount/token}",
            "/var/run/secrets/kubernetes.io/serviceaccount/token is in no volume mount",
        ),
        (
            "token turned off",
            "      discovery: {}",
            "      discovery: {token: null}",
            "token is turned off",
        ),
        (
            "token through subPath",
            "        - name: istio-token\n          mountPath: /var/run/secrets/tokens",
            "        - name: istio-token\n          mountPath: /var/run/secrets/tokens/istio-token\n          subPath: istio-token",
            "subPath",
        ),
        (
            "plaintext istiod",
            "      discovery: {}",
            "      discovery: {address: \"http://istiod.istio-system.svc:15010\"}",
            "plaintext",
        ),
        (
            "root from another ConfigMap",
            "          name: istio-ca-root-cert",
            "          name: istio-root-cert",
            "not key root-cert.pem of ConfigMap istio-ca-root-cert",
        ),
        (
            "root mounted elsewhere",
            "mountPath: /var/run/secrets/istio",
            "mountPath: /etc/istio",
            "/var/run/secrets/istio/root-cert.pem is in no volume mount",
        ),
        (
            "Bootstrap reads the root elsewhere",
            "      discovery: {}",
            "      discovery: {rootCert: /var/run/secrets/istio/ca.crt}",
            "/var/run/secrets/istio/ca.crt is not key root-cert.pem",
        ),
        (
            "pod IP from the node",
            "fieldPath: status.podIP",
            "fieldPath: status.hostIP",
            "env INSTANCE_IP",
        ),
        ("no pod IP", INSTANCE_IP_ENV, "", "env INSTANCE_IP"),
        (
            "pod name from the namespace",
            "fieldPath: metadata.name",
            "fieldPath: metadata.namespace",
            "env POD_NAME",
        ),
        (
            "service account not set",
            "        - name: SERVICE_ACCOUNT",
            "        - name: SERVICE_ACCOUNT_NAME",
            "env SERVICE_ACCOUNT",
        ),
        (
            "namespace from a literal",
            "        - name: POD_NAMESPACE\n          valueFrom:\n            fieldRef:\n              fieldPath: metadata.namespace",
            "        - name: POD_NAMESPACE\n          value: istio-system",
            "env POD_NAMESPACE",
        ),
        (
            "metadata in another network",
            "        - name: ISTIO_META_NETWORK\n          value: network1",
            "        - name: ISTIO_META_NETWORK\n          value: network2",
            "env ISTIO_META_NETWORK",
        ),
        (
            "network view beyond the own network",
            "        - name: ISTIO_META_REQUESTED_NETWORK_VIEW\n          value: network1",
            "        - name: ISTIO_META_REQUESTED_NETWORK_VIEW\n          value: network1,network2",
            "env ISTIO_META_REQUESTED_NETWORK_VIEW",
        ),
        (
            "cluster id not the Bootstrap's cluster",
            "        - name: ISTIO_META_CLUSTER_ID\n          value: cluster1",
            "        - name: ISTIO_META_CLUSTER_ID\n          value: Kubernetes",
            "cluster Kubernetes",
        ),
        (
            "no selector label in the Bootstrap",
            "        istio: eastwestgateway\n        app: istio-eastwestgateway\n        topology.istio.io/network: network1",
            "        app: istio-eastwestgateway\n        topology.istio.io/network: network1",
            "labels lack istio: eastwestgateway",
        ),
        (
            "Bootstrap label the pods do not carry",
            "        topology.istio.io/network: network1\n      # The defaults",
            "        topology.istio.io/network: network1\n        version: v2\n      # The defaults",
            "label version: v2 is not the pods'",
        ),
        (
            "Gateway in the ConfigMap",
            "      discovery: {}\n",
            "      discovery: {}\n    ---\n    apiVersion: networking.istio.io/v1\n    kind: Gateway\n    metadata: {name: cross-network-gateway, namespace: istio-system}\n    spec:\n      selector: {istio: eastwestgateway}\n      servers:\n      - port: {number: 15443, name: tls, protocol: TLS}\n        tls: {mode: AUTO_PASSTHROUGH}\n        hosts: [\"*.local\"]\n",
            "declares Gateway cross-network-gateway",
        ),
        (
            "ServiceEntry in the ConfigMap",
            "      discovery: {}\n",
            "      discovery: {}\n    ---\n    apiVersion: networking.istio.io/v1\n    kind: ServiceEntry\n    metadata: {name: helloworld, namespace: sample}\n    spec:\n      hosts: [helloworld.sample.svc.cluster.local]\n      ports:\n      - {number: 5000, name: http, protocol: HTTP}\n      resolution: DNS\n",
            "declares ServiceEntry helloworld",
        ),
        (
            "certificates from files again",
            "      certificates:\n        ca: {}\n",
            "",
            "no certificates.ca",
        ),
    ];
    for (case, from, to, needle) in cases {
        let broken = mutate(&manifest, from, to);
        assert_caught(case, &manifest_problems(&broken, Flavour::Xds), needle);
    }
    // A certificates Secret mounted beside certificates.ca: nothing reads it.
    let with_secret = mutate(
        &mutate(
            &manifest,
            "        - name: istio-token\n          mountPath: /var/run/secrets/tokens\n",
            "        - name: certs\n          mountPath: /etc/certs\n        - name: istio-token\n          mountPath: /var/run/secrets/tokens\n",
        ),
        "      - name: config\n        configMap:\n          name: strait-config\n",
        "      - name: config\n        configMap:\n          name: strait-config\n      - name: certs\n        secret:\n          secretName: strait-certs\n          optional: true\n",
    );
    assert_caught(
        "a Secret nothing reads",
        &manifest_problems(&with_secret, Flavour::Xds),
        "nothing reads it",
    );
    // The file flavour's ConfigMap is not an xDS one.
    assert_caught(
        "file flavour checked as xDS",
        &manifest_problems(&read(MANIFEST), Flavour::Xds),
        "no spec.discovery",
    );
}

/// `strait check` runs on the ConfigMap with the Deployment's env: a Bootstrap strait rejects
/// fails, and so does a Deployment that does not give strait the pod IP.
#[test]
fn configmaps_strait_rejects_are_caught() {
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            MANIFEST,
            "unparseable drain",
            "drainDuration: 45s",
            "drainDuration: soon",
            "drainDuration",
        ),
        (
            MANIFEST,
            "unknown Gateway field",
            "tls: {mode: AUTO_PASSTHROUGH}",
            "tls: {mode: AUTO_PASSTHROUGH, credentialNames: [x]}",
            "credentialNames",
        ),
        (
            XDS_MANIFEST,
            "no pod IP",
            INSTANCE_IP_ENV,
            "",
            "INSTANCE_IP",
        ),
        (
            XDS_MANIFEST,
            "unknown protocol",
            "      discovery: {}",
            "      discovery: {protocol: GRPC}",
            "not DELTA or SOTW",
        ),
        (
            XDS_MANIFEST,
            "misspelt discovery field",
            "      discovery: {}",
            "      discovery: {rootCerts: /var/run/secrets/istio/root-cert.pem}",
            "rootCerts",
        ),
    ];
    for (manifest, case, from, to, needle) in cases {
        let broken = mutate(&read(manifest), from, to);
        assert_caught(
            &format!("{manifest}: {case}"),
            &strait_check_problems(&broken),
            needle,
        );
    }
}

#[test]
fn broken_expose_services_are_caught() {
    let gateway = read(EXPOSE_SERVICES);
    let manifest = read(XDS_MANIFEST);
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "selector off the pods",
            "    istio: eastwestgateway",
            "    istio: ingressgateway",
            "does not match the gateway's labels",
        ),
        (
            "passthrough mode dropped",
            "mode: AUTO_PASSTHROUGH",
            "mode: PASSTHROUGH",
            "AUTO_PASSTHROUGH",
        ),
        (
            "passthrough on another port",
            "number: 15443",
            "number: 15444",
            "AUTO_PASSTHROUGH",
        ),
        (
            "another name",
            "name: cross-network-gateway",
            "name: eastwest",
            "istio-system/cross-network-gateway",
        ),
        (
            "older Istio API",
            "apiVersion: networking.istio.io/v1",
            "apiVersion: networking.istio.io/v1beta1",
            "not a networking.istio.io/v1 Gateway",
        ),
        (
            "field strait does not know",
            "    tls:\n      mode: AUTO_PASSTHROUGH",
            "    tls:\n      mode: AUTO_PASSTHROUGH\n      minProtocolVersion: TLSV2_0",
            "strait check",
        ),
    ];
    for (case, from, to, needle) in cases {
        let broken = mutate(&gateway, from, to);
        assert_caught(case, &expose_services_problems(&broken, &manifest), needle);
    }
    // The selector must also match the node LABELS the Bootstrap sends.
    let unlabelled = mutate(
        &manifest,
        "        istio: eastwestgateway\n        app: istio-eastwestgateway\n        topology.istio.io/network: network1",
        "        app: istio-eastwestgateway\n        topology.istio.io/network: network1",
    );
    assert_caught(
        "Bootstrap without the selected label",
        &expose_services_problems(&gateway, &unlabelled),
        "node LABELS",
    );
}

#[test]
fn broken_dockerfiles_are_caught() {
    let dockerfile = read("Dockerfile");
    let manifest = read(MANIFEST);
    let cargo_toml = read("Cargo.toml");
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "runtime with a full OS",
            "FROM gcr.io/distroless/cc-debian12:nonroot",
            "FROM debian:bookworm-slim",
            "distroless",
        ),
        ("root user", "USER 65532:65532", "USER root", "USER"),
        ("uid 0", "USER 65532:65532", "USER 0", "root"),
        (
            "metrics port not exposed",
            "EXPOSE 15443 15008 15012 15017 15021 15090",
            "EXPOSE 15443 15008 15012 15017 15021",
            "EXPOSE",
        ),
        (
            "admin port exposed",
            "EXPOSE 15443 15008 15012 15017 15021 15090",
            "EXPOSE 15443 15008 15012 15017 15021 15090 15000",
            "EXPOSE",
        ),
        (
            "debug binary copied",
            "/build/target/release/strait",
            "/build/target/debug/strait",
            "produces /build/target/release/strait",
        ),
        (
            "cross-compiled output not where COPY looks",
            "    && cargo build --release --locked",
            "    && cargo build --release --locked --target x86_64-unknown-linux-musl",
            "x86_64-unknown-linux-musl/release/strait",
        ),
        (
            "unlocked build",
            "    && cargo build --release --locked",
            "    && cargo build --release",
            "--locked",
        ),
        (
            "config directory the Deployment does not mount",
            "CMD [\"run\", \"-c\", \"/etc/strait\"]",
            "CMD [\"run\", \"-c\", \"/etc/config\"]",
            "mounts the ConfigMap at /etc/strait",
        ),
        (
            "shell-form entrypoint",
            "ENTRYPOINT [\"/usr/local/bin/strait\"]",
            "ENTRYPOINT /usr/local/bin/strait",
            "shell form",
        ),
        (
            "real sources never copied",
            "COPY . .\n# COPY keeps",
            "# COPY keeps",
            "COPY of the sources",
        ),
        (
            "builder newer than the runtime's glibc",
            "FROM rust:1-slim-bookworm AS builder",
            "FROM rust:1-slim-trixie AS builder",
            "glibc",
        ),
        (
            "RUN in distroless",
            "USER 65532:65532",
            "RUN chmod 0755 /usr/local/bin/strait\nUSER 65532:65532",
            "no shell",
        ),
    ];
    for (case, from, to, needle) in cases {
        let broken = mutate(&dockerfile, from, to);
        assert_caught(
            case,
            &dockerfile_problems(&broken, &manifest, &cargo_toml),
            needle,
        );
    }

    // The Deployment can also break the agreement by overriding the image's command.
    for (manifest, _) in MANIFESTS {
        let overridden = mutate(
            &read(manifest),
            "        imagePullPolicy: IfNotPresent\n",
            "        imagePullPolicy: IfNotPresent\n        args: [run, -c, /etc/other]\n",
        );
        assert_caught(
            &format!("{manifest}: Deployment args point elsewhere"),
            &dockerfile_problems(&dockerfile, &overridden, &cargo_toml),
            "reads its config from /etc/other",
        );
        let root = mutate(
            &read(manifest),
            "        runAsUser: 65532",
            "        runAsUser: 1337",
        );
        assert_caught(
            &format!("{manifest}: another uid"),
            &dockerfile_problems(&dockerfile, &root, &cargo_toml),
            "runAsUser 1337",
        );
    }
    let renamed = mutate(&cargo_toml, "name = \"strait\"", "name = \"straits\"");
    assert_caught(
        "package renamed",
        &dockerfile_problems(&dockerfile, &manifest, &renamed),
        "not strait",
    );
    assert_caught(
        ".dockerignore without target",
        &dockerignore_problems(".git\nfuzz/target\n"),
        "target",
    );
}

// ---------------------------------------------------------------------------------------
// The readers themselves.

#[test]
fn durations_use_istio_forms() {
    assert_eq!(parse_duration_secs("45s"), Some(45.0));
    assert_eq!(parse_duration_secs("500ms"), Some(0.5));
    assert_eq!(parse_duration_secs("1m30s"), Some(90.0));
    assert_eq!(parse_duration_secs("1h"), Some(3600.0));
    assert_eq!(parse_duration_secs("45"), None);
    assert_eq!(parse_duration_secs("s"), None);
    assert_eq!(parse_duration_secs(""), None);
    assert_eq!(parse_duration_secs("10x"), None);
}

#[test]
fn dockerfile_reader_joins_continuations_and_skips_comments() {
    let text = "# syntax comment\nFROM a AS b\nRUN one \\\n  # inner comment\n  two\n\nCOPY --from=b /x /y\nFROM c\n";
    let instructions = parse_dockerfile(text);
    let shown: Vec<(String, String, usize)> = instructions
        .iter()
        .map(|i| (i.keyword.clone(), i.args.clone(), i.line))
        .collect();
    assert_eq!(
        shown,
        vec![
            ("FROM".into(), "a AS b".into(), 2),
            ("RUN".into(), "one two".into(), 3),
            ("COPY".into(), "--from=b /x /y".into(), 7),
            ("FROM".into(), "c".into(), 8),
        ]
    );
    let stages = stages(&instructions);
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].name.as_deref(), Some("b"));
    assert_eq!(stages[1].base, "c");
    assert_eq!(
        copy_parts("--from=b --chown=1:1 /x /y"),
        (Some("b".into()), vec!["/x".into()], "/y".into())
    );
}

#[test]
fn cargo_output_follows_profile_target_and_target_dir() {
    assert_eq!(
        cargo_output("cargo build --release --locked", "/build", None),
        "/build/target/release/strait"
    );
    assert_eq!(
        cargo_output("cargo build --locked", "/build", None),
        "/build/target/debug/strait"
    );
    assert_eq!(
        cargo_output("cargo build --profile dist", "/src", None),
        "/src/target/dist/strait"
    );
    assert_eq!(
        cargo_output(
            "cargo build --release --target=aarch64-unknown-linux-gnu",
            "/b",
            None
        ),
        "/b/target/aarch64-unknown-linux-gnu/release/strait"
    );
    assert_eq!(
        cargo_output("cargo build --release", "/b", Some("/out")),
        "/out/release/strait"
    );
}

#[test]
fn gateway_hosts_match_like_istio() {
    assert!(gateway_host_matches(
        "*.local",
        "reviews.default.svc.cluster.local"
    ));
    assert!(gateway_host_matches("*", "anything.example"));
    assert!(gateway_host_matches("ns/*.local", "a.b.local"));
    assert!(gateway_host_matches("a.b.local", "a.b.local"));
    assert!(!gateway_host_matches("*.local", "reviews.example.com"));
    assert!(!gateway_host_matches("a.b.local", "c.b.local"));
}
