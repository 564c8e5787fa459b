//! The tonic service for `filterdb.v1.CnnFdbImport`: runs [`crate::cnnfdb`] off the async
//! runtime and streams its progress through a bounded channel.

use std::path::PathBuf;
use std::sync::Arc;

use filterdb_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::status;
use super::{BoxStream, blocking};
use crate::cnnfdb::{self, ImportOptions, ImportPhase, ImportProgress};
use crate::engine::Engine;

/// The CnnFdbImport service.
#[derive(Clone)]
pub struct CnnFdbImportService {
    engine: Arc<Engine>,
}

impl CnnFdbImportService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        CnnFdbImportService { engine }
    }
}

fn to_proto(p: &ImportProgress) -> pb::ImportCnnFdbProgress {
    pb::ImportCnnFdbProgress {
        phase: p.phase.as_str().into(),
        model: p.model.clone(),
        models_total: p.models_total,
        models_done: p.models_done,
        models_created: p.models_created,
        models_unchanged: p.models_unchanged,
        filters_total: p.filters_total,
        filters_done: p.filters_done,
        done: p.phase == ImportPhase::Done,
        stopped_early: p.stopped_early,
    }
}

#[tonic::async_trait]
impl pb::cnn_fdb_import_server::CnnFdbImport for CnnFdbImportService {
    type ImportStream = BoxStream<pb::ImportCnnFdbProgress>;

    async fn import(
        &self,
        r: Request<pb::ImportCnnFdbRequest>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        let r = r.into_inner();
        if r.filters_path.is_empty() || r.meta_path.is_empty() {
            return Err(Status::invalid_argument(
                "filters_path and meta_path are required (paths on the server's host)",
            ));
        }
        let (filters, meta) = (PathBuf::from(&r.filters_path), PathBuf::from(&r.meta_path));
        // Checking the release first lets bad input fail the call itself, before any stream.
        let plan = blocking(move || cnnfdb::plan(&filters, &meta).map_err(status)).await?;
        let opts = ImportOptions {
            replace: r.replace,
            max_models: (r.max_models > 0).then_some(r.max_models),
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel::<Result<pb::ImportCnnFdbProgress, Status>>(16);
        let engine = self.engine.clone();
        super::worker(move || {
            let result = cnnfdb::run(&engine, &plan, &opts, &mut |p| {
                if p.phase == ImportPhase::Done {
                    return tx.blocking_send(Ok(to_proto(p))).is_ok();
                }
                // Progress may be dropped when the client lags; a closed channel stops the import.
                !matches!(
                    tx.try_send(Ok(to_proto(p))),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            });
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(status(e)));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
