//! The command-line side: `strait run` wires the floors below into a running gateway,
//! and `strait demo` runs it on an embedded configuration with demo workloads.

pub mod app;
pub mod demo;
