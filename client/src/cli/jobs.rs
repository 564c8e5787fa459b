//! `filterdb jobs` and `filterdb jobs run SOURCE`: scheduled-ingestion sources and job state.

use clap::{Args, Subcommand};
use filterdb_client::proto as pb;
use pb::jobs_client::JobsClient;

use super::Ctx;
use super::render::{table, utc_time};

/// `filterdb jobs`.
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// What to do; without one, list sources and their items.
    #[command(subcommand)]
    pub action: Option<JobsAction>,
    /// Only this source's items.
    #[arg(long)]
    pub source: Option<String>,
}

/// `filterdb jobs run`.
#[derive(Subcommand, Debug)]
pub enum JobsAction {
    /// Run a source now and wait for it to finish.
    Run {
        /// Source name as configured on the server.
        source: String,
    },
}

/// A Jobs stub on the CLI's connection (token and TLS included).
async fn client(ctx: &Ctx) -> anyhow::Result<JobsClient<filterdb_client::Transport>> {
    Ok(JobsClient::new(ctx.connect().await?.transport()))
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(filterdb_client::ClientError::Status(e))
}

/// Runs `filterdb jobs ...`.
pub async fn run(ctx: &Ctx, a: JobsArgs) -> anyhow::Result<()> {
    let mut c = client(ctx).await?;
    if let Some(JobsAction::Run { source }) = a.action {
        let r = c.run_source(pb::RunSourceRequest { source: source.clone() }).await.map_err(status)?.into_inner();
        if ctx.json {
            println!(
                "{}",
                serde_json::json!({"source": source, "ingested": r.ingested, "unchanged": r.unchanged,
                    "skipped": r.skipped, "retry": r.retry, "quarantined": r.quarantined})
            );
        } else {
            println!(
                "source `{source}`: {} ingested, {} unchanged, {} skipped, {} to retry, {} quarantined",
                r.ingested, r.unchanged, r.skipped, r.retry, r.quarantined
            );
        }
        return Ok(());
    }
    let sources = c.list_sources(pb::ListSourcesRequest {}).await.map_err(status)?.into_inner().sources;
    let jobs = c
        .list_jobs(pb::ListJobsRequest { source: a.source.clone().unwrap_or_default() })
        .await
        .map_err(status)?
        .into_inner()
        .jobs;
    if ctx.json {
        let src: Vec<serde_json::Value> = sources
            .iter()
            .map(|s| {
                serde_json::json!({"name": s.name, "kind": s.kind, "location": s.location, "schedule": s.schedule,
                    "last_run_unix_ms": s.last_run_unix_ms, "next_run_unix_ms": s.next_run_unix_ms,
                    "done": s.done, "pending_retry": s.pending_retry, "quarantined": s.quarantined, "last_error": s.last_error})
            })
            .collect();
        let js: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                serde_json::json!({"source": j.source, "item": j.item, "sha256": j.sha256, "outcome": j.outcome,
                    "attempts": j.attempts, "last_error": j.last_error, "model_id": j.model_id, "model": j.model,
                    "updated_unix_ms": j.updated_unix_ms, "next_retry_unix_ms": j.next_retry_unix_ms})
            })
            .collect();
        println!("{}", serde_json::json!({"sources": src, "jobs": js}));
        return Ok(());
    }
    let when = |ms: i64| if ms > 0 { utc_time(ms) } else { "-".into() };
    let mut t = table(&["source", "kind", "location", "schedule", "last run", "next run", "done", "retry", "quarantined"], &[6, 7, 8]);
    for s in &sources {
        t.add_row(vec![
            s.name.clone(),
            s.kind.clone(),
            s.location.clone(),
            s.schedule.clone(),
            when(s.last_run_unix_ms),
            when(s.next_run_unix_ms),
            s.done.to_string(),
            s.pending_retry.to_string(),
            s.quarantined.to_string(),
        ]);
    }
    println!("{t}");
    for s in sources.iter().filter(|s| !s.last_error.is_empty()) {
        println!("source `{}` last run failed: {}", s.name, s.last_error);
    }
    if !jobs.is_empty() {
        let mut t = table(&["source", "item", "outcome", "attempts", "model", "updated", "error / next retry"], &[3]);
        for j in &jobs {
            let note = match j.outcome.as_str() {
                "retry" => format!("{} (next try {})", j.last_error, when(j.next_retry_unix_ms)),
                _ => j.last_error.clone(),
            };
            let model = if j.model.is_empty() { "-".to_string() } else { format!("{} (id {})", j.model, j.model_id) };
            t.add_row(vec![
                j.source.clone(),
                j.item.clone(),
                j.outcome.clone(),
                j.attempts.to_string(),
                model,
                when(j.updated_unix_ms),
                note,
            ]);
        }
        println!("{t}");
    }
    Ok(())
}
