//! The tonic service for `filterdb.v1.Jobs`.

use std::sync::Arc;

use filterdb_proto as pb;
use tonic::{Request, Response, Status};

use super::blocking;
use super::convert::status;
use crate::jobs::{Jobs, Outcome};

/// The Jobs service.
#[derive(Clone)]
pub struct JobsService {
    jobs: Arc<Jobs>,
}

impl JobsService {
    /// Wraps the scheduler.
    pub fn new(jobs: Arc<Jobs>) -> Self {
        JobsService { jobs }
    }
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Done => "done",
        Outcome::Retry => "retry",
        Outcome::Quarantined => "quarantined",
    }
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    async fn list_sources(&self, _r: Request<pb::ListSourcesRequest>) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let jobs = self.jobs.clone();
        let out = blocking(move || {
            let all = jobs.list(None).map_err(status)?;
            Ok(jobs
                .sources()
                .into_iter()
                .map(|(cfg, schedule, rt)| {
                    let mine = all.iter().filter(|j| j.source == cfg.name);
                    let (mut done, mut retry, mut bad) = (0, 0, 0);
                    for j in mine {
                        match j.outcome {
                            Outcome::Done => done += 1,
                            Outcome::Retry => retry += 1,
                            Outcome::Quarantined => bad += 1,
                        }
                    }
                    pb::SourceStatus {
                        name: cfg.name.clone(),
                        kind: if cfg.inbox.is_some() { "inbox".into() } else { "http_catalog".into() },
                        location: cfg
                            .inbox
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .or(cfg.catalog_url.clone())
                            .unwrap_or_default(),
                        schedule,
                        last_run_unix_ms: rt.last_run_unix_ms,
                        next_run_unix_ms: rt.next_run_unix_ms,
                        done,
                        pending_retry: retry,
                        quarantined: bad,
                        last_error: rt.last_error,
                    }
                })
                .collect())
        })
        .await?;
        Ok(Response::new(pb::ListSourcesResponse { sources: out }))
    }

    async fn list_jobs(&self, r: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let source = r.into_inner().source;
        let jobs = self.jobs.clone();
        let list = blocking(move || jobs.list((!source.is_empty()).then_some(source.as_str())).map_err(status)).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: list
                .into_iter()
                .map(|j| pb::JobState {
                    source: j.source,
                    item: j.item,
                    sha256: j.sha256,
                    outcome: outcome(j.outcome).into(),
                    attempts: j.attempts,
                    last_error: j.last_error,
                    model_id: j.model_id.unwrap_or(0),
                    model: j.model,
                    updated_unix_ms: j.updated_unix_ms,
                    next_retry_unix_ms: j.next_retry_unix_ms,
                })
                .collect(),
        }))
    }

    async fn run_source(&self, r: Request<pb::RunSourceRequest>) -> Result<Response<pb::RunSourceResponse>, Status> {
        let source = r.into_inner().source;
        let jobs = self.jobs.clone();
        let s = blocking(move || jobs.run(&source).map_err(status)).await?;
        Ok(Response::new(pb::RunSourceResponse {
            ingested: s.ingested,
            unchanged: s.unchanged,
            skipped: s.skipped,
            retry: s.retry,
            quarantined: s.quarantined,
        }))
    }
}
