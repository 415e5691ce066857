//! The `strait` command line: parse arguments, call the library, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use strait::cli::app::{self, Source};
use strait::config;
use strait::tls::spiffe::SpiffeId;

/// mimalloc rather than the system allocator: tokio's task cells and I/O registrations
/// are 128-byte aligned, and glibc pays for each aligned allocation with padding that
/// cost about 0.3 KiB per connection; mimalloc's size classes do not (measured by
/// `cargo bench --bench e2e`, see benches/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "East-west gateway for multi-network service meshes (Istio AUTO_PASSTHROUGH and ISTIO_MUTUAL)"
)]
struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway on a configuration (files or directories of Istio YAML).
    Run {
        #[arg(short = 'c', long = "config", required = true, num_args = 1..)]
        config: Vec<PathBuf>,
        /// Unix socket for restarts without a lost connection: a new process started
        /// with the same PATH takes the listening sockets over from the running one,
        /// which then drains.
        #[arg(long, value_name = "PATH")]
        handover: Option<PathBuf>,
    },
    /// Validate a configuration; prints FILE:LINE:COL: error|warning: MESSAGE.
    Check {
        #[arg(short = 'c', long = "config", required = true, num_args = 1..)]
        config: Vec<PathBuf>,
    },
    /// Explain how an SNI (or an HBONE tunnel's :authority) would be routed.
    Route {
        /// Configuration file or directory (repeat -c for several).
        #[arg(short = 'c', long = "config", required_unless_present = "admin")]
        config: Vec<PathBuf>,
        /// Ask a running gateway instead (its admin address, e.g. 127.0.0.1:15000): the
        /// snapshot it serves, whatever its source (files or xDS).
        #[arg(long, conflicts_with = "config")]
        admin: Option<std::net::SocketAddr>,
        /// The SNI, e.g. outbound_.9080_._.reviews.default.svc.cluster.local, or an HBONE
        /// tunnel's :authority, e.g. reviews.default.svc.cluster.local:9080
        sni: String,
        /// ALPN protocols the client would offer (comma-separated); default: istio
        #[arg(long, default_value = "istio")]
        alpn: String,
        /// For a tunnel: the x-istio-source header on its CONNECT (a waypoint sends
        /// "waypoint"), which picks where a Service with a waypoint routes
        #[arg(long)]
        source: Option<String>,
    },
    /// Mesh CA tooling.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Workload certificates (SVIDs).
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Run the real gateway with built-in demo workloads on loopback.
    Demo {
        /// Port for the demo gateway listener.
        #[arg(long, default_value_t = 15443)]
        port: u16,
        #[arg(long, default_value_t = 15021)]
        status_port: u16,
        #[arg(long, default_value_t = 15090)]
        metrics_port: u16,
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a mesh CA in Istio's plugged-CA layout.
    Init {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the root and intermediate, e.g. 87600h.
        #[arg(long, default_value = "87600h")]
        valid_for: String,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue an SVID in Istio's file-mounted layout.
    Issue {
        /// Directory made by `strait ca init`.
        #[arg(long)]
        ca: PathBuf,
        /// SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/reviews
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h")]
        valid_for: String,
    },
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("strait: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn duration(s: &str, flag: &str) -> Result<Duration, String> {
    config::parse_duration(s).map_err(|e| format!("{flag} {s:?}: {e}"))
}

fn dispatch(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Run { config, handover } => {
            app::run_blocking(Source::Paths(config), handover).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => Ok(check(&config)),
        Command::Route {
            admin: Some(admin),
            sni,
            alpn,
            source,
            ..
        } => {
            let (routes, text) =
                strait::admin::explain::ask_running(admin, &sni, &alpn, source.as_deref())
                    .map_err(|e| format!("cannot ask the gateway on {admin}: {e}"))?;
            print!("{text}");
            Ok(if routes {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Route {
            config,
            sni,
            alpn,
            source,
            ..
        } => {
            let loaded = config::load_paths(&config).map_err(|e| e.to_string())?;
            let alpn: Vec<String> = alpn
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let report =
                strait::admin::explain::explain(&loaded.snapshot, &sni, &alpn, source.as_deref());
            print!("{}", report.text);
            Ok(if report.routes {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Ca {
            command:
                CaCommand::Init {
                    trust_domain,
                    out,
                    valid_for,
                },
        } => {
            let valid_for = duration(&valid_for, "--valid-for")?;
            strait::identity::ca::init_ca(&trust_domain, &out, valid_for)
                .map_err(|e| e.to_string())?;
            println!(
                "mesh CA for trust domain {trust_domain} written to {}",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert {
            command:
                CertCommand::Issue {
                    ca,
                    id,
                    out,
                    valid_for,
                },
        } => {
            let valid_for = duration(&valid_for, "--valid-for")?;
            let id = SpiffeId::parse(&id).map_err(|e| format!("--id {id:?}: {e}"))?;
            strait::identity::ca::issue_svid(&ca, &id, &out, valid_for)
                .map_err(|e| e.to_string())?;
            println!("SVID for {id} written to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            port,
            status_port,
            metrics_port,
            admin_port,
        } => {
            let ports = strait::cli::demo::DemoPorts {
                gateway: port,
                status: status_port,
                metrics: metrics_port,
                admin: admin_port,
            };
            strait::cli::demo::run(ports).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(paths: &[PathBuf]) -> ExitCode {
    match config::load_paths(paths) {
        Ok(loaded) => {
            for d in &loaded.diagnostics {
                println!("{d}");
            }
            let n = loaded.snapshot.services.len();
            let l = loaded.snapshot.listeners.len();
            let b = loaded.snapshot.bridges.len();
            eprintln!(
                "configuration OK: {l} gateway listener(s), {b} bridge(s), {n} service port(s), {} warning(s)",
                loaded.diagnostics.len()
            );
            ExitCode::SUCCESS
        }
        Err(config::ConfigError::Invalid { diagnostics }) => {
            for d in &diagnostics {
                println!("{d}");
            }
            let errors = diagnostics
                .iter()
                .filter(|d| d.severity == config::Severity::Error)
                .count();
            eprintln!("configuration invalid: {errors} error(s)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("strait: {e}");
            ExitCode::FAILURE
        }
    }
}
