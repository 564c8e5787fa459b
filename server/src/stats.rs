//! Per-layer statistics kept at ingest: the one place that turns a layer's raw filters into
//! numbers. Everything that is a sum (moments, sparse counts) is additive over layers, so any
//! selection's mean, covariance, basis or sparsity follows from merged stats without touching
//! the filters again. The formulas (and which paper variant each follows) are in
//! `shared/reference/cnn-filter-db-analyses.md` §2; `crate::quality` turns these sums into
//! entropies, thresholds and bases.
//!
//! Conventions, fixed here once:
//! - values are widened from f32 to f64 before any arithmetic;
//! - L∞ scaling (paper Eq. 9, notebook `dX / max|dX|`): f̃ = f / max_j |f_j| in f64, an
//!   all-zero filter stays zero;
//! - sparsity threshold t = ε · max|w| over the layer (t = 1 when the layer is all zero, as
//!   torchconvquality does, so every filter is sparse); a filter is sparse *strict* when all 9
//!   |f_j| < t (CVPR notebook, torchconvquality) and *non-strict* when all |f_j| ≤ t
//!   (robustness paper).

use nalgebra::{DMatrix, SMatrix};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Sparsity thresholds ε (relative to the layer's max |w|) whose counts are stored per layer.
pub const DEFAULT_SPARSITY_EPS: [f64; 6] = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1];

/// The ε at which moments of the non-sparse ("clean") filters are stored (the papers' ε_s = 1%).
pub const CLEAN_EPS: f64 = 0.01;

/// Index of [`CLEAN_EPS`] in [`DEFAULT_SPARSITY_EPS`].
const CLEAN_EPS_INDEX: usize = 2;

/// Filters per rayon work item at ingest; small layers run as one chunk.
const CHUNK_FILTERS: usize = 8192;

/// Output-channel rows per rayon work item of the orthogonality Gram matrix.
const ORTHO_BLOCK_ROWS: usize = 64;

/// Number of entries of the upper triangle (with diagonal) of a 9x9 matrix.
const UPPER: usize = 45;

/// Additive first and second moments of a set of 3x3 filters (9-vectors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// Number of filters.
    pub n: u64,
    /// Σf (9 values).
    pub sum: Vec<f64>,
    /// Σffᵀ (81 values, row-major 9x9, symmetric).
    pub sum_outer: Vec<f64>,
}

impl Default for Moments {
    fn default() -> Self {
        Moments {
            n: 0,
            sum: vec![0.0; 9],
            sum_outer: vec![0.0; 81],
        }
    }
}

impl Moments {
    /// Moments of raw `filters` (9 values per filter; a trailing partial filter is ignored).
    pub fn of(filters: &[f32]) -> Moments {
        let mut acc = Acc9::default();
        for f in filters.chunks_exact(9) {
            let x = widen(f);
            acc.add(&x, &products(&x));
        }
        acc.into_moments()
    }

    /// True when `sum` has 9 and `sum_outer` 81 entries (stored data may be malformed).
    pub fn is_well_formed(&self) -> bool {
        self.sum.len() == 9 && self.sum_outer.len() == 81
    }

    /// Adds another set's moments (exact: sums are additive).
    pub fn merge(&mut self, o: &Moments) {
        self.merge_parts(o.n, &o.sum, &o.sum_outer);
    }

    /// Adds sums given as parts (e.g. a layer's raw sums) without building a `Moments`.
    pub fn merge_parts(&mut self, n: u64, sum: &[f64], sum_outer: &[f64]) {
        self.n += n;
        self.sum.resize(9, 0.0);
        self.sum_outer.resize(81, 0.0);
        for (a, b) in self.sum.iter_mut().zip(sum) {
            *a += b;
        }
        for (a, b) in self.sum_outer.iter_mut().zip(sum_outer) {
            *a += b;
        }
    }

    /// Mean filter (zeros when empty).
    pub fn mean(&self) -> [f64; 9] {
        let mut m = [0f64; 9];
        if self.n > 0 {
            for (mi, s) in m.iter_mut().zip(&self.sum) {
                *mi = s / self.n as f64;
            }
        }
        m
    }

    /// Sample covariance (Σffᵀ − n μμᵀ)/(n − 1), as numpy `cov`/sklearn PCA; zero if n < 2.
    pub fn covariance(&self) -> SMatrix<f64, 9, 9> {
        let mut c = SMatrix::<f64, 9, 9>::zeros();
        if self.n < 2 || !self.is_well_formed() {
            return c;
        }
        let n = self.n as f64;
        for i in 0..9 {
            for j in i..9 {
                let v = (self.sum_outer[i * 9 + j] - self.sum[i] * self.sum[j] / n) / (n - 1.0);
                c[(i, j)] = v;
                c[(j, i)] = v;
            }
        }
        c
    }
}

/// Moments of the non-sparse filters of a layer for one sparsity variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanMoments {
    /// Moments of L∞-scaled filters (true) or raw filters (false).
    pub scaled: bool,
    /// Sparse means all |f_j| < t (true) or ≤ t (false).
    pub strict: bool,
    /// The ε of the threshold t = ε · max|w|.
    pub eps: f64,
    /// Moments of the filters that are NOT sparse.
    pub moments: Moments,
}

/// Number of sparse filters of a layer at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseCount {
    /// The ε of the threshold t = ε · max|w| (t = 1 for an all-zero layer).
    pub eps: f64,
    /// Filters with all |f_j| < t.
    pub strict: u64,
    /// Filters with all |f_j| ≤ t.
    pub non_strict: u64,
}

/// Statistics of a layer (or, merged, of any set of layers), stored as JSON per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Number of filters.
    pub n: u64,
    /// Σf of raw filters (9 values), accumulated in f64.
    pub sum: Vec<f64>,
    /// Σffᵀ of raw filters (81 values, row-major 9x9), accumulated in f64.
    pub sum_outer: Vec<f64>,
    /// max |w| over all values.
    pub abs_max: f64,
    /// Moments of the L∞-scaled filters f/max_j|f_j| (all-zero filters stay zero).
    #[serde(default)]
    pub scaled: Moments,
    /// Moments of the non-sparse filters at [`CLEAN_EPS`], one per (scaled, strict) pair.
    #[serde(default)]
    pub clean: Vec<CleanMoments>,
    /// Sparse-filter counts, one per ε of [`DEFAULT_SPARSITY_EPS`], each against its layer's max.
    #[serde(default)]
    pub sparse: Vec<SparseCount>,
    /// Filters whose 9 values are all exactly zero.
    #[serde(default)]
    pub zero_filters: u64,
    /// Orthogonality O of the layer's output-channel kernels; None for fewer than 2 output
    /// channels, unknown channels, or merged stats (O is not additive).
    #[serde(default)]
    pub orthogonality: Option<f64>,
}

impl Default for LayerStats {
    fn default() -> Self {
        LayerStats {
            n: 0,
            sum: vec![0.0; 9],
            sum_outer: vec![0.0; 81],
            abs_max: 0.0,
            scaled: Moments::default(),
            clean: clean_variants()
                .iter()
                .map(|&(scaled, strict)| CleanMoments {
                    scaled,
                    strict,
                    eps: CLEAN_EPS,
                    moments: Moments::default(),
                })
                .collect(),
            sparse: DEFAULT_SPARSITY_EPS
                .iter()
                .map(|&eps| SparseCount {
                    eps,
                    strict: 0,
                    non_strict: 0,
                })
                .collect(),
            zero_filters: 0,
            orthogonality: None,
        }
    }
}

impl LayerStats {
    /// Statistics of `filters` without channel information (orthogonality is None).
    pub fn of(filters: &[f32]) -> Self {
        accumulate(filters)
    }

    /// Statistics of one layer: `filters` holds out·in·9 values, output-channel major (filter
    /// o·in + i is w[o, i]). If the length does not match the channels, orthogonality is None.
    pub fn compute(filters: &[f32], out_channels: u32, in_channels: u32) -> Self {
        let mut s = accumulate(filters);
        s.orthogonality = orthogonality(filters, out_channels as usize, in_channels as usize);
        s
    }

    /// Adds another set's statistics. Sums and counts add exactly; abs_max is the max.
    /// Orthogonality survives only when one side is empty. Clean/sparse entries present on
    /// only one side of a merge of two non-empty sets are dropped, so every kept count still
    /// covers all `n` filters.
    pub fn merge(&mut self, o: &LayerStats) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = o.clone();
            return;
        }
        self.n += o.n;
        for (a, b) in self.sum.iter_mut().zip(&o.sum) {
            *a += b;
        }
        for (a, b) in self.sum_outer.iter_mut().zip(&o.sum_outer) {
            *a += b;
        }
        self.abs_max = self.abs_max.max(o.abs_max);
        self.scaled.merge(&o.scaled);
        self.clean.retain_mut(|c| {
            match o
                .clean
                .iter()
                .find(|d| d.scaled == c.scaled && d.strict == c.strict && same_eps(d.eps, c.eps))
            {
                Some(d) => {
                    c.moments.merge(&d.moments);
                    true
                }
                None => false,
            }
        });
        self.sparse
            .retain_mut(|c| match o.sparse.iter().find(|d| same_eps(d.eps, c.eps)) {
                Some(d) => {
                    c.strict += d.strict;
                    c.non_strict += d.non_strict;
                    true
                }
                None => false,
            });
        self.zero_filters += o.zero_filters;
        self.orthogonality = None;
    }

    /// Mean raw filter.
    pub fn mean(&self) -> [f64; 9] {
        self.raw().mean()
    }

    /// Moments of the raw filters (a copy of n, sum, sum_outer).
    pub fn raw(&self) -> Moments {
        Moments {
            n: self.n,
            sum: self.sum.clone(),
            sum_outer: self.sum_outer.clone(),
        }
    }

    /// Moments of the non-sparse filters for (scaled, strict) at [`CLEAN_EPS`], if stored.
    pub fn clean_moments(&self, scaled: bool, strict: bool) -> Option<&Moments> {
        self.clean
            .iter()
            .find(|c| c.scaled == scaled && c.strict == strict && same_eps(c.eps, CLEAN_EPS))
            .map(|c| &c.moments)
    }

    /// Sparse count at `eps`, if that ε is stored.
    pub fn sparse_count(&self, eps: f64) -> Option<&SparseCount> {
        self.sparse.iter().find(|c| same_eps(c.eps, eps))
    }
}

/// ε values compare equal within a relative 1e-9 (they come from one const list).
pub fn same_eps(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// Orthogonality O = 1 − Σ_{a,b} |(ŴŴᵀ − I)_{ab}| / (n_o(n_o − 1)) of a layer (robustness paper
/// `ortho_cond`, torchconvquality ≥ 0.3 `orthogonality`): rows of Ŵ are the out_channels
/// kernels (in·9 values) L2-normalised, zero rows left zero (each adds 1 through the diagonal).
/// None when out_channels < 2 or `filters.len() != out·in·9`.
pub fn orthogonality(filters: &[f32], out_channels: usize, in_channels: usize) -> Option<f64> {
    let len = in_channels.checked_mul(9)?;
    if out_channels < 2 || len == 0 || out_channels.checked_mul(len)? != filters.len() {
        return None;
    }
    // Column o of `wt` is row o of Ŵ (column-major storage = the filters in order).
    let mut wt =
        DMatrix::<f64>::from_iterator(len, out_channels, filters.iter().map(|&v| f64::from(v)));
    for mut col in wt.column_iter_mut() {
        let norm = col.norm();
        if norm > 0.0 {
            col /= norm;
        }
    }
    // Σ|G − I| over the upper triangle of block rows, counting off-diagonal entries twice
    // (G is symmetric): each block is one matrixmultiply gemm, blocks run on rayon.
    let starts: Vec<usize> = (0..out_channels).step_by(ORTHO_BLOCK_ROWS).collect();
    let partial: Vec<f64> = starts
        .par_iter()
        .map(|&s| {
            let rows = ORTHO_BLOCK_ROWS.min(out_channels - s);
            let block = wt.columns(s, rows).transpose();
            let g = &block * wt.columns(s, out_channels - s);
            let mut acc = 0f64;
            for r in 0..rows {
                acc += (g[(r, r)] - 1.0).abs();
                for c in (r + 1)..g.ncols() {
                    acc += 2.0 * g[(r, c)].abs();
                }
            }
            acc
        })
        .collect();
    let c: f64 = partial.iter().sum::<f64>() / (out_channels as f64 * (out_channels as f64 - 1.0));
    Some(1.0 - c)
}

/// The (scaled, strict) pairs of the stored clean moments, in storage order.
fn clean_variants() -> [(bool, bool); 4] {
    [(false, true), (false, false), (true, true), (true, false)]
}

/// Streaming accumulator of Σf and the upper triangle of Σffᵀ.
#[derive(Clone)]
struct Acc9 {
    n: u64,
    sum: [f64; 9],
    upper: [f64; UPPER],
}

impl Default for Acc9 {
    fn default() -> Self {
        Acc9 {
            n: 0,
            sum: [0.0; 9],
            upper: [0.0; UPPER],
        }
    }
}

impl Acc9 {
    fn add(&mut self, x: &[f64; 9], p: &[f64; UPPER]) {
        self.n += 1;
        for (s, v) in self.sum.iter_mut().zip(x) {
            *s += v;
        }
        for (u, v) in self.upper.iter_mut().zip(p) {
            *u += v;
        }
    }

    fn merge(&mut self, o: &Acc9) {
        self.n += o.n;
        for (s, v) in self.sum.iter_mut().zip(&o.sum) {
            *s += v;
        }
        for (u, v) in self.upper.iter_mut().zip(&o.upper) {
            *u += v;
        }
    }

    fn into_moments(self) -> Moments {
        let mut outer = vec![0f64; 81];
        let mut k = 0;
        for i in 0..9 {
            for j in i..9 {
                outer[i * 9 + j] = self.upper[k];
                outer[j * 9 + i] = self.upper[k];
                k += 1;
            }
        }
        Moments {
            n: self.n,
            sum: self.sum.to_vec(),
            sum_outer: outer,
        }
    }
}

/// Per-chunk partial statistics of a layer.
#[derive(Clone, Default)]
struct ChunkAcc {
    raw: Acc9,
    scaled: Acc9,
    /// Indexed like [`clean_variants`].
    clean: [Acc9; 4],
    /// (strict, non_strict) per ε of [`DEFAULT_SPARSITY_EPS`].
    sparse: [[u64; 2]; 6],
    zero: u64,
}

impl ChunkAcc {
    fn merge(&mut self, o: &ChunkAcc) {
        self.raw.merge(&o.raw);
        self.scaled.merge(&o.scaled);
        for (a, b) in self.clean.iter_mut().zip(&o.clean) {
            a.merge(b);
        }
        for (a, b) in self.sparse.iter_mut().zip(&o.sparse) {
            a[0] += b[0];
            a[1] += b[1];
        }
        self.zero += o.zero;
    }
}

fn widen(f: &[f32]) -> [f64; 9] {
    let mut x = [0f64; 9];
    for (xi, v) in x.iter_mut().zip(f) {
        *xi = f64::from(*v);
    }
    x
}

/// Upper triangle (with diagonal, row-major) of xxᵀ.
fn products(x: &[f64; 9]) -> [f64; UPPER] {
    let mut p = [0f64; UPPER];
    let mut k = 0;
    for i in 0..9 {
        for j in i..9 {
            p[k] = x[i] * x[j];
            k += 1;
        }
    }
    p
}

/// max_j |f_j| of a widened filter.
fn linf(x: &[f64; 9]) -> f64 {
    x.iter().fold(0f64, |m, v| m.max(v.abs()))
}

/// Two passes: the layer max (for the sparsity thresholds), then all sums per chunk in
/// parallel, merged in chunk order so the result does not depend on thread scheduling.
fn accumulate(filters: &[f32]) -> LayerStats {
    let whole = &filters[..filters.len() / 9 * 9];
    let abs_max = whole
        .par_chunks(CHUNK_FILTERS * 9)
        .map(|c| c.iter().fold(0f64, |m, v| m.max(f64::from(*v).abs())))
        .reduce(|| 0.0, f64::max);
    let mut t = [0f64; 6];
    for (ti, eps) in t.iter_mut().zip(DEFAULT_SPARSITY_EPS) {
        *ti = if abs_max == 0.0 { 1.0 } else { eps * abs_max };
    }
    let parts: Vec<ChunkAcc> = whole
        .par_chunks(CHUNK_FILTERS * 9)
        .map(|c| accumulate_chunk(c, &t))
        .collect();
    let mut total = ChunkAcc::default();
    for p in &parts {
        total.merge(p);
    }
    let raw = total.raw.into_moments();
    let variants = clean_variants();
    LayerStats {
        n: raw.n,
        sum: raw.sum,
        sum_outer: raw.sum_outer,
        abs_max,
        scaled: total.scaled.into_moments(),
        clean: variants
            .iter()
            .zip(total.clean)
            .map(|(&(scaled, strict), acc)| CleanMoments {
                scaled,
                strict,
                eps: CLEAN_EPS,
                moments: acc.into_moments(),
            })
            .collect(),
        sparse: DEFAULT_SPARSITY_EPS
            .iter()
            .zip(total.sparse)
            .map(|(&eps, [strict, non_strict])| SparseCount {
                eps,
                strict,
                non_strict,
            })
            .collect(),
        zero_filters: total.zero,
        orthogonality: None,
    }
}

fn accumulate_chunk(chunk: &[f32], t: &[f64; 6]) -> ChunkAcc {
    let mut a = ChunkAcc::default();
    for f in chunk.chunks_exact(9) {
        let x = widen(f);
        let m = linf(&x);
        let px = products(&x);
        a.raw.add(&x, &px);
        let (xs, ps) = if m > 0.0 {
            let mut xs = x;
            for v in xs.iter_mut() {
                *v /= m;
            }
            (xs, products(&xs))
        } else {
            a.zero += 1;
            (x, px)
        };
        a.scaled.add(&xs, &ps);
        for (s, ti) in a.sparse.iter_mut().zip(t) {
            s[0] += u64::from(m < *ti);
            s[1] += u64::from(m <= *ti);
        }
        let t_clean = t[CLEAN_EPS_INDEX];
        for (acc, (scaled, strict)) in a.clean.iter_mut().zip(clean_variants()) {
            let sparse = if strict { m < t_clean } else { m <= t_clean };
            if !sparse {
                if scaled {
                    acc.add(&xs, &ps);
                } else {
                    acc.add(&x, &px);
                }
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    fn moments_close(a: &Moments, b: &Moments) -> bool {
        a.n == b.n
            && a.sum.iter().zip(&b.sum).all(|(x, y)| close(*x, *y, 1e-9))
            && a.sum_outer
                .iter()
                .zip(&b.sum_outer)
                .all(|(x, y)| close(*x, *y, 1e-9))
    }

    /// Filters as 9-value chunks with a few zero and tiny ones mixed in.
    fn filters_strategy() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec((prop::array::uniform9(-3.0f32..3.0), 0u8..6), 0..40).prop_map(|fs| {
            fs.into_iter()
                .flat_map(|(f, kind)| match kind {
                    0 => [0.0; 9],
                    1 => f.map(|v| v * 1e-3),
                    _ => f,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn merged_stats_equal_stats_of_the_union(a in prop::collection::vec(-3.0f32..3.0, 0..200), b in prop::collection::vec(-3.0f32..3.0, 0..200)) {
            let a = &a[..a.len() / 9 * 9];
            let b = &b[..b.len() / 9 * 9];
            let mut m = LayerStats::of(a);
            m.merge(&LayerStats::of(b));
            let all: Vec<f32> = a.iter().chain(b).copied().collect();
            let u = LayerStats::of(&all);
            prop_assert_eq!(m.n, u.n);
            for (x, y) in m.sum.iter().zip(&u.sum).chain(m.sum_outer.iter().zip(&u.sum_outer)) {
                prop_assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()));
            }
            prop_assert_eq!(m.abs_max, u.abs_max);
            prop_assert!(moments_close(&m.scaled, &u.scaled));
        }

        /// Merged moments equal the moments of the union, for raw, scaled and every clean
        /// variant (clean sets are per layer, so the union is the union of the clean sets).
        #[test]
        fn merged_moments_equal_moments_of_the_union(a in filters_strategy(), b in filters_strategy()) {
            let (sa, sb) = (LayerStats::of(&a), LayerStats::of(&b));
            let mut m = sa.clone();
            m.merge(&sb);
            let mut raw = Moments::of(&a);
            raw.merge(&Moments::of(&b));
            let all: Vec<f32> = a.iter().chain(&b).copied().collect();
            prop_assert!(moments_close(&raw, &Moments::of(&all)));
            prop_assert!(moments_close(&m.raw(), &Moments::of(&all)));
            // Scaled union the slow way (f64 quotients, as stats accumulates them).
            let mut scaled_union = Acc9::default();
            for f in all.chunks_exact(9) {
                let x = widen(f);
                let mx = x.iter().fold(0f64, |a, v| a.max(v.abs()));
                let xs = if mx > 0.0 { x.map(|v| v / mx) } else { x };
                scaled_union.add(&xs, &products(&xs));
            }
            prop_assert!(moments_close(&m.scaled, &scaled_union.into_moments()));
            for (scaled, strict) in clean_variants() {
                let mut want = sa.clean_moments(scaled, strict).cloned().unwrap_or_default();
                want.merge(sb.clean_moments(scaled, strict).unwrap_or(&Moments::default()));
                prop_assert!(moments_close(m.clean_moments(scaled, strict).unwrap(), &want));
            }
            for eps in DEFAULT_SPARSITY_EPS {
                let (x, y, z) = (m.sparse_count(eps).unwrap(), sa.sparse_count(eps).unwrap(), sb.sparse_count(eps).unwrap());
                prop_assert_eq!(x.strict, y.strict + z.strict);
                prop_assert_eq!(x.non_strict, y.non_strict + z.non_strict);
            }
            prop_assert_eq!(m.zero_filters, sa.zero_filters + sb.zero_filters);
        }

        /// Sparse and zero counts equal a brute-force count over the filters.
        #[test]
        fn sparse_counts_match_brute_force(a in filters_strategy()) {
            let s = LayerStats::of(&a);
            let amax = a.iter().fold(0f64, |m, v| m.max(f64::from(*v).abs()));
            for eps in DEFAULT_SPARSITY_EPS {
                let t = if amax == 0.0 { 1.0 } else { eps * amax };
                let strict = a.chunks_exact(9).filter(|f| f.iter().all(|v| f64::from(*v).abs() < t)).count() as u64;
                let non_strict = a.chunks_exact(9).filter(|f| f.iter().all(|v| f64::from(*v).abs() <= t)).count() as u64;
                let c = s.sparse_count(eps).unwrap();
                prop_assert_eq!((c.strict, c.non_strict), (strict, non_strict));
            }
            let zero = a.chunks_exact(9).filter(|f| f.iter().all(|v| *v == 0.0)).count() as u64;
            prop_assert_eq!(s.zero_filters, zero);
        }
    }

    #[test]
    fn brute_force_values() {
        let f: Vec<f32> = (0..18).map(|x| x as f32 - 9.0).collect();
        let s = LayerStats::of(&f);
        assert_eq!(s.n, 2);
        assert_eq!(s.sum[0], -9.0 + 0.0);
        assert_eq!(s.sum_outer[1], (-9.0 * -8.0) + (0.0 * 1.0));
        assert_eq!(s.sum_outer[9], s.sum_outer[1]);
        assert_eq!(s.abs_max, 9.0);
        assert_eq!(s.mean()[8], (-1.0 + 8.0) / 2.0);
        // Scaled: filter 0 / 9, filter 1 / 8.
        assert!((s.scaled.sum[0] - (-1.0 + 0.0)).abs() < 1e-15);
        assert!((s.scaled.sum[8] - (-1.0 / 9.0 + 1.0)).abs() < 1e-15);
    }

    #[test]
    fn large_layer_uses_many_chunks_and_matches_sequential() {
        let n = 3 * CHUNK_FILTERS + 17;
        let f: Vec<f32> = (0..n * 9)
            .map(|k| ((k * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        let s = LayerStats::of(&f);
        assert_eq!(s.n, n as u64);
        assert!(moments_close(&s.raw(), &Moments::of(&f)));
        assert_eq!(s, LayerStats::of(&f), "deterministic");
    }

    /// Ingest-size layer (WideResNet 1024x1024); run with `--run-ignored only` to see timings.

    #[test]
    fn covariance_matches_definition() {
        let f: Vec<f32> = (0..45).map(|k| ((k * 37 % 11) as f32) - 5.0).collect();
        let m = Moments::of(&f);
        let c = m.covariance();
        let mu = m.mean();
        for i in 0..9 {
            for j in 0..9 {
                let want: f64 = f
                    .chunks_exact(9)
                    .map(|x| (f64::from(x[i]) - mu[i]) * (f64::from(x[j]) - mu[j]))
                    .sum::<f64>()
                    / 4.0;
                assert!((c[(i, j)] - want).abs() < 1e-12, "{i} {j}");
            }
        }
        assert_eq!(
            Moments::of(&f[..9]).covariance(),
            SMatrix::<f64, 9, 9>::zeros()
        );
    }

    #[test]
    fn torchconvquality_sparsity_hand_tests() {
        // zeros(64,16,3,3): threshold 1 → every filter sparse.
        let s = LayerStats::compute(&vec![0.0; 64 * 16 * 9], 64, 16);
        let c = s.sparse_count(0.01).unwrap();
        assert_eq!((c.strict, c.non_strict, s.zero_filters), (1024, 1024, 1024));
        // ones: none sparse.
        let s = LayerStats::compute(&vec![1.0; 64 * 16 * 9], 64, 16);
        assert_eq!(s.sparse_count(0.01).unwrap().strict, 0);
        assert_eq!(s.zero_filters, 0);
        // Two filters, one zero → 0.5.
        let mut f = vec![0.5f32; 18];
        f[9..].fill(0.0);
        let s = LayerStats::compute(&f, 2, 1);
        assert_eq!(s.sparse_count(0.01).unwrap().strict, 1);
    }

    #[test]
    fn strict_and_non_strict_differ_at_the_threshold() {
        // Layer max 100, ε = 0.01 → t = 1.0 exactly; a filter with max |f| = 1 is sparse only
        // non-strictly.
        let mut f = vec![100.0f32; 9];
        f.extend([1.0f32, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let s = LayerStats::of(&f);
        let c = s.sparse_count(0.01).unwrap();
        assert_eq!((c.strict, c.non_strict), (0, 1));
        assert_eq!(s.clean_moments(false, true).unwrap().n, 2);
        assert_eq!(s.clean_moments(false, false).unwrap().n, 1);
        assert_eq!(s.clean_moments(true, false).unwrap().sum, vec![1.0; 9]);
    }

    #[test]
    fn orthogonality_of_orthogonal_rows_is_one() {
        // 9 output channels, 1 input channel: row o is the unit vector e_o (scaled by o+1).
        let mut f = vec![0f32; 81];
        for o in 0..9 {
            f[o * 9 + o] = (o + 1) as f32 * if o.is_multiple_of(2) { 1.0 } else { -0.5 };
        }
        let o = LayerStats::compute(&f, 9, 1).orthogonality.unwrap();
        assert!((o - 1.0).abs() < 1e-15, "{o}");
        // Blocks of a large layer (more than one ORTHO_BLOCK_ROWS block): 150 rows of 2 input
        // channels, disjoint supports.
        let (out, inp) = (150usize, 2usize);
        let len = inp * 9;
        let mut f = vec![0f32; out * len];
        for r in 0..out {
            f[r * len + r % len] = 1.0 + r as f32;
        }
        // Rows r and r' share a support iff r ≡ r' (mod 18): |cos| = 1 for those pairs.
        let same: usize = (0..out)
            .map(|r| (0..out).filter(|&q| q != r && q % len == r % len).count())
            .sum();
        let want = 1.0 - same as f64 / (out * (out - 1)) as f64;
        let got = orthogonality(&f, out, inp).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn orthogonality_of_constant_and_zero_layers() {
        for scale in [1.0f32, 0.1] {
            let o = LayerStats::compute(&vec![scale; 16 * 8 * 9], 16, 8)
                .orthogonality
                .unwrap();
            assert!(o.abs() < 1e-12, "{o}");
        }
        // All zero: each zero row adds 1 through the diagonal → 1 − 1/(n_o − 1) (a TCQ quirk).
        let o = orthogonality(&vec![0.0; 64 * 9], 64, 1).unwrap();
        assert!((o - (1.0 - 1.0 / 63.0)).abs() < 1e-12);
        assert_eq!(orthogonality(&[0.0; 9], 1, 1), None);
        assert_eq!(orthogonality(&[0.0; 18], 3, 1), None, "length mismatch");
        assert_eq!(LayerStats::of(&[1.0; 18]).orthogonality, None);
    }

    #[test]
    fn orthogonality_matches_brute_force() {
        let (out, inp) = (70usize, 3usize);
        let f: Vec<f32> = (0..out * inp * 9)
            .map(|k| ((k * 7919 % 2003) as f32 - 1000.0) / 997.0)
            .collect();
        let len = inp * 9;
        let rows: Vec<Vec<f64>> = (0..out)
            .map(|o| {
                let r: Vec<f64> = f[o * len..(o + 1) * len]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                r.iter().map(|v| v / n).collect()
            })
            .collect();
        let mut c = 0f64;
        for a in 0..out {
            for b in 0..out {
                let g: f64 = rows[a].iter().zip(&rows[b]).map(|(x, y)| x * y).sum();
                c += (g - if a == b { 1.0 } else { 0.0 }).abs();
            }
        }
        let want = 1.0 - c / (out * (out - 1)) as f64;
        let got = orthogonality(&f, out, inp).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn serialized_size_is_small_and_old_records_still_decode() {
        let f: Vec<f32> = (0..9000)
            .map(|k| ((k * 7919 % 1000) as f32 - 500.0) / 3.0)
            .collect();
        let s = LayerStats::compute(&f, 100, 10);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.len() < 32 * 1024, "{} bytes", json.len());
        eprintln!("LayerStats JSON: {} bytes", json.len());
        let back: LayerStats = serde_json::from_str(&json).unwrap();
        // serde_json (without `float_roundtrip`) may parse a float 1 ULP off.
        assert_eq!(
            (back.n, back.zero_filters, &back.sparse),
            (s.n, s.zero_filters, &s.sparse)
        );
        assert!(moments_close(&back.raw(), &s.raw()) && moments_close(&back.scaled, &s.scaled));
        for (a, b) in back.clean.iter().zip(&s.clean) {
            assert!(moments_close(&a.moments, &b.moments));
        }
        assert!(close(
            back.orthogonality.unwrap(),
            s.orthogonality.unwrap(),
            1e-15
        ));
        let old = r#"{"n":1,"sum":[0,0,0,0,0,0,0,0,0],"sum_outer":[],"abs_max":0}"#;
        let old: LayerStats = serde_json::from_str(old).unwrap();
        assert!(old.clean.is_empty() && old.orthogonality.is_none());
    }

    #[test]
    fn merge_with_default_is_identity_and_drops_orthogonality() {
        let f: Vec<f32> = (0..36).map(|k| k as f32 - 10.0).collect();
        let s = LayerStats::compute(&f, 2, 2);
        assert!(s.orthogonality.is_some());
        let mut d = LayerStats::default();
        d.merge(&s);
        assert_eq!(d, s);
        let mut e = s.clone();
        e.merge(&LayerStats::default());
        assert_eq!(e, s);
        e.merge(&s);
        assert_eq!(e.orthogonality, None);
        assert_eq!(e.n, 8);
    }
}
