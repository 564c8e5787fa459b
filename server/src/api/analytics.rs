//! The tonic service for `filterdb.v1.Analytics`: proto ↔ domain only.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use filterdb_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{field, selection, status};
use super::{BoxStream, blocking};
use crate::analytics::{Grouping, ProfileMetric, QualityRow, Weights, record_basis};
use crate::engine::Engine;
use crate::quality::{Basis, DegenerationThresholds, QualityOptions};
use crate::selection::{Field, Pred};
use crate::vocab::Vocabularies;

/// The Analytics service.
#[derive(Clone)]
pub struct AnalyticsService {
    engine: Arc<Engine>,
    max_groups: usize,
}

/// Most groups an analytics answer holds unless configured otherwise.
pub const DEFAULT_MAX_GROUPS: usize = 10_000;

impl AnalyticsService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        AnalyticsService { engine, max_groups: DEFAULT_MAX_GROUPS }
    }

    /// Sets the most groups an answer may hold.
    pub fn with_max_groups(mut self, max_groups: usize) -> Self {
        self.max_groups = max_groups.max(1);
        self
    }
}

fn grouping(v: &Vocabularies, g: Option<&pb::GroupSpec>) -> Result<Grouping, Status> {
    let Some(g) = g else { return Ok(Grouping::All) };
    if !g.selections.is_empty() {
        let mut named = Vec::new();
        for s in &g.selections {
            if s.name.is_empty() {
                return Err(Status::invalid_argument("group.selections: every group needs a name"));
            }
            named.push((s.name.clone(), selection(v, s.selection.as_ref())?));
        }
        return Ok(Grouping::Named(named));
    }
    if g.field == 0 {
        return Ok(Grouping::All);
    }
    Ok(Grouping::Field(field(g.field, "group.field")?))
}

fn basis_out(b: &Basis) -> pb::FilterBasis {
    pb::FilterBasis {
        n: b.n,
        mean: b.mean.to_vec(),
        components: b.components.iter().flatten().copied().collect(),
        eigenvalues: b.eigenvalues.to_vec(),
        evr: b.evr.to_vec(),
        cumulative_evr: b.cumulative_evr.to_vec(),
    }
}

fn quality_options(o: Option<&pb::QualityOptions>, remove_sparse: bool) -> QualityOptions {
    let mut q = QualityOptions::default();
    if let Some(o) = o {
        if o.eps != 0.0 {
            q.eps = o.eps;
        }
        q.strict = !o.non_strict;
        q.scaled = o.scaled;
        if let Some(t) = &o.thresholds {
            let d = DegenerationThresholds::default();
            q.thresholds = DegenerationThresholds {
                random_margin: if t.random_margin != 0.0 { t.random_margin } else { d.random_margin },
                low_entropy: if t.low_entropy != 0.0 { t.low_entropy } else { d.low_entropy },
                sparse_share: if t.sparse_share != 0.0 { t.sparse_share } else { d.sparse_share },
            };
        }
    }
    q.remove_sparse = remove_sparse;
    q
}

fn nan(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}

/// A quality row of a profiled (not stored) layer: no layer or model id.
fn quality_row(
    q: &crate::quality::LayerQuality,
    layer_index: u32,
    tensor_name: &str,
    conv_depth: u32,
    conv_depth_norm: f64,
) -> pb::LayerQualityRow {
    pb::LayerQualityRow {
        layer_id: 0,
        model_id: 0,
        layer_index,
        tensor_name: tensor_name.to_string(),
        conv_depth,
        conv_depth_norm,
        n: q.n,
        sparsity: q.sparsity,
        entropy: nan(q.entropy),
        entropy_norm: nan(q.entropy_norm),
        entropy_clean: nan(q.entropy_clean),
        entropy_clean_norm: nan(q.entropy_clean_norm),
        orthogonality: nan(q.orthogonality),
        random_like: q.flags.random_like,
        low_diversity: q.flags.low_diversity,
        sparse_heavy: q.flags.sparse_heavy,
        degenerate: q.flags.combined,
    }
}

/// The LayerQuality answer in columns, each model and each distinct tensor name once.
fn quality_columns(rows: &[QualityRow]) -> pb::LayerQualityResponse {
    let mut out = pb::LayerQualityResponse::default();
    let mut models = HashSet::new();
    let mut names: HashMap<&str, u32> = HashMap::new();
    for row in rows {
        let (l, q) = (&row.layer.record, &row.quality);
        if models.insert(l.model_id) {
            out.models.push(pb::LayerQualityModel { model_id: l.model_id, name: row.model.name.clone() });
        }
        let next = names.len() as u32;
        let name = *names.entry(&l.tensor_name).or_insert_with(|| {
            out.tensor_names.push(l.tensor_name.clone());
            next
        });
        out.layer_id.push(l.layer_id);
        out.model_id.push(l.model_id);
        out.layer_index.push(l.layer_index);
        out.tensor_name_index.push(name);
        out.conv_depth.push(l.conv_depth);
        out.conv_depth_norm.push(l.conv_depth_norm);
        out.n.push(q.n);
        out.sparsity.push(q.sparsity);
        out.entropy.push(nan(q.entropy));
        out.entropy_norm.push(nan(q.entropy_norm));
        out.entropy_clean.push(nan(q.entropy_clean));
        out.entropy_clean_norm.push(nan(q.entropy_clean_norm));
        out.orthogonality.push(nan(q.orthogonality));
        out.random_like.push(q.flags.random_like);
        out.low_diversity.push(q.flags.low_diversity);
        out.sparse_heavy.push(q.flags.sparse_heavy);
        out.degenerate.push(q.flags.combined);
    }
    out
}

impl AnalyticsService {
    fn pred(&self, s: Option<&pb::Selection>) -> Result<Pred, Status> {
        selection(self.engine.vocabularies(), s)
    }
}

#[tonic::async_trait]
impl pb::analytics_server::Analytics for AnalyticsService {
    async fn basis(&self, request: Request<pb::BasisRequest>) -> Result<Response<pb::BasisResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let g = grouping(self.engine.vocabularies(), r.group.as_ref())?;
        let engine = self.engine.clone();
        let (overall, groups) = blocking(move || Ok(engine.basis(&pred, &g, r.raw))).await?;
        Ok(Response::new(pb::BasisResponse {
            basis: overall.as_ref().map(basis_out),
            groups: groups.iter().map(|(k, b)| pb::GroupBasis { key: k.clone(), basis: Some(basis_out(b)) }).collect(),
        }))
    }

    type PinBasisStream = BoxStream<pb::PinBasisProgress>;

    async fn pin_basis(&self, request: Request<pb::PinBasisRequest>) -> Result<Response<Self::PinBasisStream>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let expr = r.selection.as_ref().map(|s| s.expr.clone()).unwrap_or_default();
        let bins = if r.bins == 0 { 70 } else { r.bins };
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(16);
        super::worker(move || {
            let ptx = tx.clone();
            let progress = move |version: u32, phase: &str, done: u64, total: u64| {
                // Progress may be dropped when the client reads slowly; the final message is not.
                let _ = ptx.try_send(Ok(pb::PinBasisProgress { version, phase: phase.into(), layers_done: done, layers_total: total }));
            };
            let result = engine.pin_basis(&pred, &expr, bins, &progress);
            let last = match result {
                Ok(b) => Ok(pb::PinBasisProgress { version: b.version, phase: "done".into(), layers_done: 0, layers_total: 0 }),
                Err(e) => Err(status(e)),
            };
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_pinned_basis(&self, _request: Request<pb::GetPinnedBasisRequest>) -> Result<Response<pb::PinnedBasis>, Status> {
        let b = self.engine.pinned_basis().ok_or_else(|| {
            Status::failed_precondition("no reference basis is pinned yet: pin one first (PinBasis RPC, `filterdb pin-basis`)")
        })?;
        Ok(Response::new(pb::PinnedBasis {
            version: b.version,
            basis: Some(basis_out(&record_basis(&b))),
            selection_expr: b.selection_expr.clone(),
            range_min: b.range_min,
            range_max: b.range_max,
            bins: b.bins,
            created_at_unix_ms: b.created_at_unix_ms,
        }))
    }

    async fn compare_bases(&self, request: Request<pb::CompareBasesRequest>) -> Result<Response<pb::CompareBasesResponse>, Status> {
        let r = request.into_inner();
        let a = self.pred(r.a.as_ref())?;
        let b = self.pred(r.b.as_ref())?;
        let engine = self.engine.clone();
        let raw = r.raw;
        let (ba, bb) = blocking(move || {
            let ba = engine.basis(&a, &Grouping::All, raw).0;
            let bb = engine.basis(&b, &Grouping::All, raw).0;
            Ok((ba, bb))
        })
        .await?;
        let (Some(ba), Some(bb)) = (ba, bb) else {
            return Err(Status::failed_precondition("one of the selections holds fewer than 2 filters: no basis"));
        };
        let c = crate::quality::compare_bases(&ba, &bb);
        Ok(Response::new(pb::CompareBasesResponse {
            a: Some(basis_out(&ba)),
            b: Some(basis_out(&bb)),
            abs_cos: c.abs_cos.iter().flatten().copied().collect(),
            matching: c.matching.iter().map(|(i, j, v)| pb::ComponentMatch { a: *i as u32, b: *j as u32, abs_cos: *v }).collect(),
            principal_angles_deg: c.principal_angles_deg.clone(),
            evr_diff: c.evr_diff.to_vec(),
        }))
    }

    async fn distributions(&self, request: Request<pb::DistributionsRequest>) -> Result<Response<pb::DistributionsResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let g = grouping(self.engine.vocabularies(), r.group.as_ref())?;
        let engine = self.engine.clone();
        let scan = r.bins != 0 || r.range_min.is_some() || r.range_max.is_some();
        let (bins, lo, hi) = (r.bins, r.range_min, r.range_max);
        let (record, groups) = blocking(move || {
            if scan { engine.distributions_scan(&pred, &g, bins, (lo, hi)) } else { engine.distributions(&pred, &g) }
                .map_err(status)
        })
        .await?;
        if groups.len() > self.max_groups {
            return Err(Status::resource_exhausted(format!("{} groups exceed the limit of {}", groups.len(), self.max_groups)));
        }
        let bins = record.bins as usize;
        Ok(Response::new(pb::DistributionsResponse {
            basis_version: record.version,
            range_min: record.range_min,
            range_max: record.range_max,
            bins: record.bins,
            groups: groups
                .into_iter()
                .map(|g| pb::GroupDistribution {
                    key: g.key,
                    n_filters: g.n_filters,
                    components: (0..9)
                        .map(|i| pb::ComponentHistogram {
                            counts: g.counts[i * bins..(i + 1) * bins].to_vec(),
                            out_of_range: g.out_of_range[i],
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn drift_matrix(&self, request: Request<pb::DriftMatrixRequest>) -> Result<Response<pb::DriftMatrixResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let g = grouping(self.engine.vocabularies(), r.group.as_ref())?;
        let weights = match pb::DriftWeights::try_from(r.weights) {
            Ok(pb::DriftWeights::Uniform) => Weights::Uniform,
            Ok(pb::DriftWeights::Custom) => Weights::Custom(r.custom_weights.clone()),
            Ok(_) => Weights::Evr,
            Err(_) => return Err(Status::invalid_argument("weights: unknown value")),
        };
        let engine = self.engine.clone();
        let sort = r.sort_by_mean;
        let binning = (r.bins, r.range_min, r.range_max);
        let m = blocking(move || engine.drift_matrix(&pred, &g, &weights, sort, binning).map_err(status)).await?;
        if m.keys.len() > self.max_groups {
            return Err(Status::resource_exhausted(format!("{} groups exceed the limit of {}", m.keys.len(), self.max_groups)));
        }
        Ok(Response::new(pb::DriftMatrixResponse {
            basis_version: m.basis_version,
            keys: m.keys,
            n_filters: m.n_filters,
            d: m.d,
            per_component: m.per_component,
            weights: m.weights,
            upper_triangle_summary: m.upper_triangle_summary,
        }))
    }

    async fn layer_quality(&self, request: Request<pb::LayerQualityRequest>) -> Result<Response<pb::LayerQualityResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let opts = quality_options(r.options.as_ref(), false);
        let engine = self.engine.clone();
        let limit = r.limit as usize;
        // Columns are built on the worker too: 19,000 layers are not work for the async runtime.
        let answer = blocking(move || engine.layer_quality(&pred, &opts, limit).map(|rows| quality_columns(&rows)).map_err(status)).await?;
        Ok(Response::new(answer))
    }

    async fn degeneration_ranking(
        &self,
        request: Request<pb::DegenerationRankingRequest>,
    ) -> Result<Response<pb::DegenerationRankingResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let opts = quality_options(r.options.as_ref(), false);
        let engine = self.engine.clone();
        let (by_count, limit) = (r.by_count, r.limit as usize);
        let rows = blocking(move || engine.degeneration_ranking(&pred, &opts, by_count, limit).map_err(status)).await?;
        Ok(Response::new(pb::DegenerationRankingResponse {
            models: rows
                .into_iter()
                .map(|m| pb::ModelDegeneration {
                    model_id: m.model.model_id,
                    model: m.model.name.clone(),
                    layers: m.layers,
                    degenerate_layers: m.degenerate_layers,
                    degenerate_share: m.degenerate_share,
                    mean_sparsity: m.mean_sparsity,
                    mean_entropy: m.mean_entropy,
                    degenerate_depths: m.degenerate_depths,
                })
                .collect(),
        }))
    }

    async fn depth_profile(&self, request: Request<pb::DepthProfileRequest>) -> Result<Response<pb::DepthProfileResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let opts = quality_options(r.options.as_ref(), false);
        let metric = match pb::QualityMetric::try_from(r.metric) {
            Ok(pb::QualityMetric::Entropy) => ProfileMetric::Entropy,
            Ok(pb::QualityMetric::EntropyNorm) => ProfileMetric::EntropyNorm,
            Ok(pb::QualityMetric::Orthogonality) => ProfileMetric::Orthogonality,
            Ok(_) => ProfileMetric::Sparsity,
            Err(_) => return Err(Status::invalid_argument("metric: unknown value")),
        };
        let binning = if r.binning == 0 { Field::DepthDecile } else { field(r.binning, "binning")? };
        let engine = self.engine.clone();
        let (bins, cells) = blocking(move || engine.depth_profile(&pred, metric, &opts, binning).map_err(status)).await?;
        Ok(Response::new(pb::DepthProfileResponse {
            bins,
            cells: cells
                .into_iter()
                .map(|(model, bin, value, layers)| pb::DepthProfileCell { model, bin, value, layers })
                .collect(),
        }))
    }

    async fn profile_checkpoint(
        &self,
        request: Request<tonic::Streaming<pb::ProfileCheckpointRequest>>,
    ) -> Result<Response<pb::ProfileCheckpointResponse>, Status> {
        // Storing the profiled checkpoint is an ingest: it needs the write role.
        let may_store = crate::ops::require(request.extensions(), crate::config::Role::Write, "ProfileCheckpoint with store = true");
        Ok(Response::new(self.profile_checked(request.into_inner(), may_store).await?))
    }

    async fn density2_d(&self, request: Request<pb::Density2DRequest>) -> Result<Response<pb::Density2DResponse>, Status> {
        let r = request.into_inner();
        let pred = self.pred(r.selection.as_ref())?;
        let (i, j) = if r.i == 0 && r.j == 0 { (0, 1) } else { (r.i as usize, r.j as usize) };
        let engine = self.engine.clone();
        let (version, density, n) = blocking(move || engine.density_2d(&pred, i, j).map_err(status)).await?;
        Ok(Response::new(pb::Density2DResponse { basis_version: version, density, n_filters: n }))
    }
}

impl AnalyticsService {
    /// ProfileCheckpoint: stage the upload, profile it, optionally store it.
    pub async fn profile(
        &self,
        inbound: tonic::Streaming<pb::ProfileCheckpointRequest>,
    ) -> Result<pb::ProfileCheckpointResponse, Status> {
        self.profile_checked(inbound, Ok(())).await
    }

    /// ProfileCheckpoint where `may_store` is the caller's permission to store.
    async fn profile_checked(
        &self,
        mut inbound: tonic::Streaming<pb::ProfileCheckpointRequest>,
        may_store: Result<(), Status>,
    ) -> Result<pb::ProfileCheckpointResponse, Status> {
        use sha2::Digest;
        use std::io::Write;
        let header = match inbound.message().await? {
            Some(pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("ProfileCheckpoint: the first message must be the header")),
        };
        let v = self.engine.vocabularies();
        let reference = selection(v, header.reference.as_ref())?;
        let g = match header.group.as_ref() {
            None => Grouping::Field(Field::Task),
            Some(_) => grouping(v, header.group.as_ref())?,
        };
        let opts = quality_options(header.options.as_ref(), false);
        let weights = match pb::DriftWeights::try_from(header.weights) {
            Ok(pb::DriftWeights::Uniform) => Weights::Uniform,
            _ => Weights::Evr,
        };
        let format = super::convert::format_in(header.format)?;
        let meta = super::convert::meta_in(header.meta.as_ref());
        if header.store {
            may_store?;
            self.engine.normalize_meta(&meta).map_err(status)?;
        }
        let file_name = if header.file_name.is_empty() { "<upload>".to_string() } else { header.file_name.clone() };
        let staging = self.engine.staging_dir().to_path_buf();
        let mut staged = tempfile::NamedTempFile::new_in(staging).map_err(|e| Status::internal(format!("cannot stage upload: {e}")))?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, staged.as_file_mut());
            while let Some(msg) = inbound.message().await? {
                if let Some(pb::profile_checkpoint_request::Part::Chunk(c)) = msg.part {
                    size += c.len() as u64;
                    if size > super::Limits::default().max_upload_bytes {
                        return Err(Status::resource_exhausted(format!("{file_name}: upload exceeds the limit")));
                    }
                    hasher.update(&c);
                    w.write_all(&c).map_err(|e| Status::internal(format!("staging write failed: {e}")))?;
                } else {
                    return Err(Status::invalid_argument("ProfileCheckpoint: only the first message may be a header"));
                }
            }
            w.flush().map_err(|e| Status::internal(format!("staging write failed: {e}")))?;
        }
        if size == 0 {
            return Err(Status::invalid_argument(format!("{file_name}: the upload is empty")));
        }
        let sha256 = hex::encode(hasher.finalize());
        let engine = self.engine.clone();
        let store = header.store;
        let (profile, stored) = blocking(move || {
            let p = engine
                .profile_checkpoint(staged.path(), &file_name, format, &reference, &g, &opts, &weights)
                .map_err(status)?;
            let stored = if store {
                let req = crate::engine::IngestRequest {
                    meta,
                    file_name: file_name.clone(),
                    format,
                    sha256,
                    size_bytes: size,
                    on_conflict: crate::engine::NameConflict::Error,
                };
                let (outcome, m) = engine.ingest_extracted(p.extracted.clone(), &req, &|_, _, _| {}).map_err(status)?;
                let outcome = match outcome {
                    crate::engine::IngestOutcome::Created => pb::IngestOutcome::Created,
                    crate::engine::IngestOutcome::Unchanged => pb::IngestOutcome::Unchanged,
                    crate::engine::IngestOutcome::Replaced => pb::IngestOutcome::Replaced,
                };
                Some(pb::IngestResult { outcome: outcome as i32, model: Some(super::convert::model_out(&m)) })
            } else {
                None
            };
            Ok((p, stored))
        })
        .await?;
        let bins = (profile.histogram.counts.len() / 9).max(1);
        Ok(pb::ProfileCheckpointResponse {
            basis_version: profile.basis_version,
            layers: profile
                .layers
                .iter()
                .map(|(l, q)| quality_row(q, l.layer_index, &l.tensor_name, l.conv_depth, l.conv_depth_norm))
                .collect(),
            distribution: Some(pb::GroupDistribution {
                key: profile.histogram.key.clone(),
                n_filters: profile.histogram.n_filters,
                components: (0..9)
                    .map(|i| pb::ComponentHistogram {
                        counts: profile.histogram.counts[i * bins..(i + 1) * bins].to_vec(),
                        out_of_range: profile.histogram.out_of_range[i],
                    })
                    .collect(),
            }),
            drift: profile
                .drift
                .into_iter()
                .map(|(key, d, per_component, n_filters)| pb::GroupDrift { key, d, per_component, n_filters })
                .collect(),
            stored,
            degenerate_share: profile.degenerate_share,
        })
    }
}
