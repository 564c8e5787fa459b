//! The tonic service for `filterdb.v1.FilterDb`: converts proto ↔ domain, runs engine calls off
//! the async runtime, and streams large results in bounded batches.

pub mod admin;
pub mod analytics;
pub mod cnnfdb;
pub mod convert;
pub mod jobs;
pub mod export;
pub mod flight;
pub mod search;

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;

use filterdb_proto as pb;
use futures::{Stream, StreamExt};
use tracing::Instrument;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Engine, IngestOutcome, IngestRequest, NameConflict, Phase};
use convert::*;

/// Limits the API enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest checkpoint upload, bytes.
    pub max_upload_bytes: u64,
    /// Largest ListModels page.
    pub max_page_size: u32,
    /// Largest GetFilters batch, filters.
    pub max_filter_batch: u32,
    /// Most filters one GetFilters stream may return (0: no limit; Flight exports are exempt).
    pub max_stream_rows: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_upload_bytes: 16 << 30, max_page_size: 1000, max_filter_batch: 262_144, max_stream_rows: 0 }
    }
}

/// The FilterDb service.
#[derive(Clone)]
pub struct FilterDbService {
    engine: Arc<Engine>,
    limits: Limits,
}

impl FilterDbService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>, limits: Limits) -> Self {
        FilterDbService { engine, limits }
    }
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Runs `f` on a blocking worker inside the caller's tracing span (the call's request id).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    worker(f).await.map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

/// `spawn_blocking` inside the caller's tracing span, so the worker's log lines carry the call's
/// request id.
pub(crate) fn worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> tokio::task::JoinHandle<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

const PROGRESS_EVERY_BYTES: u64 = 16 << 20;

#[tonic::async_trait]
impl pb::filter_db_server::FilterDb for FilterDbService {
    type IngestStream = BoxStream<pb::IngestResponse>;

    async fn ingest(
        &self,
        request: Request<Streaming<pb::IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let mut inbound = request.into_inner();
        let header = match inbound.message().await? {
            Some(pb::IngestRequest { part: Some(pb::ingest_request::Part::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("Ingest: the first message must be the header")),
        };
        let file_name = if header.file_name.is_empty() { "<upload>".to_string() } else { header.file_name.clone() };
        let meta = meta_in(header.meta.as_ref());
        // Fail fast on labels before the client uploads gigabytes.
        self.engine.normalize_meta(&meta).map_err(status)?;
        if header.total_bytes > self.limits.max_upload_bytes {
            return Err(Status::resource_exhausted(format!(
                "{file_name}: {} bytes exceeds the upload limit of {} bytes",
                header.total_bytes, self.limits.max_upload_bytes
            )));
        }
        let format = format_in(header.format)?;
        let on_conflict = match pb::NameConflict::try_from(header.on_name_conflict) {
            Ok(pb::NameConflict::Replace) => NameConflict::Replace,
            Ok(_) => NameConflict::Error,
            Err(_) => return Err(Status::invalid_argument("header.on_name_conflict: unknown value")),
        };
        let engine = self.engine.clone();
        let limit = self.limits.max_upload_bytes;
        let (tx, rx) = mpsc::channel::<Result<pb::IngestResponse, Status>>(16);
        tokio::spawn(
            async move {
                let result = run_ingest(engine, inbound, header, file_name, meta, format, on_conflict, limit, tx.clone()).await;
                let msg = result.map(|r| pb::IngestResponse { part: Some(pb::ingest_response::Part::Result(r)) });
                let _ = tx.send(msg).await;
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let r = request.into_inner();
        let pred = selection(self.engine.vocabularies(), r.selection.as_ref())?;
        let size = match r.page_size {
            0 => 100,
            n => n.min(self.limits.max_page_size),
        } as usize;
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse::<u64>().map_err(|_| {
                Status::invalid_argument(format!("page_token `{}` is not one this server issued", r.page_token))
            })?)
        };
        let engine = self.engine.clone();
        let (models, more) = blocking(move || Ok(engine.list_models(&pred, after, size))).await?;
        let next_page_token = match (more, models.last()) {
            (true, Some(m)) => m.model_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListModelsResponse { models: models.iter().map(|m| model_out(m)).collect(), next_page_token }))
    }

    async fn get_model(&self, request: Request<pb::GetModelRequest>) -> Result<Response<pb::Model>, Status> {
        let r = model_ref(request.get_ref().model.as_ref())?;
        let m = self.engine.model(&r).map_err(status)?;
        Ok(Response::new(model_out(&m)))
    }

    async fn list_layers(
        &self,
        request: Request<pb::ListLayersRequest>,
    ) -> Result<Response<pb::ListLayersResponse>, Status> {
        let r = request.into_inner();
        let mref = model_ref(r.model.as_ref())?;
        let pred = selection(self.engine.vocabularies(), r.selection.as_ref())?;
        let engine = self.engine.clone();
        let (m, layers) = blocking(move || engine.list_layers(&mref, &pred).map_err(status)).await?;
        Ok(Response::new(pb::ListLayersResponse {
            model: Some(model_out(&m)),
            layers: layers.iter().map(|l| layer_out(&l.record, &l.stats)).collect(),
        }))
    }

    type GetFiltersStream = BoxStream<pb::FilterBatch>;

    async fn get_filters(
        &self,
        request: Request<pb::GetFiltersRequest>,
    ) -> Result<Response<Self::GetFiltersStream>, Status> {
        let r = request.into_inner();
        let target = filter_target(r.target.as_ref())?;
        let batch = match r.batch_size {
            0 => 65_536,
            n if n > self.limits.max_filter_batch => {
                return Err(Status::invalid_argument(format!(
                    "batch_size {n} exceeds the maximum of {} filters per message",
                    self.limits.max_filter_batch
                )));
            }
            n => n,
        } as u64;
        let engine = self.engine.clone();
        let segments = {
            let engine = engine.clone();
            blocking(move || engine.plan_filters(&target).map_err(status)).await?
        };
        let rows: u64 = segments.iter().map(|s| s.end - s.start).sum();
        if self.limits.max_stream_rows > 0 && rows > self.limits.max_stream_rows {
            return Err(Status::resource_exhausted(format!(
                "GetFilters would stream {rows} filters, above this server's limit of {} \
                 (limits.max_stream_rows); narrow the request or export with Arrow Flight",
                self.limits.max_stream_rows
            )));
        }
        metrics::counter!("filterdb_get_filters_rows_total").increment(rows);
        let (tx, rx) = mpsc::channel::<Result<pb::FilterBatch, Status>>(4);
        worker(move || {
            let db = engine.store().db().clone();
            let snap = db.snapshot();
            for seg in segments {
                let mut start = seg.start;
                while start < seg.end {
                    let end = (start + batch).min(seg.end);
                    let msg = engine
                        .store()
                        .read_layer_filters(Some(&snap), &seg.layer, start, end)
                        .map(|vals| pb::FilterBatch {
                            model_id: seg.layer.model_id,
                            layer_id: seg.layer.layer_id,
                            layer_index: seg.layer.layer_index,
                            first_filter_id: seg.layer.first_filter_id + start,
                            count: (end - start) as u32,
                            kernels: bytemuck::cast_slice::<f32, u8>(&vals).to_vec(),
                            first_index_in_layer: start,
                        })
                        .map_err(|e| status(e.into()));
                    let failed = msg.is_err();
                    if tx.blocking_send(msg).is_err() || failed {
                        return; // client went away, or the error was sent
                    }
                    start = end;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn census(&self, request: Request<pb::CensusRequest>) -> Result<Response<pb::CensusResponse>, Status> {
        let r = request.into_inner();
        let pred = selection(self.engine.vocabularies(), r.selection.as_ref())?;
        let group_by = r.group_by.iter().map(|f| field(*f, "group_by")).collect::<Result<Vec<_>, _>>()?;
        let engine = self.engine.clone();
        let (rows, total) = blocking(move || Ok(engine.census(&pred, &group_by))).await?;
        Ok(Response::new(pb::CensusResponse {
            groups: rows.iter().map(census_out).collect(),
            total: Some(census_out(&total)),
        }))
    }

    async fn update_model_meta(
        &self,
        request: Request<pb::UpdateModelMetaRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let r = request.into_inner();
        let mref = model_ref(r.model.as_ref())?;
        let update = update_in(r.update.as_ref());
        let engine = self.engine.clone();
        let m = blocking(move || engine.update_meta(&mref, &update).map_err(status)).await?;
        Ok(Response::new(model_out(&m)))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        let mref = model_ref(request.get_ref().model.as_ref())?;
        let engine = self.engine.clone();
        let m = blocking(move || engine.delete_model(&mref).map_err(status)).await?;
        Ok(Response::new(pb::DeleteModelResponse { deleted: Some(model_out(&m)) }))
    }

    async fn get_vocabularies(
        &self,
        _request: Request<pb::GetVocabulariesRequest>,
    ) -> Result<Response<pb::Vocabularies>, Status> {
        Ok(Response::new(vocabularies_out(self.engine.vocabularies())))
    }
}

fn progress_msg(phase: pb::IngestPhase, received: u64, total: u64, done: u32, layers: u32) -> pb::IngestResponse {
    pb::IngestResponse {
        part: Some(pb::ingest_response::Part::Progress(pb::IngestProgress {
            phase: phase as i32,
            bytes_received: received,
            total_bytes: total,
            layers_done: done,
            layers_total: layers,
        })),
    }
}

/// Receives the upload into a staged file, then ingests it.
#[allow(clippy::too_many_arguments)]
async fn run_ingest(
    engine: Arc<Engine>,
    mut inbound: Streaming<pb::IngestRequest>,
    header: pb::IngestHeader,
    file_name: String,
    meta: crate::engine::MetaInput,
    format: Option<crate::readers::Format>,
    on_conflict: NameConflict,
    limit: u64,
    tx: mpsc::Sender<Result<pb::IngestResponse, Status>>,
) -> Result<pb::IngestResult, Status> {
    let staging = engine.staging_dir().to_path_buf();
    let mut staged = worker(move || tempfile::NamedTempFile::new_in(staging))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("cannot stage upload: {e}")))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut next_progress = 0u64;
    let total = header.total_bytes;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, staged.as_file_mut());
    loop {
        // The response gone (client away, or the deadline cut it): stop receiving.
        let msg = tokio::select! {
            m = inbound.next() => m,
            _ = tx.closed() => return Err(Status::cancelled("Ingest: the response stream was closed")),
        };
        let Some(msg) = msg else { break };
        let msg = msg?;
        match msg.part {
            Some(pb::ingest_request::Part::Chunk(c)) => {
                received += c.len() as u64;
                if received > limit {
                    return Err(Status::resource_exhausted(format!(
                        "{file_name}: upload exceeds the limit of {limit} bytes"
                    )));
                }
                hasher.update(&c);
                // Small synchronous writes into a BufWriter; the page cache absorbs them.
                writer.write_all(&c).map_err(|e| Status::internal(format!("staging write failed: {e}")))?;
                if received >= next_progress {
                    next_progress = received + PROGRESS_EVERY_BYTES;
                    // try_send: progress is dropped rather than blocking the upload.
                    let _ = tx.try_send(Ok(progress_msg(pb::IngestPhase::Receiving, received, total, 0, 0)));
                }
            }
            Some(pb::ingest_request::Part::Header(_)) => {
                return Err(Status::invalid_argument("Ingest: only the first message may be a header"));
            }
            None => {}
        }
    }
    writer.flush().map_err(|e| Status::internal(format!("staging write failed: {e}")))?;
    drop(writer);
    if received == 0 {
        return Err(Status::invalid_argument(format!("{file_name}: the upload is empty")));
    }
    if total != 0 && total != received {
        return Err(Status::invalid_argument(format!(
            "{file_name}: header announced {total} bytes but {received} arrived (interrupted upload?)"
        )));
    }
    let sha256 = hex::encode(hasher.finalize());
    metrics::counter!("filterdb_ingest_bytes_total").increment(received);
    if !header.expected_sha256.is_empty() && !header.expected_sha256.eq_ignore_ascii_case(&sha256) {
        return Err(Status::invalid_argument(format!(
            "{file_name}: sha256 of the received bytes is {sha256}, expected {}",
            header.expected_sha256
        )));
    }
    let req = IngestRequest { meta, file_name, format, sha256, size_bytes: received, on_conflict };
    let ptx = tx.clone();
    let (outcome, model) = worker(move || {
        let progress = move |phase: Phase, done: u32, layers: u32| {
            let p = match phase {
                Phase::Parsing => pb::IngestPhase::Parsing,
                Phase::Statistics => pb::IngestPhase::Statistics,
                Phase::Writing => pb::IngestPhase::Writing,
            };
            let _ = ptx.try_send(Ok(progress_msg(p, received, total, done, layers)));
        };
        let r = engine.ingest(staged.path(), &req, &progress);
        drop(staged);
        r
    })
    .await
    .map_err(|e| Status::internal(format!("ingest worker failed: {e}")))?
    .map_err(status)?;
    let outcome_label = match outcome {
        IngestOutcome::Created => "created",
        IngestOutcome::Unchanged => "unchanged",
        IngestOutcome::Replaced => "replaced",
    };
    metrics::counter!("filterdb_ingest_models_total", "outcome" => outcome_label).increment(1);
    if !matches!(outcome, IngestOutcome::Unchanged) {
        metrics::counter!("filterdb_ingest_filters_total").increment(model.n_filters);
    }
    let outcome = match outcome {
        IngestOutcome::Created => pb::IngestOutcome::Created,
        IngestOutcome::Unchanged => pb::IngestOutcome::Unchanged,
        IngestOutcome::Replaced => pb::IngestOutcome::Replaced,
    };
    Ok(pb::IngestResult { outcome: outcome as i32, model: Some(model_out(&model)) })
}
