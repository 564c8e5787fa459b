//! The tonic service for `filterdb.v1.Admin`: online RocksDB checkpoints (backups).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use filterdb_proto as pb;
use tonic::{Request, Response, Status};

use super::blocking;
use crate::engine::Engine;

/// The Admin service.
#[derive(Clone)]
pub struct AdminService {
    engine: Arc<Engine>,
}

impl AdminService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        AdminService { engine }
    }
}

/// Files and bytes under `dir`.
fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => {
                    let (f, b) = tree_size(&e.path());
                    files += f;
                    bytes += b;
                }
                Ok(m) => {
                    files += 1;
                    bytes += m.len();
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}

/// Writes an online checkpoint of the engine's database to `out/db`; `out` must be absolute
/// and not exist.
pub fn checkpoint(engine: &Engine, out: &Path) -> Result<(u64, u64), Status> {
    if !out.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "path `{}` must be an absolute path on the server host",
            out.display()
        )));
    }
    if out.exists() {
        return Err(Status::already_exists(format!(
            "{} already exists; give a new path",
            out.display()
        )));
    }
    match out.parent() {
        Some(p) if p.is_dir() => {}
        _ => {
            return Err(Status::failed_precondition(format!(
                "the parent folder of {} does not exist on the server host",
                out.display()
            )));
        }
    }
    std::fs::create_dir(out)
        .map_err(|e| Status::internal(format!("cannot create {}: {e}", out.display())))?;
    let db = engine.store().db();
    let cp = rocksdb::checkpoint::Checkpoint::new(db.as_ref())
        .map_err(|e| Status::internal(format!("checkpoint: {e}")))?;
    if let Err(e) = cp.create_checkpoint(out.join("db")) {
        let _ = std::fs::remove_dir_all(out);
        return Err(Status::internal(format!(
            "checkpoint into {}: {e}",
            out.display()
        )));
    }
    Ok(tree_size(out))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    type RebuildSearchIndexStream = super::BoxStream<pb::RebuildSearchIndexProgress>;

    async fn rebuild_search_index(
        &self,
        request: Request<pb::RebuildSearchIndexRequest>,
    ) -> Result<Response<Self::RebuildSearchIndexStream>, Status> {
        crate::ops::require(request.extensions(), crate::config::Role::Admin, "RebuildSearchIndex")?;
        let retrain = request.into_inner().retrain;
        let engine = self.engine.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let last = std::sync::Mutex::new(std::time::Instant::now());
            let progress = |phase: &str, done: u64, total: u64| {
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                // Phase changes always; within a phase at most 4 messages a second.
                if l.elapsed() >= std::time::Duration::from_millis(250) || done == 0 || done == total {
                    *l = std::time::Instant::now();
                    let _ = tx.try_send(Ok(pb::RebuildSearchIndexProgress {
                        phase: phase.into(),
                        done,
                        total,
                        status: None,
                    }));
                }
            };
            let out = engine.build_search_index_with("requested (Admin.RebuildSearchIndex)", retrain, &progress);
            let msg = match out {
                Ok(s) => Ok(pb::RebuildSearchIndexProgress {
                    phase: "done".into(),
                    done: s.build.total,
                    total: s.build.total,
                    status: Some(super::search::index_status(&s)),
                }),
                Err(e) => Err(super::convert::status(e)),
            };
            let _ = tx.blocking_send(msg);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        crate::ops::require(
            request.extensions(),
            crate::config::Role::Admin,
            "Checkpoint",
        )?;
        let out = PathBuf::from(request.into_inner().path);
        if out.as_os_str().is_empty() {
            return Err(Status::invalid_argument(
                "path: give an absolute folder path that does not exist",
            ));
        }
        let engine = self.engine.clone();
        let started = std::time::Instant::now();
        let o = out.clone();
        let (files, bytes) = blocking(move || checkpoint(&engine, &o)).await?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(path = %out.display(), files, bytes, seconds, "checkpoint written");
        metrics::counter!("filterdb_checkpoints_total").increment(1);
        Ok(Response::new(pb::CheckpointResponse {
            path: out.display().to_string(),
            files,
            bytes,
            seconds,
        }))
    }
}
