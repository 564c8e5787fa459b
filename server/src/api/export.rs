//! The tonic service for `filterdb.v1.Snapshots`: proto ↔ domain only; the datasets are written
//! by `crate::export` on a blocking thread, progress streamed through a bounded channel.

use std::path::PathBuf;
use std::sync::Arc;

use filterdb_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::BoxStream;
use super::convert::{selection, status};
use crate::engine::{Engine, Result as EngineResult};
use crate::export::{DatasetSummary, Progress};

/// The Snapshots service.
#[derive(Clone)]
pub struct SnapshotsService {
    engine: Arc<Engine>,
    retain: usize,
}

impl SnapshotsService {
    /// Wraps an engine; unnamed snapshots keep the newest `retain` under the snapshot folder
    /// (0 keeps all).
    pub fn new(engine: Arc<Engine>, retain: usize) -> Self {
        SnapshotsService { engine, retain }
    }
}

fn out_dir(s: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "out_dir `{s}` must be an absolute path on the server host"
        )));
    }
    Ok(p)
}

fn result_out(s: &DatasetSummary) -> pb::SnapshotResult {
    pb::SnapshotResult {
        path: s.path.display().to_string(),
        models: s.manifest.rows.models,
        layers: s.manifest.rows.layers,
        filters: s.manifest.rows.filters,
        files: s.manifest.files.len() as u32,
        bytes: s.bytes,
        manifest_json: s.manifest_json.clone(),
    }
}

/// Runs `work` on a blocking thread and streams its progress, then its result.
fn run(
    work: impl FnOnce(&(dyn Fn(Progress) + Sync)) -> EngineResult<DatasetSummary> + Send + 'static,
) -> BoxStream<pb::SnapshotProgress> {
    let (tx, rx) = mpsc::channel(16);
    super::worker(move || {
        let last = std::sync::Mutex::new((std::time::Instant::now(), ""));
        let ptx = tx.clone();
        let progress = move |p: Progress| {
            // Phase changes always go out; within a phase at most ~4 messages a second.
            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
            if l.1 == p.phase && l.0.elapsed() < std::time::Duration::from_millis(250) {
                return;
            }
            *l = (std::time::Instant::now(), p.phase);
            let _ = ptx.try_send(Ok(pb::SnapshotProgress {
                phase: p.phase.to_string(),
                filters_done: p.done,
                filters_total: p.total,
                result: None,
            }));
        };
        let msg = match work(&progress) {
            Ok(s) => Ok(pb::SnapshotProgress {
                phase: "done".into(),
                filters_done: s.manifest.rows.filters,
                filters_total: s.manifest.rows.filters,
                result: Some(result_out(&s)),
            }),
            Err(e) => Err(status(e)),
        };
        let _ = tx.blocking_send(msg);
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    type SnapshotStream = BoxStream<pb::SnapshotProgress>;
    type ExportStream = BoxStream<pb::SnapshotProgress>;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let req = request.into_inner();
        let engine = self.engine.clone();
        let retain = self.retain;
        if req.out_dir.is_empty() {
            return Ok(Response::new(run(move |p| engine.snapshot_auto(retain, p))));
        }
        let out = out_dir(&req.out_dir)?;
        Ok(Response::new(run(move |p| engine.snapshot_to(&out, p))))
    }

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let req = request.into_inner();
        let pred = selection(self.engine.vocabularies(), req.selection.as_ref())?;
        let expr = req
            .selection
            .as_ref()
            .map(|s| s.expr.clone())
            .unwrap_or_default();
        if req.out_dir.is_empty() {
            return Err(Status::invalid_argument(
                "out_dir: give the folder to write the export to",
            ));
        }
        let out = out_dir(&req.out_dir)?;
        let engine = self.engine.clone();
        Ok(Response::new(run(move |p| {
            engine.export_to(&pred, &expr, &out, p)
        })))
    }
}
