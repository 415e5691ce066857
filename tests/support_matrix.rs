//! `docs/fields.md` against the loader: every field it lists as honoured is one the loader
//! reads, every field the loader reads is listed, and every field the loader accepts without
//! acting on is listed as such (never as honoured).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use strait::config::{FieldUse, fields_seen};

/// One document of each kind with every mapping present (and no values), so the loader asks
/// for every field it knows. A kind that gains a nested mapping needs it added here.
const EVERY_MAPPING: &str = r#"
apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {}
spec:
  meshNetworks:
    networks:
      "<network>":
        gateways: [{}]
  certificates:
    ca: {}
  discovery:
    node: {}
    waypoint: {}
---
apiVersion: strait.dev/v1alpha1
kind: Bridge
metadata: {name: b}
spec: {}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g}
spec:
  servers:
  - port: {}
    tls: {}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ew}
spec:
  gatewayClassName: istio-east-west
  listeners:
  - protocol: HBONE
    tls:
      options: {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  tls: [{match: [{}], route: [{destination: {port: {}}}]}]
  tcp: [{match: [{}], route: [{destination: {port: {}}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
spec:
  ports: [{}]
  endpoints: [{}]
  workloadSelector: {}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: we}
spec: {}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr}
spec:
  trafficPolicy: &policy
    loadBalancer:
      localityLbSetting:
        distribute: [{to: {}}]
        failover: [{}]
    connectionPool: {tcp: {}}
    outlierDetection: {}
    tls: {}
    portLevelSettings:
    - port: {}
      loadBalancer:
        localityLbSetting:
          distribute: [{to: {}}]
          failover: [{}]
      connectionPool: {tcp: {}}
      outlierDetection: {}
      tls: {}
  subsets:
  - trafficPolicy: *policy
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa}
spec:
  selector: {}
  mtls: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ap}
spec:
  selector: {}
  rules:
  - from: [{source: {}}]
    to: [{operation: {}}]
    when: [{}]
---
apiVersion: v1
kind: List
metadata: {}
items: []
"#;

/// The `trafficPolicy` sections: the same fields at the top level, per port and per subset.
const SECTIONS: [&str; 4] = ["loadBalancer", "connectionPool", "outlierDetection", "tls"];

type Matrix = BTreeMap<(String, String), FieldUse>;

/// What the loader reads, in the shape `docs/fields.md` is written in: leaf fields only
/// (a mapping or list that holds fields is implied by them), the trafficPolicy sections once
/// under kind `trafficPolicy`, and `*` as `(all kinds)`.
fn from_loader() -> Matrix {
    let seen = fields_seen(EVERY_MAPPING);
    let is_container = |kind: &str, path: &str| {
        seen.keys().any(|(k, p)| {
            k == kind
                && p.len() > path.len()
                && p.starts_with(path)
                && (p[path.len()..].starts_with('.') || p[path.len()..].starts_with("[]"))
        })
    };
    let mut leaves: Matrix = seen
        .iter()
        .filter(|((k, p), _)| !is_container(k, p))
        .map(|((k, p), u)| {
            let k = if k == "*" { "(all kinds)" } else { k };
            ((k.to_string(), p.clone()), *u)
        })
        .collect();

    // A subset's trafficPolicy reads exactly what the top-level one reads.
    let dr = |m: &Matrix, prefix: &str| -> BTreeMap<String, FieldUse> {
        m.iter()
            .filter(|((k, _), _)| k == "DestinationRule")
            .filter_map(|((_, p), u)| p.strip_prefix(prefix).map(|rest| (rest.to_string(), *u)))
            .collect()
    };
    let top = dr(&leaves, "spec.trafficPolicy.");
    assert!(!top.is_empty(), "the fixture's trafficPolicy was not read");
    assert_eq!(dr(&leaves, "spec.subsets[].trafficPolicy."), top);
    // Each portLevelSettings entry reads the same sections as the top level.
    let section = |rest: &str| {
        SECTIONS
            .iter()
            .any(|s| rest == *s || rest.starts_with(&format!("{s}.")))
    };
    let top_sections: BTreeMap<String, FieldUse> = top
        .iter()
        .filter(|(rest, _)| section(rest))
        .map(|(r, u)| (r.clone(), *u))
        .collect();
    let port_sections: BTreeMap<String, FieldUse> =
        dr(&leaves, "spec.trafficPolicy.portLevelSettings[].")
            .into_iter()
            .filter(|(rest, _)| section(rest))
            .collect();
    assert_eq!(port_sections, top_sections);

    leaves.retain(|(k, p), _| {
        k != "DestinationRule"
            || !(p.starts_with("spec.subsets[].trafficPolicy.")
                || p.strip_prefix("spec.trafficPolicy.portLevelSettings[].")
                    .is_some_and(section)
                || p.strip_prefix("spec.trafficPolicy.").is_some_and(section))
    });
    for (rest, u) in top_sections {
        leaves.insert(("trafficPolicy".to_string(), rest), u);
    }
    leaves
}

/// The tables of `docs/fields.md`: rows `| Kind | `field` | … |` under the heading
/// "Honoured fields" are [`FieldUse::Read`]; under "Accepted but not acted on",
/// [`FieldUse::Accepted`].
fn from_docs() -> Matrix {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/fields.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut section = None;
    let mut out = Matrix::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(h) = line.strip_prefix("## ") {
            section = if h.starts_with("Honoured fields") {
                Some(FieldUse::Read)
            } else if h.starts_with("Accepted but not acted on") {
                Some(FieldUse::Accepted)
            } else {
                None
            };
            continue;
        }
        let Some(use_) = section else { continue };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| kind | field | what |` splits into ["", kind, field, what, ""].
        if cells.len() < 5 || cells[1] == "Kind" || cells[1].starts_with("---") {
            continue;
        }
        let field = cells[2]
            .strip_prefix('`')
            .and_then(|f| f.strip_suffix('`'))
            .unwrap_or_else(|| panic!("docs/fields.md:{}: field not in backticks: {line}", n + 1));
        assert!(
            !cells[3].is_empty(),
            "docs/fields.md:{}: no description",
            n + 1
        );
        let key = (cells[1].to_string(), field.to_string());
        assert!(
            out.insert(key, use_).is_none(),
            "docs/fields.md:{}: listed twice: {line}",
            n + 1
        );
    }
    out
}

fn show(rows: &[(&(String, String), &FieldUse)]) -> String {
    rows.iter()
        .map(|((k, p), u)| format!("  {k} `{p}` ({u:?})\n"))
        .collect()
}

#[test]
fn every_honoured_field_is_documented_and_every_documented_field_is_honoured() {
    let code = from_loader();
    let docs = from_docs();
    let read = |m: &Matrix| -> BTreeSet<(String, String)> {
        m.iter()
            .filter(|(_, u)| **u == FieldUse::Read)
            .map(|(k, _)| k.clone())
            .collect()
    };
    let (code_read, docs_read) = (read(&code), read(&docs));
    let undocumented: Vec<_> = code
        .iter()
        .filter(|(k, u)| **u == FieldUse::Read && !docs_read.contains(*k))
        .collect();
    let unread: Vec<_> = docs
        .iter()
        .filter(|(k, u)| **u == FieldUse::Read && !code_read.contains(*k))
        .collect();
    assert!(
        undocumented.is_empty() && unread.is_empty(),
        "docs/fields.md \"Honoured fields\" is out of step with the loader.\n\
         Read by the loader but not listed:\n{}Listed but not read by the loader:\n{}",
        show(&undocumented),
        show(&unread)
    );
}

#[test]
fn fields_accepted_without_effect_are_listed_as_such_never_as_honoured() {
    let code = from_loader();
    let docs = from_docs();
    let wrong: Vec<_> = code
        .iter()
        .filter(|(k, u)| **u == FieldUse::Accepted && docs.get(*k) != Some(&FieldUse::Accepted))
        .collect();
    let stale: Vec<_> = docs
        .iter()
        .filter(|(k, u)| **u == FieldUse::Accepted && code.get(*k) != Some(&FieldUse::Accepted))
        .collect();
    assert!(
        wrong.is_empty() && stale.is_empty(),
        "docs/fields.md \"Accepted but not acted on\" is out of step with the loader.\n\
         Accepted without effect but not listed there:\n{}Listed there but the loader does not accept it without effect:\n{}",
        show(&wrong),
        show(&stale)
    );
}

#[test]
fn the_fixture_reaches_every_kind() {
    let kinds: BTreeSet<String> = from_loader().into_keys().map(|(k, _)| k).collect();
    let expected = [
        "(all kinds)",
        "AuthorizationPolicy",
        "Bootstrap",
        "Bridge",
        "DestinationRule",
        "Gateway",
        "Gateway (gateway.networking.k8s.io)",
        "PeerAuthentication",
        "ServiceEntry",
        "VirtualService",
        "WorkloadEntry",
        "trafficPolicy",
    ];
    assert_eq!(kinds, expected.iter().map(|s| s.to_string()).collect());
}
