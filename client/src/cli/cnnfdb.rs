//! `filterdb import-cnnfdb FILTERS.h5 META.parquet`: the server imports the CNN Filter DB
//! release from files on its host, model by model, while a progress bar follows it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use filterdb_client::proto::ImportCnnFdbRequest;
use filterdb_client::proto::cnn_fdb_import_client::CnnFdbImportClient;
use indicatif::{ProgressBar, ProgressStyle};

use super::Ctx;

/// Arguments of `import-cnnfdb`.
#[derive(Debug, Args)]
#[command(
    after_help = "Convert the release's pickled meta table first (needs pandas, tables, pyarrow):\n\n  \
    python tools/cnnfdb_meta_to_parquet.py dataset.h5 meta.parquet\n  \
    filterdb import-cnnfdb dataset.h5 meta.parquet\n\n\
    Paths are read by the server (relative ones are made absolute here). An interrupted import \
    (Ctrl-C, a crash) continues where it stopped when run again; models already stored are skipped."
)]
pub struct ImportCnnFdbArgs {
    /// The release's HDF5 file with the `filters` dataset (dataset.h5).
    #[arg(value_name = "FILTERS.h5")]
    pub filters: PathBuf,
    /// The meta table as Parquet (tools/cnnfdb_meta_to_parquet.py's output).
    #[arg(value_name = "META.parquet")]
    pub meta: PathBuf,
    /// Replace stored models of the same name that hold other filters.
    #[arg(long)]
    pub replace: bool,
    /// Stop after storing this many new models (import in stages).
    #[arg(long, value_name = "N")]
    pub max_models: Option<u64>,
}

fn absolute(p: &Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(p)?.display().to_string())
}

/// Runs `filterdb import-cnnfdb`.
pub async fn run(ctx: &Ctx, a: ImportCnnFdbArgs) -> anyhow::Result<()> {
    // The CLI's connection, so --token and --ca-cert apply.
    let mut c = CnnFdbImportClient::new(ctx.connect().await?.transport());
    let req = ImportCnnFdbRequest {
        filters_path: absolute(&a.filters)?,
        meta_path: absolute(&a.meta)?,
        replace: a.replace,
        max_models: a.max_models.unwrap_or(0),
    };
    let mut s = c
        .import(req)
        .await
        .map_err(|e| anyhow::anyhow!(filterdb_client::ClientError::Status(e)))?
        .into_inner();
    let bar = if ctx.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:40!} [{wide_bar:.cyan/blue}] {human_pos}/{human_len} filters {per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut last = None;
    while let Some(p) = s
        .message()
        .await
        .map_err(|e| anyhow::anyhow!(filterdb_client::ClientError::Status(e)))?
    {
        bar.set_length(p.filters_total);
        bar.set_position(p.filters_done);
        bar.set_message(format!(
            "{} {}/{} {}",
            p.phase, p.models_done, p.models_total, p.model
        ));
        last = Some(p);
    }
    bar.finish_and_clear();
    let p = last.ok_or_else(|| anyhow::anyhow!("the server ended the import without a result"))?;
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"done": p.done, "stopped_early": p.stopped_early, "models_total": p.models_total,
                "models_done": p.models_done, "models_created": p.models_created,
                "models_unchanged": p.models_unchanged, "filters_total": p.filters_total, "filters_done": p.filters_done})
        );
    } else {
        println!(
            "{} of {} models: {} stored now, {} already stored; {} of {} filters{}",
            p.models_done,
            p.models_total,
            p.models_created,
            p.models_unchanged,
            p.filters_done,
            p.filters_total,
            if p.stopped_early {
                " (stopped at --max-models; run again to continue)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
