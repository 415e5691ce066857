//! A small YAML node tree where every node and every mapping key knows where it was written.
//!
//! Built from `saphyr`'s marked nodes. Plain scalars keep their source text, so a label value
//! written `1.10` stays `"1.10"` even though YAML types it as a float.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::diagnostics::Loc;

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
    /// A float, with its source text.
    Float(String),
    /// A string: quoted, or plain text that is no other type.
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
    /// A scalar that does not fit the type its tag asks for (`!!int abc`).
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

/// A YAML syntax error: where, and what the parser said.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub loc: Loc,
    pub message: String,
}

/// Parses every document of a YAML stream. Empty documents come back as `Null` nodes.
pub(crate) fn parse_stream(file: u32, source: &str) -> Result<Vec<Node>, SyntaxError> {
    let docs = MarkedYaml::load_from_str(source).map_err(|e| {
        let m = e.marker();
        SyntaxError {
            loc: Loc {
                file,
                line: m.line().max(1) as u32,
                col: m.col() as u32 + 1,
            },
            message: e.info().to_string(),
        }
    })?;
    let lines = LineIndex::new(source);
    Ok(docs
        .iter()
        .map(|d| convert(file, source, &lines, d))
        .collect())
}

/// Byte offsets of line starts, to recover the source text of plain scalars.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(source: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(source.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// The source text from a (1-based line, 0-based char column) to the end marker,
    /// both on the same line, or `None` if the span is not a single-line slice.
    fn slice<'s>(
        &self,
        source: &'s str,
        start: saphyr::Marker,
        end: saphyr::Marker,
    ) -> Option<&'s str> {
        if start.line() != end.line() || start.line() == 0 {
            return None;
        }
        let line_start = *self.starts.get(start.line() - 1)?;
        let line = source.get(line_start..)?;
        let line = line.split('\n').next()?;
        let mut chars = line.char_indices().map(|(i, _)| i).chain([line.len()]);
        let from = chars.clone().nth(start.col())?;
        let to = chars.nth(end.col())?;
        line.get(from..to)
    }
}

fn convert(file: u32, source: &str, lines: &LineIndex, node: &MarkedYaml<'_>) -> Node {
    let loc = Loc {
        file,
        line: node.span.start.line().max(1) as u32,
        col: node.span.start.col() as u32 + 1,
    };
    // The text as written, falling back to the parsed value (for aliases, whose span
    // covers `*name`).
    let text = |fallback: String| {
        lines
            .slice(source, node.span.start, node.span.end)
            .filter(|t| !t.is_empty() && !t.starts_with('*'))
            .map(|t| t.trim_end().to_string())
            .unwrap_or(fallback)
    };
    let value = match &node.data {
        YamlData::Value(Scalar::Null) => Value::Null,
        YamlData::Value(Scalar::Boolean(b)) => Value::Bool(*b, text(b.to_string())),
        YamlData::Value(Scalar::Integer(i)) => Value::Int(*i, text(i.to_string())),
        YamlData::Value(Scalar::FloatingPoint(f)) => Value::Float(text(f.into_inner().to_string())),
        YamlData::Value(Scalar::String(s)) => Value::Str(s.to_string()),
        YamlData::Representation(s, _, _) => Value::Str(s.to_string()),
        YamlData::Sequence(items) => Value::Seq(
            items
                .iter()
                .map(|n| convert(file, source, lines, n))
                .collect(),
        ),
        YamlData::Mapping(map) => Value::Map(
            map.iter()
                .map(|(k, v)| {
                    let key = convert(file, source, lines, k);
                    let name = match &key.value {
                        Value::Null => String::new(),
                        _ => key.scalar_text().unwrap_or("").to_string(),
                    };
                    (Key { loc: key.loc, name }, convert(file, source, lines, v))
                })
                .collect(),
        ),
        YamlData::Tagged(_, inner) => return convert(file, source, lines, inner),
        YamlData::Alias(_) | YamlData::BadValue => Value::Bad,
    };
    Node { loc, value }
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
        let e = parse_stream(0, "a: 1\na: 2\n").unwrap_err();
        assert_eq!((e.loc.line, e.loc.col), (2, 1));
        assert!(e.message.contains("duplicated key"), "{}", e.message);
    }

    #[test]
    fn aliases_are_expanded() {
        let n = one("a: &x {k: v}\nb: *x\nc: &n 5\nd: *n\n");
        let m = map(&n);
        assert!(matches!(&map(&m[1].1)[0].1.value, Value::Str(s) if s == "v"));
        assert!(matches!(&m[3].1.value, Value::Int(5, t) if t == "5"));
    }
}
