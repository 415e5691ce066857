//! Istio YAML → validated, immutable [`crate::model::Snapshot`], with diagnostics that carry
//! file, line and column.
