//! The engine's side of the approximate search index (`ann.rs`): loading it at startup, keeping
//! it in step with ingest and delete, and (re)building it in the background.
//!
//! Consistency: a model's segment is written in the model's own commit batch (when an index
//! exists) and deleted in the delete batch, so after a crash the stored segments are exactly
//! those of stored models. A build writes a new quantizer version beside the current one and
//! makes it current in one batch, under the write lock, after encoding the models ingested
//! while it ran; a crash mid-build leaves the old version current and the next build replaces
//! the leftovers.
//!
//! When the index is built: automatically (a background thread) once the store holds
//! [`crate::ann::MIN_TRAIN_FILTERS`] filters and no index exists, when the store has grown to
//! four times the size the quantizer was trained on, when a quarter of the entries belong to
//! deleted models (the lists are compacted by reloading), and when stored models lack a
//! segment (a restore, or an upgrade from schema 1); and on request (`Admin.RebuildSearchIndex`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::ann::{Index, MIN_TRAIN_FILTERS, Quantizer, Segment, train_sample_size};
use crate::engine::{Engine, EngineError, Result};
use crate::store::BlockView;

/// Filters read per batch of segments written by a build.
const BUILD_BATCH_FILTERS: u64 = 4 << 20;

/// Progress and outcome of the last build, for status reports.
#[derive(Debug, Clone, Default)]
pub struct BuildStatus {
    /// A build is running.
    pub running: bool,
    /// Phase: "sampling", "training", "encoding", "switching", "done", "failed".
    pub phase: String,
    /// Filters encoded so far (encoding phase).
    pub done: u64,
    /// Filters to encode.
    pub total: u64,
    /// Version being built or last built.
    pub version: u32,
    /// Why it ran.
    pub reason: String,
    /// The last failure, if the last build failed.
    pub error: Option<String>,
    /// Wall time of the last finished build.
    pub seconds: f64,
    /// When the last build failed.
    pub failed_at: Option<Instant>,
}

/// A snapshot of the index for status reports.
#[derive(Debug, Clone, Default)]
pub struct IndexStatus {
    /// Current quantizer version (None: no index yet).
    pub version: Option<u32>,
    /// Cells.
    pub nlist: usize,
    /// Live entries.
    pub entries: u64,
    /// Entries of deleted models awaiting compaction.
    pub dead: u64,
    /// Indexed models.
    pub models: usize,
    /// Stored models without entries (answered exactly until indexed).
    pub unindexed_models: usize,
    /// Filters the quantizer was trained on.
    pub trained_on: u64,
    /// Heap bytes of the index and of the pinned block view's address table.
    pub bytes: u64,
    /// Heap bytes of the cached selections' masks over the index (not in `bytes`).
    pub selection_mask_bytes: u64,
    /// The builder.
    pub build: BuildStatus,
}

/// The index state held by the engine.
#[derive(Default)]
pub struct SearchIndexState {
    pub(crate) index: RwLock<Option<Index>>,
    build: Mutex<BuildStatus>,
    building: AtomicBool,
    signal: Arc<Signal>,
    auto: AtomicBool,
    /// Exact queries over more filters than this go through the index (see `search.rs`).
    pub(crate) exact_walk_above: std::sync::atomic::AtomicU64,
    stopping: AtomicBool,
    /// Resolved selections (see `search.rs`), keyed by the selection's text.
    pub(crate) plans: Mutex<std::collections::HashMap<String, Arc<crate::search::SelectionPlan>>>,
    /// The pinned filter blocks that re-ranking and the exact scan read from (see
    /// [`crate::store::BlockView`]).
    blocks: RwLock<Option<Arc<BlockView>>>,
    /// When the last view was built, and how long that took.
    blocks_built: Mutex<Option<(Instant, Duration)>>,
}

/// Wakes the builder thread (held apart from the engine so waiting keeps no engine alive).
#[derive(Default)]
struct Signal {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl SearchIndexState {
    /// Loads the current version from the store (no index when none was built, or when it
    /// does not decode: the builder will rebuild it).
    pub fn load(store: &crate::store::Store) -> SearchIndexState {
        let s = SearchIndexState::default();
        s.auto.store(true, Ordering::Relaxed);
        s.exact_walk_above.store(crate::search::DEFAULT_EXACT_WALK_ABOVE, Ordering::Relaxed);
        match load_index(store) {
            Ok(ix) => *s.index.write().unwrap_or_else(|p| p.into_inner()) = ix,
            Err(e) => tracing::error!(error = %e, "search index does not load; it will be rebuilt"),
        }
        s
    }

    fn status(&self) -> BuildStatus {
        self.build.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, f: impl FnOnce(&mut BuildStatus)) {
        f(&mut self.build.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Asks the background builder to check whether work is due.
    pub fn nudge(&self) {
        *self.signal.flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.signal.cv.notify_all();
    }
}

fn corrupt(detail: String) -> EngineError {
    EngineError::Store(crate::store::StoreError::Corrupt { cf: crate::store::keys::CF_SEARCH_INDEX, detail })
}

fn load_index(store: &crate::store::Store) -> Result<Option<Index>> {
    let Some(version) = store.search_index_version()? else {
        return Ok(None);
    };
    let bytes = store
        .get_quantizer(version)?
        .ok_or_else(|| corrupt(format!("search index version {version} has no quantizer record")))?;
    let q = Quantizer::decode(&bytes).map_err(corrupt)?;
    let nlist = q.nlist();
    let mut ix = Index::new(q);
    store.segments(version, |_, b| {
        let s = Segment::decode(b, nlist).map_err(|detail| crate::store::StoreError::Corrupt { cf: "search_index", detail })?;
        ix.add(&s).map_err(|detail| crate::store::StoreError::Corrupt { cf: "search_index", detail })?;
        Ok(())
    })?;
    ix.shrink();
    tracing::info!(version, entries = ix.live_entries(), models = ix.n_models(), bytes = ix.bytes(), "loaded search index");
    Ok(Some(ix))
}

/// Starts the background builder for an engine. The thread holds only a weak reference: it
/// ends when the engine is dropped.
pub fn start(engine: &Arc<Engine>) {
    let weak: Weak<Engine> = Arc::downgrade(engine);
    let signal = engine.search_index.signal.clone();
    let spawned = std::thread::Builder::new().name("search-index".into()).spawn(move || {
        loop {
            {
                let Some(e) = weak.upgrade() else { return };
                if e.search_index.stopping.load(Ordering::Relaxed) {
                    return;
                }
                if let Err(err) = e.refresh_block_view() {
                    tracing::warn!(error = %err, "pinned block view not refreshed");
                }
                if let Some(reason) = e.search_index_due()
                    && let Err(err) = e.build_search_index(&reason, &|_, _, _| {})
                {
                    tracing::warn!(error = %err, %reason, "search index build failed");
                }
            }
            let guard = signal.flag.lock().unwrap_or_else(|p| p.into_inner());
            let (mut g, _) = signal
                .cv
                .wait_timeout_while(guard, Duration::from_secs(2), |woken| !*woken)
                .unwrap_or_else(|p| p.into_inner());
            *g = false;
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the search index builder");
    }
}

impl Engine {
    /// Stops background index work (server shutdown): a running build gives up at its next
    /// model, leaving the current index as it was.
    pub fn stop_search_index(&self) {
        self.search_index.stopping.store(true, Ordering::Relaxed);
        self.search_index.nudge();
    }

    /// The pinned block view that re-ranking and the exact scan read from, if one is built.
    pub(crate) fn block_view(&self) -> Option<Arc<BlockView>> {
        self.search_index.blocks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the pinned block view when the filter blocks' LSM version moved (a flush,
    /// compaction or file ingestion) or layers were committed since it was built: new layers
    /// become readable through it, and files a compaction replaced are released. The
    /// background builder calls this every 2 s and when nudged, but not sooner after the last
    /// build than ten times that build took (a store of 1e7 filters builds one in ~50 ms once
    /// its files are in the page cache), so that a stream of ingests does not spend more than
    /// a tenth of a core on views. Returns whether it built a new view.
    pub fn refresh_block_view(&self) -> Result<bool> {
        // Small models' blocks go into the memtable, which leaves the LSM version as it was:
        // the catalogue's next layer id tells that the view misses layers.
        let current = (self.store.filter_lsm_version()?, self.with_catalog(|c| c.next_ids.layer));
        if self.block_view().is_some_and(|v| (v.lsm_version(), v.next_layer_id()) == current) {
            return Ok(false);
        }
        let last = *self.search_index.blocks_built.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|(at, took)| at.elapsed() < took * 10) {
            return Ok(false);
        }
        let started = Instant::now();
        // Built under the catalogue's read lock: every layer below its next layer id is
        // committed, so its blocks are in the state the view pins, and never change.
        let view = self.with_catalog(|c| self.store.block_view(c.next_ids.layer))?;
        tracing::debug!(blocks = view.len(), bytes = view.bytes(), lsm_version = view.lsm_version(), "pinned block view rebuilt");
        *self.search_index.blocks.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(view));
        *self.search_index.blocks_built.lock().unwrap_or_else(|p| p.into_inner()) = Some((started, started.elapsed()));
        Ok(true)
    }

    /// The version of the index answering now.
    pub(crate) fn current_index_version(&self) -> Option<u32> {
        self.search_index.index.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|ix| ix.quantizer.version)
    }

    /// Turns automatic builds on or off (benchmarks and tests that build explicitly).
    pub fn set_search_index_auto(&self, on: bool) {
        self.search_index.auto.store(on, Ordering::Relaxed);
    }

    /// Exact queries over more than `n` selected filters go through the index's bounds; smaller
    /// ones are scanned (default [`crate::search::DEFAULT_EXACT_WALK_ABOVE`]; tests lower it).
    pub fn set_exact_walk_above(&self, n: u64) {
        self.search_index.exact_walk_above.store(n, Ordering::Relaxed);
    }

    /// Why a build is due now, if it is.
    fn search_index_due(&self) -> Option<String> {
        if !self.search_index.auto.load(Ordering::Relaxed) || self.search_index.building.load(Ordering::Relaxed) {
            return None;
        }
        let st = self.search_index.status();
        if st.phase == "failed" && st.failed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            // A failed build is retried a minute later (or on request).
            return None;
        }
        let (total, unindexed) = self.with_catalog(|c| {
            let ix = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
            let total: u64 = c.models_after(None).map(|m| m.n_filters).sum();
            let unindexed = match ix.as_ref() {
                Some(ix) => c.models_after(None).filter(|m| !ix.has_model(m.model_id)).count(),
                None => 0,
            };
            (total, unindexed)
        });
        let ix = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
        match ix.as_ref() {
            None if total >= MIN_TRAIN_FILTERS => Some(format!("{total} filters stored and no index yet")),
            None => None,
            Some(ix) if total > 4 * ix.quantizer.trained_on.max(1) => {
                Some(format!("{total} filters stored, quantizer trained on {}", ix.quantizer.trained_on))
            }
            Some(ix) if ix.dead_entries() > 0 && ix.dead_entries() * 4 >= ix.live_entries() + ix.dead_entries() => {
                Some(format!("{} of the entries belong to deleted models", ix.dead_entries()))
            }
            Some(_) if unindexed > 0 => Some(format!("{unindexed} stored models have no index entries")),
            Some(_) => None,
        }
    }

    /// The index's state.
    pub fn search_index_status(&self) -> IndexStatus {
        let unindexed = self.with_catalog(|c| {
            let ix = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
            match ix.as_ref() {
                Some(ix) => c.models_after(None).filter(|m| !ix.has_model(m.model_id)).count(),
                None => c.n_models(),
            }
        });
        let ix = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
        let build = self.search_index.status();
        match ix.as_ref() {
            None => IndexStatus { unindexed_models: unindexed, build, ..Default::default() },
            Some(ix) => IndexStatus {
                version: Some(ix.quantizer.version),
                nlist: ix.quantizer.nlist(),
                entries: ix.live_entries(),
                dead: ix.dead_entries(),
                models: ix.n_models(),
                unindexed_models: unindexed,
                trained_on: ix.quantizer.trained_on,
                bytes: ix.bytes() + self.block_view().map_or(0, |v| v.bytes()),
                selection_mask_bytes: ix.mask_bytes(),
                build,
            },
        }
    }

    /// The segment of a model about to be committed, in the current quantizer (None without
    /// an index). Ids are relative to the model's first filter; [`rebase`] fixes them.
    pub(crate) fn encode_for_ingest(&self, layers: &[&[f32]]) -> Option<Segment> {
        let ix = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
        let q = ix.as_ref()?.quantizer.clone();
        drop(ix);
        let mut first = 0u64;
        let parts: Vec<(u64, &[f32])> = layers
            .iter()
            .map(|v| {
                let p = (first, *v);
                first += (v.len() / 9) as u64;
                p
            })
            .collect();
        Some(Segment::build(&q, 0, &parts))
    }

    /// After a model's commit (write lock held): its segment joins the in-memory index when it
    /// was encoded in the current version; a replaced model's entries become dead.
    pub(crate) fn index_after_commit(&self, segment: Option<&Segment>, replaced: Option<(u64, u64)>) {
        {
            let mut ix = self.search_index.index.write().unwrap_or_else(|p| p.into_inner());
            if let Some(ix) = ix.as_mut() {
                if let Some((id, n)) = replaced {
                    ix.remove_model(id, n);
                }
                if let Some(s) = segment.filter(|s| s.version == ix.quantizer.version)
                    && let Err(e) = ix.add(s)
                {
                    tracing::error!(error = %e, "search index append failed; the model is answered exactly until the next build");
                }
            }
        }
        self.search_index.nudge();
    }

    /// After a delete (write lock held).
    pub(crate) fn index_after_delete(&self, model_id: u64, n_filters: u64) {
        if let Some(ix) = self.search_index.index.write().unwrap_or_else(|p| p.into_inner()).as_mut() {
            ix.remove_model(model_id, n_filters);
        }
        self.search_index.nudge();
    }

    /// Builds the index: retrains the quantizer when there is none, when the store outgrew it,
    /// or when `retrain` is asked; otherwise encodes the models that lack a segment and
    /// compacts the lists. Blocking; `progress(phase, done, total)` reports.
    pub fn build_search_index(&self, reason: &str, progress: &(dyn Fn(&str, u64, u64) + Sync)) -> Result<IndexStatus> {
        self.build_search_index_with(reason, false, progress)
    }

    /// [`Engine::build_search_index`], forcing a new quantizer when `retrain`.
    pub fn build_search_index_with(&self, reason: &str, retrain: bool, progress: &(dyn Fn(&str, u64, u64) + Sync)) -> Result<IndexStatus> {
        if self.search_index.building.swap(true, Ordering::AcqRel) {
            return Err(EngineError::FailedPrecondition(
                "a search index build is already running; see `filterdb search-index` for its progress".into(),
            ));
        }
        let started = Instant::now();
        self.search_index.set(|s| {
            *s = BuildStatus { running: true, phase: "starting".into(), reason: reason.into(), ..Default::default() }
        });
        tracing::info!(%reason, retrain, "search index build started");
        let out = self.build_inner(retrain, progress);
        let secs = started.elapsed().as_secs_f64();
        self.search_index.set(|s| {
            s.running = false;
            s.seconds = secs;
            match &out {
                Ok(()) => {
                    s.phase = "done".into();
                    s.error = None;
                }
                Err(e) => {
                    s.phase = "failed".into();
                    s.error = Some(e.to_string());
                    s.failed_at = Some(Instant::now());
                }
            }
        });
        self.search_index.building.store(false, Ordering::Release);
        match out {
            Ok(()) => {
                tracing::info!(seconds = secs, "search index build finished");
                Ok(self.search_index_status())
            }
            Err(e) => Err(e),
        }
    }

    fn build_inner(&self, retrain: bool, progress: &(dyn Fn(&str, u64, u64) + Sync)) -> Result<()> {
        let phase = |p: &str, done: u64, total: u64| {
            self.search_index.set(|s| {
                s.phase = p.into();
                s.done = done;
                s.total = total;
            });
            progress(p, done, total);
        };
        let current = self
            .search_index
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|ix| ix.quantizer.clone());
        let total: u64 = self.with_catalog(|c| c.models_after(None).map(|m| m.n_filters).sum());
        let need_new = retrain || current.as_ref().is_none_or(|q| total > 4 * q.trained_on.max(1));
        let quantizer = match (need_new, current) {
            (false, Some(q)) => q,
            _ => {
                if total == 0 {
                    return Err(EngineError::FailedPrecondition("no filters stored: nothing to index".into()));
                }
                phase("sampling", 0, total);
                let sample = self.train_sample(total)?;
                phase("training", 0, sample.len() as u64);
                let mut version = self.store.quantizer_versions()?.into_iter().max().unwrap_or(0) + 1;
                if let Some(v) = self.store.search_index_version()? {
                    version = version.max(v + 1);
                }
                let q = Quantizer::train(version, &sample, total);
                self.store.put_quantizer(version, &q.encode())?;
                q
            }
        };
        let version = quantizer.version;
        self.search_index.set(|s| s.version = version);
        // A catch-up build encodes only the models without a segment of this version.
        let (_, todo) = self.models_without_segment(version)?;
        let to_encode: u64 = todo.iter().map(|(m, _)| m.n_filters).sum();
        phase("encoding", 0, to_encode);
        let mut done = 0u64;
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut batch_filters = 0u64;
        for (m, layers) in &todo {
            if self.search_index.stopping.load(Ordering::Relaxed) {
                return Err(EngineError::FailedPrecondition("the server is shutting down; build abandoned".into()));
            }
            let seg = match self.encode_stored_model(&quantizer, m, layers) {
                Ok(s) => s,
                // Deleted while the build ran: nothing to index.
                Err(_) if self.with_catalog(|c| c.model(m.model_id).is_none()) => continue,
                Err(e) => return Err(e),
            };
            batch.push((m.model_id, seg.encode()));
            batch_filters += m.n_filters;
            done += m.n_filters;
            if batch_filters >= BUILD_BATCH_FILTERS {
                self.write_build_segments(version, std::mem::take(&mut batch))?;
                batch_filters = 0;
            }
            phase("encoding", done, to_encode);
        }
        self.write_build_segments(version, batch)?;

        // Switch: under the write lock, encode what was ingested meanwhile, make the version
        // current, and load the lists from the stored segments (model-id order).
        phase("switching", done, to_encode);
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (have, late) = self.models_without_segment(version)?;
        let mut late_segments = Vec::new();
        for (m, layers) in &late {
            late_segments.push((m.model_id, self.encode_stored_model(&quantizer, m, layers)?.encode()));
        }
        self.store.put_segments(version, &late_segments)?;
        // Segments of models deleted during the build (written before their delete was seen).
        let live: std::collections::HashSet<u64> = self.with_catalog(|c| c.models_after(None).map(|m| m.model_id).collect());
        let stale: Vec<u64> = have.iter().copied().filter(|id| !live.contains(id)).collect();
        for id in stale {
            self.store.delete_segment(version, id)?;
        }
        self.store.switch_search_index(version)?;
        let ix = load_index(&self.store)?;
        *self.search_index.index.write().unwrap_or_else(|p| p.into_inner()) = ix;
        Ok(())
    }

    /// The model ids holding a segment of `version`, and the stored models (with their
    /// layers) that hold none.
    #[allow(clippy::type_complexity)]
    fn models_without_segment(
        &self,
        version: u32,
    ) -> Result<(
        std::collections::HashSet<u64>,
        Vec<(Arc<crate::store::records::ModelRecord>, Vec<Arc<crate::catalog::CatalogLayer>>)>,
    )> {
        let mut have = std::collections::HashSet::new();
        self.store.segments(version, |id, _| {
            have.insert(id);
            Ok(())
        })?;
        let missing = self.with_catalog(|c| {
            c.models_after(None).filter(|m| !have.contains(&m.model_id)).map(|m| (m.clone(), c.model_layers(m))).collect()
        });
        Ok((have, missing))
    }

    /// Writes segments of a build, skipping models deleted meanwhile (checked under the write
    /// lock, so a delete cannot slip between the check and the write).
    fn write_build_segments(&self, version: u32, batch: Vec<(u64, Vec<u8>)>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let live: Vec<(u64, Vec<u8>)> =
            self.with_catalog(|c| batch.into_iter().filter(|(id, _)| c.model(*id).is_some()).collect());
        self.store.put_segments(version, &live)?;
        Ok(())
    }

    fn encode_stored_model(
        &self,
        q: &Quantizer,
        m: &crate::store::records::ModelRecord,
        layers: &[Arc<crate::catalog::CatalogLayer>],
    ) -> Result<Segment> {
        let mut vals = Vec::with_capacity(layers.len());
        for l in layers {
            vals.push((l.record.first_filter_id, self.store.read_layer_filters(None, &l.record, 0, l.record.n_filters)?));
        }
        let parts: Vec<(u64, &[f32])> = vals.iter().map(|(f, v)| (*f, v.as_slice())).collect();
        Ok(Segment::build(q, m.model_id, &parts))
    }

    /// About [`train_sample_size`] filters spread over every layer in proportion to its size: runs of
    /// up to 64 filters from evenly spaced blocks, so few blocks are read.
    fn train_sample(&self, total: u64) -> Result<Vec<[f32; 9]>> {
        let layers: Vec<Arc<crate::catalog::CatalogLayer>> =
            self.with_catalog(|c| c.models_after(None).flat_map(|m| c.model_layers(m)).collect());
        let frac = (train_sample_size(total) as f64 / total as f64).min(1.0);
        let block = crate::store::keys::BLOCK_FILTERS;
        let mut out = Vec::new();
        for l in &layers {
            let n = l.record.n_filters;
            if n == 0 {
                continue;
            }
            let want = ((n as f64 * frac).round() as u64).clamp(1, n);
            let n_blocks = n.div_ceil(block);
            let runs = want.div_ceil(64).min(n_blocks);
            let per_run = want.div_ceil(runs);
            let mut idx = Vec::with_capacity(want as usize);
            for r in 0..runs {
                let b = r * n_blocks / runs;
                let start = b * block;
                let len = (n - start).min(block);
                let take = per_run.min(len);
                for j in 0..take {
                    idx.push(start + j * len / take);
                }
            }
            idx.dedup();
            match self.store.read_filters_at(None, &l.record, &idx) {
                Ok(v) => out.extend(v.into_iter().filter(|f| f.iter().all(|x| x.is_finite()))),
                Err(_) if self.with_catalog(|c| c.layer(l.record.layer_id).is_none()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }
}

/// Shifts a segment's relative ids (from [`Engine::encode_for_ingest`]) to the model's ids.
pub(crate) fn rebase(mut s: Segment, model_id: u64, first_filter_id: u64) -> Segment {
    s.model_id = model_id;
    for (_, ids, _) in s.cells.iter_mut() {
        for id in ids.iter_mut() {
            *id += first_filter_id;
        }
    }
    s
}
