//! The tonic service for `filterdb.v1.Search`: proto ↔ domain only.

use std::sync::Arc;

use filterdb_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{model_out, selection, status};
use super::{BoxStream, blocking};
use tracing::Instrument;
use crate::engine::Engine;
use crate::search::{
    DEFAULT_EXACT_BELOW, DEFAULT_K, DEFAULT_MAX_K, FilterConditions, Mode, NearestAnswer, NearestQuery, Query, Space,
};

/// The Search service.
#[derive(Clone)]
pub struct SearchService {
    engine: Arc<Engine>,
    max_k: usize,
}

impl SearchService {
    /// Wraps an engine with the default maximum k.
    pub fn new(engine: Arc<Engine>) -> Self {
        SearchService {
            engine,
            max_k: DEFAULT_MAX_K,
        }
    }

    /// Sets the largest k a request may ask for.
    pub fn with_max_k(mut self, max_k: usize) -> Self {
        self.max_k = max_k.max(1);
        self
    }

    fn query(&self, r: &pb::NearestRequest) -> Result<NearestQuery, Status> {
        let query = match &r.query {
            Some(pb::nearest_request::Query::Kernel(b)) => {
                if b.len() != 36 {
                    return Err(Status::invalid_argument(format!(
                        "kernel: need 9 little-endian float32 values (36 bytes), got {} bytes",
                        b.len()
                    )));
                }
                let mut k = [0f32; 9];
                for (v, c) in k.iter_mut().zip(b.chunks_exact(4)) {
                    *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                Query::Kernel(k)
            }
            Some(pb::nearest_request::Query::FilterId(id)) => Query::FilterId(*id),
            None => {
                return Err(Status::invalid_argument(
                    "query: give a kernel or a filter_id",
                ));
            }
        };
        let k = if r.k == 0 { DEFAULT_K } else { r.k as usize };
        if k > self.max_k {
            return Err(Status::invalid_argument(format!(
                "k = {k} is above this server's maximum of {}",
                self.max_k
            )));
        }
        let space = match pb::SearchSpace::try_from(r.space) {
            Ok(pb::SearchSpace::Unspecified | pb::SearchSpace::Raw) => Space::Raw,
            Ok(pb::SearchSpace::Scaled) => Space::Scaled,
            Ok(pb::SearchSpace::Cosine) => Space::Cosine,
            Ok(pb::SearchSpace::Basis) => Space::Basis {
                components: if r.components == 0 {
                    9
                } else {
                    r.components as usize
                },
            },
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "space: unknown value {}",
                    r.space
                )));
            }
        };
        if r.components != 0 && !matches!(space, Space::Basis { .. }) {
            return Err(Status::invalid_argument(
                "components: only meaningful with SEARCH_SPACE_BASIS",
            ));
        }
        let mode = match pb::SearchMode::try_from(r.mode) {
            Ok(pb::SearchMode::Approximate) => Mode::Approximate,
            Ok(pb::SearchMode::Unspecified | pb::SearchMode::Exact) => Mode::Exact,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "mode: unknown value {}",
                    r.mode
                )));
            }
        };
        if mode == Mode::Exact && (r.nprobe != 0 || r.rerank != 0 || r.nprobe_unscaled) {
            return Err(Status::invalid_argument(
                "nprobe, nprobe_unscaled and rerank: only meaningful with SEARCH_MODE_APPROXIMATE",
            ));
        }
        if mode == Mode::Approximate && r.exact_scan {
            return Err(Status::invalid_argument(
                "exact_scan: only meaningful with SEARCH_MODE_EXACT",
            ));
        }
        let mut conditions = FilterConditions::default();
        if let Some(c) = &r.conditions {
            conditions.exclude_zero = c.exclude_zero;
            conditions.exclude_sparse = c.exclude_sparse;
            if c.sparse_eps != 0.0 {
                conditions.sparse_eps = c.sparse_eps;
            }
            conditions.sparse_strict = !c.sparse_non_strict;
        }
        Ok(NearestQuery {
            query,
            k,
            space,
            sign_invariant: r.sign_invariant,
            selection: selection(self.engine.vocabularies(), r.selection.as_ref())?,
            conditions,
            exclude_query_filter: r.exclude_query_filter,
            mode,
            nprobe: r.nprobe as usize,
            nprobe_unscaled: r.nprobe_unscaled,
            rerank: r.rerank as usize,
            exact_below: DEFAULT_EXACT_BELOW,
            exact_scan: r.exact_scan,
        })
    }

    async fn answer(
        &self,
        r: &pb::NearestRequest,
        index: u64,
    ) -> Result<pb::NearestResponse, Status> {
        let q = self.query(r)?;
        let engine = self.engine.clone();
        let max_k = self.max_k;
        let a = blocking(move || engine.nearest(&q, max_k).map_err(status)).await?;
        Ok(response(&a, index))
    }
}

fn kernel_bytes(k: &[f32; 9]) -> Vec<u8> {
    k.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn response(a: &NearestAnswer, index: u64) -> pb::NearestResponse {
    let mut models: Vec<&crate::store::records::ModelRecord> =
        a.neighbors.iter().map(|n| n.model.as_ref()).collect();
    models.sort_by_key(|m| m.model_id);
    models.dedup_by_key(|m| m.model_id);
    pb::NearestResponse {
        neighbors: a
            .neighbors
            .iter()
            .map(|n| {
                let l = &n.layer.record;
                pb::Neighbor {
                    filter_id: n.filter_id,
                    distance: n.distance,
                    kernel: kernel_bytes(&n.kernel),
                    sign_flipped: n.sign_flipped,
                    model_id: n.model.model_id,
                    model_name: n.model.name.clone(),
                    layer_id: l.layer_id,
                    layer_index: l.layer_index,
                    tensor_name: l.tensor_name.clone(),
                    conv_depth: l.conv_depth,
                    conv_depth_norm: l.conv_depth_norm,
                    out_channel: n.out_channel(),
                    in_channel: n.in_channel(),
                    index_in_layer: n.index_in_layer,
                }
            })
            .collect(),
        models: models.into_iter().map(model_out).collect(),
        mode: match a.mode {
            Mode::Exact => pb::SearchMode::Exact,
            Mode::Approximate => pb::SearchMode::Approximate,
        } as i32,
        mode_reason: a.mode_reason.clone(),
        nprobe: a.nprobe,
        candidates_reranked: a.candidates_reranked,
        index_version: a.index_version.unwrap_or(0),
        space: match a.space {
            Space::Raw => pb::SearchSpace::Raw,
            Space::Scaled => pb::SearchSpace::Scaled,
            Space::Cosine => pb::SearchSpace::Cosine,
            Space::Basis { .. } => pb::SearchSpace::Basis,
        } as i32,
        k: a.k as u32,
        components: match a.space {
            Space::Basis { components } => components as u32,
            _ => 0,
        },
        sign_invariant: a.sign_invariant,
        basis_version: a.basis_version.unwrap_or(0),
        query_kernel: kernel_bytes(&a.query_kernel),
        query_index: index,
        layers_scanned: a.layers_scanned,
        filters_scanned: a.filters_scanned,
        elapsed_us: a.elapsed.as_micros() as u64,
    }
}

#[tonic::async_trait]
impl pb::search_server::Search for SearchService {
    async fn nearest(
        &self,
        request: Request<pb::NearestRequest>,
    ) -> Result<Response<pb::NearestResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.answer(&r, 0).await?))
    }

    type NearestBatchStream = BoxStream<pb::NearestResponse>;

    async fn nearest_batch(
        &self,
        request: Request<Streaming<pb::NearestRequest>>,
    ) -> Result<Response<Self::NearestBatchStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut index = 0u64;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                // Each query already uses every core (the scan runs on the rayon pool), so the
                // batch answers one at a time, in order; the bounded channel applies backpressure.
                let out = this
                    .answer(&msg, index)
                    .await
                    .map_err(|s| Status::new(s.code(), format!("query {index}: {}", s.message())));
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    break;
                }
                index += 1;
            }
        }.in_current_span());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn search_index_status(
        &self,
        _request: Request<pb::SearchIndexStatusRequest>,
    ) -> Result<Response<pb::SearchIndexStatusResponse>, Status> {
        let engine = self.engine.clone();
        let s = blocking(move || Ok(engine.search_index_status())).await?;
        Ok(Response::new(index_status(&s)))
    }
}

/// The proto form of the index status.
pub fn index_status(s: &crate::search_index::IndexStatus) -> pb::SearchIndexStatusResponse {
    pb::SearchIndexStatusResponse {
        version: s.version.unwrap_or(0),
        nlist: s.nlist as u32,
        entries: s.entries,
        dead_entries: s.dead,
        models: s.models as u64,
        unindexed_models: s.unindexed_models as u64,
        trained_on: s.trained_on,
        bytes: s.bytes,
        bytes_per_filter: if s.entries > 0 { s.bytes as f64 / s.entries as f64 } else { 0.0 },
        selection_mask_bytes: s.selection_mask_bytes,
        build: Some(pb::SearchIndexBuild {
            running: s.build.running,
            phase: s.build.phase.clone(),
            done: s.build.done,
            total: s.build.total,
            version: s.build.version,
            reason: s.build.reason.clone(),
            error: s.build.error.clone().unwrap_or_default(),
            seconds: s.build.seconds,
        }),
    }
}
