//! Problems found in configuration files, each with the place it was found.

use std::fmt;
use std::path::PathBuf;

/// How bad a [`Diagnostic`] is: errors reject the configuration, warnings only inform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem in one file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.severity,
            self.message
        )
    }
}

/// A place in one of the files being loaded: index into the file list, 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Loc {
    pub file: u32,
    pub line: u32,
    pub col: u32,
}

/// Collects diagnostics during a load; turned into [`Diagnostic`]s once all files are known.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    items: Vec<(Loc, Severity, String)>,
    errors: usize,
}

impl Sink {
    pub fn error(&mut self, loc: Loc, message: impl Into<String>) {
        self.errors += 1;
        self.items.push((loc, Severity::Error, message.into()));
    }

    pub fn warn(&mut self, loc: Loc, message: impl Into<String>) {
        self.items.push((loc, Severity::Warning, message.into()));
    }

    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }

    /// All diagnostics in file order, then line, then column (stable for equal places).
    pub fn into_diagnostics(mut self, files: &[PathBuf]) -> Vec<Diagnostic> {
        self.items.sort_by_key(|(loc, _, _)| *loc);
        self.items
            .into_iter()
            .map(|(loc, severity, message)| Diagnostic {
                file: files.get(loc.file as usize).cloned().unwrap_or_default(),
                line: loc.line as usize,
                col: loc.col as usize,
                severity,
                message,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_file_line_col_severity_message() {
        let d = Diagnostic {
            file: PathBuf::from("config/a.yaml"),
            line: 3,
            col: 7,
            severity: Severity::Warning,
            message: "unknown field spec.foo; ignored".into(),
        };
        assert_eq!(
            d.to_string(),
            "config/a.yaml:3:7: warning: unknown field spec.foo; ignored"
        );
        let e = Diagnostic {
            severity: Severity::Error,
            ..d
        };
        assert!(e.to_string().starts_with("config/a.yaml:3:7: error: "));
    }

    #[test]
    fn sink_sorts_by_file_then_position() {
        let mut sink = Sink::default();
        let at = |file, line, col| Loc { file, line, col };
        sink.warn(at(1, 1, 1), "b1");
        sink.error(at(0, 9, 2), "a9");
        sink.warn(at(0, 2, 5), "a2");
        assert!(sink.has_errors());
        let files = [PathBuf::from("a"), PathBuf::from("b")];
        let msgs: Vec<_> = sink
            .into_diagnostics(&files)
            .into_iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            msgs,
            [
                "a:2:5: warning: a2",
                "a:9:2: error: a9",
                "b:1:1: warning: b1"
            ]
        );
    }
}
