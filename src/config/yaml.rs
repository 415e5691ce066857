//! A small YAML node tree where every node and every mapping key knows where it was written.
//!
//! Built straight from `saphyr-parser` events: one pass, no recursion, nesting bounded (so
//! hostile input cannot exhaust the stack), anchors expanded within a node budget. Scalars are
//! typed by YAML's core schema but keep their source text, so a label value written `1.10`
//! stays `"1.10"` even though YAML types it as a float.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr::Scalar;
use saphyr_parser::{Event, Parser, ScalarStyle, Tag};

use super::diagnostics::{Loc, Sink};

/// Deeper nesting than any Istio resource needs; refusing it keeps every walk over the tree
/// (including `Drop`) shallow.
const MAX_DEPTH: usize = 64;
/// Nodes that alias expansion may add per file ("billion laughs" guard).
const ALIAS_BUDGET: usize = 100_000;

/// One YAML node and where it starts.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub loc: Loc,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    Null,
    /// A boolean, with its source text.
    Bool(bool, String),
    /// An integer, with its source text.
    Int(i64, String),
    /// A float, by its source text.
    Float(String),
    /// A string: quoted, or plain text that is no other type.
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
    /// A scalar that does not fit the type its tag asks for (`!!int abc`), or an alias to
    /// an unknown anchor.
    Bad,
}

/// A mapping key (always read as text) and where it was written.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    pub loc: Loc,
    pub name: String,
}

impl Node {
    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "null".into(),
            Value::Bool(_, t) => format!("boolean {t}"),
            Value::Int(_, t) => format!("integer {t}"),
            Value::Float(t) => format!("number {t}"),
            Value::Str(s) => format!("string {s:?}"),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
            Value::Bad => "a value that does not match its tag".into(),
        }
    }

    /// The text of a scalar (any type), or `None` for null, lists and mappings.
    pub fn scalar_text(&self) -> Option<&str> {
        match &self.value {
            Value::Bool(_, t) | Value::Int(_, t) | Value::Float(t) => Some(t),
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }
}

/// A YAML error that stops reading the file: where, and why.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub loc: Loc,
    pub message: String,
}

/// Parses every document of a YAML stream. Empty documents come back as `Null` nodes.
#[cfg(test)]
pub(crate) fn parse_stream(file: u32, source: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut out = Vec::new();
    let mut sink = Sink::default();
    for_each_document(file, source, &mut sink, |_, n| out.push(n))?;
    Ok(out)
}

/// Parses a YAML stream and hands each document to `read` as soon as it is complete.
/// Duplicate mapping keys are reported to `sink`; syntax errors, over-deep nesting and
/// runaway aliases stop the file.
pub(crate) fn for_each_document(
    file: u32,
    source: &str,
    sink: &mut Sink,
    mut read: impl FnMut(&mut Sink, Node),
) -> Result<(), SyntaxError> {
    let mut b = Builder {
        file,
        stack: Vec::new(),
        root: None,
        anchors: HashMap::new(),
        alias_budget: ALIAS_BUDGET,
    };
    let mut parser = Parser::new_from_str(source);
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| SyntaxError {
            loc: b.loc_of(*e.marker()),
            message: e.info().to_string(),
        })?;
        let loc = b.loc_of(span.start);
        match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
            Event::DocumentStart(_) => {
                b.root = None;
                b.anchors.clear();
            }
            Event::DocumentEnd => {
                let doc = b.root.take().map(|(n, _)| n).unwrap_or(Node {
                    loc,
                    value: Value::Null,
                });
                read(sink, doc);
            }
            Event::Scalar(text, style, anchor, tag) => {
                let value = scalar(text, style, tag.as_ref());
                b.push(sink, Node { loc, value }, Shape::LEAF, anchor);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if b.stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError {
                        loc,
                        message: format!("nesting deeper than {MAX_DEPTH} levels; refused"),
                    });
                }
                let is_map = matches!(event, Event::MappingStart(..));
                b.stack.push(Frame {
                    loc,
                    anchor,
                    items: if is_map {
                        Items::Map(Vec::new(), None)
                    } else {
                        Items::Seq(Vec::new())
                    },
                    shape: Shape { height: 1, size: 1 },
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = b.stack.pop() else { continue };
                let value = match frame.items {
                    Items::Seq(items) => Value::Seq(items),
                    Items::Map(entries, _) => {
                        report_duplicate_keys(sink, &entries);
                        Value::Map(entries)
                    }
                };
                let node = Node {
                    loc: frame.loc,
                    value,
                };
                b.push(sink, node, frame.shape, frame.anchor);
            }
            Event::Alias(id) => {
                let (node, shape) = match b.anchors.get(&id) {
                    Some((n, shape)) => (n.clone(), *shape),
                    None => (
                        Node {
                            loc,
                            value: Value::Bad,
                        },
                        Shape::LEAF,
                    ),
                };
                if b.stack.len() + shape.height > MAX_DEPTH {
                    return Err(SyntaxError {
                        loc,
                        message: format!(
                            "alias expands to nesting deeper than {MAX_DEPTH} levels; refused"
                        ),
                    });
                }
                b.alias_budget = match b.alias_budget.checked_sub(shape.size) {
                    Some(left) => left,
                    None => {
                        return Err(SyntaxError {
                            loc,
                            message: format!(
                                "aliases expand to more than {ALIAS_BUDGET} nodes; refused"
                            ),
                        });
                    }
                };
                b.push(sink, Node { loc, ..node }, shape, 0);
            }
        }
    }
    Ok(())
}

/// Height and node count of a subtree, for the depth limit and the alias budget.
#[derive(Debug, Clone, Copy)]
struct Shape {
    height: usize,
    size: usize,
}

impl Shape {
    const LEAF: Shape = Shape { height: 0, size: 1 };
}

struct Frame {
    loc: Loc,
    anchor: usize,
    items: Items,
    shape: Shape,
}

enum Items {
    Seq(Vec<Node>),
    /// Entries so far, and a key waiting for its value.
    Map(Vec<(Key, Node)>, Option<Key>),
}

struct Builder {
    file: u32,
    stack: Vec<Frame>,
    root: Option<(Node, Shape)>,
    anchors: HashMap<usize, (Node, Shape)>,
    alias_budget: usize,
}

impl Builder {
    fn loc_of(&self, m: saphyr_parser::Marker) -> Loc {
        Loc {
            file: self.file,
            line: m.line().max(1) as u32,
            col: m.col() as u32 + 1,
        }
    }

    /// Places a finished node in its parent (or as the document root).
    fn push(&mut self, sink: &mut Sink, node: Node, shape: Shape, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), shape));
        }
        let Some(parent) = self.stack.last_mut() else {
            self.root = Some((node, shape));
            return;
        };
        parent.shape.height = parent.shape.height.max(shape.height + 1);
        parent.shape.size += shape.size;
        match &mut parent.items {
            Items::Seq(items) => items.push(node),
            Items::Map(entries, pending) => match pending.take() {
                Some(key) => entries.push((key, node)),
                None => {
                    let name = match &node.value {
                        Value::Null => String::new(),
                        Value::Seq(_) | Value::Map(_) => {
                            sink.error(node.loc, "a list or mapping as a mapping key is not supported; use a plain key");
                            String::new()
                        }
                        _ => node.scalar_text().unwrap_or("").to_string(),
                    };
                    *pending = Some(Key {
                        loc: node.loc,
                        name,
                    });
                }
            },
        }
    }
}

/// Types a scalar by YAML's core schema, keeping the written text.
fn scalar(text: Cow<'_, str>, style: ScalarStyle, tag: Option<&Cow<'_, Tag>>) -> Value {
    match Scalar::parse_from_cow_and_metadata(Cow::Borrowed(text.as_ref()), style, tag) {
        None => Value::Bad,
        Some(Scalar::Null) => Value::Null,
        Some(Scalar::Boolean(b)) => Value::Bool(b, text.into_owned()),
        Some(Scalar::Integer(i)) => Value::Int(i, text.into_owned()),
        Some(Scalar::FloatingPoint(_)) => Value::Float(text.into_owned()),
        Some(Scalar::String(_)) => Value::Str(text.into_owned()),
    }
}

/// YAML forbids a key twice in one mapping; each repeat is an error at the repeat.
fn report_duplicate_keys(sink: &mut Sink, entries: &[(Key, Node)]) {
    if entries.len() < 2 {
        return;
    }
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|a, b| entries[*a].0.name.cmp(&entries[*b].0.name).then(a.cmp(b)));
    for pair in order.windows(2) {
        let (first, again) = (&entries[pair[0]].0, &entries[pair[1]].0);
        if first.name == again.name {
            sink.error(
                again.loc,
                format!(
                    "duplicate key {:?} (first at line {}); a key may appear once in a mapping",
                    again.name, first.loc.line
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(src: &str) -> Node {
        let mut docs = parse_stream(0, src).unwrap();
        assert_eq!(docs.len(), 1);
        docs.remove(0)
    }

    fn map(n: &Node) -> &[(Key, Node)] {
        match &n.value {
            Value::Map(m) => m,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn positions_are_one_based_line_and_column() {
        let n = one("a: 1\nbb:\n  c: \"x\"\n");
        let m = map(&n);
        assert_eq!((m[0].0.loc.line, m[0].0.loc.col), (1, 1));
        assert_eq!((m[0].1.loc.line, m[0].1.loc.col), (1, 4));
        let inner = map(&m[1].1);
        assert_eq!(inner[0].0.name, "c");
        assert_eq!((inner[0].0.loc.line, inner[0].0.loc.col), (3, 3));
        assert_eq!((inner[0].1.loc.line, inner[0].1.loc.col), (3, 6));
    }

    #[test]
    fn plain_scalars_keep_their_text() {
        let n = one("v: 1.10\nw: 0x1F\nq: \"9080\"\nb: yes\nt: true\nz: ~\n");
        let m = map(&n);
        assert!(matches!(&m[0].1.value, Value::Float(t) if t == "1.10"));
        assert!(matches!(&m[1].1.value, Value::Int(31, t) if t == "0x1F"));
        assert!(matches!(&m[2].1.value, Value::Str(s) if s == "9080"));
        assert!(matches!(&m[3].1.value, Value::Str(s) if s == "yes"));
        assert!(matches!(&m[4].1.value, Value::Bool(true, _)));
        assert!(m[5].1.is_null());
    }

    #[test]
    fn multi_document_and_empty_documents() {
        let docs = parse_stream(0, "---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 3);
        assert!(docs[1].is_null() || matches!(docs[1].value, Value::Bad));
        assert_eq!(docs[2].loc.line, 5);
    }

    #[test]
    fn syntax_error_has_a_position() {
        let e = parse_stream(3, "a: 1\nb: [1, 2\n").unwrap_err();
        assert_eq!(e.loc.file, 3);
        assert!(e.loc.line >= 2, "{e:?}");
        let mut sink = Sink::default();
        let mut docs = 0;
        for_each_document(0, "a: 1\nb: 2\na: 3\n", &mut sink, |_, _| docs += 1).unwrap();
        assert_eq!(docs, 1);
        let d = sink.into_diagnostics(&["f.yaml".into()]);
        assert_eq!(
            d[0].to_string(),
            "f.yaml:3:1: error: duplicate key \"a\" (first at line 1); a key may appear once in a mapping"
        );
    }

    #[test]
    fn aliases_are_expanded() {
        let n = one("a: &x {k: v}\nb: *x\nc: &n 5\nd: *n\n");
        let m = map(&n);
        assert!(matches!(&map(&m[1].1)[0].1.value, Value::Str(s) if s == "v"));
        assert!(matches!(&m[3].1.value, Value::Int(5, t) if t == "5"));
    }
}
