//! The arrows between strait's modules run one way, as `src/lib.rs` tells them: each
//! top-level module imports only from the floors below its own, and no two modules import
//! each other, but for the pairs named here with the reason (also said where they meet).
//!
//! Read from the source as written: every `crate::…` and `super::…` path outside comments
//! and test modules, in `use` trees and in expressions alike.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The floors of `src/lib.rs`, from the ground up.
const FLOORS: &[&[&str]] = &[
    &["model"],
    &["tls", "route", "telemetry", "policy"],
    &["config", "upstream"],
    &["xds"],
    &["proxy"],
    &["admin", "identity"],
    &["cli"],
];

/// Modules that import each other on purpose, and why.
const BOTH_WAYS: &[(&str, &str, &str)] = &[
    (
        "config::document",
        "config::gateway_api",
        "the envelope dispatches to the kind readers, which take its `Meta`",
    ),
    (
        "config::document",
        "config::istio",
        "the envelope dispatches to the kind readers, which take its `Meta`",
    ),
    (
        "config::document",
        "config::strait",
        "the envelope dispatches to the kind readers, which take its `Meta`",
    ),
    (
        "config::document",
        "config::virtual_service",
        "the envelope dispatches to the kind readers, which take its `Meta`",
    ),
];

/// Every module of `src/` (`a::b` for `src/a/b.rs` and `src/a/b/mod.rs`) and its source,
/// comments and `#[cfg(test)]` modules removed.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                if name != "mod" {
                    p.push(name);
                }
                if p.is_empty() || p == ["lib"] || p == ["main"] {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                out.insert(p.join("::"), code_of(&text));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut out,
    );
    out
}

/// The source without line comments and without what follows the first `#[cfg(test)]`.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that starts with `crate` or `super` in `code`, `use` trees expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // `use` statements first, as trees.
    let mut rest = code;
    let mut plain = String::new();
    while let Some(i) = find_word(rest, "use") {
        let tree = rest[i + 3..].trim_start();
        if !(tree.starts_with("crate::") || tree.starts_with("super::")) {
            plain.push_str(&rest[..i + 3]);
            rest = &rest[i + 3..];
            continue;
        }
        plain.push_str(&rest[..i]);
        let stmt_end = rest[i..].find(';').map_or(rest.len(), |e| i + e);
        expand(&rest[i + 3..stmt_end], &[], &mut out);
        rest = &rest[(stmt_end + 1).min(rest.len())..];
    }
    plain.push_str(rest);
    // Then paths in expressions and types.
    let chars: Vec<char> = plain.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        let word: String = chars[i..]
            .iter()
            .take_while(|c| c.is_alphanumeric() || **c == '_' || **c == ':')
            .collect();
        if boundary && (word.starts_with("crate::") || word.starts_with("super::")) {
            out.push(
                word.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
        i += word.len().max(1);
    }
    out.retain(|p| p.first().is_some_and(|s| s == "crate" || s == "super"));
    out
}

fn find_word(s: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(word) {
        let at = from + i;
        let before = s[..at].chars().next_back();
        let after = s[at + word.len()..].chars().next();
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && after.is_some_and(char::is_whitespace)
        {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// Expands one `use` tree (`a::b::{c, d::{e, f}}`) under `prefix`.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    let (head, group) = match tree.find('{') {
        Some(i) => (
            &tree[..i],
            Some(&tree[i + 1..tree.rfind('}').unwrap_or(tree.len())]),
        ),
        None => (tree, None),
    };
    let mut path = prefix.to_vec();
    path.extend(
        head.split("::")
            .map(|s| s.split(" as ").next().unwrap_or("").trim())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    );
    match group {
        None => out.push(path),
        Some(group) => {
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&group[start..i], &path, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&group[start..], &path, out);
        }
    }
}

/// The module a path names (its longest prefix that is a module), seen from `from`.
fn target(from: &str, path: &[String], modules: &BTreeMap<String, String>) -> Option<String> {
    let mut full: Vec<String> = Vec::new();
    let mut segs = path.iter().peekable();
    match segs.next().map(String::as_str) {
        Some("crate") => {}
        Some("super") => {
            full = from.split("::").map(str::to_string).collect();
            full.pop();
            while segs.peek().is_some_and(|s| *s == "super") {
                segs.next();
                full.pop();
            }
        }
        _ => return None,
    }
    full.extend(segs.cloned());
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

fn imports() -> BTreeSet<(String, String)> {
    let modules = modules();
    let mut edges = BTreeSet::new();
    for (from, code) in &modules {
        for p in paths(code) {
            if let Some(to) = target(from, &p, &modules) {
                // A module's own items, and its ancestors' (`super::Shared`), are no arrow.
                if to != *from && !from.starts_with(&format!("{to}::")) {
                    edges.insert((from.clone(), to));
                }
            }
        }
    }
    edges
}

fn floor(module: &str) -> usize {
    let top = module.split("::").next().unwrap();
    FLOORS
        .iter()
        .position(|f| f.contains(&top))
        .unwrap_or_else(|| panic!("`{top}` is on no floor: add it to src/lib.rs and FLOORS"))
}

#[test]
fn every_top_level_module_imports_only_from_the_floors_below() {
    let imports = imports();
    // The reader sees something: the ground floor is used from above.
    assert!(
        imports
            .iter()
            .any(|(a, b)| a.starts_with("proxy") && b == "model")
    );
    let upward: Vec<String> = imports
        .iter()
        .filter(|(a, b)| a.split("::").next() != b.split("::").next() && floor(b) >= floor(a))
        .map(|(a, b)| format!("{a} -> {b}"))
        .collect();
    assert!(
        upward.is_empty(),
        "imports from the same floor or above:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_two_modules_import_each_other_without_a_reason() {
    let imports = imports();
    let mutual: Vec<String> = imports
        .iter()
        .filter(|(a, b)| a < b && imports.contains(&(b.clone(), a.clone())))
        .filter(|(a, b)| {
            !BOTH_WAYS
                .iter()
                .any(|(x, y, _)| (x, y) == (&a.as_str(), &b.as_str()))
        })
        .map(|(a, b)| format!("{a} <-> {b}"))
        .collect();
    assert!(
        mutual.is_empty(),
        "modules that import each other:\n{}",
        mutual.join("\n")
    );
    // Every pair allowed still imports both ways (else its entry is stale).
    for (a, b, why) in BOTH_WAYS {
        assert!(
            imports.contains(&(a.to_string(), b.to_string()))
                && imports.contains(&(b.to_string(), a.to_string())),
            "{a} and {b} no longer import each other ({why}): remove the entry"
        );
    }
}
