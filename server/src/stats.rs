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

/// Output-channel rows per rayon work item of the orthogonality Gram matrix (also fixes the
/// order in which O is summed: changing it changes stored values in the last bits).
const ORTHO_BLOCK_ROWS: usize = 64;

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
        for f in filters.as_chunks::<9>().0 {
            acc.add(&widen(f));
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
    // Σ|G − I| over the upper triangle of block rows, counting off-diagonal entries twice
    // (G is symmetric), blocks on rayon. The order of the sums (row by row in column order,
    // blocks added in block order) and how each entry of G is summed over the kernel (as
    // matrixmultiply does) are part of the stored values: both paths keep both.
    #[cfg(target_arch = "x86_64")]
    let partial = match Avx512::detect() {
        Some(k) => k.ortho_partials(filters, out_channels, len),
        None => ortho_partials(filters, out_channels, len),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let partial = ortho_partials(filters, out_channels, len);
    let n = out_channels as f64;
    Some(1.0 - partial.iter().sum::<f64>() / (n * (n - 1.0)))
}

/// Blocks of [`ORTHO_BLOCK_ROWS`] rows of G, starting at these rows.
fn ortho_starts(out_channels: usize) -> Vec<usize> {
    (0..out_channels).step_by(ORTHO_BLOCK_ROWS).collect()
}

/// True when the block at row `s` has a dimension at most nalgebra's small-matrix cut-off.
fn ortho_small(out_channels: usize, s: usize) -> bool {
    ORTHO_BLOCK_ROWS.min(out_channels - s) <= NALGEBRA_SMALL_DIM
        || out_channels - s <= NALGEBRA_SMALL_DIM
}

/// Each block's Σ|G − I|, with G from nalgebra (matrixmultiply, one product per block).
fn ortho_partials(filters: &[f32], out_channels: usize, len: usize) -> Vec<f64> {
    let wt = normalised(filters, out_channels, len);
    ortho_starts(out_channels)
        .par_iter()
        .map(|&s| {
            let rows = ORTHO_BLOCK_ROWS.min(out_channels - s);
            if ortho_small(out_channels, s) {
                return ortho_block_small(&wt, s, rows);
            }
            // The block transposed, Gᵀ[s.., s..s+rows] = (rows s.. of Ŵ) · (rows s..s+rows of
            // Ŵ)ᵀ, so that each row of G is one contiguous column: matrixmultiply sums every
            // entry over the kernel in the same order either way (its multiply-adds commute),
            // and rows s.. of Ŵ are read in place (row stride in·9) without a transposed copy.
            let rest = &wt.as_slice()[s * len..];
            let after = BlockRows::from_slice_with_strides(rest, out_channels - s, len, len, 1);
            let gt = after * wt.columns(s, rows);
            let mut acc = 0f64;
            for (r, col) in gt.column_iter().enumerate() {
                let col = col.as_slice();
                acc += (col[r] - 1.0).abs();
                for v in &col[r + 1..] {
                    acc += 2.0 * v.abs();
                }
            }
            acc
        })
        .collect()
}

/// Ŵ as a matrix whose column o is row o of Ŵ (column-major storage = the filters in order):
/// each column divided by its nalgebra L2 norm when that is > 0.
fn normalised(filters: &[f32], out_channels: usize, len: usize) -> DMatrix<f64> {
    let mut wt =
        DMatrix::<f64>::from_iterator(len, out_channels, filters.iter().map(|&v| f64::from(v)));
    for mut col in wt.column_iter_mut() {
        let norm = col.norm();
        if norm > 0.0 {
            col /= norm;
        }
    }
    wt
}

/// The L2 norm of each row of Ŵ before normalisation, exactly as [`normalised`] gets it
/// (nalgebra's norm of the row as an f64 column).
#[cfg(target_arch = "x86_64")]
fn row_norms(filters: &[f32], out_channels: usize, len: usize) -> Vec<f64> {
    let mut row = vec![0f64; len];
    filters
        .chunks_exact(len)
        .take(out_channels)
        .map(|f| {
            for (r, &v) in row.iter_mut().zip(f) {
                *r = f64::from(v);
            }
            nalgebra::DVectorView::from_slice(&row, len).norm()
        })
        .collect()
}

/// One block's Σ|G − I| in its fixed order: rows in turn, each from its diagonal (|g − 1|) on
/// (2|g| per entry). G's rows are computed in batches as the sum reaches them
/// ([`avx512::rows_of_g`]): all the block's rows at once when Ŵ's rows are longer than one
/// depth block (each depth block's panels then serve all of them from cache), 8 at a time
/// otherwise (a block of a layer with tens of thousands of output channels and one input
/// channel would not fit in any cache).
#[cfg(target_arch = "x86_64")]
struct Chain<'a> {
    k: Avx512,
    p: &'a avx512::Panels,
    /// First row of the block (a row of G, and the column its row 0's diagonal is in).
    s: usize,
    rows: usize,
    /// Row length in `buf` (columns s.. up to the padding).
    cs: usize,
    /// Columns s..out of a row are `buf[..out − s]`.
    end: usize,
    /// Rows of G per batch (8, or the block's rows rounded up to a multiple of 8).
    batch: usize,
    /// The current batch of rows of G.
    buf: Vec<f64>,
    /// Next row to start.
    r: usize,
    /// Unsummed part of the current row: `buf[pos..row_end]`.
    pos: usize,
    row_end: usize,
    acc: f64,
}

#[cfg(target_arch = "x86_64")]
impl<'a> Chain<'a> {
    fn new(k: Avx512, p: &'a avx512::Panels, s: usize, rows: usize) -> Self {
        let cs = p.stride() - s;
        let batch = if p.len() > avx512::KC {
            rows.div_ceil(8) * 8
        } else {
            8
        };
        Chain {
            k,
            p,
            s,
            rows,
            cs,
            end: p.out - s,
            batch,
            buf: vec![0.0; batch * cs],
            r: 0,
            pos: 0,
            row_end: 0,
            acc: 0.0,
        }
    }

    /// Starts the next row (adding its diagonal term); false when the block is done.
    fn next_row(&mut self) -> bool {
        if self.r >= self.rows {
            return false;
        }
        if self.r.is_multiple_of(self.batch) {
            self.k
                .rows_of_g(self.p, self.s, self.r, self.batch, &mut self.buf);
        }
        let base = (self.r % self.batch) * self.cs;
        self.acc += (self.buf[base + self.r] - 1.0).abs();
        self.r += 1;
        (self.pos, self.row_end) = (base + self.r, base + self.end);
        true
    }

    fn remaining(&self) -> usize {
        self.row_end - self.pos
    }

    /// Sums `m` more entries of the current row.
    fn add(&mut self, m: usize) {
        let mut acc = self.acc;
        for v in &self.buf[self.pos..self.pos + m] {
            acc += 2.0 * v.abs();
        }
        (self.acc, self.pos) = (acc, self.pos + m);
    }

    fn finish(mut self) -> f64 {
        loop {
            self.add(self.remaining());
            if !self.next_row() {
                return self.acc;
            }
        }
    }
}

/// Both chains to the end, each in its own order, their additions interleaved: every add
/// waits for the one before it in its chain, so a lone chain runs at the adder's latency and
/// two in step run at twice the rate.
#[cfg(target_arch = "x86_64")]
fn sum_pair(mut a: Chain, mut b: Chain) -> [f64; 2] {
    loop {
        let live_a = a.remaining() > 0 || a.next_row();
        let live_b = b.remaining() > 0 || b.next_row();
        if !live_a || !live_b {
            return [a.finish(), b.finish()];
        }
        if a.remaining() == 0 || b.remaining() == 0 {
            continue; // a row with nothing after its diagonal
        }
        let m = a.remaining().min(b.remaining());
        let (mut x, mut y) = (a.acc, b.acc);
        for (u, v) in a.buf[a.pos..a.pos + m].iter().zip(&b.buf[b.pos..b.pos + m]) {
            x += 2.0 * u.abs();
            y += 2.0 * v.abs();
        }
        (a.acc, a.pos, b.acc, b.pos) = (x, a.pos + m, y, b.pos + m);
    }
}

/// nalgebra multiplies with matrixmultiply only when every dimension exceeds this.
const NALGEBRA_SMALL_DIM: usize = 5;

/// A block with a dimension of at most [`NALGEBRA_SMALL_DIM`]: nalgebra's own product, which
/// sums in another order, from exactly the input it always had.
fn ortho_block_small(wt: &DMatrix<f64>, s: usize, rows: usize) -> f64 {
    let out_channels = wt.ncols();
    let g = &wt.columns(s, rows).transpose() * wt.columns(s, out_channels - s);
    let mut acc = 0f64;
    for r in 0..rows {
        acc += (g[(r, r)] - 1.0).abs();
        for c in (r + 1)..g.ncols() {
            acc += 2.0 * g[(r, c)].abs();
        }
    }
    acc
}

/// Rows of Ŵ as a strided view (row stride in·9, column stride 1).
type BlockRows<'a> =
    nalgebra::MatrixView<'a, f64, nalgebra::Dyn, nalgebra::Dyn, nalgebra::Dyn, nalgebra::Dyn>;

/// The (scaled, strict) pairs of the stored clean moments, in storage order.
fn clean_variants() -> [(bool, bool); 4] {
    [(false, true), (false, false), (true, true), (true, false)]
}

/// A filter widened to f64 and padded with zeros to 16 lanes, so that every product row of
/// [`Acc9`] is one 8-lane multiply without shuffles.
type Padded = [f64; 16];

#[inline(always)]
fn widen(f: &[f32; 9]) -> Padded {
    let mut x = [0f64; 16];
    for k in 0..9 {
        x[k] = f64::from(f[k]);
    }
    x
}

/// Lanes d..d+8 of a padded filter.
#[inline(always)]
fn shifted(x: &Padded, d: usize) -> [f64; 8] {
    std::array::from_fn(|i| x[i + d])
}

/// acc += a·b lane by lane (a multiply, then an add: no fused multiply-add).
#[inline(always)]
fn mul_add8(acc: &mut [f64; 8], a: &[f64; 8], b: &[f64; 8]) {
    for i in 0..8 {
        acc[i] += a[i] * b[i];
    }
}

/// Streaming accumulator of Σf and the upper triangle of Σffᵀ.
///
/// The triangle is kept by diagonal: `diag[d][i]` is Σ x_i·x_{i+d} for i + d ≤ 8 (lanes past
/// that only ever add products with the zero padding and are never read), and `last` is
/// Σ x_8². Every entry receives the same products in the same order as a row-major triangle
/// would, so the sums are the same to the bit; the layout only lets the compiler use 8-lane
/// vectors.
#[derive(Clone)]
struct Acc9 {
    n: u64,
    sum: [f64; 9],
    diag: [[f64; 8]; 9],
    last: f64,
}

impl Default for Acc9 {
    fn default() -> Self {
        Acc9 {
            n: 0,
            sum: [0.0; 9],
            diag: [[0.0; 8]; 9],
            last: 0.0,
        }
    }
}

impl Acc9 {
    #[inline(always)]
    fn add(&mut self, x: &Padded) {
        self.n += 1;
        for (s, v) in self.sum.iter_mut().zip(x) {
            *s += v;
        }
        // Spelled out per diagonal: as a loop over d, the compiler vectorises across d with
        // gathers and scatters instead of across i.
        let a = shifted(x, 0);
        mul_add8(&mut self.diag[0], &a, &a);
        mul_add8(&mut self.diag[1], &a, &shifted(x, 1));
        mul_add8(&mut self.diag[2], &a, &shifted(x, 2));
        mul_add8(&mut self.diag[3], &a, &shifted(x, 3));
        mul_add8(&mut self.diag[4], &a, &shifted(x, 4));
        mul_add8(&mut self.diag[5], &a, &shifted(x, 5));
        mul_add8(&mut self.diag[6], &a, &shifted(x, 6));
        mul_add8(&mut self.diag[7], &a, &shifted(x, 7));
        mul_add8(&mut self.diag[8], &a, &shifted(x, 8));
        self.last += x[8] * x[8];
    }

    fn merge(&mut self, o: &Acc9) {
        self.n += o.n;
        for (s, v) in self.sum.iter_mut().zip(&o.sum) {
            *s += v;
        }
        for (a, b) in self.diag.iter_mut().zip(&o.diag) {
            for (u, v) in a.iter_mut().zip(b) {
                *u += v;
            }
        }
        self.last += o.last;
    }

    /// Σffᵀ entry (i, j), i ≤ j.
    fn outer(&self, i: usize, j: usize) -> f64 {
        if i == 8 {
            self.last
        } else {
            self.diag[j - i][i]
        }
    }

    fn into_moments(self) -> Moments {
        let mut outer = vec![0f64; 81];
        for i in 0..9 {
            for j in i..9 {
                let v = self.outer(i, j);
                outer[i * 9 + j] = v;
                outer[j * 9 + i] = v;
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

/// |v| of an f32 as ordered bits: for finite and infinite values the integer order of
/// `bits & 0x7fff_ffff` is the order of |v|; NaN maps to 0, as `f64::max` ignores NaN.
#[inline(always)]
fn abs_bits(v: f32) -> u32 {
    let b = v.to_bits() & 0x7fff_ffff;
    if b > 0x7f80_0000 { 0 } else { b }
}

/// Three passes over a layer, each in parallel over chunks of [`CHUNK_FILTERS`] filters: every
/// filter's m = max_j |f_j|; the layer max (for the sparsity thresholds); then each chunk's
/// counts and sums, merged in chunk order so the result does not depend on thread scheduling.
fn accumulate(filters: &[f32]) -> LayerStats {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(k) = Avx512::detect() {
            return accumulate_with(k, filters);
        }
        if let Some(k) = Avx2::detect() {
            return accumulate_with(k, filters);
        }
    }
    accumulate_with(Portable, filters)
}

fn accumulate_with(k: impl Kernel, filters: &[f32]) -> LayerStats {
    let (whole, _) = filters.as_chunks::<9>();
    let mut m = vec![0f32; whole.len()];
    m.par_chunks_mut(CHUNK_FILTERS)
        .zip(whole.par_chunks(CHUNK_FILTERS))
        .for_each(|(m, f)| k.maxima(f, m));
    // The max of the filters' maxima is max |w| (all are ≥ 0, none NaN).
    let abs_max = f64::from(
        m.par_chunks(CHUNK_FILTERS)
            .map(|c| c.iter().fold(0f32, |a, &b| a.max(b)))
            .reduce(|| 0.0, f32::max),
    );
    let mut t = [0f64; 6];
    for (ti, eps) in t.iter_mut().zip(DEFAULT_SPARSITY_EPS) {
        *ti = if abs_max == 0.0 { 1.0 } else { eps * abs_max };
    }
    let parts: Vec<ChunkAcc> = whole
        .par_chunks(CHUNK_FILTERS)
        .zip(m.par_chunks(CHUNK_FILTERS))
        .map(|(f, m)| k.chunk(f, m, &t))
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

/// The vector unit the statistics run on. Every kernel does the same arithmetic in the same
/// order (a multiply then an add, never fused), so every bit of the result is the same on all.
trait Kernel: Copy + Send + Sync {
    /// `m[i]` = max_j |f_j| of `filters[i]` (NaN ignored, as `f64::max` does).
    fn maxima(self, filters: &[[f32; 9]], m: &mut [f32]);

    /// Counts and sums of one chunk, given its filters' maxima and the thresholds.
    fn chunk(self, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc;

    /// Adds the filters of `range` that `keep` (by m against `t`) to `acc`, raw or L∞-scaled
    /// (x / m in f64; a zero filter stays as it is).
    #[allow(clippy::too_many_arguments)]
    fn sum_set(
        self,
        acc: &mut Acc9,
        filters: &[[f32; 9]],
        m: &[f32],
        range: std::ops::Range<usize>,
        scaled: bool,
        keep: Keep,
        t: f64,
    );
}

/// Plain Rust, vectorised by the compiler for the baseline target.
#[derive(Clone, Copy)]
struct Portable;

impl Kernel for Portable {
    fn maxima(self, filters: &[[f32; 9]], m: &mut [f32]) {
        maxima(filters, m)
    }

    fn chunk(self, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc {
        chunk_with(self, filters, m, t)
    }

    #[inline(always)]
    fn sum_set(
        self,
        acc: &mut Acc9,
        filters: &[[f32; 9]],
        m: &[f32],
        range: std::ops::Range<usize>,
        scaled: bool,
        keep: Keep,
        t: f64,
    ) {
        sum_set(acc, filters, m, range, scaled, keep, t)
    }
}

/// The portable code compiled for AVX2. Only [`Avx2::detect`] makes one, on a CPU that has it.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn detect() -> Option<Avx2> {
        std::arch::is_x86_feature_detected!("avx2").then_some(Avx2(()))
    }

    #[target_feature(enable = "avx2")]
    fn maxima_avx2(filters: &[[f32; 9]], m: &mut [f32]) {
        maxima(filters, m)
    }

    #[target_feature(enable = "avx2")]
    fn chunk_avx2(self, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc {
        chunk_with(self, filters, m, t)
    }
}

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx2 {
    fn maxima(self, filters: &[[f32; 9]], m: &mut [f32]) {
        // SAFETY: `self` exists, so the CPU has AVX2, the only feature the function enables.
        unsafe { Avx2::maxima_avx2(filters, m) }
    }

    fn chunk(self, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc {
        // SAFETY: as above.
        unsafe { self.chunk_avx2(filters, m, t) }
    }

    #[inline(always)]
    fn sum_set(
        self,
        acc: &mut Acc9,
        filters: &[[f32; 9]],
        m: &[f32],
        range: std::ops::Range<usize>,
        scaled: bool,
        keep: Keep,
        t: f64,
    ) {
        sum_set(acc, filters, m, range, scaled, keep, t)
    }
}

/// AVX-512F kernels (module [`avx512`]). Only [`Avx512::detect`] makes one, on a CPU that has it.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    fn detect() -> Option<Avx512> {
        std::arch::is_x86_feature_detected!("avx512f").then_some(Avx512(()))
    }

    #[target_feature(enable = "avx512f")]
    fn chunk_avx512(self, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc {
        chunk_with(self, filters, m, t)
    }

    /// Each block's Σ|G − I|, with G from [`avx512::rows_of_g`]: Ŵ goes straight from the
    /// filters into the kernel's panels; the matrix [`normalised`] makes is only built for
    /// blocks under nalgebra's small-matrix cut-off. Two blocks per task, so that their sums
    /// can run interleaved ([`sum_pair`]).
    fn ortho_partials(self, filters: &[f32], out_channels: usize, len: usize) -> Vec<f64> {
        let panels = self.panels(filters, out_channels, len);
        let wt = std::sync::OnceLock::new();
        let small_wt = || wt.get_or_init(|| normalised(filters, out_channels, len));
        ortho_starts(out_channels)
            .par_chunks(2)
            .flat_map_iter(|pair| self.ortho_blocks(&small_wt, &panels, pair))
            .collect()
    }

    /// Σ|G − I| of each block starting at `starts` (one or two), in the order of
    /// [`orthogonality`], with G's entries from [`avx512::rows_of_g`] (or, for a block under
    /// nalgebra's small-matrix cut-off, from nalgebra as before).
    fn ortho_blocks<'w>(
        self,
        small_wt: &(dyn Fn() -> &'w DMatrix<f64> + Sync),
        p: &avx512::Panels,
        starts: &[usize],
    ) -> Vec<f64> {
        let out = p.out;
        let chains: Vec<Option<Chain>> = starts
            .iter()
            .map(|&s| {
                (!ortho_small(out, s))
                    .then(|| Chain::new(self, p, s, ORTHO_BLOCK_ROWS.min(out - s)))
            })
            .collect();
        let mut chains = chains.into_iter();
        match (chains.next(), chains.next()) {
            (Some(Some(a)), Some(Some(b))) => sum_pair(a, b).to_vec(),
            (first, second) => [first, second]
                .into_iter()
                .flatten()
                .zip(starts)
                .map(|(c, &s)| match c {
                    Some(c) => c.finish(),
                    None => ortho_block_small(small_wt(), s, ORTHO_BLOCK_ROWS.min(out - s)),
                })
                .collect(),
        }
    }

    /// Ŵ's panels (see [`avx512::Panels::of`]).
    fn panels(self, filters: &[f32], out: usize, len: usize) -> avx512::Panels {
        let norms = row_norms(filters, out, len);
        // SAFETY: `self` exists, so the CPU has AVX-512F, the only feature the function enables.
        unsafe { avx512::Panels::of(filters, out, len, &norms) }
    }

    /// Rows s+r..s+r+n of G into `buf` (see [`avx512::rows_of_g`]).
    fn rows_of_g(self, p: &avx512::Panels, s: usize, r: usize, n: usize, buf: &mut [f64]) {
        // SAFETY: `self` exists, so the CPU has AVX-512F, the only feature the function enables.
        unsafe { avx512::rows_of_g(p, s, r, n, buf) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx512 {
    fn maxima(self, filters: &[[f32; 9]], m: &mut [f32]) {
        // SAFETY: `self` exists, so the CPU has AVX-512F, the only feature the function enables.
        unsafe { avx512::maxima(filters, m) }
    }

    fn chunk(self, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc {
        // SAFETY: as above.
        unsafe { self.chunk_avx512(filters, m, t) }
    }

    #[inline(always)]
    fn sum_set(
        self,
        acc: &mut Acc9,
        filters: &[[f32; 9]],
        m: &[f32],
        range: std::ops::Range<usize>,
        scaled: bool,
        keep: Keep,
        t: f64,
    ) {
        // SAFETY: as above.
        unsafe { avx512::sum_set(acc, filters, m, range, scaled, keep, t) }
    }
}

/// Per-filter maxima, portable.
#[inline(always)]
fn maxima(filters: &[[f32; 9]], m: &mut [f32]) {
    for (mi, f) in m.iter_mut().zip(filters) {
        *mi = f32::from_bits(f.iter().fold(0u32, |a, v| a.max(abs_bits(*v))));
    }
}

/// A chunk's counts and sums. The counts come from the maxima alone. The sums run one loop
/// per set, so an accumulator can stay in registers: the full set (raw, then scaled), and a
/// clean set only from the first filter it skips, starting from a copy of the full set's sums
/// at that point — exact, since until then it held the same filters added in the same order.
/// Chunks without sparse filters so cost two sums instead of six. Strict-clean keeps m ≥ t and
/// non-strict-clean m > t; they are the same set unless some filter has m = t.
#[inline(always)]
fn chunk_with(k: impl Kernel, filters: &[[f32; 9]], m: &[f32], t: &[f64; 6]) -> ChunkAcc {
    let n = filters.len().min(m.len());
    let (filters, m) = (&filters[..n], &m[..n]);
    let mut sparse = [[0u64; 2]; 6];
    for (s, &ti) in sparse.iter_mut().zip(t) {
        let (mut strict, mut non_strict) = (0u64, 0u64);
        for &mi in m {
            strict += u64::from(f64::from(mi) < ti);
            non_strict += u64::from(f64::from(mi) <= ti);
        }
        *s = [strict, non_strict];
    }
    let zero = m.iter().filter(|&&mi| mi == 0.0).count() as u64;
    let tc = t[CLEAN_EPS_INDEX];
    let at = ClassAt {
        n,
        first_at_or_below: m.iter().position(|&mi| f64::from(mi) <= tc).unwrap_or(n),
        first_below: m.iter().position(|&mi| f64::from(mi) < tc).unwrap_or(n),
        any_at: m.iter().any(|&mi| f64::from(mi) == tc),
        t: tc,
    };
    let [raw, raw_strict, raw_non_strict] = set_sums(k, filters, m, &at, false);
    let [scaled, scaled_strict, scaled_non_strict] = set_sums(k, filters, m, &at, true);
    ChunkAcc {
        raw,
        scaled,
        // Indexed like `clean_variants`.
        clean: [raw_strict, raw_non_strict, scaled_strict, scaled_non_strict],
        sparse,
        zero,
    }
}

/// Where a chunk's filters first fall at or below the clean threshold `t`.
struct ClassAt {
    n: usize,
    first_at_or_below: usize,
    first_below: usize,
    any_at: bool,
    t: f64,
}

/// Which filters of a range a sum keeps, by m.
#[derive(Clone, Copy, PartialEq)]
enum Keep {
    All,
    AtLeast,
    Above,
}

/// Sums of the full, strict-clean and non-strict-clean sets of a chunk, raw or scaled.
#[inline(always)]
fn set_sums(
    k: impl Kernel,
    filters: &[[f32; 9]],
    m: &[f32],
    c: &ClassAt,
    scaled: bool,
) -> [Acc9; 3] {
    let (fa, fb, n) = (c.first_at_or_below, c.first_below, c.n);
    let mut all = Acc9::default();
    k.sum_set(&mut all, filters, m, 0..fa, scaled, Keep::All, c.t);
    let at_fa = all.clone();
    k.sum_set(&mut all, filters, m, fa..fb, scaled, Keep::All, c.t);
    let at_fb = all.clone();
    k.sum_set(&mut all, filters, m, fb..n, scaled, Keep::All, c.t);
    let strict = if fb == n {
        all.clone()
    } else {
        let mut s = at_fb;
        k.sum_set(&mut s, filters, m, fb..n, scaled, Keep::AtLeast, c.t);
        s
    };
    let non_strict = if fa == n {
        all.clone()
    } else if !c.any_at {
        strict.clone()
    } else {
        let mut s = at_fa;
        k.sum_set(&mut s, filters, m, fa..n, scaled, Keep::Above, c.t);
        s
    };
    [all, strict, non_strict]
}

/// [`Kernel::sum_set`], portable.
#[inline(always)]
fn sum_set(
    acc: &mut Acc9,
    filters: &[[f32; 9]],
    m: &[f32],
    range: std::ops::Range<usize>,
    scaled: bool,
    keep: Keep,
    t: f64,
) {
    let mut a = acc.clone();
    for (f, &mi) in filters[range.clone()].iter().zip(&m[range]) {
        let mi = f64::from(mi);
        let kept = match keep {
            Keep::All => true,
            Keep::AtLeast => mi >= t,
            Keep::Above => mi > t,
        };
        if !kept {
            continue;
        }
        let mut x = widen(f);
        if scaled && mi > 0.0 {
            for v in x.iter_mut().take(9) {
                *v /= mi;
            }
        }
        a.add(&x);
    }
    *acc = a;
}

/// The AVX-512F kernels. [`sum_set`] keeps an accumulator in ten registers: x₀..x₇ in one and
/// x₈ apart, and row d of the triangle by diagonal is x · (x shifted by d), the shift one
/// two-source permute.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Acc9, Keep};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn vec(a: &[f64; 8]) -> __m512d {
        _mm512_set_pd(a[7], a[6], a[5], a[4], a[3], a[2], a[1], a[0])
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn array(v: __m512d) -> [f64; 8] {
        let mut a = [0f64; 8];
        // SAFETY: `a` holds 8 f64, the 64 bytes an unaligned 512-bit store writes.
        unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
        a
    }

    /// Lane i of the permute picks element i + d of (x₀..x₇, x₈, 0, …).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn shift(d: i64) -> __m512i {
        _mm512_set_epi64(d + 7, d + 6, d + 5, d + 4, d + 3, d + 2, d + 1, d)
    }

    /// [`super::Kernel::maxima`]: |f| as bits (NaN → 0), a horizontal max of x₀..x₇, then x₈.
    #[target_feature(enable = "avx512f")]
    pub(super) fn maxima(filters: &[[f32; 9]], m: &mut [f32]) {
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        let inf = _mm256_set1_epi32(0x7f80_0000);
        for (mi, f) in m.iter_mut().zip(filters) {
            let v = _mm256_castps_si256(_mm256_set_ps(
                f[7], f[6], f[5], f[4], f[3], f[2], f[1], f[0],
            ));
            let b = _mm256_and_si256(v, abs);
            let b = _mm256_andnot_si256(_mm256_cmpgt_epi32(b, inf), b);
            let b = _mm256_max_epu32(b, _mm256_permute2x128_si256::<1>(b, b));
            let b = _mm256_max_epu32(b, _mm256_shuffle_epi32::<0b0100_1110>(b));
            let b = _mm256_max_epu32(b, _mm256_shuffle_epi32::<0b1011_0001>(b));
            let b = (_mm256_cvtsi256_si32(b) as u32).max(super::abs_bits(f[8]));
            *mi = f32::from_bits(b);
        }
    }

    /// matrixmultiply's depth block (`archparam::D_KC`): an entry of a product is the sum of
    /// one fused multiply-add chain per block of this many k, the blocks added in order.
    pub(super) const KC: usize = 256;

    /// Ŵ (the layer's output-channel kernels, L2-normalised) in panels, packed once for all of
    /// the layer's products: for each block of [`KC`] k and each group of 8 rows of Ŵ, the
    /// group's values k by k (8 per k, rows padded with zeros), so every tile of G streams
    /// through two contiguous panels.
    pub(super) struct Panels {
        w: Vec<f64>,
        /// Groups of 8 rows (rows of Ŵ rounded up to a multiple of 8, over 8).
        groups: usize,
        len: usize,
        pub(super) out: usize,
    }

    impl Panels {
        /// From a layer's filters (`out` rows of `len` values) and each row's L2 norm: row o
        /// of Ŵ is row o divided by its norm when that is > 0, as `orthogonality` divides (one
        /// IEEE division per value, so the same bits at any vector width).
        #[target_feature(enable = "avx512f")]
        pub(super) fn of(filters: &[f32], out: usize, len: usize, norms: &[f64]) -> Panels {
            let groups = out.div_ceil(8);
            let mut w = vec![0f64; len.div_ceil(KC) * groups * KC * 8];
            // Group by group and k by k: each write fills one cache line.
            for g in 0..groups {
                let lanes = 8.min(out - 8 * g);
                let mut d = [1f64; 8];
                for (dl, &n) in d.iter_mut().zip(&norms[8 * g..8 * g + lanes]) {
                    if n > 0.0 {
                        *dl = n;
                    }
                }
                let div = vec(&d);
                let rows: [&[f32]; 8] = std::array::from_fn(|lane| {
                    if lane < lanes {
                        &filters[(8 * g + lane) * len..(8 * g + lane + 1) * len]
                    } else {
                        &[]
                    }
                });
                for k in 0..len {
                    let x: [f32; 8] =
                        std::array::from_fn(|lane| rows[lane].get(k).copied().unwrap_or(0.0));
                    let v = _mm512_cvtps_pd(_mm256_set_ps(
                        x[7], x[6], x[5], x[4], x[3], x[2], x[1], x[0],
                    ));
                    let at = ((k / KC * groups + g) * KC + k % KC) * 8;
                    if let Ok(dst) = <&mut [f64; 8]>::try_from(&mut w[at..at + 8]) {
                        *dst = array(_mm512_div_pd(v, div));
                    }
                }
            }
            Panels {
                w,
                groups,
                len,
                out,
            }
        }

        fn at(&self, kb: usize, g: usize) -> usize {
            (kb * self.groups + g) * KC * 8
        }

        /// Rows of Ŵ with their padding.
        pub(super) fn stride(&self) -> usize {
            self.groups * 8
        }

        /// Length of a row of Ŵ (in·9).
        pub(super) fn len(&self) -> usize {
            self.len
        }
    }

    /// Rows s+r..s+r+n of G = ŴŴᵀ (r and n multiples of 8), each from the column of its
    /// 8-row tile's diagonal on, into `buf[(i − r) * cs + (c − s)]` (cs = stride − s; columns
    /// left of a tile's diagonal are left as they are, columns out.. are padding). The depth
    /// blocks run outermost, so each block's panels serve all n rows while in cache.
    ///
    /// Each entry is computed exactly as matrixmultiply's AVX-512 and FMA kernels compute it
    /// (what nalgebra used for these products before): per block of [`KC`] k, a chain of
    /// fused multiply-adds in k order starting from 0, the first block's result stored and
    /// each later one added to it. So the entries, and O, keep every bit; the per-product
    /// packing and most of the work below the diagonal are gone.
    #[target_feature(enable = "avx512f")]
    pub(super) fn rows_of_g(p: &Panels, s: usize, r: usize, n: usize, buf: &mut [f64]) {
        let stride = p.stride();
        let cs = stride - s;
        // Every panel read below, at p.at(kb, group) + 8·k + lane with kb < len/KC rounded up,
        // group < groups, k < KC and lane < 8, lies inside `p.w`.
        assert!(
            p.w.len() >= p.len.div_ceil(KC) * p.groups * KC * 8
                && s.is_multiple_of(8)
                && r.is_multiple_of(8)
                && n.is_multiple_of(8)
                && s + r + n <= stride
                && buf.len() >= n * cs
        );
        let w = p.w.as_ptr();
        for (kb, k0) in (0..p.len).step_by(KC).enumerate() {
            let kc = KC.min(p.len - k0);
            for t in (0..n).step_by(8) {
                let r0 = s + r + t;
                // SAFETY: see the assertion above (r0 / 8 < groups).
                let rp = unsafe { w.add(p.at(kb, r0 / 8)) };
                for c0 in (r0..stride).step_by(8) {
                    // SAFETY: as above (c0 / 8 < groups).
                    let acc = unsafe { tile(rp, w.add(p.at(kb, c0 / 8)), kc) };
                    for (i, a) in acc.iter().enumerate() {
                        let at = (t + i) * cs + (c0 - s);
                        if let Ok(dst) = <&mut [f64; 8]>::try_from(&mut buf[at..at + 8]) {
                            *dst = if kb == 0 {
                                array(*a)
                            } else {
                                array(_mm512_add_pd(*a, vec(dst)))
                            };
                        }
                    }
                }
            }
        }
    }

    /// One 8 x 8 tile of G over `kc` k: row i of the result is Σ_k rp[8k + i] · cp[8k..8k + 8],
    /// one fused multiply-add chain per entry in k order.
    ///
    /// # Safety
    /// `rp` and `cp` point to at least 8·kc readable f64 (two panels of one depth block).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(rp: *const f64, cp: *const f64, kc: usize) -> [__m512d; 8] {
        let mut acc = [_mm512_setzero_pd(); 8];
        for k in 0..kc {
            // SAFETY: 8k + 8 ≤ 8·kc (the caller's contract).
            let bv = unsafe { _mm512_loadu_pd(cp.add(8 * k)) };
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: 8k + i < 8·kc.
                let x = unsafe { *rp.add(8 * k + i) };
                *a = _mm512_fmadd_pd(_mm512_set1_pd(x), bv, *a);
            }
        }
        acc
    }

    /// [`super::Kernel::sum_set`].
    #[target_feature(enable = "avx512f")]
    pub(super) fn sum_set(
        acc: &mut Acc9,
        filters: &[[f32; 9]],
        m: &[f32],
        range: std::ops::Range<usize>,
        scaled: bool,
        keep: Keep,
        t: f64,
    ) {
        let s = &acc.sum;
        let mut sum = vec(&[s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        let (mut s8, mut last, mut n) = (s[8], acc.last, acc.n);
        let mut g = acc.diag.map(|r| vec(&r));
        let idx = [
            shift(1),
            shift(2),
            shift(3),
            shift(4),
            shift(5),
            shift(6),
            shift(7),
            shift(8),
        ];
        for (f, &mi) in filters[range.clone()].iter().zip(&m[range]) {
            let mi = f64::from(mi);
            let kept = match keep {
                Keep::All => true,
                Keep::AtLeast => mi >= t,
                Keep::Above => mi > t,
            };
            if !kept {
                continue;
            }
            n += 1;
            let mut lo = _mm512_cvtps_pd(_mm256_set_ps(
                f[7], f[6], f[5], f[4], f[3], f[2], f[1], f[0],
            ));
            let mut x8 = f64::from(f[8]);
            if scaled && mi > 0.0 {
                lo = _mm512_div_pd(lo, _mm512_set1_pd(mi));
                x8 /= mi;
            }
            let hi = _mm512_set_pd(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, x8);
            sum = _mm512_add_pd(sum, lo);
            s8 += x8;
            g[0] = _mm512_add_pd(g[0], _mm512_mul_pd(lo, lo));
            for d in 1..9 {
                let shifted = _mm512_permutex2var_pd(lo, idx[d - 1], hi);
                g[d] = _mm512_add_pd(g[d], _mm512_mul_pd(lo, shifted));
            }
            last += x8 * x8;
        }
        acc.sum[..8].copy_from_slice(&array(sum));
        acc.sum[8] = s8;
        acc.last = last;
        acc.n = n;
        acc.diag = g.map(|v| array(v));
    }
}

/// The implementation before the vectorised one (ingest of FilterDB ≤ 0.1.0), kept as the
/// oracle: statistics must stay the same to the bit, so stored layers and new ones agree.
#[cfg(test)]
mod reference {
    use super::*;

    const UPPER: usize = 45;

    #[derive(Clone)]
    pub struct Acc9 {
        pub n: u64,
        pub sum: [f64; 9],
        pub upper: [f64; UPPER],
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
        pub fn add(&mut self, x: &[f64; 9], p: &[f64; UPPER]) {
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

        pub fn into_moments(self) -> Moments {
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

    #[derive(Clone, Default)]
    struct ChunkAcc {
        raw: Acc9,
        scaled: Acc9,
        clean: [Acc9; 4],
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

    pub fn widen(f: &[f32]) -> [f64; 9] {
        let mut x = [0f64; 9];
        for (xi, v) in x.iter_mut().zip(f) {
            *xi = f64::from(*v);
        }
        x
    }

    pub fn products(x: &[f64; 9]) -> [f64; UPPER] {
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

    fn linf(x: &[f64; 9]) -> f64 {
        x.iter().fold(0f64, |m, v| m.max(v.abs()))
    }

    pub fn compute(filters: &[f32], out_channels: u32, in_channels: u32) -> LayerStats {
        let mut s = accumulate(filters);
        s.orthogonality = orthogonality(filters, out_channels as usize, in_channels as usize);
        s
    }

    pub fn accumulate(filters: &[f32]) -> LayerStats {
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
        LayerStats {
            n: raw.n,
            sum: raw.sum,
            sum_outer: raw.sum_outer,
            abs_max,
            scaled: total.scaled.into_moments(),
            clean: clean_variants()
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

    pub fn orthogonality(filters: &[f32], out_channels: usize, in_channels: usize) -> Option<f64> {
        let len = in_channels.checked_mul(9)?;
        if out_channels < 2 || len == 0 || out_channels.checked_mul(len)? != filters.len() {
            return None;
        }
        let mut wt =
            DMatrix::<f64>::from_iterator(len, out_channels, filters.iter().map(|&v| f64::from(v)));
        for mut col in wt.column_iter_mut() {
            let norm = col.norm();
            if norm > 0.0 {
                col /= norm;
            }
        }
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
        let c: f64 =
            partial.iter().sum::<f64>() / (out_channels as f64 * (out_channels as f64 - 1.0));
        Some(1.0 - c)
    }
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

    /// Every number of the statistics as bits (0.0 and -0.0 differ, NaN equals itself).
    fn bits(s: &LayerStats) -> Vec<u64> {
        fn moments(v: &mut Vec<u64>, m: &Moments) {
            v.push(m.n);
            v.extend(m.sum.iter().chain(&m.sum_outer).map(|x| x.to_bits()));
        }
        let mut v = vec![s.n, s.abs_max.to_bits(), s.zero_filters];
        moments(&mut v, &s.raw());
        moments(&mut v, &s.scaled);
        for c in &s.clean {
            v.extend([u64::from(c.scaled), u64::from(c.strict), c.eps.to_bits()]);
            moments(&mut v, &c.moments);
        }
        for c in &s.sparse {
            v.extend([c.eps.to_bits(), c.strict, c.non_strict]);
        }
        v.push(s.orthogonality.map_or(1, |o| o.to_bits() ^ 1 << 63));
        v
    }

    /// Layers mixing every case the clean sets branch on: zero and negative-zero filters,
    /// tiny ones, and (with a filter of max 100 first, so t = 1 at ε = 1 %) filters whose max
    /// is exactly the threshold.
    fn tricky_strategy() -> impl Strategy<Value = Vec<f32>> {
        (
            any::<bool>(),
            prop::collection::vec((prop::array::uniform9(-3.0f32..3.0), 0u8..8), 0..80),
        )
            .prop_map(|(anchor, fs)| {
                let mut out = Vec::new();
                if anchor {
                    out.extend([100.0f32, -3.0, 2.0, 0.0, 1.0, 0.5, -0.25, 7.0, 1.5]);
                }
                for (f, kind) in fs {
                    let mx = f.iter().fold(0f32, |m, v| m.max(v.abs()));
                    out.extend(match kind {
                        0 => [0.0; 9],
                        1 => [-0.0; 9],
                        2 => f.map(|v| v * 1e-3),
                        3 if mx > 0.0 => f.map(|v| v / mx),
                        4 => f.map(|v| v * 0.3),
                        _ => f,
                    });
                }
                out
            })
    }

    /// A layer of several chunks: no sparse filter in the first, then sparse and threshold
    /// filters in different orders.
    fn multi_chunk_layer() -> Vec<f32> {
        let n = 4 * CHUNK_FILTERS + 17;
        let mut f = vec![0f32; n * 9];
        f[0] = 100.0;
        for i in 1..n {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            let chunk = i / CHUNK_FILTERS;
            let kind = if chunk == 0 {
                5
            } else {
                h % (3 + chunk as u64)
            };
            for k in 0..9 {
                let v = ((h >> (k * 2)) % 2000) as f32 / 1000.0 - 1.0 + 2.5 * (k % 2) as f32;
                f[i * 9 + k] = match kind {
                    0 => 0.0,
                    1 => v * 1e-3,
                    2 if k == 4 => 1.0,
                    2 => v.clamp(-1.0, 1.0) * 0.5,
                    3 => -0.0,
                    _ => v,
                };
            }
        }
        f
    }

    #[test]
    fn statistics_equal_the_reference_to_the_bit_on_many_chunks() {
        let f = multi_chunk_layer();
        let s = LayerStats::compute(&f, 1, f.len() as u32 / 9);
        let c = s.sparse_count(CLEAN_EPS).unwrap();
        assert!(c.strict > 0 && c.non_strict > c.strict, "{c:?}");
        assert_eq!(
            bits(&s),
            bits(&reference::compute(&f, 1, f.len() as u32 / 9))
        );
        let want = bits(&reference::accumulate(&f));
        assert_eq!(bits(&accumulate_with(Portable, &f)), want, "portable");
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(k) = Avx2::detect() {
                assert_eq!(bits(&accumulate_with(k, &f)), want, "avx2");
            }
            if let Some(k) = Avx512::detect() {
                assert_eq!(bits(&accumulate_with(k, &f)), want, "avx512");
            }
        }
    }

    #[test]
    fn orthogonality_equals_the_reference_to_the_bit() {
        for (out, inp) in [
            (2usize, 1usize),
            (5, 40),
            (9, 1),
            (63, 2),
            (64, 3),
            (65, 1),
            (69, 30),
            (68, 3),
            (70, 64),
            (130, 40),
            (200, 29),
            (257, 2),
            (1000, 1),
        ] {
            let mut f: Vec<f32> = (0..out * inp * 9)
                .map(|k| {
                    (((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 41) as f32 / 4e6) - 1.0
                })
                .collect();
            // A zero output channel and a duplicated one.
            f[9 * inp..18 * inp].fill(0.0);
            if out > 3 {
                let (a, b) = f.split_at_mut(3 * 9 * inp);
                b[..9 * inp].copy_from_slice(&a[..9 * inp]);
            }
            let got = orthogonality(&f, out, inp);
            let want = reference::orthogonality(&f, out, inp);
            if out >= 2 {
                // The nalgebra path too (taken on CPUs without AVX-512F).
                let n = out as f64;
                let p =
                    1.0 - ortho_partials(&f, out, inp * 9).iter().sum::<f64>() / (n * (n - 1.0));
                assert_eq!(
                    Some(p.to_bits()),
                    want.map(f64::to_bits),
                    "{out} x {inp} nalgebra"
                );
            }
            assert_eq!(
                got.map(f64::to_bits),
                want.map(f64::to_bits),
                "{out} x {inp}: {got:?} vs {want:?}"
            );
        }
    }

    proptest! {
        /// The statistics are those of the reference implementation, to the bit.
        #[test]
        fn statistics_equal_the_reference_to_the_bit(f in tricky_strategy()) {
            prop_assert_eq!(bits(&LayerStats::of(&f)), bits(&reference::accumulate(&f)));
            let m = Moments::of(&f);
            let mut r = reference::Acc9::default();
            for c in f.chunks_exact(9) {
                let x = reference::widen(c);
                r.add(&x, &reference::products(&x));
            }
            let r = r.into_moments();
            prop_assert_eq!(m.n, r.n);
            prop_assert!(m.sum.iter().chain(&m.sum_outer).map(|x| x.to_bits()).eq(r.sum.iter().chain(&r.sum_outer).map(|x| x.to_bits())));
        }

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
            let mut scaled_union = reference::Acc9::default();
            for f in all.chunks_exact(9) {
                let x = reference::widen(f);
                let mx = x.iter().fold(0f64, |a, v| a.max(v.abs()));
                let xs = if mx > 0.0 { x.map(|v| v / mx) } else { x };
                scaled_union.add(&xs, &reference::products(&xs));
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
