//! `filterdb-server`: the FilterDB gRPC server on its embedded RocksDB.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use filterdb::engine::Engine;
use filterdb::server::{ServerConfig, serve};
use tracing_subscriber::EnvFilter;

/// FilterDB: a database of trained CNN convolution filters with a gRPC query server.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Data directory (created if missing).
    #[arg(long, global = true, env = "FILTERDB_DATA_DIR", default_value = "./filterdb-data")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "FILTERDB_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Log format: text or json.
    #[arg(long, env = "FILTERDB_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Take a snapshot into <data-dir>/snapshots every this many seconds (0: never).
    #[arg(long, env = "FILTERDB_SNAPSHOT_INTERVAL_SECS", default_value_t = 0)]
    snapshot_interval_secs: u64,
    /// Periodic snapshots to keep (0: all).
    #[arg(long, env = "FILTERDB_SNAPSHOT_RETAIN", default_value_t = 7)]
    snapshot_retain: usize,
    /// Configuration file (TOML): scheduled-ingestion sources as `[[source]]` tables.
    #[arg(long, env = "FILTERDB_CONFIG")]
    config: Option<PathBuf>,
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_format == "json" {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if let Some(Sub::Restore { snapshot }) = &args.command {
        return filterdb::export::restore_cli(snapshot, &args.data_dir);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let engine = Arc::new(Engine::open(&args.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?);
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
        if args.snapshot_interval_secs > 0 {
            let every = std::time::Duration::from_secs(args.snapshot_interval_secs);
            filterdb::export::spawn_periodic(engine.clone(), every, args.snapshot_retain);
        }
        let mut config = ServerConfig::default();
        if let Some(path) = &args.config {
            config.sources = read_sources(path)?;
        }
        serve(engine, listener, config, shutdown_signal()).await
    })
}

/// The `[[source]]` tables of the configuration file.
fn read_sources(path: &std::path::Path) -> anyhow::Result<Vec<filterdb::jobs::SourceConfig>> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        source: Vec<filterdb::jobs::SourceConfig>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    let f: File = toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    for s in &f.source {
        s.validate().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    }
    Ok(f.source)
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
}
