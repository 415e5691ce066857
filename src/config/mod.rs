//! Istio YAML → validated, immutable [`crate::model::Snapshot`], with diagnostics that carry
//! file, line and column.
//!
//! Loading runs in three steps: `yaml` parses each file into a node tree with positions,
//! `document` reads each document's envelope and hands its `spec` to the reader of its kind
//! (`istio`, `strait`), and `build` checks what spans documents and assembles the snapshot.
//! Every problem becomes a [`Diagnostic`]; any error rejects the whole configuration.

mod build;
mod diagnostics;
mod document;
mod duration;
mod fields;
mod gateway_api;
mod istio;
mod strait;
mod virtual_service;
mod yaml;

use std::path::{Path, PathBuf};

pub use diagnostics::{Diagnostic, Severity};
pub use duration::{DurationError, parse_duration};
pub use fields::FieldUse;
pub use strait::ISTIO_VERSION;

use crate::model::Snapshot;
use diagnostics::Sink;

/// A configuration that passed validation.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// Warnings only (errors reject the load), sorted by file, line and column.
    pub diagnostics: Vec<Diagnostic>,
    /// Every file read, in the order read, for the file watcher.
    pub files: Vec<PathBuf>,
}

/// Why a configuration was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", summary(diagnostics))]
    Invalid {
        /// Errors and warnings, sorted by file, line and column.
        diagnostics: Vec<Diagnostic>,
    },
}

fn summary(diagnostics: &[Diagnostic]) -> String {
    let errors: Vec<&Diagnostic> = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    match errors.as_slice() {
        [] => "invalid configuration".to_string(),
        [one] => format!("invalid configuration: {one}"),
        [first, rest @ ..] => format!(
            "invalid configuration: {first} (and {} more error{})",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" }
        ),
    }
}

/// Loads files, or directories of `*.yaml`/`*.yml` files (sorted by name, not recursive,
/// skipping names that start with a dot), each holding any number of YAML documents.
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded, ConfigError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Io { path, source }
    };
    let mut files = Vec::new();
    let mut sources = Vec::new();
    let mut empty_dirs = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io(path))? {
                let entry = entry.map_err(io(path))?;
                let p = entry.path();
                // Hidden entries are not configuration: a Kubernetes ConfigMap mount keeps
                // its real files in `..<timestamp>/` behind a `..data` symlink, and editors
                // leave `.name.yaml.swp`-style files beside the ones being edited.
                if entry.file_name().as_encoded_bytes().starts_with(b".") {
                    continue;
                }
                let yaml = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml");
                if yaml && p.is_file() {
                    found.push(p);
                }
            }
            found.sort();
            if found.is_empty() {
                empty_dirs.push(path.clone());
            }
            for p in found {
                sources.push(std::fs::read_to_string(&p).map_err(io(&p))?);
                files.push(p);
            }
        } else {
            sources.push(std::fs::read_to_string(path).map_err(io(path))?);
            files.push(path.clone());
        }
    }
    let mut sink = Sink::default();
    let mut names = files.clone();
    for dir in empty_dirs {
        sink.warn(
            diagnostics::Loc {
                file: names.len() as u32,
                line: 1,
                col: 1,
            },
            "directory holds no *.yaml or *.yml files",
        );
        names.push(dir);
    }
    load_sources(sink, files, names, &sources)
}

/// Loads configuration from memory; `name` stands for the file in diagnostics.
pub fn load_str(name: &str, yaml: &str) -> Result<Loaded, ConfigError> {
    let files = vec![PathBuf::from(name)];
    load_sources(Sink::default(), files.clone(), files, &[yaml])
}

/// The fields the loader knows, as seen while loading `yaml`: each (kind, field path) with
/// what strait does with it. Paths are written as in diagnostics with list positions left
/// out (`spec.servers[].tls.mode`); the envelope (`apiVersion`, `metadata.name`) is under
/// kind `*`. A field is seen when the mapping that holds it is present in `yaml`, whether or
/// not the field itself is written, so one document with every mapping present lists every
/// field of its kind. This is what `docs/fields.md` is checked against.
pub fn fields_seen(yaml: &str) -> std::collections::BTreeMap<(String, String), FieldUse> {
    fields::record_fields(|| {
        let _ = load_str("fields.yaml", yaml);
    })
}

fn load_sources(
    mut sink: Sink,
    files: Vec<PathBuf>,
    names: Vec<PathBuf>,
    sources: &[impl AsRef<str>],
) -> Result<Loaded, ConfigError> {
    let mut parsed = document::Parsed::default();
    for (i, source) in sources.iter().enumerate() {
        let read = yaml::for_each_document(i as u32, source.as_ref(), &mut sink, |sink, doc| {
            document::read_document(sink, &doc, &mut parsed)
        });
        if let Err(e) = read {
            sink.error(e.loc, format!("YAML syntax error: {}", e.message));
        }
    }
    let snapshot = build::build(&mut sink, parsed);
    let failed = sink.has_errors();
    let diagnostics = sink.into_diagnostics(&names);
    if failed {
        return Err(ConfigError::Invalid { diagnostics });
    }
    Ok(Loaded {
        snapshot,
        diagnostics,
        files,
    })
}

#[cfg(test)]
mod tests;
