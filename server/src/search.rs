//! Nearest-neighbour search over stored filters, exact mode: a multi-threaded scan of the
//! layer-contiguous filter blocks of the selected layers only, with a bounded heap per work
//! item, merged at the end. Recall is 1.0 by construction.
//!
//! Conventions, fixed here once (the proto `search.proto` documents them for clients):
//! - every space maps a filter f and the query q through one transform T and the distance is
//!   the squared Euclidean distance Σ_k (T(f)_k − T(q)_k)², summed in f64 in element order
//!   k = 0..dim, so a naive loop reproduces it bit for bit (the vectorised kernel computes 8
//!   filters per step in lanes, each lane in that same order; no reassociation, no FMA);
//! - values are widened from f32 to f64 before any arithmetic (as `stats.rs` does);
//! - raw: T(f) = f; scaled: f / max_k |f_k| (stats.rs's L∞ scaling in f64; zero stays zero);
//!   cosine: f / ‖f‖₂ in f64 (zero stays zero), so the distance is 2 − 2cos; basis: the first m
//!   coefficients `quality::project(basis, quality::scale_linf(f))` in the pinned basis, exactly
//!   the coefficients its histograms bin;
//! - sign invariance: d = min(d(T(f), T(q)), d(T(f), T(−q))), `sign_flipped` when the second is
//!   strictly smaller;
//! - ranking by (distance, filter id) ascending (`f64::total_cmp`; a NaN distance, from a
//!   stored non-finite value, ranks last);
//! - filter-level sparsity follows `stats.rs`: t = ε · max|w| of the layer (1 for an all-zero
//!   layer), sparse when max_k |f_k| < t (≤ t non-strict).

use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::analytics::record_basis;
use crate::catalog::CatalogLayer;
use crate::engine::{Engine, EngineError, Result};
use crate::quality::{self, Basis};
use crate::selection::Pred;
use crate::store::{BlockCheck, FilterCursor, StoreError};
use crate::store::keys::{BLOCK_FILTERS, FILTER_BYTES};
use crate::store::records::{LayerSpan, ModelRecord};

/// Neighbours returned when a request leaves k at 0.
pub const DEFAULT_K: usize = 10;
/// Largest k a server accepts unless configured otherwise.
pub const DEFAULT_MAX_K: usize = 1000;
/// Filters per scan work item (16 blocks): large enough to amortise a RocksDB seek, small
/// enough to spread one big layer over every core.
const SCAN_CHUNK: u64 = 16 * BLOCK_FILTERS;
/// A scan of fewer selected filters runs on the calling thread alone: waking the pool and
/// waiting for it costs more than the second core saves. Measured on our 2-core machine with
/// cached blocks: 20 us alone against 30-40 us on the pool at 15,600 filters, even at 31,600.
/// Set below that break-even, as a scan from memory gains more from the second core.
const SCAN_ALONE_BELOW: u64 = 6 * BLOCK_FILTERS;
/// Filters per vectorised step.
const LANES: usize = 8;

/// The space distances are measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// The stored values.
    Raw,
    /// L∞-scaled filters.
    Scaled,
    /// L2-normalised filters (squared distance = 2 − 2cos).
    Cosine,
    /// The first `components` (1..=9) coefficients in the pinned reference basis.
    Basis {
        /// Leading components used.
        components: usize,
    },
}

/// The query kernel, given or stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Query {
    /// Nine values, row-major.
    Kernel([f32; 9]),
    /// A stored filter.
    FilterId(u64),
}

/// Conditions on single filters, evaluated after the layer selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FilterConditions {
    /// Skip filters whose 9 values are all zero.
    pub exclude_zero: bool,
    /// Skip sparse filters (see the module doc).
    pub exclude_sparse: bool,
    /// ε of the sparsity threshold, relative to the layer max.
    pub sparse_eps: f64,
    /// `<` (strict, the default) or `≤`.
    pub sparse_strict: bool,
}

impl Default for FilterConditions {
    fn default() -> Self {
        FilterConditions {
            exclude_zero: false,
            exclude_sparse: false,
            sparse_eps: crate::stats::CLEAN_EPS,
            sparse_strict: true,
        }
    }
}

/// Which algorithm answers (asked for, or used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A full scan of the candidates (recall 1.0).
    #[default]
    Exact,
    /// The approximate index with exact re-ranking.
    Approximate,
}

/// Selections of at most this many filters are scanned exactly even in approximate mode.
pub const DEFAULT_EXACT_BELOW: u64 = 16_384;

/// Exact queries over more selected filters than this go through the index's bounds, smaller
/// ones are scanned. Measured at 1e7 filters (4,097 cells): the walk takes 1.2–1.5 ms (bounds
/// of every cell, then the opened cells' codes), the scan ~1.3 ns per selected filter (four
/// filters per screen step, blocks read in place), so they cross near a million: 1.04 M
/// filters scanned in 1.32 ms, walked in 1.47.
pub const DEFAULT_EXACT_WALK_ABOVE: u64 = 1 << 20;

/// ... and only when the selection holds at least this share of the indexed filters: a narrow
/// selection's k-th distance is larger, so the walk opens more cells for fewer selected
/// entries. Measured (ms per query, walk / scan): 1e7 at 10 % 1.8 / 2.9; 1e8 at 10 % 7.6 /
/// 19.4, at 1 % 5.2 / 2.5.
const EXACT_WALK_MIN_SHARE: f64 = 0.05;

/// How a query was answered (reported in the response).
struct Plan {
    mode: Mode,
    reason: String,
    nprobe: u32,
    reranked: u64,
    index_version: Option<u32>,
    codes: u64,
}

impl Plan {
    fn exact(reason: &str) -> Plan {
        Plan { mode: Mode::Exact, reason: reason.into(), nprobe: 0, reranked: 0, index_version: None, codes: 0 }
    }
}

/// Entries of [`SelectionPlan::by_first`] per entry of its coarse index.
const LOCATE_STRIDE: usize = 64;

/// [`SelectionPlan::locate`] over its arrays.
fn locate_in(by_first: &[(u64, usize)], coarse: &[u64], lens: &[u64], id: u64) -> Option<(usize, u64)> {
    let lo = coarse.partition_point(|&f| f <= id).checked_sub(1)? * LOCATE_STRIDE;
    let stretch = by_first.get(lo..(lo + LOCATE_STRIDE).min(by_first.len()))?;
    let i = lo + stretch.partition_point(|x| x.0 <= id).checked_sub(1)?;
    let (first, slot) = by_first[i];
    let idx = id - first;
    (idx < *lens.get(i)?).then_some((slot, idx))
}

/// A selection resolved against one catalogue generation (cached, shared by queries).
pub(crate) struct SelectionPlan {
    generation: u64,
    /// Selected layers with their models, in layer-id order.
    layers: Vec<(Arc<ModelRecord>, Arc<CatalogLayer>)>,
    /// What the scan needs of each selected layer, by slot (as `layers`).
    slots: Vec<ScanSlot>,
    /// (first filter id, slot) of the non-empty layers, ascending.
    by_first: Vec<(u64, usize)>,
    /// Every [`LOCATE_STRIDE`]th first filter id of `by_first`: [`SelectionPlan::locate`]
    /// searches this small array first, then one stretch of `by_first`, instead of binary
    /// searching tens of thousands of entries (a cache miss a step; measured, a tenth of an
    /// approximate query).
    coarse: Vec<u64>,
    /// Filters per entry of `by_first` (so that locating needs no layer record).
    lens: Vec<u64>,
    /// Filters in the selected layers.
    filters: u64,
    /// Ranges over the index, for one index state.
    ann: std::sync::Mutex<Option<Arc<AnnPlan>>>,
}

/// What a scan needs of a selected layer, kept together per slot: reading a layer's
/// catalogue entry (its record, its statistics) was a cache miss or two per layer, a fifth of
/// a scan over the benchmark's 36,000 small layers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanSlot {
    span: LayerSpan,
    first_filter_id: u64,
    /// The layer's largest |value| (the sparse-filter condition's reference).
    abs_max: f64,
}

impl From<&CatalogLayer> for ScanSlot {
    fn from(l: &CatalogLayer) -> Self {
        ScanSlot { span: (&l.record).into(), first_filter_id: l.record.first_filter_id, abs_max: l.stats.abs_max }
    }
}

/// The selection over one index state: merged filter-id ranges of indexed layers, the slots
/// of layers whose model is not indexed (scanned exactly).
pub(crate) struct AnnPlan {
    key: (u32, u64),
    ranges: Vec<(u64, u64)>,
    /// The same selection as bits per posting list, for a selection of at most
    /// [`MASKS_BELOW_SHARE`] of the indexed filters (resolved per list as probes open it).
    masks: Option<crate::ann::SelectionMasks>,
    unindexed: Vec<usize>,
    indexed_filters: u64,
}

/// Selections of at most this share of the indexed filters keep [`crate::ann::SelectionMasks`]:
/// over a broader one nearly every entry is selected and the ranges are as good.
const MASKS_BELOW_SHARE: f64 = 0.5;

impl AnnPlan {
    fn selected(&self) -> crate::ann::Selected<'_> {
        crate::ann::Selected { ranges: &self.ranges, masks: self.masks.as_ref() }
    }
}

impl SelectionPlan {
    /// The (slot, index in layer) of a selected filter id.
    fn locate(&self, id: u64) -> Option<(usize, u64)> {
        locate_in(&self.by_first, &self.coarse, &self.lens, id)
    }

    fn ann_plan(&self, ix: &crate::ann::Index) -> Arc<AnnPlan> {
        let mut slot = self.ann.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = slot.as_ref().filter(|p| p.key == ix.key()) {
            return p.clone();
        }
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut unindexed = Vec::new();
        let mut indexed_filters = 0u64;
        for &(a, s) in &self.by_first {
            let (m, l) = &self.layers[s];
            if !ix.has_model(m.model_id) {
                unindexed.push(s);
                continue;
            }
            let b = a + l.record.n_filters;
            indexed_filters += l.record.n_filters;
            match ranges.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => ranges.push((a, b)),
            }
        }
        let masks = (indexed_filters as f64 <= MASKS_BELOW_SHARE * ix.live_entries() as f64).then(|| ix.masks());
        let p = Arc::new(AnnPlan { key: ix.key(), ranges, masks, unindexed, indexed_filters });
        *slot = Some(p.clone());
        p
    }
}

/// What the index paths (approximate, exact walk) need of one planned query.
struct IndexQuery<'a> {
    q: &'a NearestQuery,
    plan: &'a SelectionPlan,
    spec: &'a ScanSpec<'a>,
    snapshot: &'a rocksdb::Snapshot<'a>,
    /// The query kernel, and its negation when sign invariant.
    qs: Vec<[f32; 9]>,
}

/// An answer through the index (approximate, or exact through its bounds), or why the scan answers instead.
enum IndexAnswer {
    Answered { plan: Plan, candidates: Vec<Candidate>, unindexed: Vec<usize> },
    Declined(String),
}

/// One nearest-neighbour query.
#[derive(Debug, Clone)]
pub struct NearestQuery {
    /// The query kernel.
    pub query: Query,
    /// Neighbours wanted (≥ 1).
    pub k: usize,
    /// Space.
    pub space: Space,
    /// f and −f count as the same shape.
    pub sign_invariant: bool,
    /// Layers searched.
    pub selection: Pred,
    /// Filter-level conditions.
    pub conditions: FilterConditions,
    /// Leave the query filter out (filter-id queries).
    pub exclude_query_filter: bool,
    /// Mode asked for.
    pub mode: Mode,
    /// Approximate: cells probed for a search over everything (0: the default); scaled up by
    /// √(1/selectivity) unless `nprobe_unscaled`.
    pub nprobe: usize,
    /// Approximate: probe exactly `nprobe` cells (the default when 0), whatever the
    /// selection's size.
    pub nprobe_unscaled: bool,
    /// Approximate: candidates re-ranked exactly = k · rerank (0: the default).
    pub rerank: usize,
    /// Selections of at most this many filters are scanned (both modes).
    pub exact_below: u64,
    /// Exact mode: scan every selected filter rather than letting the index's bounds skip
    /// those that cannot be among the k nearest (same answer; for verification and benchmarks).
    pub exact_scan: bool,
}

/// One neighbour with its owners.
#[derive(Debug, Clone)]
pub struct Neighbor {
    /// Stored filter id.
    pub filter_id: u64,
    /// Squared distance in the query's space.
    pub distance: f64,
    /// The stored kernel.
    pub kernel: [f32; 9],
    /// Sign-invariant search: −q matched better.
    pub sign_flipped: bool,
    /// Owning model.
    pub model: Arc<ModelRecord>,
    /// Owning layer.
    pub layer: Arc<CatalogLayer>,
    /// Index within the layer (o · in_channels + i).
    pub index_in_layer: u64,
}

impl Neighbor {
    /// Output channel o.
    pub fn out_channel(&self) -> u32 {
        (self.index_in_layer / u64::from(self.layer.record.in_channels.max(1))) as u32
    }

    /// Input channel i.
    pub fn in_channel(&self) -> u32 {
        (self.index_in_layer % u64::from(self.layer.record.in_channels.max(1))) as u32
    }
}

/// The answer to a query, with how it was computed.
#[derive(Debug, Clone)]
pub struct NearestAnswer {
    /// Nearest first, ties by lower filter id.
    pub neighbors: Vec<Neighbor>,
    /// Algorithm used.
    pub mode: Mode,
    /// Why this mode answered, and with which parameters.
    pub mode_reason: String,
    /// Approximate: cells probed (after the selectivity scaling).
    pub nprobe: u32,
    /// Approximate: candidates re-ranked exactly.
    pub candidates_reranked: u64,
    /// Approximate: the index (quantizer) version used.
    pub index_version: Option<u32>,
    /// Space used.
    pub space: Space,
    /// k used.
    pub k: usize,
    /// Whether sign invariant.
    pub sign_invariant: bool,
    /// Pinned basis version (basis space).
    pub basis_version: Option<u32>,
    /// The query kernel (the stored one for a filter-id query).
    pub query_kernel: [f32; 9],
    /// Selected layers.
    pub layers_scanned: u64,
    /// Filters compared: read by the exact scan, plus codes compared by the index.
    pub filters_scanned: u64,
    /// Wall time of the search.
    pub elapsed: std::time::Duration,
}

/// A space with what its transform needs.
enum Metric {
    Raw,
    Scaled,
    Cosine,
    Basis(Box<Basis>, usize),
}

impl Metric {
    fn dim(&self) -> usize {
        match self {
            Metric::Basis(_, m) => *m,
            _ => 9,
        }
    }

    /// T(f): the one definition of each space (see the module doc).
    fn transform(&self, f: &[f32; 9]) -> [f64; 9] {
        match self {
            Metric::Raw => f.map(f64::from),
            Metric::Scaled => {
                let x = f.map(f64::from);
                let m = x.iter().fold(0f64, |m, v| m.max(v.abs()));
                let d = if m > 0.0 { m } else { 1.0 };
                x.map(|v| v / d)
            }
            Metric::Cosine => {
                let x = f.map(f64::from);
                let s = x.iter().fold(0f64, |a, v| a + v * v).sqrt();
                let d = if s > 0.0 { s } else { 1.0 };
                x.map(|v| v / d)
            }
            Metric::Basis(b, _) => quality::project(b, &quality::scale_linf(f)),
        }
    }
}

/// Squared distance of the first `dim` coordinates, summed in order.
fn sq_dist(a: &[f64; 9], b: &[f64; 9], dim: usize) -> f64 {
    let mut acc = 0f64;
    for k in 0..dim {
        let t = a[k] - b[k];
        acc += t * t;
    }
    acc
}

/// A candidate in a heap: ordered by (distance, filter id), NaN last.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    distance: f64,
    filter_id: u64,
    kernel: [f32; 9],
    flipped: bool,
    slot: usize,
    index: u64,
}

impl PartialEq for Candidate {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.distance
            .total_cmp(&o.distance)
            .then(self.filter_id.cmp(&o.filter_id))
    }
}

/// The k best candidates seen so far (a max-heap on the worst kept).
struct TopK {
    k: usize,
    heap: BinaryHeap<Candidate>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Distance a candidate must not exceed to be considered (∞ until the heap is full).
    fn bound(&self) -> f64 {
        if self.heap.len() < self.k {
            f64::INFINITY
        } else {
            self.heap.peek().map_or(f64::INFINITY, |c| c.distance)
        }
    }

    fn offer(&mut self, c: Candidate) {
        if self.heap.len() < self.k {
            self.heap.push(c);
        } else if let Some(mut worst) = self.heap.peek_mut()
            && c < *worst
        {
            *worst = c;
        }
    }
}

/// What a scan needs, shared by the work items.
struct ScanSpec<'a> {
    metric: &'a Metric,
    q: [f64; 9],
    q_neg: Option<[f64; 9]>,
    conditions: FilterConditions,
    skip_id: Option<u64>,
}

impl ScanSpec<'_> {
    /// Distances of `LANES` filters at once (`chunk` holds LANES·9 values), each lane summed in
    /// the same order as [`sq_dist`].
    fn lanes(
        &self,
        chunk: &[f32],
        d: &mut [f64; LANES],
        flip: &mut [bool; LANES],
        raw_max: &mut [f64; LANES],
    ) {
        let mut x = [[0f64; LANES]; 9];
        for (l, f) in chunk.chunks_exact(9).enumerate().take(LANES) {
            for (k, v) in f.iter().enumerate() {
                x[k][l] = f64::from(*v);
            }
        }
        let mut m = [0f64; LANES];
        for row in &x {
            for l in 0..LANES {
                m[l] = m[l].max(row[l].abs());
            }
        }
        *raw_max = m;
        match self.metric {
            Metric::Raw => {}
            Metric::Scaled => {
                let den = m.map(|v| if v > 0.0 { v } else { 1.0 });
                for row in x.iter_mut() {
                    for l in 0..LANES {
                        row[l] /= den[l];
                    }
                }
            }
            Metric::Cosine => {
                let mut s = [0f64; LANES];
                for row in &x {
                    for l in 0..LANES {
                        s[l] += row[l] * row[l];
                    }
                }
                let den = s.map(|v| {
                    let r = v.sqrt();
                    if r > 0.0 { r } else { 1.0 }
                });
                for row in x.iter_mut() {
                    for l in 0..LANES {
                        row[l] /= den[l];
                    }
                }
            }
            Metric::Basis(..) => unreachable!("basis space uses the per-filter path"),
        }
        let mut acc = [0f64; LANES];
        for (row, qk) in x.iter().zip(&self.q) {
            for l in 0..LANES {
                let t = row[l] - qk;
                acc[l] += t * t;
            }
        }
        *flip = [false; LANES];
        if let Some(qn) = &self.q_neg {
            let mut acc2 = [0f64; LANES];
            for (row, qk) in x.iter().zip(qn) {
                for l in 0..LANES {
                    let t = row[l] - qk;
                    acc2[l] += t * t;
                }
            }
            for l in 0..LANES {
                if acc2[l] < acc[l] {
                    acc[l] = acc2[l];
                    flip[l] = true;
                }
            }
        }
        *d = acc;
    }

    /// Distance of one filter (tail of a chunk, and the basis space).
    fn one(&self, f: &[f32; 9]) -> (f64, bool) {
        let t = self.metric.transform(f);
        let dim = self.metric.dim();
        let d = sq_dist(&t, &self.q, dim);
        match &self.q_neg {
            Some(qn) => {
                let d2 = sq_dist(&t, qn, dim);
                if d2 < d { (d2, true) } else { (d, false) }
            }
            None => (d, false),
        }
    }

    /// Whether the filter conditions drop a filter with this max |f|.
    fn dropped(&self, raw_max: f64, threshold: f64) -> bool {
        let c = &self.conditions;
        (c.exclude_zero && raw_max == 0.0)
            || (c.exclude_sparse
                && if c.sparse_strict {
                    raw_max < threshold
                } else {
                    raw_max <= threshold
                })
    }

    /// Scans the filters of one layer starting at index `start` (`bytes`: 36 bytes each, 9 f32
    /// LE, as stored) into `top`.
    ///
    /// `shared` holds (as f64 bits) the smallest k-th distance any full heap of this query has
    /// reached: a filter farther than that cannot be among the k nearest, whichever work item
    /// finds it (the raw screen uses it).
    fn scan(&self, slot: usize, layer: &ScanSlot, start: u64, bytes: &[u8], top: &mut TopK, shared: &AtomicU64) {
        let first_id = layer.first_filter_id + start;
        let abs_max = layer.abs_max;
        let threshold = if abs_max == 0.0 {
            1.0
        } else {
            self.conditions.sparse_eps * abs_max
        };
        let consider = |i: usize, d: f64, flipped: bool, kernel: [f32; 9], top: &mut TopK| {
            let id = first_id + i as u64;
            let d = if d.is_nan() { f64::NAN } else { d };
            // Cheap reject first: most filters are farther than the current k-th.
            if d > top.bound() || self.skip_id == Some(id) {
                return;
            }
            let raw_max = kernel.iter().fold(0f64, |m, v| m.max(f64::from(*v).abs()));
            if self.dropped(raw_max, threshold) {
                return;
            }
            top.offer(Candidate {
                distance: d,
                filter_id: id,
                kernel,
                flipped,
                slot,
                index: start + i as u64,
            });
        };
        let n = bytes.len() / FILTER_BYTES;
        match self.metric {
            Metric::Raw => {
                // Screen in f32, then the exact f64 distance for the few that may enter the
                // heap. The f32 sum of 9 squared differences is within a relative 12u
                // (u = 2⁻²⁴) of the exact value: each difference, square and addition (or fused
                // square-and-add) is one correctly rounded f32 operation on non-negative terms;
                // underflow adds at most 9·2⁻¹⁴⁹ in absolute terms. So a filter whose f32
                // distance exceeds bound·(1 + 2⁻¹⁹) + 2⁻¹²⁰ cannot reach the heap, and skipping
                // it changes nothing. A sum of fewer of the squares is within the same bound of
                // a value no greater, so it may screen too.
                let q = self.q.map(|v| v as f32);
                match self.q_neg.map(|n| n.map(|v| v as f32)) {
                    None => self.scan_raw::<false>(bytes, &q, &q, top, shared, consider),
                    Some(qn) => self.scan_raw::<true>(bytes, &q, &qn, top, shared, consider),
                }
            }
            Metric::Scaled | Metric::Cosine => {
                let (mut d, mut flip, mut m) = ([0f64; LANES], [false; LANES], [0f64; LANES]);
                let mut chunk = [0f32; LANES * 9];
                let mut lanes = bytes.chunks_exact(LANES * FILTER_BYTES);
                let mut i = 0;
                for c in &mut lanes {
                    for (x, b) in chunk.iter_mut().zip(c.chunks_exact(4)) {
                        *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    self.lanes(&chunk, &mut d, &mut flip, &mut m);
                    for l in 0..LANES {
                        if d[l] <= top.bound() || d[l].is_nan() {
                            consider(i + l, d[l], flip[l], kernel_at(&c[l * FILTER_BYTES..]), top);
                        }
                    }
                    i += LANES;
                }
                for (j, f) in lanes.remainder().chunks_exact(FILTER_BYTES).enumerate() {
                    let x = kernel_at(f);
                    let (d, flipped) = self.one(&x);
                    consider(i + j, d, flipped, x, top);
                }
            }
            Metric::Basis(..) => {
                for i in 0..n {
                    let x = kernel_at(&bytes[i * FILTER_BYTES..]);
                    let (d, flipped) = self.one(&x);
                    consider(i, d, flipped, x, top);
                }
            }
        }
    }

    /// The raw space's screened scan (see [`ScanSpec::scan`]): `SIGN` adds the distance to −q.
    #[inline(always)]
    fn scan_raw<const SIGN: bool>(
        &self,
        bytes: &[u8],
        q: &[f32; 9],
        qn: &[f32; 9],
        top: &mut TopK,
        shared: &AtomicU64,
        mut consider: impl FnMut(usize, f64, bool, [f32; 9], &mut TopK),
    ) {
        // The screen's limit, rounded up to an f32 so the hot loop compares in f32.
        let limit = |top: &TopK| {
            let b = top.bound();
            let mut g = f64::from_bits(shared.load(Ordering::Relaxed));
            // A plain load first: a locked update of the line every item shares, at each run
            // of each item, cost more than the scan of a small layer.
            if b.is_finite() && b < g {
                shared.fetch_min(b.to_bits(), Ordering::Relaxed);
                g = b;
            }
            // (`min` ignores a NaN bound, which rejects nothing anyway.)
            let l = b.min(g) * (1.0 + SCREEN_REL) + SCREEN_ABS;
            let l32 = l as f32;
            if f64::from(l32) < l { l32.next_up() } else { l32 }
        };
        let mut limit32 = limit(top);
        let (q_lo, q_hi, q_8) = split_query(q);
        let (n_lo, n_hi, n_8) = split_query(qn);
        // Eight filters at a time where the CPU has AVX2 and FMA, screened first on their
        // first eight values (see `scan_octs_avx2`), the rest one by one.
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present (checked above).
            done = unsafe { self.scan_octs_avx2::<SIGN>(bytes, (q, qn), (&q_lo, &q_hi, q_8), (&n_lo, &n_hi, n_8), top, &mut limit32, &limit, &mut consider) };
        }
        for (i, f) in bytes.chunks_exact(FILTER_BYTES).enumerate().skip(done) {
            let Ok(f) = <&[u8; FILTER_BYTES]>::try_from(f) else { continue };
            prefetch(bytes, i * FILTER_BYTES + PREFETCH_AHEAD);
            let mut d = screen_dist(f, &q_lo, &q_hi, q_8);
            if SIGN {
                d = d.min(screen_dist(f, &n_lo, &n_hi, n_8));
            }
            // NaN is not greater and goes to the exact path, as does an f32 overflow to ∞.
            if d > limit32 && d != f32::INFINITY {
                continue;
            }
            let x = kernel_of(f);
            let (d, flipped) = self.one(&x);
            consider(i, d, flipped, x, top);
            limit32 = limit(top);
        }
    }

    /// The screened scan's loop over whole groups of eight filters (see `scan_raw`); returns
    /// how many filters it covered.
    ///
    /// A group is screened first on the sum of each filter's first eight squared differences
    /// (`screen_partial8`): a sum of non-negative terms, at most the full sum but for rounding,
    /// and the screen's slack covers any order of up to nine such terms, so a filter whose
    /// partial sum exceeds the limit cannot reach the heap. The few that pass are screened on
    /// all nine values (`screen_dist`) before the exact distance.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scan_octs_avx2<const SIGN: bool>(
        &self,
        bytes: &[u8],
        (q, qn): (&[f32; 9], &[f32; 9]),
        (q_lo, q_hi, q_8): (&[f32; 4], &[f32; 4], f32),
        (n_lo, n_hi, n_8): (&[f32; 4], &[f32; 4], f32),
        top: &mut TopK,
        limit32: &mut f32,
        limit: &impl Fn(&TopK) -> f32,
        consider: &mut impl FnMut(usize, f64, bool, [f32; 9], &mut TopK),
    ) -> usize {
        use std::arch::x86_64::*;
        for (n, oct) in bytes.chunks_exact(8 * FILTER_BYTES).enumerate() {
            let Ok(oct) = <&[u8; 8 * FILTER_BYTES]>::try_from(oct) else { continue };
            prefetch(bytes, n * 8 * FILTER_BYTES + PREFETCH_AHEAD);
            let mut d8 = screen_partial8(oct, q);
            if SIGN {
                d8 = _mm256_min_ps(d8, screen_partial8(oct, qn));
            }
            // Most groups hold no filter within the limit: one vector compare tells. NaN is not
            // greater and goes on, as does an f32 overflow to ∞.
            let near = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_NGT_UQ>(d8, _mm256_set1_ps(*limit32)),
                _mm256_cmp_ps::<_CMP_EQ_OQ>(d8, _mm256_set1_ps(f32::INFINITY)),
            );
            let mut lanes = _mm256_movemask_ps(near) as u32;
            while lanes != 0 {
                let l = lanes.trailing_zeros() as usize;
                lanes &= lanes - 1;
                let Ok(f) = <&[u8; FILTER_BYTES]>::try_from(&oct[l * FILTER_BYTES..(l + 1) * FILTER_BYTES]) else { continue };
                let mut d = screen_dist(f, q_lo, q_hi, q_8);
                if SIGN {
                    d = d.min(screen_dist(f, n_lo, n_hi, n_8));
                }
                // As in `scan_raw` (the limit may have fallen since the compare).
                if d > *limit32 && d != f32::INFINITY {
                    continue;
                }
                let x = kernel_of(f);
                let (d, flipped) = self.one(&x);
                consider(8 * n + l, d, flipped, x, top);
                *limit32 = limit(top);
            }
        }
        bytes.len() / (8 * FILTER_BYTES) * 8
    }
}

/// Relative slack of the f32 screen (2⁻¹⁹ > 2·12·2⁻²⁴ with margin for the f64 reference's own
/// rounding).
const SCREEN_REL: f64 = 1.0 / 524_288.0;
/// Absolute slack of the f32 screen (covers underflow of the squared differences).
const SCREEN_ABS: f64 = 7.52316384526264e-37; // 2⁻¹²⁰

/// The 9 values of a stored filter (36 bytes, f32 LE).
#[inline(always)]
fn kernel_of(b: &[u8; FILTER_BYTES]) -> [f32; 9] {
    std::array::from_fn(|k| f32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]))
}

/// [`kernel_of`] for a slice that holds at least one filter (zeros past its end).
fn kernel_at(b: &[u8]) -> [f32; 9] {
    let mut a = [0u8; FILTER_BYTES];
    let n = b.len().min(FILTER_BYTES);
    a[..n].copy_from_slice(&b[..n]);
    kernel_of(&a)
}

/// How far ahead of the scan (bytes) [`prefetch`] asks for data.
const PREFETCH_AHEAD: usize = 1024;

/// Hints the CPU to load the cache line holding `bytes[at]` (nothing past the end). The stored
/// blocks are read through mmap, page by page, where the hardware prefetchers stop at every
/// 4 KiB boundary; the index's code groups are fetched ahead of their distances.
#[inline(always)]
pub(crate) fn prefetch<T>(bytes: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = bytes.get(at) {
        // SAFETY: a prefetch never faults and has no architectural effect; `p` points into
        // `bytes` anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(std::ptr::from_ref(p).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at);
}

/// A query split as [`screen_dist`] reads a filter: values 0–3, 4–7 and 8.
fn split_query(q: &[f32; 9]) -> ([f32; 4], [f32; 4], f32) {
    ([q[0], q[1], q[2], q[3]], [q[4], q[5], q[6], q[7]], q[8])
}

/// The f32 squared distance the raw screen uses (see [`ScanSpec::scan`]), read straight from
/// the stored bytes as two 4-lane halves and the last value, summed pairwise. Any summation
/// order of the 9 non-negative squares keeps the relative error within 12u.
#[inline(always)]
fn screen_dist(b: &[u8; FILTER_BYTES], q_lo: &[f32; 4], q_hi: &[f32; 4], q_8: f32) -> f32 {
    let v = |k: usize| f32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]);
    let mut acc = [0f32; 4];
    for l in 0..4 {
        let t = v(l) - q_lo[l];
        let u = v(4 + l) - q_hi[l];
        acc[l] = t * t + u * u;
    }
    let t = v(8) - q_8;
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + t * t
}

/// The sums of the first eight squared differences of eight consecutive stored filters (lane
/// `i`: filter `i`), each as `((d0² + d1²) + (d2² + d3²)) + ((d4² + d5²) + (d6² + d7²))` with
/// the first sum of each pair fused (`d0·d0 + d1²` rounded once), bit for bit the value of
/// [`screen_partial8_one`] (a NaN up to its sign; tested): one unaligned load per filter, then
/// the differences transposed and summed in three rounds of interleaves. Inlined into
/// [`ScanSpec::scan_octs_avx2`], which has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn screen_partial8(b: &[u8; 8 * FILTER_BYTES], q: &[f32; 9]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let p = b.as_ptr().cast::<f32>();
    // SAFETY: filter f's load reads 32 bytes at f32 offset 9f (f < 8), at most byte 284 of the
    // 288, and the query's reads its first eight values (unaligned loads); x86 is
    // little-endian, as the stored bytes are. The caller has AVX2 and FMA.
    unsafe {
        let ql = _mm256_loadu_ps(q.as_ptr());
        let d = |f: usize| _mm256_sub_ps(_mm256_loadu_ps(p.add(9 * f)), ql);
        // Filters a and b interleaved, per 128-bit half [a, b, a, b]: the squares of values 0
        // and 2, then 1 and 3 (4 and 6, 5 and 7 in the high half), summed.
        let pair = |a: __m256, b: __m256| {
            let (lo, hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            _mm256_fmadd_ps(lo, lo, _mm256_mul_ps(hi, hi))
        };
        let (u01, u23, u45, u67) = (pair(d(0), d(1)), pair(d(2), d(3)), pair(d(4), d(5)), pair(d(6), d(7)));
        // Per half: the four filters' (0+2) + (1+3) sums, in filter order.
        let w0 = _mm256_add_ps(_mm256_shuffle_ps::<0x44>(u01, u23), _mm256_shuffle_ps::<0xEE>(u01, u23));
        let w1 = _mm256_add_ps(_mm256_shuffle_ps::<0x44>(u45, u67), _mm256_shuffle_ps::<0xEE>(u45, u67));
        // Low halves (values 0-3 of filters 0-7) plus high halves (values 4-7).
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(w0, w1), _mm256_permute2f128_ps::<0x31>(w0, w1))
    }
}

/// [`screen_partial8`]'s sum for one filter, in the same order and with the same fused steps.
#[cfg(all(test, target_arch = "x86_64"))]
fn screen_partial8_one(b: &[u8; FILTER_BYTES], q: &[f32; 9]) -> f32 {
    let d: [f32; 8] = std::array::from_fn(|k| f32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]) - q[k]);
    let pair = |i: usize, j: usize| d[i].mul_add(d[i], d[j] * d[j]);
    (pair(0, 2) + pair(1, 3)) + (pair(4, 6) + pair(5, 7))
}

/// [`screen_partial8`] compiled with AVX2 and FMA, for the test.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn screen_partial8_avx2(b: &[u8; 8 * FILTER_BYTES], q: &[f32; 9]) -> [f32; 8] {
    let mut out = [0f32; 8];
    // SAFETY: `out` holds eight f32; the caller has AVX2 and FMA.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), screen_partial8(b, q)) };
    out
}

fn check_kernel(k: &[f32; 9], what: &str) -> Result<()> {
    if let Some(j) = k.iter().position(|v| !v.is_finite()) {
        return Err(EngineError::InvalidArgument(format!(
            "{what}: value {j} (row {}, column {}) is {}; kernels must be finite",
            j / 3,
            j % 3,
            k[j]
        )));
    }
    Ok(())
}

impl Engine {
    /// The k stored filters nearest to the query among the selected layers, by a full scan
    /// (exact: recall 1.0). `max_k` bounds k. Blocking; a scan of more than one work item runs
    /// on the rayon pool.
    pub fn nearest(&self, q: &NearestQuery, max_k: usize) -> Result<NearestAnswer> {
        let started = Instant::now();
        if q.k == 0 || q.k > max_k {
            return Err(EngineError::InvalidArgument(format!(
                "k must be between 1 and {max_k}, got {}",
                q.k
            )));
        }
        let c = &q.conditions;
        if c.exclude_sparse && !(c.sparse_eps > 0.0 && c.sparse_eps < 1.0) {
            return Err(EngineError::InvalidArgument(format!(
                "sparse_eps must be in (0, 1), got {}",
                c.sparse_eps
            )));
        }
        let (metric, basis_version) = match q.space {
            Space::Raw => (Metric::Raw, None),
            Space::Scaled => (Metric::Scaled, None),
            Space::Cosine => (Metric::Cosine, None),
            Space::Basis { components } => {
                if !(1..=9).contains(&components) {
                    return Err(EngineError::InvalidArgument(format!(
                        "components must be between 1 and 9, got {components}"
                    )));
                }
                let b = self.read_basis();
                let p = b.as_ref().ok_or_else(|| {
                    EngineError::FailedPrecondition(
                        "the basis space needs a pinned reference basis: pin one first (PinBasis RPC, `filterdb pin-basis`)"
                            .into(),
                    )
                })?;
                (
                    Metric::Basis(Box::new(record_basis(&p.record)), components),
                    Some(p.record.version),
                )
            }
        };
        if let Query::Kernel(k) = &q.query {
            check_kernel(k, "query kernel")?;
        }

        // Plan under the catalogue lock, and take the snapshot there too: every layer the
        // catalogue lists has its blocks in the snapshot (commits precede catalogue updates).
        let db = self.store.db();
        let (sel_plan, snapshot, query_kernel) = {
            let cat = self.read_catalog();
            let snapshot = db.snapshot();
            let query_kernel = match q.query {
                Query::Kernel(k) => k,
                Query::FilterId(id) => {
                    let l = cat.layer_of_filter(id).ok_or_else(|| {
                        EngineError::NotFound(format!(
                            "filter id {id} is not stored (deleted, or beyond the last filter id {})",
                            cat.next_ids.filter.saturating_sub(1)
                        ))
                    })?;
                    let idx = id - l.record.first_filter_id;
                    let v =
                        self.store
                            .read_layer_filters(Some(&snapshot), &l.record, idx, idx + 1)?;
                    let mut k = [0f32; 9];
                    k.copy_from_slice(v.get(..9).ok_or_else(|| {
                        EngineError::NotFound(format!(
                            "filter id {id}: its layer holds no such filter"
                        ))
                    })?);
                    check_kernel(&k, &format!("stored filter {id}"))?;
                    k
                }
            };
            let sel_plan = self.selection_plan(&cat, &q.selection);
            (sel_plan, snapshot, query_kernel)
        };
        let layers = &sel_plan.layers[..];

        let neg = query_kernel.map(|v| -v);
        let spec = ScanSpec {
            q: metric.transform(&query_kernel),
            q_neg: q.sign_invariant.then(|| metric.transform(&neg)),
            metric: &metric,
            conditions: q.conditions,
            skip_id: match q.query {
                Query::FilterId(id) if q.exclude_query_filter => Some(id),
                _ => None,
            },
        };

        // The approximate path, when asked for and when it applies; otherwise (and for layers
        // the index does not cover yet) the exact scan.
        let mut plan = Plan::exact("");
        let mut exact_slots: Option<Vec<usize>> = None; // None: every selected layer
        let mut candidates: Vec<Candidate> = Vec::new();
        let iq = IndexQuery {
            q,
            plan: &sel_plan,
            spec: &spec,
            snapshot: &snapshot,
            qs: if q.sign_invariant { vec![query_kernel, neg] } else { vec![query_kernel] },
        };
        let through_index = if q.mode == Mode::Approximate { self.approximate(&iq)? } else { self.exact_by_index(&iq)? };
        drop(iq);
        match through_index {
            IndexAnswer::Answered { plan: p, candidates: c, unindexed } => {
                plan = p;
                candidates = c;
                exact_slots = Some(unindexed);
            }
            IndexAnswer::Declined(reason) => plan.reason = reason,
        }
        let exact_slots = exact_slots.unwrap_or_else(|| (0..layers.len()).collect());
        let (parts, from_view) = self.scan_exact(&sel_plan.slots, &exact_slots, &spec, q.k, &snapshot)?;
        drop(snapshot);
        let mut all: Vec<Candidate> = parts.into_iter().flat_map(|t| t.heap.into_vec()).chain(candidates).collect();
        all.sort_unstable();
        all.truncate(q.k);
        let neighbors = all
            .into_iter()
            .map(|c| {
                let (m, l) = &layers[c.slot];
                Neighbor {
                    filter_id: c.filter_id,
                    distance: c.distance,
                    kernel: c.kernel,
                    sign_flipped: c.flipped,
                    model: m.clone(),
                    layer: l.clone(),
                    index_in_layer: c.index,
                }
            })
            .collect();
        let exact_filters: u64 = exact_slots.iter().map(|&s| sel_plan.slots[s].span.n_filters).sum();
        if exact_filters > 0 {
            plan.reason.push_str(&format!(" ({from_view} of the {exact_filters} filters scanned read from the pinned block view)"));
        }
        Ok(NearestAnswer {
            neighbors,
            mode: plan.mode,
            mode_reason: plan.reason,
            nprobe: plan.nprobe,
            candidates_reranked: plan.reranked,
            index_version: plan.index_version,
            space: q.space,
            k: q.k,
            sign_invariant: q.sign_invariant,
            basis_version,
            query_kernel,
            layers_scanned: layers.len() as u64,
            filters_scanned: exact_filters + plan.codes,
            elapsed: started.elapsed(),
        })
    }

    /// The exact scan of the layers in `slots`: the selected layers, in key order, are cut
    /// into work items of about [`SCAN_CHUNK`] filters (many small layers share one item, a big
    /// layer spreads over several); each item reads its blocks with one RocksDB cursor into one
    /// bounded heap, and the items share the best k-th distance reached so far.
    fn scan_exact(
        &self,
        layers: &[ScanSlot],
        slots: &[usize],
        spec: &ScanSpec<'_>,
        k: usize,
        snapshot: &rocksdb::Snapshot<'_>,
    ) -> Result<(Vec<TopK>, u64)> {
        // A selection smaller than a chunk per thread is cut into one item per thread (of at
        // least a block), so a small scan still reads with every core; one smaller than
        // `SCAN_ALONE_BELOW` is one item.
        let total: u64 = slots.iter().map(|&slot| layers[slot].span.n_filters).sum();
        let chunk = if total < SCAN_ALONE_BELOW {
            total.max(1)
        } else {
            total.div_ceil(rayon::current_num_threads().max(1) as u64).clamp(BLOCK_FILTERS, SCAN_CHUNK)
        };
        let mut items: Vec<Vec<(usize, u64, u64)>> = Vec::new();
        let mut current: Vec<(usize, u64, u64)> = Vec::new();
        let mut filled = 0u64;
        for &slot in slots {
            let n = layers[slot].span.n_filters;
            let mut s = 0;
            while s < n {
                let e = (s + chunk - filled).min(n);
                current.push((slot, s, e));
                filled += e - s;
                s = e;
                if filled >= chunk {
                    items.push(std::mem::take(&mut current));
                    filled = 0;
                }
            }
        }
        if !current.is_empty() {
            items.push(current);
        }
        let shared = AtomicU64::new(f64::INFINITY.to_bits());
        // Blocks the pinned view holds are scanned in place, without an iterator step each
        // (the synthetic benchmark's 36,000 layers are 36,000 values); the rest through a cursor.
        let view = self.block_view();
        let scan = |pieces: &Vec<(usize, u64, u64)>| -> Result<(TopK, u64)> {
            let mut top = TopK::new(k);
            // The cursor stops after the last block any piece needs.
            let until = pieces
                .iter()
                .map(|&(slot, _, e)| (layers[slot].span.layer_id, ((e - 1) / BLOCK_FILTERS) as u32 + 1))
                .max();
            let mut cursor = self.store.filter_cursor(Some(snapshot), until, BlockCheck::Trusted)?.with_view(view.clone());
            for &(slot, s, e) in pieces {
                self.scan_part(&mut cursor, spec, slot, &layers[slot], (s, e), &mut top, &shared)?;
            }
            Ok((top, cursor.view_reads()))
        };
        // One item runs on the calling thread: handing it to the pool and waiting for it
        // costs a wake-up each way.
        let parts: Vec<(TopK, u64)> = if items.len() == 1 {
            items.iter().map(scan).collect::<Result<_>>()?
        } else {
            items.par_iter().map(scan).collect::<Result<_>>()?
        };
        let from_view = parts.iter().map(|p| p.1).sum();
        Ok((parts.into_iter().map(|p| p.0).collect(), from_view))
    }

    /// Scans filters `[s, e)` of the selected layer in `slot` through `cursor` into `top`.
    /// `Ok(false)`: the layer was deleted while the search ran, and is skipped.
    #[allow(clippy::too_many_arguments)]
    fn scan_part(
        &self,
        cursor: &mut FilterCursor<'_>,
        spec: &ScanSpec<'_>,
        slot: usize,
        layer: &ScanSlot,
        (s, e): (u64, u64),
        top: &mut TopK,
        shared: &AtomicU64,
    ) -> Result<bool> {
        match cursor.for_each_run(layer.span, s, e, |first, bytes| spec.scan(slot, layer, first, bytes, top, shared)) {
            Ok(()) => Ok(true),
            Err(err) if self.layer_deleted(layer.span.layer_id) => {
                tracing::debug!(layer = layer.span.layer_id, %err, "layer deleted during a search; skipped");
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The approximate path: candidates from the index among the selected, indexed layers,
    /// re-ranked exactly from the stored values. Declines (with the reason the response
    /// reports) when it does not apply.
    fn approximate(&self, iq: &IndexQuery<'_>) -> Result<IndexAnswer> {
        let IndexQuery { q, plan, spec, snapshot, qs } = iq;
        let selected = plan.filters;
        if !matches!(spec.metric, Metric::Raw) {
            return Ok(IndexAnswer::Declined(
                "the approximate index covers the raw space; other spaces are answered by the exact scan".into(),
            ));
        }
        if selected <= q.exact_below {
            return Ok(IndexAnswer::Declined(format!(
                "the selection holds {selected} filters (at most {}): scanned exactly",
                q.exact_below
            )));
        }
        let guard = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(ix) = guard.as_ref() else {
            return Ok(IndexAnswer::Declined("no search index is built yet (see `filterdb search-index`)".into()));
        };
        let ann = plan.ann_plan(ix);
        let (unindexed, indexed_filters) = (ann.unindexed.clone(), ann.indexed_filters);
        let nlist = ix.quantizer.nlist();
        let base = if q.nprobe == 0 { crate::ann::DEFAULT_NPROBE } else { q.nprobe };
        // A narrow selection meets fewer of its filters per cell: widen the probe by
        // sqrt(1/selectivity) (measured: recall holds, and linear widening costs more than it
        // brings, because the nearest cells hold a selection's near neighbours first) unless
        // the caller tunes the count itself.
        let nprobe = if q.nprobe_unscaled {
            base.min(nlist)
        } else {
            let scaled = (base as f64 * (ix.live_entries().max(1) as f64 / indexed_filters.max(1) as f64).sqrt()).ceil();
            (scaled.min(nlist as f64) as usize).clamp(base.min(nlist), nlist)
        };
        let rerank = if q.rerank == 0 { crate::ann::DEFAULT_RERANK } else { q.rerank };
        let want = q.k.saturating_mul(rerank).max(q.k) + usize::from(spec.skip_id.is_some());
        let (cands, stats) = ix.candidates(qs, nprobe, ann.selected(), want);
        let version = ix.quantizer.version;
        drop(guard);

        // Exact re-ranking, nearest estimate first; a candidate whose lower bound exceeds the
        // k-th exact distance so far cannot enter the answer, and neither can any after it
        // whose bound is larger — so usually little more than k stored filters are read, and
        // the answer equals re-ranking every candidate.
        let mut reranked = 0u64;
        let mut top = TopK::new(q.k);
        let mut cursor = self.store.filter_cursor(Some(snapshot), None, BlockCheck::Trusted)?.point_reads().with_view(self.block_view());
        let mut pending: Vec<&crate::ann::Approx> = cands.iter().collect();
        pending.sort_by(|a, b| a.lower_bound().total_cmp(&b.lower_bound()).then(a.id.cmp(&b.id)));
        for c in pending {
            if c.lower_bound() > top.bound() {
                break;
            }
            let Some((slot, idx)) = plan.locate(c.id) else { continue };
            let layer = &plan.slots[slot];
            // From the pinned block view, or through the cursor: an iterator hands out the
            // block in place, where a point read (`get_pinned`) copied the whole 147 KiB block.
            let shared = AtomicU64::new(f64::INFINITY.to_bits());
            if self.scan_part(&mut cursor, spec, slot, layer, (idx, idx + 1), &mut top, &shared)? {
                reranked += 1;
            }
        }
        Ok(IndexAnswer::Answered {
            plan: Plan {
                mode: Mode::Approximate,
                reason: format!(
                    "approximate: {} of {nlist} cells probed{}, {} codes compared, best {} candidates by code, {reranked} of them re-ranked exactly (the rest bounded out; {} read from the pinned block view)",
                    stats.cells,
                    if q.nprobe_unscaled { " (nprobe unscaled)" } else { "" },
                    stats.codes,
                    cands.len(),
                    cursor.view_reads()
                ),
                nprobe: nprobe as u32,
                reranked,
                index_version: Some(version),
                codes: stats.codes,
            },
            candidates: top.heap.into_vec(),
            unindexed: unindexed.to_vec(),
        })
    }

    /// Exact mode through the index (see [`crate::ann::Index::exact_walk`]): the scan's answer,
    /// reading only the stored filters whose code-based lower bound can still beat the k-th
    /// distance. Declines (with the reason the response reports) when it does not apply or its
    /// budget runs out; the scan answers then.
    fn exact_by_index(&self, iq: &IndexQuery<'_>) -> Result<IndexAnswer> {
        let IndexQuery { q, plan, spec, snapshot, qs } = iq;
        let selected = plan.filters;
        let scan = |why: String| Ok(IndexAnswer::Declined(format!("exact scan of every selected filter: {why}")));
        if q.exact_scan {
            return scan("requested".into());
        }
        if !matches!(spec.metric, Metric::Raw) {
            return scan("the search index covers the raw space only".into());
        }
        let above = self.search_index.exact_walk_above.load(Ordering::Relaxed);
        if selected <= above.max(q.exact_below) {
            return scan(format!("the selection holds {selected} filters (at most {}), faster scanned", above.max(q.exact_below)));
        }
        let guard = self.search_index.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(ix) = guard.as_ref() else {
            return scan("no search index is built yet".into());
        };
        let ann = plan.ann_plan(ix);
        let share = ann.indexed_filters as f64 / ix.live_entries().max(1) as f64;
        if share < EXACT_WALK_MIN_SHARE {
            return scan(format!("the selection holds {:.1} % of the indexed filters, faster scanned", share * 100.0));
        }
        // Past these a scan is about as fast: a read costs ~0.3 µs from the pinned block view
        // (~4 µs through a cursor), a scanned filter 1.3–3 ns, and the walk's codes and bounds
        // add their own cost.
        let budget = crate::ann::WalkBudget { reranks: (ann.indexed_filters / 1024).max(256), codes: ann.indexed_filters / 2 };
        let mut top = TopK::new(q.k);
        let mut cursor = self.store.filter_cursor(Some(snapshot), None, BlockCheck::Trusted)?.point_reads().with_view(self.block_view());
        let shared = AtomicU64::new(f64::INFINITY.to_bits());
        // The index stays read-locked during the walk, so a failed read ends the walk (and the
        // scan, which knows about layers deleted meanwhile, answers) rather than taking the
        // engine's write lock here.
        let walked = ix.exact_walk(qs, ann.selected(), budget, |id| -> std::result::Result<f64, StoreError> {
            if let Some((slot, idx)) = plan.locate(id) {
                let layer = &plan.slots[slot];
                cursor.for_each_run(layer.span, idx, idx + 1, |first, bytes| spec.scan(slot, layer, first, bytes, &mut top, &shared))?;
            }
            Ok(top.bound())
        });
        let (version, nlist) = (ix.quantizer.version, ix.quantizer.nlist());
        drop(guard);
        let view_reads = cursor.view_reads();
        Ok(match walked {
            Ok(Some(st)) => IndexAnswer::Answered {
                plan: Plan {
                    mode: Mode::Exact,
                    reason: format!(
                        "exact through the search index: {} of {nlist} cells opened, {} codes compared, {} filters read ({} from the pinned block view); every other selected filter is provably farther than the k-th",
                        st.cells, st.codes, st.reranked, view_reads
                    ),
                    nprobe: 0,
                    reranked: st.reranked,
                    index_version: Some(version),
                    codes: st.codes,
                },
                candidates: top.heap.into_vec(),
                unindexed: ann.unindexed.to_vec(),
            },
            Ok(None) => IndexAnswer::Declined(format!(
                "exact scan of every selected filter: the search index's bounds did not narrow this query within {} reads and {} codes",
                budget.reranks, budget.codes
            )),
            Err(e) => {
                tracing::debug!(error = %e, "a read of the exact walk failed; scanning instead");
                IndexAnswer::Declined(format!("exact scan of every selected filter: a read through the search index failed ({e})"))
            }
        })
    }

    /// The layers a selection picks, from a cache keyed by the selection and the catalogue's
    /// generation (walking ~20,000 layers costs more than a whole approximate query).
    fn selection_plan(&self, cat: &crate::catalog::Catalog, pred: &Pred) -> Arc<SelectionPlan> {
        let key = format!("{pred:?}");
        let generation = cat.generation();
        let mut cache = self.search_index.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&key).filter(|p| p.generation == generation) {
            return p.clone();
        }
        let mut layers: Vec<(Arc<ModelRecord>, Arc<CatalogLayer>)> = Vec::new();
        cat.for_each_selected_arc(pred, |m, l| layers.push((m.clone(), l.clone())));
        let mut by_first: Vec<(u64, usize)> =
            layers.iter().enumerate().filter(|(_, (_, l))| l.record.n_filters > 0).map(|(s, (_, l))| (l.record.first_filter_id, s)).collect();
        by_first.sort_unstable();
        let filters = layers.iter().map(|(_, l)| l.record.n_filters).sum();
        let coarse = by_first.iter().step_by(LOCATE_STRIDE).map(|x| x.0).collect();
        let lens = by_first.iter().map(|&(_, s)| layers[s].1.record.n_filters).collect();
        let slots = layers.iter().map(|(_, l)| ScanSlot::from(&**l)).collect();
        let plan = Arc::new(SelectionPlan { generation, layers, slots, by_first, coarse, lens, filters, ann: std::sync::Mutex::new(None) });
        if cache.len() >= 256 {
            cache.clear();
        }
        cache.insert(key, plan.clone());
        plan
    }

    /// After a failed block read: whether the layer was deleted (a delete commits to the store
    /// before it updates the catalogue, both under the write lock, so waiting for that lock
    /// settles the question).
    fn layer_deleted(&self, layer_id: u64) -> bool {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.read_catalog().layer(layer_id).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(metric: &Metric, q: &[f32; 9], sign: bool) -> ScanSpec<'static> {
        // Leak for the test's 'static borrow; a handful of bytes per test.
        let metric: &'static Metric = Box::leak(Box::new(match metric {
            Metric::Raw => Metric::Raw,
            Metric::Scaled => Metric::Scaled,
            Metric::Cosine => Metric::Cosine,
            Metric::Basis(b, m) => Metric::Basis(b.clone(), *m),
        }));
        let neg = q.map(|v| -v);
        ScanSpec {
            q: metric.transform(q),
            q_neg: sign.then(|| metric.transform(&neg)),
            metric,
            conditions: FilterConditions::default(),
            skip_id: None,
        }
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Some exact zeros and repeated values, to exercise zero filters and ties.
                if i % 41 < 9 {
                    0.0
                } else {
                    ((x % 7) as f32 - 3.0) * 0.25
                }
            })
            .collect()
    }

    #[test]
    fn lanes_equal_the_per_filter_path_bit_for_bit() {
        let vals = pseudo_random(9 * 64, 7);
        for metric in [Metric::Raw, Metric::Scaled, Metric::Cosine] {
            for sign in [false, true] {
                let s = spec(
                    &metric,
                    &[0.5, -0.25, 0.0, 1.0, 0.75, -1.0, 0.25, 0.0, -0.5],
                    sign,
                );
                for chunk in vals.chunks_exact(9 * LANES) {
                    let (mut d, mut fl, mut m) = ([0f64; LANES], [false; LANES], [0f64; LANES]);
                    s.lanes(chunk, &mut d, &mut fl, &mut m);
                    for (l, f) in chunk.chunks_exact(9).enumerate() {
                        let f: [f32; 9] = f.try_into().unwrap();
                        let (d1, fl1) = s.one(&f);
                        assert_eq!(d[l].to_bits(), d1.to_bits());
                        assert_eq!(fl[l], fl1);
                    }
                }
            }
        }
    }

    #[test]
    fn locating_a_filter_id_through_the_coarse_index_equals_a_linear_search() {
        // 1,000 layers with gaps between them (unselected layers), some of them empty.
        let mut x = 7u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut by_first, mut lens, mut at) = (Vec::new(), Vec::new(), 0u64);
        for slot in 0..1000 {
            at += next() % 3 * 100;
            let n = 1 + next() % 300;
            by_first.push((at, slot));
            lens.push(n);
            at += n;
        }
        let coarse: Vec<u64> = by_first.iter().step_by(LOCATE_STRIDE).map(|x| x.0).collect();
        for id in 0..at + 10 {
            let want = by_first.iter().zip(&lens).find(|((f, _), n)| id >= *f && id < *f + **n).map(|((f, s), _)| (*s, id - f));
            assert_eq!(locate_in(&by_first, &coarse, &lens, id), want, "id {id}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_eight_wide_partial_screen_equals_the_one_filter_sum_bit_for_bit() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        let mut x = 99u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for round in 0..20_000 {
            // Ordinary values, subnormals, huge values (overflow to ∞), NaN and ±0.
            let mut val = |_| match next() % 11 {
                0 => f32::from_bits(next() % 5000),
                1 => (next() % 1000) as f32 * 1e36,
                2 if round % 7 == 0 => f32::NAN,
                3 => -0.0,
                _ => ((next() % 20_001) as f32 - 10_000.0) * 1e-4,
            };
            let oct: Vec<f32> = (0..72).map(&mut val).collect();
            let q: [f32; 9] = std::array::from_fn(&mut val);
            let bytes: [u8; 8 * FILTER_BYTES] = std::array::from_fn(|i| oct[i / 4].to_le_bytes()[i % 4]);
            // SAFETY: AVX2 and FMA are present (checked above).
            let eight = unsafe { screen_partial8_avx2(&bytes, &q) };
            for l in 0..8 {
                let one = screen_partial8_one(bytes[l * FILTER_BYTES..(l + 1) * FILTER_BYTES].try_into().unwrap(), &q);
                // (A NaN's sign may differ; the screen treats every NaN alike.)
                assert!(eight[l].to_bits() == one.to_bits() || (eight[l].is_nan() && one.is_nan()), "round {round}, filter {l}: {} {one}", eight[l]);
            }
        }
    }

    #[test]
    fn top_k_keeps_the_smallest_with_ties_by_id() {
        let mut t = TopK::new(3);
        let c = |d: f64, id: u64| Candidate {
            distance: d,
            filter_id: id,
            kernel: [0.0; 9],
            flipped: false,
            slot: 0,
            index: 0,
        };
        for (d, id) in [
            (1.0, 5),
            (1.0, 2),
            (0.5, 9),
            (1.0, 1),
            (f64::NAN, 0),
            (2.0, 3),
        ] {
            t.offer(c(d, id));
        }
        let mut v = t.heap.into_vec();
        v.sort();
        let got: Vec<u64> = v.iter().map(|c| c.filter_id).collect();
        assert_eq!(got, vec![9, 1, 2]);
    }

    /// The raw space's f32 screen never drops a filter the exact (f64) order needs: near-ties
    /// one f32 ulp apart, exact ties, tiny (underflowing) and huge values, against a naive sort.
    #[test]
    fn the_f32_screen_keeps_every_filter_the_exact_order_needs() {
        let base = [0.3f32, -0.7, 0.11, 0.9, -0.2, 0.05, 0.6, -0.45, 0.33];
        let mut filters: Vec<[f32; 9]> = Vec::new();
        let mut x = 12345u32;
        for i in 0..4000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut f = base;
            match i % 8 {
                // On a sphere of radius 1 around `base` + 3, rounded to f32: distances that differ
                // in f64 by less than f32 resolution, in no particular order.
                5..=7 => {
                    let mut u = [0f64; 9];
                    let mut y = x;
                    for v in u.iter_mut() {
                        y ^= y << 13;
                        y ^= y >> 17;
                        y ^= y << 5;
                        *v = f64::from(y % 20_001) - 10_000.0;
                    }
                    let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
                    for k in 0..9 {
                        f[k] = (f64::from(base[k]) + 3.0 + u[k] / norm) as f32;
                    }
                }
                // ±1..3 ulp on one or two coordinates: distances equal in f32, not in f64.
                0 | 1 => {
                    let k = (x % 9) as usize;
                    f[k] = f32::from_bits(f[k].to_bits().wrapping_add(x % 3 + 1));
                    let j = ((x >> 8) % 9) as usize;
                    f[j] = f32::from_bits(f[j].to_bits().wrapping_sub((x >> 4) % 3));
                }
                2 => f = [f32::from_bits(x % 5000); 9], // subnormals: squares underflow
                3 => f = base.map(|v| v * 1e18),
                _ => f = base.map(|v| v + ((x % 1000) as f32 - 500.0) * 1e-4),
            }
            filters.push(f);
        }
        let bytes: Vec<u8> = filters.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
        let layer = CatalogLayer {
            record: crate::store::records::LayerRecord {
                layer_id: 1,
                model_id: 1,
                layer_index: 0,
                tensor_name: "t".into(),
                out_channels: 1,
                in_channels: 4000,
                groups: None,
                conv_depth: 1,
                conv_depth_norm: 0.0,
                first_filter_id: 100,
                n_filters: 4000,
            },
            stats: crate::stats::LayerStats::default(),
        };
        // The last query is so far from every filter that each f32 screen distance overflows
        // to ∞: all of them must reach the exact path, eight at a time or one by one.
        for q in [base, [0.0; 9], [f32::from_bits(7); 9], base.map(|v| -v), base.map(|v| v + 3.0), base.map(|v| -v - 3.0), base.map(|v| v * -3e19)] {
            for sign in [false, true] {
                for k in [1, 7, 64] {
                    let s = spec(&Metric::Raw, &q, sign);
                    let mut top = TopK::new(k);
                    // In two runs, so both end in filters left over from whole groups of eight.
                    let shared = AtomicU64::new(f64::INFINITY.to_bits());
                    s.scan(0, &ScanSlot::from(&layer), 0, &bytes[..3995 * FILTER_BYTES], &mut top, &shared);
                    s.scan(0, &ScanSlot::from(&layer), 3995, &bytes[3995 * FILTER_BYTES..], &mut top, &shared);
                    let mut got = top.heap.into_vec();
                    got.sort();
                    let mut want: Vec<(f64, u64)> = filters
                        .iter()
                        .enumerate()
                        .map(|(i, f)| (s.one(f).0, 100 + i as u64))
                        .collect();
                    want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    want.truncate(k);
                    let got: Vec<(f64, u64)> = got.iter().map(|c| (c.distance, c.filter_id)).collect();
                    assert_eq!(got, want, "q {q:?} sign {sign} k {k}");
                }
            }
        }
    }

    #[test]
    fn spaces_follow_their_definitions() {
        let f = [3.0f32, 0.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(Metric::Scaled.transform(&f)[2], -1.0);
        assert_eq!(Metric::Cosine.transform(&f)[0], 0.6);
        assert_eq!(Metric::Cosine.transform(&[0.0; 9]), [0.0; 9]);
        // Sign invariance finds −f at distance 0.
        let s = spec(&Metric::Raw, &f, true);
        assert_eq!(s.one(&f.map(|v| -v)), (0.0, true));
    }
}
