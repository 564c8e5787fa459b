//! `filterdb snapshot` and `filterdb export`: ask the server to write a Parquet dataset (on the
//! server's host), showing its progress.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use filterdb_client::proto::snapshots_client::SnapshotsClient;
use filterdb_client::proto::{ExportRequest, SnapshotProgress, SnapshotRequest, SnapshotResult};
use filterdb_client::selection;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::Streaming;

use super::Ctx;

/// Arguments of `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Folder to create on the server's host (default: a new one under <data-dir>/snapshots).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only layers matching this expression (see `filterdb where-help`); default everything.
    #[arg(long = "where", value_name = "EXPR")]
    pub where_: Option<String>,
    /// Folder to create on the server's host (relative paths are taken from here).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

fn absolute(p: &Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(p)?.display().to_string())
}

/// A Snapshots stub on the CLI's connection (token and TLS included).
async fn connect(ctx: &Ctx) -> anyhow::Result<SnapshotsClient<filterdb_client::Transport>> {
    Ok(SnapshotsClient::new(ctx.connect().await?.transport()))
}

/// Follows a progress stream to its result, with a bar on stderr.
async fn follow(mut s: Streaming<SnapshotProgress>, quiet: bool) -> anyhow::Result<SnapshotResult> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:9} [{wide_bar:.cyan/blue}] {human_pos}/{human_len} filters {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut result = None;
    while let Some(p) = s.message().await? {
        bar.set_message(p.phase.clone());
        bar.set_length(p.filters_total);
        bar.set_position(p.filters_done);
        if p.result.is_some() {
            result = p.result;
        }
    }
    bar.finish_and_clear();
    result.ok_or_else(|| anyhow::anyhow!("the server ended the stream without a result"))
}

fn report(ctx: &Ctx, what: &str, r: &SnapshotResult) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if ctx.json {
        let manifest: serde_json::Value =
            serde_json::from_str(&r.manifest_json).unwrap_or(serde_json::Value::Null);
        let v = serde_json::json!({
            "path": r.path, "models": r.models, "layers": r.layers, "filters": r.filters,
            "files": r.files, "bytes": r.bytes, "manifest": manifest,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "{what} {}: {} models, {} layers, {} filters in {} files ({})",
            r.path,
            r.models,
            r.layers,
            r.filters,
            r.files,
            indicatif::HumanBytes(r.bytes)
        )?;
    }
    Ok(out.flush()?)
}

/// `filterdb snapshot`.
pub async fn snapshot(ctx: &Ctx, a: SnapshotArgs) -> anyhow::Result<()> {
    let out_dir = match &a.out {
        Some(p) => absolute(p)?,
        None => String::new(),
    };
    let mut c = connect(ctx).await?;
    let s = c.snapshot(SnapshotRequest { out_dir }).await?.into_inner();
    let r = follow(s, ctx.json).await?;
    report(ctx, "snapshot", &r)
}

/// `filterdb export`.
pub async fn export(ctx: &Ctx, a: ExportArgs) -> anyhow::Result<()> {
    let sel = selection(a.where_.as_deref())?;
    let out_dir = absolute(&a.out)?;
    let mut c = connect(ctx).await?;
    let s = c
        .export(ExportRequest {
            selection: sel,
            out_dir,
        })
        .await?
        .into_inner();
    let r = follow(s, ctx.json).await?;
    report(ctx, "export", &r)
}
