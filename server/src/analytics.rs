//! Analytics over the catalogue: bases, the pinned reference basis and its per-layer
//! coefficient histograms, distributions, drift matrices, layer quality, degeneration ranking,
//! depth profiles and 2-D densities. Every aggregate merges per-layer statistics kept at ingest;
//! only pinning a basis and `Density2D` read filters again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rayon::prelude::*;

use crate::catalog::{Catalog, CatalogLayer};
use crate::engine::{Engine, EngineError, Result};
use crate::quality::{self, Basis, LayerQuality, QualityOptions};
use crate::selection::{Field, LayerView, Pred, group_values};
use crate::stats::Moments;
use crate::store::records::{BasisRecord, LayerHistogram, ModelRecord};

/// How to split a selection into groups.
#[derive(Debug, Clone)]
pub enum Grouping {
    /// One group holding the whole selection.
    All,
    /// Each value of a field is a group.
    Field(Field),
    /// Explicit named selections (ANDed with the selection).
    Named(Vec<(String, Pred)>),
}

/// The pinned basis and the histograms of every layer in it.
#[derive(Debug, Clone)]
pub struct PinnedState {
    /// The basis record.
    pub record: Arc<BasisRecord>,
    /// Histograms by layer id.
    pub hists: HashMap<u64, Arc<LayerHistogram>>,
}

/// Merged histograms of one group.
#[derive(Debug, Clone)]
pub struct GroupHistogram {
    /// Group key.
    pub key: String,
    /// Filters in the group.
    pub n_filters: u64,
    /// 9 × bins counts.
    pub counts: Vec<u64>,
    /// Out-of-range coefficients per component.
    pub out_of_range: Vec<u64>,
}

/// A drift matrix.
#[derive(Debug, Clone)]
pub struct DriftMatrix {
    /// Basis version used.
    pub basis_version: u32,
    /// Keys in matrix order.
    pub keys: Vec<String>,
    /// Filters per group.
    pub n_filters: Vec<u64>,
    /// G×G D values.
    pub d: Vec<f64>,
    /// G×G×9 per-component S_i.
    pub per_component: Vec<f64>,
    /// Weights.
    pub weights: Vec<f64>,
    /// min, q1, median, q3, max, mean of the strict upper triangle.
    pub upper_triangle_summary: Vec<f64>,
}

/// Drift weights.
#[derive(Debug, Clone)]
pub enum Weights {
    /// EVR of the pinned basis.
    Evr,
    /// 1/9 each.
    Uniform,
    /// Given.
    Custom(Vec<f64>),
}

/// One quality row.
#[derive(Debug, Clone)]
pub struct QualityRow {
    /// Model.
    pub model: Arc<ModelRecord>,
    /// Layer.
    pub layer: Arc<CatalogLayer>,
    /// Metrics.
    pub quality: LayerQuality,
}

/// Per-model degeneration summary.
#[derive(Debug, Clone)]
pub struct ModelDegeneration {
    /// Model.
    pub model: Arc<ModelRecord>,
    /// Layers considered.
    pub layers: u32,
    /// Flagged layers.
    pub degenerate_layers: u32,
    /// Share flagged.
    pub degenerate_share: f64,
    /// Filter-weighted mean sparsity.
    pub mean_sparsity: f64,
    /// Filter-weighted mean entropy.
    pub mean_entropy: f64,
    /// Depths of flagged layers.
    pub degenerate_depths: Vec<u32>,
}

/// One depth-profile cell: (model name, bin label, value, layers aggregated).
pub type ProfileCell = (String, String, f64, u64);

/// Metric of a depth profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileMetric {
    /// Σ sparse / Σ n.
    Sparsity,
    /// Filter-weighted mean H.
    Entropy,
    /// Filter-weighted mean H/TH(n).
    EntropyNorm,
    /// out_channels-weighted mean O.
    Orthogonality,
}

/// Bins of the 2-D density.
pub const DENSITY_BINS: usize = 512;
/// Range of the 2-D density (notebook cells 30-31).
pub const DENSITY_RANGE: (f64, f64) = (-3.3, 3.3);

fn no_basis() -> EngineError {
    EngineError::FailedPrecondition(
        "no reference basis is pinned yet: pin one first (PinBasis RPC, `filterdb pin-basis`)".into(),
    )
}

impl Engine {
    /// The selected layers with their groups, in layer-id order: the group keys (named groups
    /// first, even when empty) and (key index, layer) pairs — a layer appears once per group it
    /// belongs to.
    fn group_pairs(c: &Catalog, pred: &Pred, grouping: &Grouping) -> (Vec<String>, Vec<(usize, Arc<CatalogLayer>)>) {
        let mut keys: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut slot = |k: String| -> usize {
            let n = index.len();
            *index.entry(k).or_insert_with_key(|k| {
                keys.push(k.clone());
                n
            })
        };
        if let Grouping::Named(named) = grouping {
            for (name, _) in named {
                slot(name.clone());
            }
        }
        let mut pairs: Vec<(usize, Arc<CatalogLayer>)> = Vec::new();
        c.for_each_selected_arc(pred, |m, l| match grouping {
            Grouping::All => pairs.push((slot("all".to_string()), l.clone())),
            Grouping::Field(field) => {
                for key in group_values(*field, LayerView { model: m, layer: &l.record }) {
                    pairs.push((slot(key), l.clone()));
                }
            }
            Grouping::Named(named) => {
                for (name, p) in named {
                    if p.matches(LayerView { model: m, layer: &l.record }) {
                        pairs.push((slot(name.clone()), l.clone()));
                    }
                }
            }
        });
        (keys, pairs)
    }

    /// Folds the selected layers into groups on the rayon pool: the pairs of
    /// [`Self::group_pairs`] are folded in fixed chunks and the chunk results merged in chunk
    /// order, so an answer does not depend on scheduling (f64 sums are reproducible call to
    /// call).
    fn fold_groups_par<T: Default + Send>(
        c: &Catalog,
        pred: &Pred,
        grouping: &Grouping,
        f: impl Fn(&mut T, &CatalogLayer) + Sync,
        merge: impl Fn(&mut T, T),
    ) -> BTreeMap<String, T> {
        const CHUNK: usize = 1024;
        let (keys, pairs) = Self::group_pairs(c, pred, grouping);
        let n = keys.len();
        let parts: Vec<Vec<Option<T>>> = pairs
            .par_chunks(CHUNK)
            .map(|chunk| {
                let mut acc: Vec<Option<T>> = (0..n).map(|_| None).collect();
                for (g, l) in chunk {
                    f(acc[*g].get_or_insert_with(T::default), l);
                }
                acc
            })
            .collect();
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for part in parts {
            for (o, p) in out.iter_mut().zip(part) {
                if let Some(p) = p {
                    match o {
                        Some(o) => merge(o, p),
                        None => *o = Some(p),
                    }
                }
            }
        }
        keys.into_iter().zip(out).map(|(k, v)| (k, v.unwrap_or_default())).collect()
    }

    /// PCA basis of the selection's scaled (or raw) filters, overall and per group.
    pub fn basis(&self, pred: &Pred, grouping: &Grouping, raw: bool) -> (Option<Basis>, Vec<(String, Basis)>) {
        let c = self.read_catalog();
        // Merge in place (no per-layer copies): this fold is most of a Basis query's time.
        let add = |acc: &mut Option<Moments>, l: &CatalogLayer| {
            let m = acc.get_or_insert_with(Moments::default);
            if raw {
                m.merge_parts(l.stats.n, &l.stats.sum, &l.stats.sum_outer);
            } else {
                m.merge(&l.stats.scaled);
            }
        };
        let merge = |a: &mut Option<Moments>, b: Option<Moments>| match (a.as_mut(), b) {
            (Some(a), Some(b)) => a.merge(&b),
            (None, b) => *a = b,
            (_, None) => {}
        };
        let groups = Self::fold_groups_par::<Option<Moments>>(&c, pred, grouping, add, merge);
        let all = Self::fold_groups_par::<Option<Moments>>(&c, pred, &Grouping::All, add, merge)
            .into_values()
            .next()
            .flatten();
        let overall = all.and_then(|m| quality::basis_from_moments(&m).ok());
        let per = if matches!(grouping, Grouping::All) {
            Vec::new()
        } else {
            groups.into_iter().filter_map(|(k, m)| Some((k, quality::basis_from_moments(&m?).ok()?))).collect()
        };
        (overall, per)
    }

    /// The pinned reference basis.
    pub fn pinned_basis(&self) -> Option<Arc<BasisRecord>> {
        self.read_basis().as_ref().map(|p| p.record.clone())
    }

    /// Fits a new reference basis on the selection, computes the global coefficient range and
    /// every layer's histograms, and makes it current. Ingests wait while this runs; queries
    /// keep answering with the previous basis until the new one is complete.
    pub fn pin_basis(
        &self,
        pred: &Pred,
        selection_expr: &str,
        bins: u32,
        progress: &(dyn Fn(u32, &str, u64, u64) + Sync),
    ) -> Result<Arc<BasisRecord>> {
        if !(2..=10_000).contains(&bins) {
            return Err(EngineError::InvalidArgument(format!("bins must be between 2 and 10000, got {bins}")));
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (basis, layers) = {
            let c = self.read_catalog();
            let mut all: Option<Moments> = None;
            c.for_each_selected_arc(pred, |_, l| match &mut all {
                Some(m) => m.merge(&l.stats.scaled),
                None => all = Some(l.stats.scaled.clone()),
            });
            let m = all.ok_or_else(|| EngineError::FailedPrecondition("the selection holds no filters: no basis to fit".into()))?;
            let basis = quality::basis_from_moments(&m)
                .map_err(|e| EngineError::FailedPrecondition(format!("cannot fit a basis on the selection: {e}")))?;
            let mut layers = Vec::new();
            c.for_each_selected_arc(&Pred::True, |_, l| layers.push(l.clone()));
            (basis, layers)
        };
        let version = self.store.basis_versions()?.into_iter().max().unwrap_or(0).max(self.pinned_basis().map(|b| b.version).unwrap_or(0)) + 1;
        let total = layers.len() as u64;
        progress(version, "fit", 0, total);
        let mut record = BasisRecord {
            version,
            selection_expr: selection_expr.to_string(),
            n: basis.n,
            mean: basis.mean.to_vec(),
            components: basis.components.iter().flatten().copied().collect(),
            eigenvalues: basis.eigenvalues.to_vec(),
            evr: basis.evr.to_vec(),
            range_min: 0.0,
            range_max: 0.0,
            bins,
            created_at_unix_ms: crate::engine::now_ms(),
            ready: false,
        };
        self.store.put_basis(&record)?;
        let result = (|| -> Result<Arc<BasisRecord>> {
            // Pass 1: the global coefficient range over every stored filter (notebook cell 11).
            let done = std::sync::atomic::AtomicU64::new(0);
            let ranges: Vec<(f64, f64)> = layers
                .par_iter()
                .map(|l| -> Result<(f64, f64)> {
                    let mut lo = f64::INFINITY;
                    let mut hi = f64::NEG_INFINITY;
                    self.for_each_filter_chunk(l, |chunk| {
                        for f in chunk.chunks_exact(9) {
                            for c in quality::project(&basis, &scaled(f)) {
                                lo = lo.min(c);
                                hi = hi.max(c);
                            }
                        }
                    })?;
                    let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress(version, "range", d, total);
                    Ok((lo, hi))
                })
                .collect::<Result<_>>()?;
            let (lo, hi) = ranges.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (l, h)| (a.min(*l), b.max(*h)));
            if !lo.is_finite() || !hi.is_finite() || hi <= lo {
                return Err(EngineError::FailedPrecondition("no coefficient range: the database holds no filters".into()));
            }
            record.range_min = lo;
            record.range_max = hi;
            self.store.put_basis(&record)?;
            // Pass 2: per-layer histograms on the fixed global edges.
            let done = std::sync::atomic::AtomicU64::new(0);
            let hists: Vec<(u64, LayerHistogram)> = layers
                .par_iter()
                .map(|l| -> Result<(u64, LayerHistogram)> {
                    let mut h = empty_histogram(bins);
                    self.for_each_filter_chunk(l, |chunk| add_to_histogram(&record, &basis, chunk, &mut h))?;
                    let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress(version, "histograms", d, total);
                    Ok((l.record.layer_id, h))
                })
                .collect::<Result<_>>()?;
            for chunk in hists.chunks(512) {
                self.store.put_histograms(version, chunk)?;
            }
            record.ready = true;
            self.store.make_current_basis(&record)?;
            let record = Arc::new(record.clone());
            *self.write_basis() = Some(PinnedState {
                record: record.clone(),
                hists: hists.into_iter().map(|(id, h)| (id, Arc::new(h))).collect(),
            });
            progress(version, "done", total, total);
            Ok(record)
        })();
        if result.is_err() {
            let _ = self.store.drop_basis(version);
        }
        result
    }

    fn for_each_filter_chunk(&self, l: &CatalogLayer, mut f: impl FnMut(&[f32])) -> Result<()> {
        const CHUNK: u64 = 1 << 16;
        let mut start = 0;
        while start < l.record.n_filters {
            let end = (start + CHUNK).min(l.record.n_filters);
            let vals = self.store.read_layer_filters(None, &l.record, start, end)?;
            f(&vals);
            start = end;
        }
        Ok(())
    }

    /// Histograms of new layers in the current basis (called at ingest, filters in memory).
    pub(crate) fn histograms_for(&self, layers: &[(u64, &[f32])]) -> Option<(u32, Vec<(u64, LayerHistogram)>)> {
        let b = self.read_basis();
        let p = b.as_ref()?;
        let basis = record_basis(&p.record);
        let hs = layers
            .par_iter()
            .map(|(id, filters)| {
                let mut h = empty_histogram(p.record.bins);
                add_to_histogram(&p.record, &basis, filters, &mut h);
                (*id, h)
            })
            .collect();
        Some((p.record.version, hs))
    }

    /// Records histograms of committed layers in the in-memory state.
    pub(crate) fn remember_histograms(&self, version: u32, hs: Vec<(u64, LayerHistogram)>) {
        if let Some(p) = self.write_basis().as_mut()
            && p.record.version == version
        {
            p.hists.extend(hs.into_iter().map(|(id, h)| (id, Arc::new(h))));
        }
    }

    /// Forgets histograms of deleted layers.
    /// Forgets histograms and memoised quality of deleted layers.
    pub(crate) fn forget_histograms(&self, layer_ids: impl Iterator<Item = u64>) {
        let ids: Vec<u64> = layer_ids.collect();
        if let Some(p) = self.write_basis().as_mut() {
            for id in &ids {
                p.hists.remove(id);
            }
        }
        let mut memo = self.quality_memo.write().unwrap_or_else(|p| p.into_inner());
        for m in memo.values_mut() {
            for id in &ids {
                m.remove(id);
            }
        }
    }

    /// Histograms per group in the pinned basis with another binning: a scan of the filters.
    /// Returns a basis record carrying the binning used.
    pub fn distributions_scan(
        &self,
        pred: &Pred,
        grouping: &Grouping,
        bins: u32,
        range: (Option<f64>, Option<f64>),
    ) -> Result<(Arc<BasisRecord>, Vec<GroupHistogram>)> {
        let pinned = self.pinned_basis().ok_or_else(no_basis)?;
        let mut record = (*pinned).clone();
        if bins != 0 {
            if !(2..=100_000).contains(&bins) {
                return Err(EngineError::InvalidArgument(format!("bins must be between 2 and 100000, got {bins}")));
            }
            record.bins = bins;
        }
        record.range_min = range.0.unwrap_or(record.range_min);
        record.range_max = range.1.unwrap_or(record.range_max);
        if !(record.range_min.is_finite() && record.range_max.is_finite() && record.range_min < record.range_max) {
            return Err(EngineError::InvalidArgument(format!(
                "range [{}, {}] is empty or not finite",
                record.range_min, record.range_max
            )));
        }
        let basis = record_basis(&record);
        let c = self.read_catalog();
        let (keys, pairs) = Self::group_pairs(&c, pred, grouping);
        drop(c);
        let mut members: BTreeMap<String, Vec<Arc<CatalogLayer>>> = keys.iter().map(|k| (k.clone(), Vec::new())).collect();
        for (g, l) in pairs {
            members.entry(keys[g].clone()).or_default().push(l);
        }
        let bins = record.bins as usize;
        let mut out = Vec::new();
        for (key, layers) in members {
            let hs: Vec<LayerHistogram> = layers
                .par_iter()
                .map(|l| -> Result<LayerHistogram> {
                    let mut h = empty_histogram(record.bins);
                    self.for_each_filter_chunk(l, |chunk| add_to_histogram(&record, &basis, chunk, &mut h))?;
                    Ok(h)
                })
                .collect::<Result<_>>()?;
            let mut g = GroupHistogram { key, n_filters: 0, counts: vec![0; 9 * bins], out_of_range: vec![0; 9] };
            for (l, h) in layers.iter().zip(&hs) {
                g.n_filters += l.record.n_filters;
                for (a, b) in g.counts.iter_mut().zip(&h.counts) {
                    *a += u64::from(*b);
                }
                for (a, b) in g.out_of_range.iter_mut().zip(&h.out_of_range) {
                    *a += b;
                }
            }
            out.push(g);
        }
        Ok((Arc::new(record), out))
    }

    /// Merged coefficient histograms per group in the pinned basis.
    pub fn distributions(&self, pred: &Pred, grouping: &Grouping) -> Result<(Arc<BasisRecord>, Vec<GroupHistogram>)> {
        let b = self.read_basis();
        let p = b.as_ref().ok_or_else(no_basis)?;
        let bins = p.record.bins as usize;
        let c = self.read_catalog();
        let empty = || GroupHistogram {
            key: String::new(),
            n_filters: 0,
            counts: vec![0; 9 * bins],
            out_of_range: vec![0; 9],
        };
        let groups = Self::fold_groups_par::<Option<GroupHistogram>>(
            &c,
            pred,
            grouping,
            |acc, l| {
                let g = acc.get_or_insert_with(empty);
                g.n_filters += l.record.n_filters;
                if let Some(h) = p.hists.get(&l.record.layer_id) {
                    for (a, b) in g.counts.iter_mut().zip(&h.counts) {
                        *a += u64::from(*b);
                    }
                    for (a, b) in g.out_of_range.iter_mut().zip(&h.out_of_range) {
                        *a += b;
                    }
                }
            },
            |a, b| match (a.as_mut(), b) {
                (Some(a), Some(b)) => {
                    a.n_filters += b.n_filters;
                    for (x, y) in a.counts.iter_mut().zip(&b.counts) {
                        *x += y;
                    }
                    for (x, y) in a.out_of_range.iter_mut().zip(&b.out_of_range) {
                        *x += y;
                    }
                }
                (None, b) => *a = b,
                (_, None) => {}
            },
        );
        let out = groups
            .into_iter()
            .map(|(k, g)| {
                let mut g = g.unwrap_or(GroupHistogram {
                    key: String::new(),
                    n_filters: 0,
                    counts: vec![0; 9 * bins],
                    out_of_range: vec![0; 9],
                });
                g.key = k;
                g
            })
            .collect();
        Ok((p.record.clone(), out))
    }

    /// D between every pair of groups, from merged histograms (spec §2.5). A binning other
    /// than the pinned one (`bins` ≠ 0 or a range) is computed by a scan.
    pub fn drift_matrix(
        &self,
        pred: &Pred,
        grouping: &Grouping,
        weights: &Weights,
        sort_by_mean: bool,
        binning: (u32, Option<f64>, Option<f64>),
    ) -> Result<DriftMatrix> {
        let (record, groups) = if binning == (0, None, None) {
            self.distributions(pred, grouping)?
        } else {
            self.distributions_scan(pred, grouping, binning.0, (binning.1, binning.2))?
        };
        let groups: Vec<GroupHistogram> = groups.into_iter().filter(|g| g.n_filters > 0).collect();
        let w: Vec<f64> = match weights {
            Weights::Evr => record.evr.clone(),
            Weights::Uniform => vec![1.0 / 9.0; 9],
            Weights::Custom(w) => {
                if w.len() != 9 || w.iter().any(|x| !x.is_finite()) {
                    return Err(EngineError::InvalidArgument(format!("custom weights: need 9 finite values, got {}", w.len())));
                }
                w.clone()
            }
        };
        let bins = record.bins as usize;
        let width = (record.range_max - record.range_min) / bins as f64;
        let probs: Vec<Vec<Vec<f64>>> = groups
            .par_iter()
            .map(|g| {
                (0..9)
                    .map(|i| quality::hist_to_prob(&g.counts[i * bins..(i + 1) * bins], width))
                    .collect::<std::result::Result<Vec<_>, _>>()
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| EngineError::FailedPrecondition(format!("drift: {e}")))?;
        let n = groups.len();
        let mut d = vec![0.0; n * n];
        let mut per = vec![0.0; n * n * 9];
        for a in 0..n {
            for b in a + 1..n {
                let mut total = 0.0;
                for i in 0..9 {
                    let s = quality::jeffreys(&probs[a][i], &probs[b][i])
                        .map_err(|e| EngineError::FailedPrecondition(format!("drift: {e}")))?;
                    per[(a * n + b) * 9 + i] = s;
                    per[(b * n + a) * 9 + i] = s;
                    total += w[i] * s;
                }
                d[a * n + b] = total;
                d[b * n + a] = total;
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        if sort_by_mean && n > 0 {
            let mean = |j: usize| (0..n).map(|r| d[r * n + j]).sum::<f64>() / n as f64;
            order.sort_by(|x, y| mean(*x).total_cmp(&mean(*y)));
        }
        let mut dd = vec![0.0; n * n];
        let mut pp = vec![0.0; n * n * 9];
        for (r, &a) in order.iter().enumerate() {
            for (c, &b) in order.iter().enumerate() {
                dd[r * n + c] = d[a * n + b];
                pp[(r * n + c) * 9..(r * n + c + 1) * 9].copy_from_slice(&per[(a * n + b) * 9..(a * n + b + 1) * 9]);
            }
        }
        let mut upper: Vec<f64> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).map(|(a, b)| dd[a * n + b]).collect();
        upper.sort_by(f64::total_cmp);
        Ok(DriftMatrix {
            basis_version: record.version,
            keys: order.iter().map(|i| groups[*i].key.clone()).collect(),
            n_filters: order.iter().map(|i| groups[*i].n_filters).collect(),
            d: dd,
            per_component: pp,
            weights: w,
            upper_triangle_summary: summary(&upper),
        })
    }

    /// Quality metrics of every selected layer.
    pub fn layer_quality(&self, pred: &Pred, opts: &QualityOptions, limit: usize) -> Result<Vec<QualityRow>> {
        check_quality_options(opts)?;
        let c = self.read_catalog();
        let mut out = Vec::new();
        c.for_each_selected_arc(pred, |m, l| {
            if limit == 0 || out.len() < limit {
                out.push((m.clone(), l.clone()));
            }
        });
        drop(c);
        // A layer's statistics never change, so its quality for given options is computed once
        // (the 9x9 eigendecompositions are most of the cost) and memoised until it is deleted.
        // Memoised layers are copied under the read lock, in one sequential pass: a parallel
        // pass or an intermediate map costs more than it saves once everything is known.
        let key = format!("{opts:?}");
        let mut known: Vec<Option<LayerQuality>> = {
            let memo = self.quality_memo.read().unwrap_or_else(|p| p.into_inner());
            match memo.get(&key) {
                Some(m) => out.iter().map(|(_, l)| m.get(&l.record.layer_id).cloned()).collect(),
                None => vec![None; out.len()],
            }
        };
        let missing: Vec<usize> = (0..out.len()).filter(|&i| known[i].is_none()).collect();
        if !missing.is_empty() {
            let computed = missing
                .par_iter()
                .map(|&i| {
                    let (model, layer) = &out[i];
                    quality::layer_quality(&layer.stats, opts).map_err(|e| {
                        EngineError::InvalidArgument(format!("layer {} of `{}`: {e}", layer.record.layer_index, model.name))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut memo = self.quality_memo.write().unwrap_or_else(|p| p.into_inner());
            // Bounded: options are few in practice; a client cycling through many is not cached.
            if memo.len() >= 16 && !memo.contains_key(&key) {
                memo.clear();
            }
            let m = memo.entry(key).or_default();
            for (&i, q) in missing.iter().zip(computed) {
                m.entry(out[i].1.record.layer_id).or_insert_with(|| q.clone());
                known[i] = Some(q);
            }
        }
        Ok(out
            .into_iter()
            .zip(known)
            .filter_map(|((model, layer), quality)| quality.map(|quality| QualityRow { model, layer, quality }))
            .collect())
    }

    /// Models ranked by the share (or count) of degenerate layers.
    pub fn degeneration_ranking(&self, pred: &Pred, opts: &QualityOptions, by_count: bool, limit: usize) -> Result<Vec<ModelDegeneration>> {
        let rows = self.layer_quality(pred, opts, 0)?;
        // model id -> (model, layers, flagged, Σ S·n, Σ H·n, Σ n, flagged depths)
        type Acc = (Arc<ModelRecord>, u32, u32, f64, f64, f64, Vec<u32>);
        let mut per: BTreeMap<u64, Acc> = BTreeMap::new();
        for r in rows {
            let e = per.entry(r.model.model_id).or_insert_with(|| (r.model.clone(), 0, 0, 0.0, 0.0, 0.0, Vec::new()));
            let q = &r.quality;
            let n = q.n as f64;
            e.1 += 1;
            if q.flags.combined {
                e.2 += 1;
                e.6.push(r.layer.record.conv_depth);
            }
            e.3 += q.sparsity * n;
            if let Some(h) = q.entropy {
                e.4 += h * n;
            }
            e.5 += n;
        }
        let mut out: Vec<ModelDegeneration> = per
            .into_values()
            .map(|(model, layers, bad, s, h, n, depths)| ModelDegeneration {
                model,
                layers,
                degenerate_layers: bad,
                degenerate_share: if layers == 0 { 0.0 } else { f64::from(bad) / f64::from(layers) },
                mean_sparsity: if n > 0.0 { s / n } else { 0.0 },
                mean_entropy: if n > 0.0 { h / n } else { 0.0 },
                degenerate_depths: depths,
            })
            .collect();
        out.sort_by(|a, b| {
            let (x, y) = if by_count {
                (f64::from(b.degenerate_layers), f64::from(a.degenerate_layers))
            } else {
                (b.degenerate_share, a.degenerate_share)
            };
            x.total_cmp(&y).then(a.model.model_id.cmp(&b.model.model_id))
        });
        if limit > 0 {
            out.truncate(limit);
        }
        Ok(out)
    }

    /// A metric per model per depth bin, aggregated as the robustness paper does.
    pub fn depth_profile(
        &self,
        pred: &Pred,
        metric: ProfileMetric,
        opts: &QualityOptions,
        binning: Field,
    ) -> Result<(Vec<String>, Vec<ProfileCell>)> {
        if !matches!(binning, Field::DepthDecile | Field::DepthDecileFirst) {
            return Err(EngineError::InvalidArgument("binning must be depth_decile or depth_decile_first".into()));
        }
        let rows = self.layer_quality(pred, opts, 0)?;
        // (model name, bin) -> (numerator, denominator, layers)
        let mut cells: BTreeMap<(u64, String), (String, f64, f64, u64)> = BTreeMap::new();
        let mut bins = std::collections::BTreeSet::new();
        for r in &rows {
            let bin = group_values(binning, LayerView { model: &r.model, layer: &r.layer.record }).remove(0);
            bins.insert(bin.clone());
            let q = &r.quality;
            let n = q.n as f64;
            let (num, den) = match metric {
                ProfileMetric::Sparsity => (q.sparsity * n, n),
                ProfileMetric::Entropy => match q.entropy {
                    Some(h) => (h * n, n),
                    None => continue,
                },
                ProfileMetric::EntropyNorm => match q.entropy_norm {
                    Some(h) => (h * n, n),
                    None => continue,
                },
                ProfileMetric::Orthogonality => match q.orthogonality {
                    Some(o) => {
                        let w = f64::from(r.layer.record.out_channels);
                        (o * w, w)
                    }
                    None => continue,
                },
            };
            let e = cells.entry((r.model.model_id, bin)).or_insert_with(|| (r.model.name.clone(), 0.0, 0.0, 0));
            e.1 += num;
            e.2 += den;
            e.3 += 1;
        }
        let mut bins: Vec<String> = bins.into_iter().collect();
        // "first", then "[0.0, 0.1]", then "(0.1, 0.2]" ... (the rest sort correctly as text).
        bins.sort_by_key(|b| (b != "first", b != "[0.0, 0.1]", b.clone()));
        let cells = cells
            .into_iter()
            .map(|((_, bin), (name, num, den, layers))| (name, bin, if den > 0.0 { num / den } else { f64::NAN }, layers))
            .collect();
        Ok((bins, cells))
    }

    /// 512×512 histogram of components (i, j) over [−3.3, 3.3]², normalised by its max.
    pub fn density_2d(&self, pred: &Pred, i: usize, j: usize) -> Result<(u32, Vec<f32>, u64)> {
        if i > 8 || j > 8 {
            return Err(EngineError::InvalidArgument(format!("components are 0..8, got ({i}, {j})")));
        }
        let record = self.pinned_basis().ok_or_else(no_basis)?;
        let basis = record_basis(&record);
        let layers: Vec<Arc<CatalogLayer>> = {
            let c = self.read_catalog();
            let mut v = Vec::new();
            c.for_each_selected_arc(pred, |_, l| v.push(l.clone()));
            v
        };
        let (lo, hi) = DENSITY_RANGE;
        let grids: Vec<(Vec<u64>, u64)> = layers
            .par_iter()
            .map(|l| -> Result<(Vec<u64>, u64)> {
                let mut g = vec![0u64; DENSITY_BINS * DENSITY_BINS];
                let mut n = 0u64;
                self.for_each_filter_chunk(l, |chunk| {
                    for f in chunk.chunks_exact(9) {
                        let c = quality::project(&basis, &scaled(f));
                        n += 1;
                        if let (Some(a), Some(b)) = (
                            quality::histogram_bin(c[i], lo, hi, DENSITY_BINS),
                            quality::histogram_bin(c[j], lo, hi, DENSITY_BINS),
                        ) {
                            g[a * DENSITY_BINS + b] += 1;
                        }
                    }
                })?;
                Ok((g, n))
            })
            .collect::<Result<_>>()?;
        let mut total = vec![0u64; DENSITY_BINS * DENSITY_BINS];
        let mut n = 0;
        for (g, k) in grids {
            n += k;
            for (a, b) in total.iter_mut().zip(g) {
                *a += b;
            }
        }
        let max = total.iter().copied().max().unwrap_or(0).max(1) as f64;
        Ok((record.version, total.iter().map(|x| (*x as f64 / max) as f32).collect(), n))
    }
}

fn check_quality_options(o: &QualityOptions) -> Result<()> {
    if !crate::stats::DEFAULT_SPARSITY_EPS.iter().any(|e| crate::stats::same_eps(*e, o.eps)) {
        return Err(EngineError::InvalidArgument(
            quality::QualityError::UnknownEps(o.eps).to_string(),
        ));
    }
    if o.remove_sparse && !crate::stats::same_eps(o.eps, crate::stats::CLEAN_EPS) {
        return Err(EngineError::InvalidArgument(quality::QualityError::CleanNeedsDefaultEps(o.eps).to_string()));
    }
    Ok(())
}

fn scaled(f: &[f32]) -> [f32; 9] {
    let mut a = [0f32; 9];
    a.copy_from_slice(&f[..9]);
    quality::scale_linf(&a)
}

/// The basis stored in a record, as the formula module's type.
pub fn record_basis(r: &BasisRecord) -> Basis {
    let mut mean = [0f64; 9];
    mean.copy_from_slice(&r.mean[..9]);
    let mut components = [[0f64; 9]; 9];
    for (k, row) in components.iter_mut().enumerate() {
        row.copy_from_slice(&r.components[9 * k..9 * k + 9]);
    }
    let mut eigenvalues = [0f64; 9];
    eigenvalues.copy_from_slice(&r.eigenvalues[..9]);
    let mut evr = [0f64; 9];
    evr.copy_from_slice(&r.evr[..9]);
    let mut cumulative_evr = [0f64; 9];
    let mut acc = 0.0;
    for (c, e) in cumulative_evr.iter_mut().zip(evr) {
        acc += e;
        *c = acc;
    }
    Basis { n: r.n, mean, components, eigenvalues, evr, cumulative_evr }
}

fn empty_histogram(bins: u32) -> LayerHistogram {
    LayerHistogram { counts: vec![0; 9 * bins as usize], out_of_range: vec![0; 9] }
}

fn add_to_histogram(r: &BasisRecord, basis: &Basis, filters: &[f32], h: &mut LayerHistogram) {
    let bins = r.bins as usize;
    for f in filters.chunks_exact(9) {
        let c = quality::project(basis, &scaled(f));
        for (i, x) in c.iter().enumerate() {
            match quality::histogram_bin(*x, r.range_min, r.range_max, bins) {
                Some(b) => h.counts[i * bins + b] += 1,
                None => h.out_of_range[i] += 1,
            }
        }
    }
}

/// min, q1, median, q3, max, mean of sorted values (linear interpolation, numpy default).
fn summary(sorted: &[f64]) -> Vec<f64> {
    if sorted.is_empty() {
        return Vec::new();
    }
    let q = |p: f64| {
        let pos = p * (sorted.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
    };
    let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
    vec![sorted[0], q(0.25), q(0.5), q(0.75), sorted[sorted.len() - 1], mean]
}

/// What `profile_checkpoint` answers.
#[derive(Debug)]
pub struct Profile {
    /// Basis version used.
    pub basis_version: u32,
    /// Per-layer (tensor name, layer index, depth, depth norm, quality).
    pub layers: Vec<(crate::readers::ExtractedLayer, LayerQuality)>,
    /// The checkpoint's histograms.
    pub histogram: GroupHistogram,
    /// (group key, D, S_i, group filters), ascending D.
    pub drift: Vec<(String, f64, Vec<f64>, u64)>,
    /// Share of layers flagged degenerate.
    pub degenerate_share: f64,
    /// The extracted model, for storing it.
    pub extracted: crate::readers::ExtractedModel,
}

impl Engine {
    /// Profiles a checkpoint against the database without storing it: per-layer quality, its
    /// coefficient histograms in the pinned basis, and D to every reference group.
    #[allow(clippy::too_many_arguments)] // each argument is one request field
    pub fn profile_checkpoint(
        &self,
        staged: &std::path::Path,
        file_name: &str,
        format: Option<crate::readers::Format>,
        reference: &Pred,
        grouping: &Grouping,
        opts: &QualityOptions,
        weights: &Weights,
    ) -> Result<Profile> {
        check_quality_options(opts)?;
        let cp = crate::readers::read_checkpoint(staged, format)
            .map_err(|e| EngineError::InvalidArgument(format!("{file_name}: {e}")))?;
        let extracted =
            crate::readers::extract(cp).map_err(|e| EngineError::InvalidArgument(format!("{file_name}: {e}")))?;
        let (record, groups) = self.distributions(reference, grouping)?;
        let basis = record_basis(&record);
        let bins = record.bins as usize;
        let per_layer: Vec<(LayerQuality, LayerHistogram)> = extracted
            .layers
            .par_iter()
            .map(|l| -> Result<(LayerQuality, LayerHistogram)> {
                let stats = crate::stats::LayerStats::compute(&l.filters, l.out_channels, l.in_channels);
                let q = quality::layer_quality(&stats, opts)
                    .map_err(|e| EngineError::InvalidArgument(format!("layer `{}`: {e}", l.tensor_name)))?;
                let mut h = empty_histogram(record.bins);
                add_to_histogram(&record, &basis, &l.filters, &mut h);
                Ok((q, h))
            })
            .collect::<Result<_>>()?;
        let mut mine = GroupHistogram { key: file_name.to_string(), n_filters: 0, counts: vec![0; 9 * bins], out_of_range: vec![0; 9] };
        for ((_, h), l) in per_layer.iter().zip(&extracted.layers) {
            mine.n_filters += l.n_filters();
            for (a, b) in mine.counts.iter_mut().zip(&h.counts) {
                *a += u64::from(*b);
            }
            for (a, b) in mine.out_of_range.iter_mut().zip(&h.out_of_range) {
                *a += b;
            }
        }
        let w: Vec<f64> = match weights {
            Weights::Evr => record.evr.clone(),
            Weights::Uniform => vec![1.0 / 9.0; 9],
            Weights::Custom(w) if w.len() == 9 => w.clone(),
            Weights::Custom(w) => {
                return Err(EngineError::InvalidArgument(format!("custom weights: need 9 values, got {}", w.len())));
            }
        };
        let width = (record.range_max - record.range_min) / bins as f64;
        let prob = |g: &GroupHistogram, i: usize| {
            quality::hist_to_prob(&g.counts[i * bins..(i + 1) * bins], width)
                .map_err(|e| EngineError::FailedPrecondition(format!("drift: {e}")))
        };
        let p: Vec<Vec<f64>> = (0..9).map(|i| prob(&mine, i)).collect::<Result<_>>()?;
        let mut drift = Vec::new();
        for g in groups.iter().filter(|g| g.n_filters > 0) {
            let mut s = Vec::with_capacity(9);
            let mut d = 0.0;
            for i in 0..9 {
                let q = prob(g, i)?;
                let si = quality::jeffreys(&p[i], &q).map_err(|e| EngineError::FailedPrecondition(format!("drift: {e}")))?;
                d += w[i] * si;
                s.push(si);
            }
            drift.push((g.key.clone(), d, s, g.n_filters));
        }
        drift.sort_by(|a, b| a.1.total_cmp(&b.1));
        let flagged = per_layer.iter().filter(|(q, _)| q.flags.combined).count();
        let degenerate_share = if per_layer.is_empty() { 0.0 } else { flagged as f64 / per_layer.len() as f64 };
        let layers = extracted.layers.iter().cloned().zip(per_layer.into_iter().map(|(q, _)| q)).collect();
        Ok(Profile { basis_version: record.version, layers, histogram: mine, drift, degenerate_share, extracted })
    }
}
