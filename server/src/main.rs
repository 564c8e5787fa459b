//! `filterdb-server`: the FilterDB gRPC server on its embedded RocksDB.
//!
//! Configuration comes from defaults < a TOML file (`--config`) < `FILTERDB_*` environment
//! variables < flags; see `filterdb::config` and `deploy/filterdb.toml`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use filterdb::config::{self, Loaded};
use filterdb::engine::Engine;
use filterdb::server::{ServerConfig, serve};
use tracing_subscriber::EnvFilter;

/// FilterDB: a database of trained CNN convolution filters with a gRPC query server.
///
/// Precedence: defaults < --config file < FILTERDB_* environment variables < flags.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file (TOML): server settings, `[[auth.token]]`, `[[source]]` tables.
    #[arg(long, env = "FILTERDB_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (created if missing) [key data_dir].
    #[arg(long, global = true)]
    data_dir: Option<String>,
    /// Address to listen on [key listen; default 127.0.0.1:50051].
    #[arg(long)]
    listen: Option<String>,
    /// Log format: text or json [key log_format].
    #[arg(long)]
    log_format: Option<String>,
    /// Take a snapshot into <data-dir>/snapshots every this many seconds (0: never).
    #[arg(long)]
    snapshot_interval_secs: Option<String>,
    /// Periodic snapshots to keep (0: all).
    #[arg(long)]
    snapshot_retain: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9464) [key metrics_listen].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Seconds in-flight calls may run after SIGTERM/SIGINT [key shutdown_grace_secs].
    #[arg(long)]
    shutdown_grace_secs: Option<String>,
    /// Longest a call may run, seconds (0: only client deadlines) [key limits.request_timeout_secs].
    #[arg(long)]
    request_timeout_secs: Option<String>,
    /// Calls served at once before shedding load [key limits.max_concurrent_requests].
    #[arg(long)]
    max_concurrent_requests: Option<String>,
    /// PEM certificate chain for TLS [key tls.cert].
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key for TLS [key tls.key].
    #[arg(long)]
    tls_key: Option<String>,
    /// PEM CA for client certificates (mTLS) [key tls.client_ca].
    #[arg(long)]
    tls_client_ca: Option<String>,
    /// Any scalar key, e.g. `--set limits.max_k=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective configuration as TOML (token hashes masked) and exit.
    #[arg(long)]
    print_config: bool,
    /// Without a subcommand: serve.
    #[command(subcommand)]
    command: Option<Sub>,
}

/// Offline commands.
#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Rebuild a database in --data-dir (new or empty) from a snapshot folder, bit-identically.
    Restore {
        /// Snapshot folder (the one holding manifest.json).
        snapshot: PathBuf,
    },
}

impl Args {
    /// The flags given, as (key, value) pairs in the configuration's key space.
    fn flags(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (key, v) in [
            ("data_dir", &self.data_dir),
            ("listen", &self.listen),
            ("log_format", &self.log_format),
            ("snapshot_interval_secs", &self.snapshot_interval_secs),
            ("snapshot_retain", &self.snapshot_retain),
            ("metrics_listen", &self.metrics_listen),
            ("shutdown_grace_secs", &self.shutdown_grace_secs),
            ("limits.request_timeout_secs", &self.request_timeout_secs),
            (
                "limits.max_concurrent_requests",
                &self.max_concurrent_requests,
            ),
            ("tls.cert", &self.tls_cert),
            ("tls.key", &self.tls_key),
            ("tls.client_ca", &self.tls_client_ca),
        ] {
            if let Some(v) = v {
                out.push((key.to_string(), v.clone()));
            }
        }
        for s in &self.set {
            let (k, v) = s.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("--set `{s}`: expected KEY=VALUE, e.g. --set limits.max_k=100")
            })?;
            out.push((k.trim().to_string(), v.to_string()));
        }
        Ok(out)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded: Loaded = config::load(args.config.as_deref(), std::env::vars(), &args.flags()?)?;
    if args.print_config {
        print!("{}", loaded.to_toml());
        return Ok(());
    }
    let cfg = loaded.config;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cfg.log_format == "json" {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if let Some(Sub::Restore { snapshot }) = &args.command {
        return filterdb::export::restore_cli(snapshot, &cfg.data_dir);
    }
    let server_config = ServerConfig::from_config(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let engine = Arc::new(Engine::open(&cfg.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?);
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (key listen): {e}", cfg.listen))?;
        if cfg.snapshot_interval_secs > 0 {
            let every = std::time::Duration::from_secs(cfg.snapshot_interval_secs);
            filterdb::export::spawn_periodic(engine.clone(), every, cfg.snapshot_retain);
        }
        serve(engine, listener, server_config, shutdown_signal()).await
    });
    // Blocking workers of calls cut off by the grace period get a moment, not forever.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("signal received: shutting down");
}
