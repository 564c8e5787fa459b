//! `filterdb search-index`: the approximate search index's state; `filterdb search-index
//! rebuild [--retrain]` builds it now with a progress bar (admin role).

use clap::{Args, Subcommand};
use filterdb_client::proto::admin_client::AdminClient;
use filterdb_client::proto::search_client::SearchClient;
use filterdb_client::proto::{RebuildSearchIndexRequest, SearchIndexStatusRequest, SearchIndexStatusResponse};
use filterdb_client::ClientError;
use indicatif::{ProgressBar, ProgressStyle};

use super::Ctx;

/// Arguments of `search-index`.
#[derive(Debug, Args)]
pub struct SearchIndexArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
}

/// What to do (default: show the state).
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Show the index: version, cells, entries, memory, the background builder.
    Status,
    /// Build now: encode models without entries and compact deleted ones (admin role).
    Rebuild {
        /// Train a new quantizer on a fresh sample even if the current one fits.
        #[arg(long)]
        retrain: bool,
    },
}

fn status_json(s: &SearchIndexStatusResponse) -> serde_json::Value {
    let b = s.build.clone().unwrap_or_default();
    serde_json::json!({
        "version": s.version, "nlist": s.nlist, "entries": s.entries, "dead_entries": s.dead_entries,
        "models": s.models, "unindexed_models": s.unindexed_models, "trained_on": s.trained_on,
        "bytes": s.bytes, "bytes_per_filter": s.bytes_per_filter, "selection_mask_bytes": s.selection_mask_bytes,
        "build": {"running": b.running, "phase": b.phase, "done": b.done, "total": b.total, "version": b.version,
                  "reason": b.reason, "error": b.error, "seconds": b.seconds},
    })
}

fn status_text(s: &SearchIndexStatusResponse) -> String {
    let mut out = if s.version == 0 {
        format!("no search index yet ({} models stored; approximate queries are answered exactly)\n", s.unindexed_models)
    } else {
        format!(
            "search index v{}: {} cells, {} filters of {} models ({} models not indexed yet), {} dead entries\nmemory {:.1} MiB = {:.2} bytes/filter (and {:.1} MiB of cached selections' masks); quantizer trained on {} filters\n",
            s.version,
            s.nlist,
            s.entries,
            s.models,
            s.unindexed_models,
            s.dead_entries,
            s.bytes as f64 / (1 << 20) as f64,
            s.bytes_per_filter,
            s.selection_mask_bytes as f64 / (1 << 20) as f64,
            s.trained_on
        )
    };
    if let Some(b) = &s.build {
        if b.running {
            out.push_str(&format!("builder: {} ({}/{} filters) — {}\n", b.phase, b.done, b.total, b.reason));
        } else if !b.phase.is_empty() {
            out.push_str(&format!("last build: {} in {:.1} s — {}\n", b.phase, b.seconds, b.reason));
            if !b.error.is_empty() {
                out.push_str(&format!("error: {}\n", b.error));
            }
        }
    }
    out
}

/// Runs `search-index`.
pub async fn run(ctx: &Ctx, a: SearchIndexArgs) -> anyhow::Result<()> {
    let c = ctx.connect().await?;
    match a.action.unwrap_or(Action::Status) {
        Action::Status => {
            let s = SearchClient::new(c.transport())
                .search_index_status(SearchIndexStatusRequest {})
                .await
                .map_err(ClientError::from)?
                .into_inner();
            if ctx.json {
                println!("{}", status_json(&s));
            } else {
                print!("{}", status_text(&s));
            }
        }
        Action::Rebuild { retrain } => {
            let mut stream = AdminClient::new(c.transport())
                .rebuild_search_index(RebuildSearchIndexRequest { retrain })
                .await
                .map_err(ClientError::from)?
                .into_inner();
            let bar = if ctx.json { ProgressBar::hidden() } else { ProgressBar::new(0) };
            bar.set_style(
                ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} filters ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let mut last = None;
            while let Some(m) = stream.message().await.map_err(ClientError::from)? {
                bar.set_message(m.phase.clone());
                bar.set_length(m.total);
                bar.set_position(m.done);
                if m.status.is_some() {
                    last = m.status;
                }
            }
            bar.finish_and_clear();
            let s = last.ok_or_else(|| ClientError::Protocol("the build ended without a final status".into()))?;
            if ctx.json {
                println!("{}", status_json(&s));
            } else {
                print!("{}", status_text(&s));
            }
        }
    }
    Ok(())
}
