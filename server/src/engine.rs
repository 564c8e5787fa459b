//! The engine: ingest, catalogue queries, census, label updates and deletes over the store.
//! Usable without gRPC; every method is blocking (callers on an async runtime use
//! `spawn_blocking`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rayon::prelude::*;

use crate::catalog::{Catalog, CatalogLayer};
use crate::readers::{self, Format, ReadError};
use crate::selection::{Field, LayerView, Pred, group_values};
use crate::stats::LayerStats;
use crate::store::records::{LayerRecord, ModelRecord, NextIds, NormalizedMeta};
use crate::store::{Store, StoreError};
use crate::vocab::{Label, Vocabularies};

/// Engine errors, one variant per client-visible class.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request or the uploaded file is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// An unknown model, layer or filter.
    #[error("{0}")]
    NotFound(String),
    /// A name or content conflict.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request does not fit the stored state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A range beyond what is stored.
    #[error("{0}")]
    OutOfRange(String),
    /// Storage failure.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, EngineError>;

/// Labels supplied with an ingest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetaInput {
    /// Unique model name.
    pub name: String,
    /// Training datasets (each may hold a comma-separated list).
    pub training_datasets: Vec<String>,
    /// Pretraining datasets.
    pub pretraining_datasets: Vec<String>,
    /// Task.
    pub task: String,
    /// Architecture as published.
    pub architecture: String,
    /// Visual category (defaults from the dataset).
    pub visual_category: String,
    /// Source URI.
    pub source_uri: String,
    /// License.
    pub license: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// What to do when a name is taken by different bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameConflict {
    /// Fail with ALREADY_EXISTS.
    #[default]
    Error,
    /// Replace the old model atomically.
    Replace,
}

/// One ingest request, the file already staged on disk.
#[derive(Debug, Clone)]
pub struct IngestRequest {
    /// Labels.
    pub meta: MetaInput,
    /// File name for messages.
    pub file_name: String,
    /// Format, or detect.
    pub format: Option<Format>,
    /// SHA-256 of the staged bytes, hex.
    pub sha256: String,
    /// Size of the staged file.
    pub size_bytes: u64,
    /// Name-conflict policy.
    pub on_conflict: NameConflict,
}

/// Result of an ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored a new model.
    Created,
    /// Identical bytes were already stored under this name; nothing written.
    Unchanged,
    /// Replaced an older model of the same name.
    Replaced,
}

/// Ingest progress phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the checkpoint.
    Parsing,
    /// Computing per-layer statistics.
    Statistics,
    /// Writing to RocksDB.
    Writing,
}

/// Which filters to fetch.
#[derive(Debug, Clone)]
pub enum FilterTarget {
    /// A model, optionally one layer, optionally one output channel.
    Model {
        /// Model.
        model: ModelRef,
        /// Layer index.
        layer_index: Option<u32>,
        /// Output channel (needs `layer_index`).
        out_channel: Option<u32>,
    },
    /// Filter ids `[start, end)`.
    Ids {
        /// First id.
        start: u64,
        /// One past the last id.
        end: u64,
    },
}

/// A model by id or name.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelRef {
    /// By id.
    Id(u64),
    /// By name.
    Name(String),
}

/// A contiguous piece of one layer's filters.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The layer.
    pub layer: LayerRecord,
    /// First index within the layer.
    pub start: u64,
    /// One past the last index within the layer.
    pub end: u64,
}

/// One census group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CensusRow {
    /// Values of the group-by fields.
    pub key: Vec<String>,
    /// Distinct models.
    pub models: u64,
    /// Layers.
    pub layers: u64,
    /// Filters.
    pub filters: u64,
}

/// The engine.
pub struct Engine {
    pub(crate) store: Store,
    catalog: RwLock<Catalog>,
    pub(crate) write_lock: Mutex<()>,
    vocab: Vocabularies,
    staging: PathBuf,
    basis: RwLock<Option<crate::analytics::PinnedState>>,
    /// Memoised layer quality per options (see `Engine::layer_quality`).
    pub(crate) quality_memo: RwLock<HashMap<String, HashMap<u64, crate::quality::LayerQuality>>>,
    /// The approximate search index (`search_index.rs`).
    pub(crate) search_index: crate::search_index::SearchIndexState,
}

const MAX_NAME_LEN: usize = 256;

impl Engine {
    /// Opens the database in `data_dir` (created if missing) and loads the catalogue.
    pub fn open(data_dir: &Path) -> Result<Engine> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| EngineError::FailedPrecondition(format!("cannot create {}: {e}", data_dir.display())))?;
        let store = Store::open(&data_dir.join("db"))?;
        let catalog = Catalog::from_loaded(store.load_all()?);
        let basis = store.load_current_basis()?.map(|(record, hists)| crate::analytics::PinnedState {
            record: Arc::new(record),
            hists: hists.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        });
        let search_index = crate::search_index::SearchIndexState::load(&store);
        let staging = data_dir.join("staging");
        // Staged uploads of a previous run were never acknowledged: drop them.
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .map_err(|e| EngineError::FailedPrecondition(format!("cannot create {}: {e}", staging.display())))?;
        tracing::info!(models = catalog.n_models(), dir = %data_dir.display(), "opened FilterDB");
        Ok(Engine {
            store,
            catalog: RwLock::new(catalog),
            write_lock: Mutex::new(()),
            vocab: Vocabularies::builtin(),
            staging,
            basis: RwLock::new(basis),
            quality_memo: RwLock::new(HashMap::new()),
            search_index,
        })
    }

    /// Folder for staged uploads (same filesystem as the database).
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// The store (snapshots, checkpoints, flush).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The vocabularies.
    pub fn vocabularies(&self) -> &Vocabularies {
        &self.vocab
    }

    pub(crate) fn read_basis(&self) -> std::sync::RwLockReadGuard<'_, Option<crate::analytics::PinnedState>> {
        self.basis.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write_basis(&self) -> std::sync::RwLockWriteGuard<'_, Option<crate::analytics::PinnedState>> {
        self.basis.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn read_catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        // A panic while holding the lock cannot leave the catalogue half-updated (updates are
        // single assignments after the store commit), so a poisoned lock is still usable.
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_catalog(&self) -> std::sync::RwLockWriteGuard<'_, Catalog> {
        self.catalog.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and normalises ingest labels.
    pub fn normalize_meta(&self, m: &MetaInput) -> Result<NormalizedMeta> {
        validate_name(&m.name)?;
        let split = |xs: &[String]| -> Vec<String> {
            xs.iter().flat_map(|x| x.split(',')).map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
        };
        let training = split(&m.training_datasets);
        let mut missing = Vec::new();
        if training.is_empty() {
            missing.push("training dataset (--dataset)");
        }
        if m.task.trim().is_empty() {
            missing.push("task (--task)");
        }
        if m.architecture.trim().is_empty() {
            missing.push("architecture (--architecture)");
        }
        if !missing.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "model `{}`: missing required meta: {}",
                m.name,
                missing.join(", ")
            )));
        }
        let v = &self.vocab;
        let training_datasets: Vec<Label> = training.iter().map(|d| v.datasets.normalize(d)).collect();
        let pretraining_datasets = split(&m.pretraining_datasets).iter().map(|d| v.datasets.normalize(d)).collect();
        let visual_category = if m.visual_category.trim().is_empty() {
            match training_datasets.iter().find_map(|d| v.dataset_visual_category(d)) {
                Some(c) => Label { raw: String::new(), canonical: c, known: true },
                None => Label { raw: String::new(), canonical: String::new(), known: false },
            }
        } else {
            v.visual_categories.normalize(&m.visual_category)
        };
        let mut tags: Vec<String> = m.tags.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
        tags.sort();
        tags.dedup();
        Ok(NormalizedMeta {
            training_datasets,
            pretraining_datasets,
            task: v.tasks.normalize(&m.task),
            architecture: v.architectures.normalize(&m.architecture),
            architecture_variant: crate::vocab::key(&m.architecture),
            visual_category,
            source_uri: m.source_uri.trim().to_string(),
            license: m.license.trim().to_string(),
            tags,
            vocabulary_version: v.version,
        })
    }

    /// Checks, before any parsing, whether an ingest would be a no-op or a conflict.
    /// Returns the stored model when the same bytes are already stored under this name.
    pub fn precheck(&self, req: &IngestRequest) -> Result<Option<Arc<ModelRecord>>> {
        let c = self.read_catalog();
        check_conflicts(&c, req).map(|r| r.and_then(|(m, unchanged)| unchanged.then_some(m)))
    }

    /// Ingests a staged checkpoint: parse, extract, compute statistics, commit atomically.
    pub fn ingest(
        &self,
        staged: &Path,
        req: &IngestRequest,
        progress: &(dyn Fn(Phase, u32, u32) + Sync),
    ) -> Result<(IngestOutcome, Arc<ModelRecord>)> {
        self.normalize_meta(&req.meta)?;
        if let Some(m) = self.precheck(req)? {
            return Ok((IngestOutcome::Unchanged, m));
        }
        progress(Phase::Parsing, 0, 0);
        let file = &req.file_name;
        let cp = readers::read_checkpoint(staged, req.format).map_err(|e| read_error(file, e))?;
        let extracted = readers::extract(cp).map_err(|e| read_error(file, e))?;
        self.ingest_extracted(extracted, req, progress)
    }

    /// Stores layers already extracted (by a reader, a bulk importer or a generator):
    /// statistics, histograms and one atomic commit. `req.sha256` identifies the content.
    pub fn ingest_extracted(
        &self,
        extracted: readers::ExtractedModel,
        req: &IngestRequest,
        progress: &(dyn Fn(Phase, u32, u32) + Sync),
    ) -> Result<(IngestOutcome, Arc<ModelRecord>)> {
        match self.prepare_extracted(extracted, req, progress)? {
            Prepared::Unchanged(m) => Ok((IngestOutcome::Unchanged, m)),
            Prepared::Ready(p) => self.commit_prepared(*p, progress),
        }
    }

    /// The first half of [`Engine::ingest_extracted`]: checks the labels and computes the
    /// statistics, without the write lock, so a bulk importer can compute the next model while
    /// the previous one is committed.
    pub fn prepare_extracted(
        &self,
        extracted: readers::ExtractedModel,
        req: &IngestRequest,
        progress: &(dyn Fn(Phase, u32, u32) + Sync),
    ) -> Result<Prepared> {
        let meta = self.normalize_meta(&req.meta)?;
        if let Some(m) = self.precheck(req)? {
            return Ok(Prepared::Unchanged(m));
        }
        let n_layers = extracted.layers.len() as u32;
        progress(Phase::Statistics, 0, n_layers);
        let done = std::sync::atomic::AtomicU32::new(0);
        let stats: Vec<LayerStats> = extracted
            .layers
            .par_iter()
            .map(|l| {
                let s = LayerStats::compute(&l.filters, l.out_channels, l.in_channels);
                let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress(Phase::Statistics, d, n_layers);
                s
            })
            .collect();
        // Codes for the search index (when one exists), computed here, outside the write lock.
        let layer_values: Vec<&[f32]> = extracted.layers.iter().map(|l| l.filters.as_slice()).collect();
        let segment = self.encode_for_ingest(&layer_values);
        Ok(Prepared::Ready(Box::new(PreparedIngest { extracted, req: req.clone(), meta, stats, segment })))
    }

    /// The second half of [`Engine::ingest_extracted`]: under the write lock, checks conflicts
    /// again (another writer may have come first), allocates ids and commits atomically.
    pub fn commit_prepared(
        &self,
        prepared: PreparedIngest,
        progress: &(dyn Fn(Phase, u32, u32) + Sync),
    ) -> Result<(IngestOutcome, Arc<ModelRecord>)> {
        let PreparedIngest { extracted, req, meta, stats, segment } = prepared;
        let req = &req;
        let n_layers = extracted.layers.len() as u32;
        progress(Phase::Writing, 0, n_layers);

        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (replaces, next) = {
            let c = self.read_catalog();
            let conflict = check_conflicts(&c, req)?;
            if let Some((m, true)) = &conflict {
                return Ok((IngestOutcome::Unchanged, m.clone()));
            }
            let replaces = conflict.map(|(m, _)| {
                let layers: Vec<LayerRecord> = c.model_layers(&m).iter().map(|l| l.record.clone()).collect();
                (m, layers)
            });
            (replaces, c.next_ids)
        };
        let model_id = next.model;
        let mut layer_id = next.layer;
        let mut filter_id = next.filter;
        let mut records = Vec::with_capacity(extracted.layers.len());
        for l in &extracted.layers {
            records.push(LayerRecord {
                layer_id,
                model_id,
                layer_index: l.layer_index,
                tensor_name: l.tensor_name.clone(),
                out_channels: l.out_channels,
                in_channels: l.in_channels,
                groups: l.groups,
                conv_depth: l.conv_depth,
                conv_depth_norm: l.conv_depth_norm,
                first_filter_id: filter_id,
                n_filters: l.n_filters(),
            });
            layer_id += 1;
            filter_id += l.n_filters();
        }
        let model = ModelRecord {
            model_id,
            name: req.meta.name.clone(),
            meta,
            format: extracted.format,
            depth_definition: extracted.depth_definition,
            content_sha256: req.sha256.clone(),
            size_bytes: req.size_bytes,
            file_name: req.file_name.clone(),
            n_layers,
            n_filters: extracted.n_filters(),
            first_layer_id: next.layer,
            first_filter_id: next.filter,
            kernel_shape_counts: extracted.kernel_shape_counts.clone(),
            producer: extracted.producer.clone(),
            opset: extracted.opset,
            ingested_at_unix_ms: now_ms(),
            excluded_tensors: extracted.excluded.clone(),
        };
        let next_ids = NextIds { model: model_id + 1, layer: layer_id, filter: filter_id };
        let rows: Vec<(LayerRecord, LayerStats, &[f32])> = records
            .iter()
            .zip(&stats)
            .zip(&extracted.layers)
            .map(|((r, s), l)| (r.clone(), s.clone(), l.filters.as_slice()))
            .collect();
        // Histograms in the pinned basis are written with the model (the basis cannot change
        // meanwhile: pinning holds the write lock too).
        let hist_input: Vec<(u64, &[f32])> =
            records.iter().zip(&extracted.layers).map(|(r, l)| (r.layer_id, l.filters.as_slice())).collect();
        let hists = self.histograms_for(&hist_input);
        let hist_rows: Vec<(u32, u64, crate::store::records::LayerHistogram)> = match &hists {
            Some((v, hs)) => hs.iter().map(|(id, h)| (*v, *id, h.clone())).collect(),
            None => Vec::new(),
        };
        // Encoded in the version still current (a rebuild switches under this lock), or not
        // written at all: the builder then indexes the model.
        let segment = segment
            .filter(|s| self.current_index_version() == Some(s.version))
            .map(|s| crate::search_index::rebase(s, model_id, next.filter));
        let segment_bytes = segment.as_ref().map(|s| (s.version, s.encode()));
        self.store.commit_model(
            &model,
            &rows,
            next_ids,
            replaces.as_ref().map(|(m, l)| (m.as_ref(), l.as_slice())),
            &hist_rows,
            segment_bytes.as_ref().map(|(v, b)| (*v, b.as_slice())),
        )?;
        self.index_after_commit(segment.as_ref(), replaces.as_ref().map(|(m, _)| (m.model_id, m.n_filters)));
        if let Some((v, hs)) = hists {
            self.remember_histograms(v, hs);
        }
        if let Some((_, old_layers)) = &replaces {
            self.forget_histograms(old_layers.iter().map(|l| l.layer_id));
        }
        let cat_layers =
            records.into_iter().zip(stats).map(|(record, stats)| CatalogLayer { record, stats }).collect();
        let mut c = self.write_catalog();
        let outcome = if let Some((old, _)) = &replaces {
            c.remove(old.model_id);
            IngestOutcome::Replaced
        } else {
            IngestOutcome::Created
        };
        c.insert(model.clone(), cat_layers, next_ids);
        let stored = c.model(model_id).cloned().unwrap_or_else(|| Arc::new(model));
        tracing::info!(model = %stored.name, id = stored.model_id, layers = stored.n_layers, filters = stored.n_filters, ?outcome, "ingested");
        Ok((outcome, stored))
    }

    /// Resolves a model reference.
    pub fn model(&self, r: &ModelRef) -> Result<Arc<ModelRecord>> {
        let c = self.read_catalog();
        resolve(&c, r).cloned()
    }

    /// Lists models with at least one selected layer, in id order, after `after`.
    pub fn list_models(&self, pred: &Pred, after: Option<u64>, limit: usize) -> (Vec<Arc<ModelRecord>>, bool) {
        let c = self.read_catalog();
        let mut out = Vec::new();
        let mut more = false;
        for m in c.models_after(after) {
            let selected = matches!(pred, Pred::True)
                || c.model_layers(m).iter().any(|l| pred.matches(LayerView { model: m, layer: &l.record }));
            if !selected {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(m.clone());
        }
        (out, more)
    }

    /// A model's selected layers.
    pub fn list_layers(&self, r: &ModelRef, pred: &Pred) -> Result<(Arc<ModelRecord>, Vec<Arc<CatalogLayer>>)> {
        let c = self.read_catalog();
        let m = resolve(&c, r)?.clone();
        let layers =
            c.model_layers(&m).into_iter().filter(|l| pred.matches(LayerView { model: &m, layer: &l.record })).collect();
        Ok((m, layers))
    }

    /// Plans which filters a request reads.
    pub fn plan_filters(&self, t: &FilterTarget) -> Result<Vec<Segment>> {
        let c = self.read_catalog();
        match t {
            FilterTarget::Model { model, layer_index, out_channel } => {
                let m = resolve(&c, model)?;
                let layers = c.model_layers(m);
                match layer_index {
                    None => {
                        if out_channel.is_some() {
                            return Err(EngineError::InvalidArgument(
                                "out_channel needs layer_index (a channel belongs to one layer)".into(),
                            ));
                        }
                        Ok(layers
                            .iter()
                            .map(|l| Segment { layer: l.record.clone(), start: 0, end: l.record.n_filters })
                            .collect())
                    }
                    Some(i) => {
                        let l = layers.get(*i as usize).ok_or_else(|| {
                            EngineError::NotFound(format!(
                                "model `{}` has {} 3x3 layers; layer_index {i} does not exist",
                                m.name, m.n_layers
                            ))
                        })?;
                        let r = &l.record;
                        match out_channel {
                            None => Ok(vec![Segment { layer: r.clone(), start: 0, end: r.n_filters }]),
                            Some(o) if *o < r.out_channels => {
                                let s = u64::from(*o) * u64::from(r.in_channels);
                                Ok(vec![Segment { layer: r.clone(), start: s, end: s + u64::from(r.in_channels) }])
                            }
                            Some(o) => Err(EngineError::NotFound(format!(
                                "layer {i} (`{}`) of model `{}` has {} output channels; out_channel {o} does not exist",
                                r.tensor_name, m.name, r.out_channels
                            ))),
                        }
                    }
                }
            }
            FilterTarget::Ids { start, end } => {
                if start >= end {
                    return Err(EngineError::InvalidArgument(format!(
                        "filter id range [{start}, {end}) is empty: end must be greater than start"
                    )));
                }
                if *start >= c.next_ids.filter {
                    return Err(EngineError::OutOfRange(format!(
                        "filter id {start} is beyond the last stored filter id {}",
                        c.next_ids.filter.saturating_sub(1)
                    )));
                }
                Ok(c.layers_in_filter_range(*start, *end)
                    .iter()
                    .map(|l| {
                        let r = &l.record;
                        let s = start.saturating_sub(r.first_filter_id);
                        let e = (end - r.first_filter_id).min(r.n_filters);
                        Segment { layer: r.clone(), start: s, end: e }
                    })
                    .filter(|s| s.start < s.end)
                    .collect())
            }
        }
    }

    /// Counts models, layers and filters of the selection, grouped by `group_by`.
    pub fn census(&self, pred: &Pred, group_by: &[Field]) -> (Vec<CensusRow>, CensusRow) {
        let c = self.read_catalog();
        let mut groups: BTreeMap<Vec<String>, (HashSet<u64>, u64, u64)> = BTreeMap::new();
        let mut total_models = HashSet::new();
        let (mut total_layers, mut total_filters) = (0u64, 0u64);
        c.for_each_selected(pred, |m, l| {
            total_models.insert(m.model_id);
            total_layers += 1;
            total_filters += l.record.n_filters;
            let view = LayerView { model: m, layer: &l.record };
            let mut keys: Vec<Vec<String>> = vec![Vec::new()];
            for f in group_by {
                let vals = group_values(*f, view);
                keys = keys
                    .into_iter()
                    .flat_map(|k| {
                        vals.iter().map(move |v| {
                            let mut k = k.clone();
                            k.push(v.clone());
                            k
                        })
                    })
                    .collect();
            }
            for k in keys {
                let g = groups.entry(k).or_default();
                g.0.insert(m.model_id);
                g.1 += 1;
                g.2 += l.record.n_filters;
            }
        });
        let rows = if group_by.is_empty() {
            Vec::new()
        } else {
            groups
                .into_iter()
                .map(|(key, (ms, layers, filters))| CensusRow { key, models: ms.len() as u64, layers, filters })
                .collect()
        };
        let total = CensusRow {
            key: Vec::new(),
            models: total_models.len() as u64,
            layers: total_layers,
            filters: total_filters,
        };
        (rows, total)
    }

    /// Changes labels or the name of a model.
    pub fn update_meta(&self, r: &ModelRef, update: &MetaUpdate) -> Result<Arc<ModelRecord>> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.model(r)?;
        let v = &self.vocab;
        let mut new = (*old).clone();
        if let Some(name) = &update.name {
            validate_name(name)?;
            if name != &old.name && self.read_catalog().model_by_name(name).is_some() {
                return Err(EngineError::AlreadyExists(format!("model name `{name}` is already taken")));
            }
            new.name = name.clone();
        }
        let norm = |xs: &[String]| -> Vec<Label> {
            xs.iter()
                .flat_map(|x| x.split(','))
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|d| v.datasets.normalize(d))
                .collect()
        };
        if let Some(ds) = &update.training_datasets {
            let ds = norm(ds);
            if ds.is_empty() {
                return Err(EngineError::InvalidArgument("training datasets cannot be emptied".into()));
            }
            new.meta.training_datasets = ds;
        }
        if let Some(ds) = &update.pretraining_datasets {
            new.meta.pretraining_datasets = norm(ds);
        }
        if let Some(t) = &update.task {
            if t.trim().is_empty() {
                return Err(EngineError::InvalidArgument("task cannot be empty".into()));
            }
            new.meta.task = v.tasks.normalize(t);
        }
        if let Some(a) = &update.architecture {
            if a.trim().is_empty() {
                return Err(EngineError::InvalidArgument("architecture cannot be empty".into()));
            }
            new.meta.architecture = v.architectures.normalize(a);
            new.meta.architecture_variant = crate::vocab::key(a);
        }
        if let Some(c) = &update.visual_category {
            new.meta.visual_category = v.visual_categories.normalize(c);
        }
        if let Some(s) = &update.source_uri {
            new.meta.source_uri = s.trim().to_string();
        }
        if let Some(s) = &update.license {
            new.meta.license = s.trim().to_string();
        }
        if let Some(t) = &update.tags {
            let mut t: Vec<String> = t.iter().map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
            t.sort();
            t.dedup();
            new.meta.tags = t;
        }
        new.meta.vocabulary_version = v.version;
        self.store.update_model(&old, &new)?;
        let mut c = self.write_catalog();
        c.update(new);
        c.model(old.model_id).cloned().ok_or_else(|| EngineError::NotFound("model vanished".into()))
    }

    /// Deletes a model and everything it owns, atomically.
    pub fn delete_model(&self, r: &ModelRef) -> Result<Arc<ModelRecord>> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (m, layers) = {
            let c = self.read_catalog();
            let m = resolve(&c, r)?.clone();
            let layers: Vec<LayerRecord> = c.model_layers(&m).iter().map(|l| l.record.clone()).collect();
            (m, layers)
        };
        self.store.delete_model(&m, &layers)?;
        self.write_catalog().remove(m.model_id);
        self.index_after_delete(m.model_id, m.n_filters);
        self.forget_histograms(layers.iter().map(|l| l.layer_id));
        tracing::info!(model = %m.name, id = m.model_id, "deleted");
        Ok(m)
    }

    /// Runs `f` with a read view of the catalogue (for analytics over many layers).
    pub fn with_catalog<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        f(&self.read_catalog())
    }
}

/// What [`Engine::prepare_extracted`] found.
pub enum Prepared {
    /// The same content is already stored under this name: nothing to commit.
    Unchanged(Arc<ModelRecord>),
    /// Statistics computed; commit with [`Engine::commit_prepared`].
    Ready(Box<PreparedIngest>),
}

/// A model with its statistics, ready to commit.
pub struct PreparedIngest {
    extracted: readers::ExtractedModel,
    req: IngestRequest,
    meta: NormalizedMeta,
    stats: Vec<LayerStats>,
    segment: Option<crate::ann::Segment>,
}

impl PreparedIngest {
    /// Number of filters.
    pub fn n_filters(&self) -> u64 {
        self.extracted.n_filters()
    }
}

/// Label changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct MetaUpdate {
    /// New name.
    pub name: Option<String>,
    /// Training datasets.
    pub training_datasets: Option<Vec<String>>,
    /// Pretraining datasets.
    pub pretraining_datasets: Option<Vec<String>>,
    /// Task.
    pub task: Option<String>,
    /// Architecture.
    pub architecture: Option<String>,
    /// Visual category.
    pub visual_category: Option<String>,
    /// Source URI.
    pub source_uri: Option<String>,
    /// License.
    pub license: Option<String>,
    /// Tags.
    pub tags: Option<Vec<String>>,
}

fn resolve<'a>(c: &'a Catalog, r: &ModelRef) -> Result<&'a Arc<ModelRecord>> {
    match r {
        ModelRef::Id(id) => c.model(*id).ok_or_else(|| EngineError::NotFound(format!("no model with id {id}"))),
        ModelRef::Name(n) => c.model_by_name(n).ok_or_else(|| EngineError::NotFound(format!("no model named `{n}`"))),
    }
}

/// `Some((model, true))`: same bytes already stored under this name (no-op);
/// `Some((model, false))`: the name is taken by other bytes and the policy is Replace.
fn check_conflicts(c: &Catalog, req: &IngestRequest) -> Result<Option<(Arc<ModelRecord>, bool)>> {
    if let Some(m) = c.model_by_hash(&req.sha256) {
        if m.name == req.meta.name {
            return Ok(Some((m.clone(), true)));
        }
        return Err(EngineError::AlreadyExists(format!(
            "{}: these exact bytes (sha256 {}) are already stored as model `{}` (id {}); ingest each checkpoint once, or rename that model with UpdateModelMeta",
            req.file_name, req.sha256, m.name, m.model_id
        )));
    }
    if let Some(m) = c.model_by_name(&req.meta.name) {
        return match req.on_conflict {
            NameConflict::Error => Err(EngineError::AlreadyExists(format!(
                "model name `{}` is already taken by different bytes (stored sha256 {}, uploaded {}); choose another name, or ask to replace it (--replace / NAME_CONFLICT_REPLACE)",
                m.name, m.content_sha256, req.sha256
            ))),
            NameConflict::Replace => Ok(Some((m.clone(), false))),
        };
    }
    Ok(None)
}

fn validate_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(EngineError::InvalidArgument("missing required meta: model name (--model)".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(EngineError::InvalidArgument(format!("model name is {} bytes long; at most {MAX_NAME_LEN}", name.len())));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_alphanumeric() || "._-+@/:=".contains(*c))) {
        return Err(EngineError::InvalidArgument(format!(
            "model name `{name}` contains `{c}`; use letters, digits and . _ - + @ / : = only"
        )));
    }
    Ok(())
}

fn read_error(file: &str, e: ReadError) -> EngineError {
    match e {
        ReadError::Io(io) => EngineError::FailedPrecondition(format!("{file}: reading the staged upload failed: {io}")),
        other => EngineError::InvalidArgument(format!("{file}: {other}")),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
