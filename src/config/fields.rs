//! Typed reading of YAML nodes: each read either yields a value or records a diagnostic at the
//! node's position, naming the field path (`spec.servers[0].port.number`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::diagnostics::{Loc, Sink};
use super::duration::parse_duration;
use super::yaml::{Key, Node, Value};

/// A field path, built on the stack as the walk descends; only formatted for diagnostics.
#[derive(Clone, Copy)]
pub(crate) struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Path<'a> {
    pub fn root(key: &'a str) -> Self {
        Path {
            parent: None,
            seg: Seg::Key(key),
        }
    }

    pub fn key(&'a self, key: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            seg: Seg::Key(key),
        }
    }

    pub fn index(&'a self, i: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            seg: Seg::Index(i),
        }
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.parent {
            p.fmt(f)?;
        }
        match self.seg {
            Seg::Key(k) if self.parent.is_some() => write!(f, ".{k}"),
            Seg::Key(k) => f.write_str(k),
            Seg::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// The fields of one mapping, tracking which were read so the rest can be reported.
pub(crate) struct Fields<'n, 'p> {
    entries: &'n [(Key, Node)],
    used: Vec<bool>,
    path: Path<'p>,
}

impl<'n, 'p> Fields<'n, 'p> {
    /// Opens a mapping; `null` reads as an empty one. Anything else is an error.
    pub fn of(sink: &mut Sink, node: &'n Node, path: Path<'p>) -> Option<Self> {
        let entries: &'n [(Key, Node)] = match &node.value {
            Value::Map(m) => m,
            Value::Null => &[],
            _ => {
                sink.error(
                    node.loc,
                    format!("{path}: expected a mapping, found {}", node.describe()),
                );
                return None;
            }
        };
        Some(Fields {
            used: vec![false; entries.len()],
            entries,
            path,
        })
    }

    pub fn path(&self) -> &Path<'p> {
        &self.path
    }

    /// The value of `key`, unless absent or `null`. Marks it read.
    pub fn get(&mut self, key: &str) -> Option<&'n Node> {
        self.get_entry(key).map(|(_, v)| v)
    }

    /// The key and value of `key`, unless absent or `null`. Marks it read.
    pub fn get_entry(&mut self, key: &str) -> Option<(&'n Key, &'n Node)> {
        record(&self.path, key, FieldUse::Read);
        let i = self.entries.iter().position(|(k, _)| k.name == key)?;
        self.used[i] = true;
        let (k, v) = &self.entries[i];
        (!v.is_null()).then_some((k, v))
    }

    /// Accepts these fields without using them and without comment.
    pub fn accept(&mut self, keys: &[&str]) {
        for key in keys {
            record(&self.path, key, FieldUse::Accepted);
        }
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if keys.contains(&k.name.as_str()) {
                self.used[i] = true;
            }
        }
    }

    /// Warns about these (valid Istio) fields, which strait does not act on.
    pub fn not_used(&mut self, sink: &mut Sink, keys: &[&str]) {
        for key in keys {
            record(&self.path, key, FieldUse::Accepted);
        }
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if keys.contains(&k.name.as_str()) && !self.used[i] {
                self.used[i] = true;
                if !v.is_null() {
                    sink.warn(
                        k.loc,
                        format!(
                            "field {} is not used by strait; ignored",
                            self.path.key(&k.name)
                        ),
                    );
                }
            }
        }
    }

    /// Warns about every field not read, accepted or reported so far.
    pub fn finish(self, sink: &mut Sink) {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if !self.used[i] {
                sink.warn(
                    k.loc,
                    format!("unknown field {}; ignored", self.path.key(&k.name)),
                );
            }
        }
    }

    /// Entries of the mapping (for maps keyed by user data, e.g. labels).
    pub fn entries(&self) -> &'n [(Key, Node)] {
        self.entries
    }
}

/// What the loader does with a field it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldUse {
    /// Read and acted on.
    Read,
    /// Valid, but not acted on (silently, or with a warning that it is ignored).
    Accepted,
}

/// The fields seen during one recorded load: (kind, field path) → use.
pub(crate) type Seen = BTreeMap<(String, String), FieldUse>;

struct Recorder {
    kind: String,
    seen: Seen,
}

thread_local! {
    /// Set only while [`record_fields`] runs, so ordinary loads pay one check per field read.
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Runs `load` while recording every field name the readers ask for.
pub(crate) fn record_fields(load: impl FnOnce()) -> Seen {
    RECORDER.with(|r| {
        *r.borrow_mut() = Some(Recorder {
            kind: "*".into(),
            seen: Seen::new(),
        })
    });
    load();
    RECORDER.with(|r| r.borrow_mut().take().map(|r| r.seen).unwrap_or_default())
}

/// Names the kind whose `spec` the following reads belong to.
pub(crate) fn record_kind(kind: &str) {
    RECORDER.with(|r| {
        if let Some(r) = r.borrow_mut().as_mut() {
            r.kind = kind.to_string();
        }
    });
}

fn record(path: &Path<'_>, key: &str, how: FieldUse) {
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let Some(r) = r.as_mut() else { return };
        // List positions do not name a field: `servers[2].port` is `servers[].port`.
        let mut field = String::new();
        let full = path.key(key).to_string();
        let mut chars = full.chars();
        while let Some(c) = chars.next() {
            field.push(c);
            if c == '[' {
                for d in chars.by_ref() {
                    if d == ']' {
                        field.push(']');
                        break;
                    }
                }
            }
        }
        // The envelope (`apiVersion`, `metadata.name`, …) is the same for every kind.
        let kind = if field.starts_with("spec.") {
            r.kind.clone()
        } else {
            "*".to_string()
        };
        let field = field
            .strip_prefix("document.")
            .map(str::to_string)
            .unwrap_or(field);
        let entry = r.seen.entry((kind, field)).or_insert(how);
        // A field read anywhere is read, even if another reader only accepts it.
        *entry = (*entry).min(how);
    });
}

/// Items of a sequence; `null` reads as empty. Anything else is an error.
pub(crate) fn seq<'n>(sink: &mut Sink, node: &'n Node, path: &Path<'_>) -> &'n [Node] {
    match &node.value {
        Value::Seq(items) => items,
        Value::Null => &[],
        _ => {
            sink.error(
                node.loc,
                format!("{path}: expected a list, found {}", node.describe()),
            );
            &[]
        }
    }
}

/// Any scalar read as text (YAML numbers and booleans keep their written form).
pub(crate) fn string(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<String> {
    match node.scalar_text() {
        Some(t) => Some(t.to_string()),
        None => {
            sink.error(
                node.loc,
                format!("{path}: expected a string, found {}", node.describe()),
            );
            None
        }
    }
}

/// A non-negative integer no larger than `max`.
pub(crate) fn uint(sink: &mut Sink, node: &Node, path: &Path<'_>, max: u64) -> Option<u64> {
    match &node.value {
        Value::Int(i, _) if *i >= 0 && (*i as u64) <= max => Some(*i as u64),
        Value::Int(_, t) => {
            sink.error(
                node.loc,
                format!("{path}: {t} is out of range (0 to {max})"),
            );
            None
        }
        _ => {
            sink.error(
                node.loc,
                format!("{path}: expected an integer, found {}", node.describe()),
            );
            None
        }
    }
}

pub(crate) fn u32_(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<u32> {
    uint(sink, node, path, u64::from(u32::MAX)).map(|v| v as u32)
}

/// A port number, 1 to 65535.
pub(crate) fn port(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<u16> {
    match &node.value {
        Value::Int(i, _) if (1..=65535).contains(i) => Some(*i as u16),
        Value::Int(_, t) => {
            sink.error(
                node.loc,
                format!("{path}: port {t} is out of range (1 to 65535)"),
            );
            None
        }
        _ => {
            sink.error(
                node.loc,
                format!("{path}: expected a port number, found {}", node.describe()),
            );
            None
        }
    }
}

/// A port written as a number or as a string of digits (AuthorizationPolicy writes strings).
pub(crate) fn port_text(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<u16> {
    match &node.value {
        Value::Str(s) => match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                sink.error(
                    node.loc,
                    format!("{path}: expected a port number (1 to 65535), found {s:?}"),
                );
                None
            }
        },
        _ => port(sink, node, path),
    }
}

pub(crate) fn boolean(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<bool> {
    match &node.value {
        Value::Bool(b, _) => Some(*b),
        _ => {
            sink.error(
                node.loc,
                format!("{path}: expected true or false, found {}", node.describe()),
            );
            None
        }
    }
}

pub(crate) fn duration(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<Duration> {
    let text = match &node.value {
        // A bare number gets the "missing unit" explanation from the parser.
        Value::Str(s) | Value::Int(_, s) | Value::Float(s) => s.as_str(),
        _ => {
            sink.error(
                node.loc,
                format!(
                    "{path}: expected a duration such as \"10s\", found {}",
                    node.describe()
                ),
            );
            return None;
        }
    };
    match parse_duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            sink.error(node.loc, format!("{path}: {e}"));
            None
        }
    }
}

pub(crate) fn ip(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<IpAddr> {
    let s = string(sink, node, path)?;
    match s.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            sink.error(node.loc, format!("{path}: {s:?} is not an IP address"));
            None
        }
    }
}

pub(crate) fn socket_addr(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Option<SocketAddr> {
    let s = string(sink, node, path)?;
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            sink.error(
                node.loc,
                format!(
                    "{path}: {s:?} is not an IP:PORT address; write e.g. \"127.0.0.1:15000\" or \"[::1]:15000\""
                ),
            );
            None
        }
    }
}

/// A list of strings.
pub(crate) fn strings(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Vec<String> {
    seq(sink, node, path)
        .iter()
        .enumerate()
        .filter_map(|(i, item)| string(sink, item, &path.index(i)))
        .collect()
}

/// A list of strings with where each was written.
pub(crate) fn strings_at(sink: &mut Sink, node: &Node, path: &Path<'_>) -> Vec<(String, Loc)> {
    seq(sink, node, path)
        .iter()
        .enumerate()
        .filter_map(|(i, item)| string(sink, item, &path.index(i)).map(|s| (s, item.loc)))
        .collect()
}

/// A mapping of strings to strings (labels, selectors).
pub(crate) fn string_map(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(f) = Fields::of(sink, node, *path) else {
        return out;
    };
    for (k, v) in f.entries() {
        if v.is_null() {
            continue;
        }
        if let Some(s) = string(sink, v, &path.key(&k.name)) {
            out.insert(k.name.clone(), s);
        }
    }
    out
}

/// One of a fixed set of words (an Istio enum). Unknown words are errors listing the valid ones.
pub(crate) fn word<'w>(
    sink: &mut Sink,
    node: &Node,
    path: &Path<'_>,
    words: &[&'w str],
) -> Option<&'w str> {
    let s = string(sink, node, path)?;
    match words.iter().find(|w| **w == s) {
        Some(w) => Some(w),
        None => {
            sink.error(
                node.loc,
                format!(
                    "{path}: unknown value {s:?}; expected one of {}",
                    words.join(", ")
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::yaml::parse_stream;
    use super::*;

    fn doc(src: &str) -> Node {
        parse_stream(0, src).unwrap().remove(0)
    }

    fn messages(sink: Sink) -> Vec<String> {
        sink.into_diagnostics(&["f.yaml".into()])
            .into_iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn paths_format_like_field_selectors() {
        let root = Path::root("spec");
        let s = root.key("servers");
        let i = s.index(2);
        let p = i.key("port");
        assert_eq!(p.to_string(), "spec.servers[2].port");
    }

    #[test]
    fn unknown_and_unused_fields_are_reported_at_their_keys() {
        let n = doc("a: 1\nhttp: {}\nfoo: 2\nok: 3\n");
        let mut sink = Sink::default();
        let root = Path::root("spec");
        let mut f = Fields::of(&mut sink, &n, root).unwrap();
        assert!(f.get("a").is_some());
        f.accept(&["ok"]);
        f.not_used(&mut sink, &["http"]);
        f.finish(&mut sink);
        assert_eq!(
            messages(sink),
            [
                "f.yaml:2:1: warning: field spec.http is not used by strait; ignored",
                "f.yaml:3:1: warning: unknown field spec.foo; ignored"
            ]
        );
    }

    #[test]
    fn recorded_fields_drop_list_positions_and_name_their_kind() {
        let n = doc("servers: [{port: {number: 1}, foo: 2}]\n");
        let seen = record_fields(|| {
            let mut sink = Sink::default();
            record_kind("Gateway");
            let root = Path::root("spec");
            let mut f = Fields::of(&mut sink, &n, root).unwrap();
            let servers = f.get("servers").unwrap();
            let sp = root.key("servers");
            let item = &seq(&mut sink, servers, &sp)[0];
            let ip = sp.index(0);
            let mut sf = Fields::of(&mut sink, item, ip).unwrap();
            sf.get("port");
            sf.get("absent");
            sf.not_used(&mut sink, &["defaultEndpoint"]);
            sf.accept(&["port"]);
            let meta = Path::root("document");
            let mut mf = Fields::of(&mut sink, &n, meta).unwrap();
            mf.get("apiVersion");
        });
        let got: Vec<(&str, &str, FieldUse)> = seen
            .iter()
            .map(|((k, p), u)| (k.as_str(), p.as_str(), *u))
            .collect();
        assert_eq!(
            got,
            [
                ("*", "apiVersion", FieldUse::Read),
                ("Gateway", "spec.servers", FieldUse::Read),
                ("Gateway", "spec.servers[].absent", FieldUse::Read),
                (
                    "Gateway",
                    "spec.servers[].defaultEndpoint",
                    FieldUse::Accepted
                ),
                ("Gateway", "spec.servers[].port", FieldUse::Read),
            ]
        );
        // Outside a recording nothing is kept.
        assert!(record_fields(|| {}).is_empty());
    }

    #[test]
    fn wrong_types_are_errors_at_the_value() {
        let n = doc("port: abc\nlist: 3\nd: 10x\nb: maybe\n");
        let mut sink = Sink::default();
        let root = Path::root("spec");
        let mut f = Fields::of(&mut sink, &n, root).unwrap();
        assert_eq!(
            port(&mut sink, f.get("port").unwrap(), &root.key("port")),
            None
        );
        assert!(strings(&mut sink, f.get("list").unwrap(), &root.key("list")).is_empty());
        assert_eq!(
            duration(&mut sink, f.get("d").unwrap(), &root.key("d")),
            None
        );
        assert_eq!(
            boolean(&mut sink, f.get("b").unwrap(), &root.key("b")),
            None
        );
        assert_eq!(
            messages(sink),
            [
                "f.yaml:1:7: error: spec.port: expected a port number, found string \"abc\"",
                "f.yaml:2:7: error: spec.list: expected a list, found integer 3",
                "f.yaml:3:4: error: spec.d: unknown unit \"x\" in duration \"10x\"; use ns, us, ms, s, m or h",
                "f.yaml:4:4: error: spec.b: expected true or false, found string \"maybe\"",
            ]
        );
    }

    #[test]
    fn ports_as_strings_and_ranges() {
        let n = doc("[\"9080\", 80, 0, \"x\"]");
        let mut sink = Sink::default();
        let p = Path::root("ports");
        let Value::Seq(items) = &n.value else {
            panic!()
        };
        assert_eq!(port_text(&mut sink, &items[0], &p), Some(9080));
        assert_eq!(port_text(&mut sink, &items[1], &p), Some(80));
        assert_eq!(port_text(&mut sink, &items[2], &p), None);
        assert_eq!(port_text(&mut sink, &items[3], &p), None);
        let m = messages(sink);
        assert_eq!(
            m[0],
            "f.yaml:1:14: error: ports: port 0 is out of range (1 to 65535)"
        );
    }
}
