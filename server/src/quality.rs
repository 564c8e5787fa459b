//! The analysis formulas of CNN Filter DB and its follow-ups, as pure functions over the sums in
//! [`crate::stats`]: layer quality (sparsity, variance entropy, randomness threshold,
//! orthogonality, degeneration flags), the 9-component filter basis (PCA) and its comparison,
//! coefficient histograms and the drift D. Each function names the paper variant it follows;
//! `shared/reference/cnn-filter-db-analyses.md` §2 has the sources. Ingest, queries and tests
//! all call these, so there is one definition of each number.

use nalgebra::{DMatrix, SMatrix, SVD, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::stats::{CLEAN_EPS, DEFAULT_SPARSITY_EPS, LayerStats, Moments, same_eps};

/// TH(n) logistic fit constant l (torchconvquality `_entropy_max_threshold`).
pub const TH_L: f64 = 1.2618047;
/// TH(n) logistic fit constant x0.
pub const TH_X0: f64 = 2.30436435;
/// TH(n) logistic fit constant k.
pub const TH_K: f64 = 0.88767525;
/// TH(n) logistic fit constant b.
pub const TH_B: f64 = -0.31050834;

/// Eigenvalues of a covariance below this fraction of the raw second moment's trace
/// (tr Σffᵀ/(n−1)) are cancellation noise of the streaming sums and count as 0 in the entropy.
/// It only matters for (near-)constant layers, where it makes H exactly 0 as the SVD gives.
pub const EIGEN_NOISE_FLOOR: f64 = 1e-10;

/// Number of leading components whose spans [`compare_bases`] measures principal angles for.
pub const PRINCIPAL_ANGLES_K: usize = 3;

/// Density given to empty histogram bins: float32 machine epsilon (CVPR notebook, §2.4).
pub const HIST_EMPTY_DENSITY: f64 = f32::EPSILON as f64;

/// Default number of histogram bins for coefficient distributions (notebook since 2021-10-20).
pub const DEFAULT_HIST_BINS: usize = 70;

/// Iteration cap for the 9x9 eigen/SVD solvers (they converge in a few dozen).
const MAX_ITER: usize = 10_000;

/// Errors of the analysis formulas; they name the option or input at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QualityError {
    /// A sparsity ε whose counts are not precomputed.
    #[error("sparsity eps {0} is not stored per layer; use one of {DEFAULT_SPARSITY_EPS:?}")]
    UnknownEps(f64),
    /// remove_sparse needs the clean moments, which exist only at ε = 0.01.
    #[error(
        "remove_sparse needs eps = {CLEAN_EPS} (the only eps with stored clean moments), got {0}"
    )]
    CleanNeedsDefaultEps(f64),
    /// Stats stored before a field existed.
    #[error("layer stats lack {0}; re-ingest the layer to compute it")]
    MissingStats(&'static str),
    /// A basis needs a covariance.
    #[error("a basis needs at least 2 filters, got {0}")]
    TooFewFilters(u64),
    /// The covariance holds NaN/inf or the eigen solver did not converge.
    #[error("covariance is not finite or did not decompose")]
    NotDecomposable,
    /// Two histograms of different bin counts.
    #[error("histograms differ in bin count: {0} vs {1}")]
    BinMismatch(usize, usize),
    /// A bin width that is not finite and positive.
    #[error("bin width must be finite and > 0, got {0}")]
    BadBinWidth(f64),
    /// A distribution with no mass.
    #[error("a distribution sums to {0}; it needs positive mass")]
    EmptyDistribution(f64),
}

/// Randomness threshold TH(n) = l/(1 + exp(−k(log₂n − x0))) + b: a logistic fit to the minimum
/// variance entropy of n random-normal filters (CVPR 2022 paper; torchconvquality). TH ≤ 0 for
/// n ≤ 2, TH(∞) ≈ 0.95130.
pub fn th(n: f64) -> f64 {
    TH_L / (1.0 + (-TH_K * (n.log2() - TH_X0)).exp()) + TH_B
}

/// Entropy −Σ p log₁₀ p with 0·log 0 = 0 (scipy semantics; torchconvquality's NaN is not copied).
pub fn entropy10(p: &[f64]) -> f64 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x.log10())
        .sum::<f64>()
}

/// Eigenvalues (descending, negatives clamped to 0) and eigenvectors (rows, same order) of a
/// symmetric 9x9 matrix; None if it is not finite or the solver does not converge.
fn eigen_desc(m: SMatrix<f64, 9, 9>) -> Option<([f64; 9], [[f64; 9]; 9])> {
    if m.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let e = SymmetricEigen::try_new(m, f64::EPSILON, MAX_ITER)?;
    let mut order: Vec<usize> = (0..9).collect();
    order.sort_by(|&a, &b| e.eigenvalues[b].total_cmp(&e.eigenvalues[a]));
    let mut vals = [0f64; 9];
    let mut vecs = [[0f64; 9]; 9];
    for (k, &i) in order.iter().enumerate() {
        vals[k] = e.eigenvalues[i].max(0.0);
        for (j, v) in vecs[k].iter_mut().enumerate() {
            *v = e.eigenvectors[(j, i)];
        }
    }
    Some((vals, vecs))
}

/// Variance entropy H (CVPR 2022 paper; torchconvquality `variance_entropy`): eigenvalues λ of
/// the sample covariance (n − 1) of the filters, p = λ/Σλ, H = −Σ p log₁₀ p ∈ [0, log₁₀9].
/// Equals the SVD definition (λ = σ²/(n−1) of the centred n×9 matrix). Eigenvalues below
/// [`EIGEN_NOISE_FLOOR`] count as 0. Some(0.0) when Σλ = 0; None when n < 2 or the moments are
/// malformed or not finite.
pub fn variance_entropy(m: &Moments) -> Option<f64> {
    if m.n < 2 || !m.is_well_formed() {
        return None;
    }
    let (vals, _) = eigen_desc(m.covariance())?;
    let trace: f64 = (0..9).map(|i| m.sum_outer[i * 10]).sum();
    let floor = EIGEN_NOISE_FLOOR * trace / (m.n as f64 - 1.0);
    let vals = vals.map(|v| if v <= floor { 0.0 } else { v });
    let total: f64 = vals.iter().sum();
    if total <= 0.0 {
        return Some(0.0);
    }
    Some(entropy10(&vals.map(|v| v / total)))
}

/// Thresholds of the degeneration flags (CVPR 2022 paper and supplement, per [3P]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DegenerationThresholds {
    /// The combined rule flags H ≥ TH(n) − this margin (supplement ablation: 0.02).
    pub random_margin: f64,
    /// H below this is low diversity (0.5).
    pub low_entropy: f64,
    /// Sparsity S at or above this is sparse-heavy (0.14).
    pub sparse_share: f64,
}

impl Default for DegenerationThresholds {
    fn default() -> Self {
        DegenerationThresholds {
            random_margin: 0.02,
            low_entropy: 0.5,
            sparse_share: 0.14,
        }
    }
}

/// Which variant of the layer-quality metrics to compute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityOptions {
    /// Sparsity ε, one of [`DEFAULT_SPARSITY_EPS`] (default 0.01).
    pub eps: f64,
    /// Sparse means all |f_j| < t (true, CVPR/TCQ, default) or ≤ t (false, robustness paper).
    pub strict: bool,
    /// Entropy on L∞-scaled filters (robustness paper) instead of raw ones (CVPR/TCQ, default).
    pub scaled: bool,
    /// Entropy (and its flags) without the sparse filters, i.e. H = H_clean (robustness paper).
    pub remove_sparse: bool,
    /// Thresholds of the degeneration flags.
    pub thresholds: DegenerationThresholds,
}

impl Default for QualityOptions {
    fn default() -> Self {
        QualityOptions {
            eps: CLEAN_EPS,
            strict: true,
            scaled: false,
            remove_sparse: false,
            thresholds: DegenerationThresholds::default(),
        }
    }
}

/// Degeneration flags of a layer; all false when H is undefined.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DegenerationFlags {
    /// H > TH(n): random-like (the paper's rule).
    pub random_like: bool,
    /// H < low_entropy: few repeated patterns.
    pub low_diversity: bool,
    /// S ≥ sparse_share.
    pub sparse_heavy: bool,
    /// H ≥ TH(n) − random_margin OR (H < low_entropy AND S ≥ sparse_share) (supplement ablation).
    pub combined: bool,
}

/// Quality metrics of one layer (or of merged stats) for one [`QualityOptions`] variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerQuality {
    /// Number of filters.
    pub n: u64,
    /// Sparse filters at (eps, strict).
    pub sparse: u64,
    /// S = sparse / n (0 for an empty layer).
    pub sparsity: f64,
    /// Filters the entropy H was computed on (n, or n′ with remove_sparse).
    pub entropy_n: u64,
    /// Variance entropy H of the chosen filters (raw or scaled, all or non-sparse).
    pub entropy: Option<f64>,
    /// H / TH(entropy_n); None when TH ≤ 0 (n ≤ 2).
    pub entropy_norm: Option<f64>,
    /// n′, the number of non-sparse filters at ε = 0.01 (None for other ε).
    pub clean_n: Option<u64>,
    /// H of the non-sparse filters (torchconvquality `variance_entropy_clean`), same scaling.
    pub entropy_clean: Option<f64>,
    /// H_clean / TH(n′).
    pub entropy_clean_norm: Option<f64>,
    /// Orthogonality O (robustness paper), when stored.
    pub orthogonality: Option<f64>,
    /// Degeneration flags from entropy, entropy_n and sparsity.
    pub flags: DegenerationFlags,
}

fn normalised(h: Option<f64>, n: u64) -> Option<f64> {
    let t = th(n as f64);
    h.filter(|_| t > 0.0).map(|h| h / t)
}

/// Layer quality (CVPR notebook quality cell, torchconvquality `measure_conv_weight_quality`,
/// robustness-paper variants via `opts`) from a layer's stored stats.
pub fn layer_quality(
    stats: &LayerStats,
    opts: &QualityOptions,
) -> Result<LayerQuality, QualityError> {
    if !DEFAULT_SPARSITY_EPS.iter().any(|&e| same_eps(e, opts.eps)) {
        return Err(QualityError::UnknownEps(opts.eps));
    }
    let count = stats
        .sparse_count(opts.eps)
        .ok_or(QualityError::MissingStats("sparse counts"))?;
    let sparse = if opts.strict {
        count.strict
    } else {
        count.non_strict
    };
    let sparsity = if stats.n > 0 {
        sparse as f64 / stats.n as f64
    } else {
        0.0
    };
    let clean = if same_eps(opts.eps, CLEAN_EPS) {
        Some(
            stats
                .clean_moments(opts.scaled, opts.strict)
                .ok_or(QualityError::MissingStats("clean moments"))?,
        )
    } else {
        None
    };
    let raw;
    let all = if opts.scaled {
        if stats.scaled.n != stats.n {
            return Err(QualityError::MissingStats("scaled moments"));
        }
        &stats.scaled
    } else {
        raw = stats.raw();
        &raw
    };
    let chosen = if opts.remove_sparse {
        clean.ok_or(QualityError::CleanNeedsDefaultEps(opts.eps))?
    } else {
        all
    };
    let entropy = variance_entropy(chosen);
    let entropy_clean = clean.and_then(variance_entropy);
    let t = &opts.thresholds;
    let th_n = th(chosen.n as f64);
    let flags = match entropy {
        Some(h) => DegenerationFlags {
            random_like: h > th_n,
            low_diversity: h < t.low_entropy,
            sparse_heavy: sparsity >= t.sparse_share,
            combined: h >= th_n - t.random_margin
                || (h < t.low_entropy && sparsity >= t.sparse_share),
        },
        None => DegenerationFlags {
            sparse_heavy: sparsity >= t.sparse_share,
            ..Default::default()
        },
    };
    Ok(LayerQuality {
        n: stats.n,
        sparse,
        sparsity,
        entropy_n: chosen.n,
        entropy,
        entropy_norm: normalised(entropy, chosen.n),
        clean_n: clean.map(|c| c.n),
        entropy_clean,
        entropy_clean_norm: clean.and_then(|c| normalised(entropy_clean, c.n)),
        orthogonality: stats.orthogonality,
        flags,
    })
}

/// A 9-component filter basis, like sklearn `PCA(n_components=9)` (centred, covariance with
/// n − 1, no whitening) of L∞-scaled filters (CVPR notebook cell 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Basis {
    /// Number of filters the basis was fitted on.
    pub n: u64,
    /// Centring vector μ.
    pub mean: [f64; 9],
    /// Eigenfilters as rows, by descending eigenvalue; the largest-|loading| entry of each is
    /// positive (ties: the lowest index).
    pub components: [[f64; 9]; 9],
    /// Covariance eigenvalues (explained variance), descending, ≥ 0.
    pub eigenvalues: [f64; 9],
    /// Explained-variance ratio λ_i / Σλ (zeros when Σλ = 0).
    pub evr: [f64; 9],
    /// Running sum of `evr`.
    pub cumulative_evr: [f64; 9],
}

/// Basis of the filters summarised by `m` (merged moments of scaled filters; CVPR notebook
/// PCA, computed exactly from streaming sums as [3P] did), with the canonical sign convention.
pub fn basis_from_moments(m: &Moments) -> Result<Basis, QualityError> {
    if m.n < 2 || !m.is_well_formed() {
        return Err(QualityError::TooFewFilters(m.n));
    }
    let (eigenvalues, mut components) =
        eigen_desc(m.covariance()).ok_or(QualityError::NotDecomposable)?;
    for c in components.iter_mut() {
        let mut top = 0;
        for j in 1..9 {
            if c[j].abs() > c[top].abs() {
                top = j;
            }
        }
        if c[top] < 0.0 {
            for v in c.iter_mut() {
                *v = -*v;
            }
        }
    }
    let total: f64 = eigenvalues.iter().sum();
    let evr = if total > 0.0 {
        eigenvalues.map(|v| v / total)
    } else {
        [0.0; 9]
    };
    let mut cumulative_evr = [0f64; 9];
    let mut acc = 0.0;
    for (c, e) in cumulative_evr.iter_mut().zip(evr) {
        acc += e;
        *c = acc;
    }
    Ok(Basis {
        n: m.n,
        mean: m.mean(),
        components,
        eigenvalues,
        evr,
        cumulative_evr,
    })
}

/// L∞ scaling f / max_j |f_j| (paper Eq. 9); an all-zero filter stays zero. Equals the f64
/// quotient that [`crate::stats`] accumulates, rounded to f32.
pub fn scale_linf(f: &[f32; 9]) -> [f32; 9] {
    let m = f.iter().fold(0f32, |m, v| m.max(v.abs()));
    if m > 0.0 { f.map(|v| v / m) } else { *f }
}

/// Coefficients c = V(f̃ − μ) of an already scaled filter (use [`scale_linf`]) in `basis`
/// (CVPR notebook `pca.transform`).
pub fn project(basis: &Basis, f: &[f32; 9]) -> [f64; 9] {
    let mut d = [0f64; 9];
    for ((dj, v), m) in d.iter_mut().zip(f).zip(&basis.mean) {
        *dj = f64::from(*v) - m;
    }
    basis
        .components
        .map(|c| c.iter().zip(&d).map(|(a, b)| a * b).sum())
}

/// How two bases relate (the paper's "same eigenfilters?" question, §2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BasisComparison {
    /// abs_cos[i][j] = |⟨a_i, b_j⟩| (components are unit vectors; signs are arbitrary).
    pub abs_cos: [[f64; 9]; 9],
    /// Greedy one-to-one matching (i in a, j in b, |cos|), picking the largest remaining |cos|
    /// first (ties: lowest i, then j); 9 pairs in pick order.
    pub matching: Vec<(usize, usize, f64)>,
    /// Principal angles in degrees, ascending, between span(a_0..a_k) and span(b_0..b_k) for
    /// k = [`PRINCIPAL_ANGLES_K`] (3): arccos of the singular values of A_k B_kᵀ.
    pub principal_angles_deg: Vec<f64>,
    /// a.evr − b.evr per component index.
    pub evr_diff: [f64; 9],
}

/// Compares two bases: |cos| matrix, greedy matching, principal angles of the leading
/// [`PRINCIPAL_ANGLES_K`] components, EVR differences ([3P]'s matching by |cos|).
pub fn compare_bases(a: &Basis, b: &Basis) -> BasisComparison {
    let mut abs_cos = [[0f64; 9]; 9];
    for (i, row) in abs_cos.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = a.components[i]
                .iter()
                .zip(&b.components[j])
                .map(|(x, y)| x * y)
                .sum::<f64>()
                .abs();
        }
    }
    let mut pairs: Vec<(usize, usize, f64)> = (0..81)
        .map(|k| (k / 9, k % 9, abs_cos[k / 9][k % 9]))
        .collect();
    pairs.sort_by(|x, y| y.2.total_cmp(&x.2).then(x.0.cmp(&y.0)).then(x.1.cmp(&y.1)));
    let (mut used_a, mut used_b) = ([false; 9], [false; 9]);
    let mut matching = Vec::with_capacity(9);
    for (i, j, c) in pairs {
        if !used_a[i] && !used_b[j] {
            used_a[i] = true;
            used_b[j] = true;
            matching.push((i, j, c));
        }
    }
    let mut evr_diff = [0f64; 9];
    for (d, (x, y)) in evr_diff.iter_mut().zip(a.evr.iter().zip(&b.evr)) {
        *d = x - y;
    }
    BasisComparison {
        abs_cos,
        matching,
        principal_angles_deg: principal_angles_deg(a, b, PRINCIPAL_ANGLES_K).unwrap_or_default(),
        evr_diff,
    }
}

/// Principal angles (degrees, ascending) between the spans of the first `k` (1..=9) components
/// of `a` and `b`: θ_i = arccos σ_i(A_k B_kᵀ) (Björck–Golub). None for k outside 1..=9 or if the
/// SVD does not converge.
pub fn principal_angles_deg(a: &Basis, b: &Basis, k: usize) -> Option<Vec<f64>> {
    if !(1..=9).contains(&k) {
        return None;
    }
    let m = DMatrix::from_fn(k, k, |i, j| {
        a.components[i]
            .iter()
            .zip(&b.components[j])
            .map(|(x, y)| x * y)
            .sum()
    });
    let svd: SVD<f64, nalgebra::Dyn, nalgebra::Dyn> =
        SVD::try_new(m, false, false, f64::EPSILON, MAX_ITER)?;
    let mut angles: Vec<f64> = svd
        .singular_values
        .iter()
        .map(|s: &f64| s.clamp(0.0, 1.0).acos().to_degrees())
        .collect();
    angles.sort_by(f64::total_cmp);
    Some(angles)
}

/// Bin of `x` in `bins` equal-width bins over [lo, hi], exactly as numpy.histogram assigns it
/// (edges i·(hi−lo)/bins + lo, last edge = hi, last bin right-inclusive, lo == hi widened by
/// ±0.5). None when x is outside [lo, hi] or NaN, bins = 0, or the range is invalid.
pub fn histogram_bin(x: f64, lo: f64, hi: f64, bins: usize) -> Option<usize> {
    if bins == 0 || !lo.is_finite() || !hi.is_finite() || lo > hi {
        return None;
    }
    let (lo, hi) = if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    if !(x >= lo && x <= hi) {
        return None;
    }
    let step = (hi - lo) / bins as f64;
    let edge = |i: usize| if i == bins { hi } else { i as f64 * step + lo };
    // numpy: truncate, clamp the right edge into the last bin, then fix ±1 ULP misplacement.
    let mut i = (((x - lo) / (hi - lo)) * bins as f64) as usize;
    i = i.min(bins - 1);
    if x < edge(i) {
        i -= 1;
    }
    if i != bins - 1 && x >= edge(i + 1) {
        i += 1;
    }
    Some(i)
}

/// Counts of `values` in `bins` equal-width bins over [lo, hi] (numpy.histogram with `range`).
pub fn histogram(values: impl IntoIterator<Item = f64>, lo: f64, hi: f64, bins: usize) -> Vec<u64> {
    let mut counts = vec![0u64; bins];
    for v in values {
        if let Some(b) = histogram_bin(v, lo, hi, bins) {
            counts[b] += 1;
        }
    }
    counts
}

/// Histogram → probabilities as the CVPR notebook does before KL (§2.4): density
/// count/(N·w), empty bins set to [`HIST_EMPTY_DENSITY`] (in density units), renormalised to
/// sum 1. An all-empty histogram becomes uniform.
pub fn hist_to_prob(counts: &[u64], bin_width: f64) -> Result<Vec<f64>, QualityError> {
    if !(bin_width.is_finite() && bin_width > 0.0) {
        return Err(QualityError::BadBinWidth(bin_width));
    }
    let total = counts.iter().sum::<u64>() as f64;
    let d: Vec<f64> = counts
        .iter()
        .map(|&c| {
            if c == 0 {
                HIST_EMPTY_DENSITY
            } else {
                c as f64 / (total * bin_width)
            }
        })
        .collect();
    let s: f64 = d.iter().sum();
    Ok(d.iter().map(|v| v / s).collect())
}

/// KL(p‖q) with scipy `rel_entr` terms: 0 where p = 0, +inf where p > 0 = q. Inputs sum to 1.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(&x, &y)| {
            if x == 0.0 {
                0.0
            } else if y > 0.0 {
                x * (x / y).ln()
            } else {
                f64::INFINITY
            }
        })
        .sum()
}

/// Jeffreys divergence KL(p‖q) + KL(q‖p), natural log, each side first normalised to sum 1
/// (scipy `entropy(p, q) + entropy(q, p)`, CVPR notebook cell 23).
pub fn jeffreys(p: &[f64], q: &[f64]) -> Result<f64, QualityError> {
    if p.len() != q.len() {
        return Err(QualityError::BinMismatch(p.len(), q.len()));
    }
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    for s in [sp, sq] {
        if !(s > 0.0 && s.is_finite()) {
            return Err(QualityError::EmptyDistribution(s));
        }
    }
    let p: Vec<f64> = p.iter().map(|v| v / sp).collect();
    let q: Vec<f64> = q.iter().map(|v| v / sq).collect();
    Ok(kl(&p, &q) + kl(&q, &p))
}

/// Drift D(P, Q) = Σ_i w_i S_i with S_i the Jeffreys divergence of the per-component
/// coefficient histograms after [`hist_to_prob`] (CVPR notebook cells 23–28: w = EVR of the
/// global basis, 70 bins on the global range; MED: w = 1/9). Returns (D, S).
pub fn drift(
    hists_p: &[Vec<u64>; 9],
    hists_q: &[Vec<u64>; 9],
    bin_width: f64,
    weights: &[f64; 9],
) -> Result<(f64, [f64; 9]), QualityError> {
    let mut s = [0f64; 9];
    for (si, (hp, hq)) in s.iter_mut().zip(hists_p.iter().zip(hists_q)) {
        if hp.len() != hq.len() {
            return Err(QualityError::BinMismatch(hp.len(), hq.len()));
        }
        *si = jeffreys(&hist_to_prob(hp, bin_width)?, &hist_to_prob(hq, bin_width)?)?;
    }
    let d = s.iter().zip(weights).map(|(a, b)| a * b).sum();
    Ok((d, s))
}

/// 1-based ranks with ties given their average rank (scipy `rankdata(method="average")`).
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0f64; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's ρ: Pearson correlation of average ranks (scipy `spearmanr`; robustness paper's
/// correlations). None for different lengths, fewer than 2 values, NaN, or a constant side.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 || x.iter().chain(y).any(|v| v.is_nan()) {
        return None;
    }
    let (rx, ry) = (average_ranks(x), average_ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0f64, 0f64, 0f64);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    Some(sxy / (sxx * syy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;
    use std::path::PathBuf;

    /// Deterministic splitmix64 stream for test data.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (1.0 - self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    /// Variance entropy the SVD way (TCQ `_svd_variance_ratio`), the second computation.
    fn entropy_by_svd(filters: &[f32]) -> Option<f64> {
        let n = filters.len() / 9;
        if n < 2 {
            return None;
        }
        let x = DMatrix::from_fn(n, 9, |r, c| f64::from(filters[r * 9 + c]));
        let mean = x.row_mean();
        let centred = DMatrix::from_fn(n, 9, |r, c| x[(r, c)] - mean[c]);
        let s = centred.singular_values();
        let lam: Vec<f64> = s.iter().map(|v| v * v / (n as f64 - 1.0)).collect();
        let total: f64 = lam.iter().sum();
        if total == 0.0 {
            return Some(0.0);
        }
        Some(entropy10(
            &lam.iter().map(|v| v / total).collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn th_check_values() {
        for (n, want) in [
            (9.0, 0.5515),
            (16.0, 0.7221),
            (64.0, 0.9056),
            (192.0, 0.9398),
            (576.0, 0.9485),
            (4096.0, 0.9511),
        ] {
            assert!((th(n) - want).abs() < 5e-5, "TH({n}) = {}", th(n));
        }
        assert!((th(f64::INFINITY) - 0.95130).abs() < 5e-6);
        assert!(th(2.0) < 0.0 && th(3.0) > 0.0);
    }

    #[test]
    fn entropy10_check_values() {
        assert!((entropy10(&[0.5, 0.2, 0.2, 0.1]) - 0.530103).abs() < 1e-6);
        assert_eq!(entropy10(&[1.0, 0.0, 0.0]), 0.0);
        assert!((entropy10(&[1.0 / 9.0; 9]) - 9f64.log10()).abs() < 1e-15);
    }

    proptest! {
        /// variance_entropy (covariance eigen from streaming sums) = SVD of the centred matrix.
        #[test]
        fn variance_entropy_equals_svd(f in prop::collection::vec(-3.0f32..3.0, 18..400), shift in -2.0f32..2.0) {
            let f: Vec<f32> = f[..f.len() / 9 * 9].iter().map(|v| v + shift).collect();
            let m = Moments::of(&f);
            let got = variance_entropy(&m).unwrap();
            let want = entropy_by_svd(&f).unwrap();
            prop_assert!((got - want).abs() < 1e-9, "{} vs {}", got, want);
        }
    }

    #[test]
    fn variance_entropy_edge_cases() {
        assert_eq!(variance_entropy(&Moments::of(&[1.0; 9])), None);
        assert_eq!(variance_entropy(&Moments::default()), None);
        // Two filters: rank 1 → H = 0.
        let f: Vec<f32> = (0..18).map(|k| k as f32 * 0.37).collect();
        assert!(variance_entropy(&Moments::of(&f)).unwrap().abs() < 1e-12);
        let bad = Moments {
            n: 5,
            sum: vec![0.0; 3],
            sum_outer: vec![],
        };
        assert_eq!(variance_entropy(&bad), None);
        let nan = Moments {
            n: 5,
            sum: vec![f64::NAN; 9],
            sum_outer: vec![0.0; 81],
        };
        assert_eq!(variance_entropy(&nan), None);
    }

    #[test]
    fn torchconvquality_hand_tests() {
        let q = |f: &[f32], o: u32, i: u32| {
            layer_quality(&LayerStats::compute(f, o, i), &QualityOptions::default()).unwrap()
        };
        // zeros(64,16,3,3) → S = 1 (and H = 0: no variance at all).
        let z = q(&vec![0.0; 64 * 16 * 9], 64, 16);
        assert_eq!(z.sparsity, 1.0);
        assert_eq!(z.entropy, Some(0.0));
        assert!(
            z.flags.low_diversity
                && z.flags.sparse_heavy
                && z.flags.combined
                && !z.flags.random_like
        );
        // ones → S = 0.
        assert_eq!(q(&vec![1.0; 64 * 16 * 9], 64, 16).sparsity, 0.0);
        // Two filters, one zero → S = 0.5.
        let mut f = vec![0.3f32; 18];
        f[9..].fill(0.0);
        assert_eq!(q(&f, 2, 1).sparsity, 0.5);
        // Uniform random (128,128,3,3) → H/TH > 1.
        let mut rng = Rng(42);
        let f: Vec<f32> = (0..128 * 128 * 9)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect();
        let r = q(&f, 128, 128);
        assert!(r.entropy_norm.unwrap() > 1.0, "{:?}", r.entropy_norm);
        assert!(r.flags.random_like && r.flags.combined);
        // Constant weights → H = 0 (raw and clean) and O ≈ 0, also scaled by 0.1.
        for c in [1.0f32, 0.1, 0.3] {
            let r = q(&vec![c; 64 * 16 * 9], 64, 16);
            assert_eq!(r.entropy, Some(0.0), "c = {c}");
            assert_eq!(r.entropy_clean, Some(0.0), "c = {c}");
            assert!(r.orthogonality.unwrap().abs() < 1e-12, "c = {c}");
        }
    }

    #[test]
    fn quality_options_variants_and_errors() {
        let mut rng = Rng(5);
        let mut f: Vec<f32> = (0..40 * 9).map(|_| rng.normal() as f32).collect();
        f[..9 * 10].fill(0.0);
        let s = LayerStats::compute(&f, 8, 5);
        let base = layer_quality(&s, &QualityOptions::default()).unwrap();
        assert_eq!((base.n, base.sparse, base.clean_n), (40, 10, Some(30)));
        assert_eq!(base.entropy_n, 40);
        let clean = layer_quality(
            &s,
            &QualityOptions {
                remove_sparse: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(clean.entropy, base.entropy_clean);
        assert_eq!(clean.entropy_n, 30);
        assert_eq!(clean.entropy_norm, base.entropy_clean_norm);
        let scaled = layer_quality(
            &s,
            &QualityOptions {
                scaled: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(scaled.entropy, variance_entropy(&s.scaled));
        let other_eps = layer_quality(
            &s,
            &QualityOptions {
                eps: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((other_eps.clean_n, other_eps.entropy_clean), (None, None));
        assert_eq!(
            layer_quality(
                &s,
                &QualityOptions {
                    eps: 0.03,
                    ..Default::default()
                }
            ),
            Err(QualityError::UnknownEps(0.03))
        );
        assert_eq!(
            layer_quality(
                &s,
                &QualityOptions {
                    eps: 0.1,
                    remove_sparse: true,
                    ..Default::default()
                }
            ),
            Err(QualityError::CleanNeedsDefaultEps(0.1))
        );
        let old: LayerStats =
            serde_json::from_str(r#"{"n":1,"sum":[],"sum_outer":[],"abs_max":0}"#).unwrap();
        assert_eq!(
            layer_quality(&old, &QualityOptions::default()),
            Err(QualityError::MissingStats("sparse counts"))
        );
    }

    #[test]
    fn degeneration_flags_follow_thresholds() {
        // Few distinct patterns (H small) and many sparse filters → combined via the second arm.
        let mut f = Vec::new();
        for k in 0..100 {
            if k < 20 {
                f.extend([0.0; 9]);
            } else {
                let a = 1.0 + (k % 2) as f32 * 1e-3;
                f.extend([a, a, a, a, a, a, a, a, a + 0.5]);
            }
        }
        let q = layer_quality(&LayerStats::of(&f), &QualityOptions::default()).unwrap();
        assert!(q.entropy.unwrap() < 0.5 && q.sparsity >= 0.14);
        assert!(
            q.flags.low_diversity
                && q.flags.sparse_heavy
                && q.flags.combined
                && !q.flags.random_like
        );
        let strict = QualityOptions {
            thresholds: DegenerationThresholds {
                sparse_share: 0.5,
                ..Default::default()
            },
            ..Default::default()
        };
        let q = layer_quality(&LayerStats::of(&f), &strict).unwrap();
        assert!(!q.flags.sparse_heavy && !q.flags.combined);
    }

    /// Orthogonal matrix (eigenvectors of a fixed symmetric matrix), rows.
    fn rotation() -> [[f64; 9]; 9] {
        let m = SMatrix::<f64, 9, 9>::from_fn(|i, j| ((i * 7 + j * 7 + i * j) % 11) as f64 - 5.0);
        let (_, v) = eigen_desc(m + m.transpose()).unwrap();
        v
    }

    #[test]
    fn basis_of_exact_rotated_data() {
        // Points μ ± s_k q_k: mean μ exactly, covariance Σ 2 s_k² q_k q_kᵀ / (n − 1).
        let q = rotation();
        let mu = [0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.2, 0.0, -0.05];
        let s: Vec<f64> = (0..9).map(|k| 0.9 - 0.09 * k as f64).collect();
        let mut f = Vec::new();
        for k in 0..9 {
            for sign in [1.0, -1.0] {
                f.extend((0..9).map(|j| (mu[j] + sign * s[k] * q[k][j]) as f32));
            }
        }
        let b = basis_from_moments(&Moments::of(&f)).unwrap();
        assert_eq!(b.n, 18);
        let total: f64 = s.iter().map(|v| 2.0 * v * v / 17.0).sum();
        for k in 0..9 {
            assert!((b.mean[k] - mu[k]).abs() < 1e-6);
            assert!(
                (b.eigenvalues[k] - 2.0 * s[k] * s[k] / 17.0).abs() < 1e-6,
                "{k}"
            );
            assert!((b.evr[k] - 2.0 * s[k] * s[k] / 17.0 / total).abs() < 1e-6);
            let cos: f64 = b.components[k].iter().zip(&q[k]).map(|(a, c)| a * c).sum();
            assert!((cos.abs() - 1.0).abs() < 1e-6, "{k}: {cos}");
            let top = (0..9).fold(0, |t, j| {
                if b.components[k][j].abs() > b.components[k][t].abs() {
                    j
                } else {
                    t
                }
            });
            assert!(b.components[k][top] > 0.0);
        }
        assert!((b.cumulative_evr[8] - 1.0).abs() < 1e-12);
        // μ projects to 0; μ + q_k to ±e_k.
        let pm = project(&b, &mu.map(|v| v as f32));
        assert!(pm.iter().all(|c| c.abs() < 1e-6));
        let c = project(&b, &std::array::from_fn(|j| (mu[j] + q[3][j]) as f32));
        for (k, ck) in c.iter().enumerate() {
            assert!((ck.abs() - f64::from(k == 3)).abs() < 1e-6, "{k}: {ck}");
        }
        assert_eq!(
            basis_from_moments(&Moments::of(&f[..9])),
            Err(QualityError::TooFewFilters(1))
        );
    }

    #[test]
    fn basis_of_sampled_rotated_gaussian() {
        let q = rotation();
        let sd: Vec<f64> = (0..9).map(|k| 1.0 / (1.0 + k as f64)).collect();
        let mut rng = Rng(9);
        let n = 60_000;
        let mut f = Vec::with_capacity(n * 9);
        for _ in 0..n {
            let z: Vec<f64> = sd.iter().map(|s| s * rng.normal()).collect();
            f.extend((0..9).map(|j| (0.2 + (0..9).map(|k| z[k] * q[k][j]).sum::<f64>()) as f32));
        }
        let b = basis_from_moments(&Moments::of(&f)).unwrap();
        let total: f64 = sd.iter().map(|s| s * s).sum();
        for (k, s) in sd.iter().enumerate() {
            assert!((b.evr[k] - s * s / total).abs() < 0.01, "{k}");
            assert!((b.mean[k] - 0.2).abs() < 0.02);
        }
        // Well-separated leading components line up; the tail is close in span.
        for (k, qk) in q.iter().enumerate().take(3) {
            let cos: f64 = b.components[k].iter().zip(qk).map(|(a, c)| a * c).sum();
            assert!(cos.abs() > 0.99, "{k}: {cos}");
        }
    }

    #[test]
    fn scale_linf_matches_f32_division() {
        let f = [0.5f32, -2.0, 1.0, 0.0, 0.25, -0.125, 1.5, 2.0, -1.0];
        assert_eq!(scale_linf(&f), f.map(|v| v / 2.0));
        assert_eq!(scale_linf(&[0.0; 9]), [0.0; 9]);
        let g = [0.3f32, -0.7, 0.1, 0.2, 0.9, -0.4, 0.6, 0.8, -0.5];
        let m = 0.9f32;
        assert_eq!(
            scale_linf(&g),
            g.map(|v| (f64::from(v) / f64::from(m)) as f32)
        );
    }

    #[test]
    fn compare_identical_and_permuted_bases() {
        let q = rotation();
        let mut f = Vec::new();
        for (k, qk) in q.iter().enumerate() {
            for sign in [1.0, -1.0] {
                f.extend(qk.map(|v| (sign * (1.0 - 0.1 * k as f64) * v) as f32));
            }
        }
        let a = basis_from_moments(&Moments::of(&f)).unwrap();
        let same = compare_bases(&a, &a);
        for i in 0..9 {
            for j in 0..9 {
                assert!((same.abs_cos[i][j] - f64::from(i == j)).abs() < 1e-9);
            }
        }
        assert!(
            same.matching
                .iter()
                .all(|&(i, j, c)| i == j && (c - 1.0).abs() < 1e-9)
        );
        assert_eq!(same.principal_angles_deg.len(), PRINCIPAL_ANGLES_K);
        assert!(same.principal_angles_deg.iter().all(|a| a.abs() < 1e-5));
        assert_eq!(same.evr_diff, [0.0; 9]);
        // Swap components 0 and 1 and flip 2: |cos| sees through both; spans of the first 3 agree.
        let mut b = a.clone();
        b.components.swap(0, 1);
        b.components[2] = b.components[2].map(|v| -v);
        let c = compare_bases(&a, &b);
        assert!(c.matching.iter().any(|&(i, j, _)| i == 0 && j == 1));
        assert!(c.matching.iter().any(|&(i, j, _)| i == 1 && j == 0));
        assert!(c.principal_angles_deg.iter().all(|a| a.abs() < 1e-5));
        // Replace component 2 by 3: one right angle between the 3-spans.
        b.components[2] = a.components[3];
        let c = compare_bases(&a, &b);
        assert!(
            (c.principal_angles_deg[2] - 90.0).abs() < 1e-6,
            "{:?}",
            c.principal_angles_deg
        );
        assert_eq!(principal_angles_deg(&a, &b, 0), None);
        assert_eq!(principal_angles_deg(&a, &b, 9).map(|v| v.len()), Some(9));
    }

    #[test]
    fn hist_to_prob_follows_the_notebook() {
        let p = hist_to_prob(&[2, 0, 6, 0], 0.5).unwrap();
        let d = [2.0 / 4.0, HIST_EMPTY_DENSITY, 6.0 / 4.0, HIST_EMPTY_DENSITY];
        let s: f64 = d.iter().sum();
        for (a, b) in p.iter().zip(d) {
            assert!((a - b / s).abs() < 1e-15);
        }
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(hist_to_prob(&[0, 0], 1.0).unwrap(), vec![0.5, 0.5]);
        assert_eq!(hist_to_prob(&[1], 0.0), Err(QualityError::BadBinWidth(0.0)));
    }

    #[test]
    fn drift_is_zero_for_identical_and_symmetric() {
        let mut rng = Rng(3);
        let h = |rng: &mut Rng| -> [Vec<u64>; 9] {
            std::array::from_fn(|_| (0..70).map(|_| rng.next_u64() % 5).collect())
        };
        let (p, q) = (h(&mut rng), h(&mut rng));
        let w = [1.0 / 9.0; 9];
        let (d0, s0) = drift(&p, &p, 0.1, &w).unwrap();
        assert_eq!(d0, 0.0);
        assert_eq!(s0, [0.0; 9]);
        let (dpq, spq) = drift(&p, &q, 0.1, &w).unwrap();
        let (dqp, sqp) = drift(&q, &p, 0.1, &w).unwrap();
        assert!(dpq > 0.0 && (dpq - dqp).abs() < 1e-12);
        for (a, b) in spq.iter().zip(sqp) {
            assert!((a - b).abs() < 1e-12);
        }
        let evr = [0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03];
        let (d, s) = drift(&p, &q, 0.1, &evr).unwrap();
        assert!((d - s.iter().zip(evr).map(|(a, b)| a * b).sum::<f64>()).abs() < 1e-15);
        let mut short = q.clone();
        short[4].pop();
        assert_eq!(
            drift(&p, &short, 0.1, &w),
            Err(QualityError::BinMismatch(70, 69))
        );
        assert_eq!(jeffreys(&[0.5, 0.5], &[1.0, 0.0]), Ok(f64::INFINITY));
        assert_eq!(
            jeffreys(&[0.0, 0.0], &[1.0, 0.0]),
            Err(QualityError::EmptyDistribution(0.0))
        );
    }

    #[test]
    fn histogram_bin_edge_cases() {
        // The classic floating edge: linspace(0, 1, 11)[3] = 0.30000000000000004 > 0.3.
        assert_eq!(histogram_bin(0.3, 0.0, 1.0, 10), Some(2));
        assert_eq!(histogram_bin(0.0, 0.0, 1.0, 10), Some(0));
        assert_eq!(
            histogram_bin(1.0, 0.0, 1.0, 10),
            Some(9),
            "last bin right-inclusive"
        );
        assert_eq!(
            histogram_bin(0.5, 0.0, 1.0, 10),
            Some(5),
            "inner edges belong to the right bin"
        );
        assert_eq!(histogram_bin(1.0 + 1e-12, 0.0, 1.0, 10), None);
        assert_eq!(histogram_bin(-1e-300, 0.0, 1.0, 10), None);
        assert_eq!(histogram_bin(f64::NAN, 0.0, 1.0, 10), None);
        assert_eq!(histogram_bin(0.5, 0.0, 1.0, 0), None);
        assert_eq!(histogram_bin(0.5, 1.0, 0.0, 3), None);
        assert_eq!(
            histogram_bin(1.4, 1.0, 1.0, 4),
            Some(3),
            "empty range widened by ±0.5"
        );
        assert_eq!(
            histogram(vec![0.0, 0.05, 0.3, 1.0, 2.0], 0.0, 1.0, 10),
            vec![2, 0, 1, 0, 0, 0, 0, 0, 0, 1]
        );
    }

    #[test]
    fn spearman_with_ties() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // Average ranks: x ranks [1.5, 1.5, 3], y ranks [1, 2, 3] → ρ = 0.866….
        let r = spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]).unwrap();
        assert!((r - 0.75f64.sqrt()).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0]), None);
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
    }

    // ---- numpy cross-check (tests/fixtures/make_expected_quality.py) ----

    fn expected_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/expected")
    }

    fn read_json(name: &str) -> Value {
        let p = expected_dir().join(name);
        serde_json::from_str(
            &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap()
    }

    fn read_f32(name: &str) -> Vec<f32> {
        let bytes = std::fs::read(expected_dir().join(name)).unwrap();
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn f(v: &Value) -> f64 {
        v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
    }

    fn u(v: &Value) -> u64 {
        v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
    }

    fn vecf(v: &Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(f).collect()
    }

    /// Largest relative error seen per quantity, checked against a tolerance at the end.
    #[derive(Default)]
    struct Worst(std::collections::BTreeMap<&'static str, f64>);

    impl Worst {
        fn check(&mut self, what: &'static str, got: f64, want: f64, ctx: &str) {
            let scale = got.abs().max(want.abs());
            let rel = if scale == 0.0 {
                0.0
            } else {
                (got - want).abs() / scale
            };
            assert!(
                rel <= 1e-9,
                "{ctx} {what}: rust {got} vs numpy {want} (rel {rel:e})"
            );
            let w = self.0.entry(what).or_insert(0.0);
            *w = w.max(rel);
        }
        fn check_opt(&mut self, what: &'static str, got: Option<f64>, want: &Value, ctx: &str) {
            match (got, want.as_f64()) {
                (Some(g), Some(w)) => self.check(what, g, w, ctx),
                (None, None) => {}
                (g, _) => panic!("{ctx} {what}: rust {g:?} vs numpy {want}"),
            }
        }
    }

    /// The "derived" variant of make_expected_quality.py, in the same f32 arithmetic.
    fn derive(f: &[f32]) -> Vec<f32> {
        f.chunks_exact(9)
            .enumerate()
            .flat_map(|(k, x)| {
                x.iter().map(move |&v| {
                    if k % 5 == 1 {
                        0.0
                    } else if k.is_multiple_of(3) {
                        v * 0.004f32
                    } else {
                        v
                    }
                })
            })
            .collect()
    }

    const FIXTURES: [&str; 3] = [
        "tinynet_zip.pt",
        "tinynet_initializers.onnx",
        "tinynet_f64.safetensors",
    ];

    fn layer_filters(values: &[f32], l: &Value) -> Vec<f32> {
        let off = u(&l["offset"]) as usize;
        let n = u(&l["n"]) as usize;
        let raw = &values[off..off + 9 * n];
        if l["variant"] == "derived" {
            derive(raw)
        } else {
            raw.to_vec()
        }
    }

    #[test]
    fn layer_statistics_match_numpy() {
        let mut worst = Worst::default();
        let mut layers = 0;
        for fixture in FIXTURES {
            let exp = read_json(&format!("{fixture}.quality.json"));
            let values = read_f32(&format!("{fixture}.f32"));
            for l in exp["layers"].as_array().unwrap() {
                let ctx = format!("{fixture} {} {}", l["tensor_name"], l["variant"]);
                let filters = layer_filters(&values, l);
                let s = LayerStats::compute(
                    &filters,
                    u(&l["out_channels"]) as u32,
                    u(&l["in_channels"]) as u32,
                );
                assert_eq!(s.n, u(&l["n"]), "{ctx}");
                for (g, w) in s.sum.iter().zip(vecf(&l["sum"])) {
                    worst.check("sum", *g, w, &ctx);
                }
                assert_eq!(s.abs_max, f(&l["abs_max"]), "{ctx}");
                assert_eq!(s.zero_filters, u(&l["zero_filters"]), "{ctx}");
                for c in l["sparse"].as_array().unwrap() {
                    let got = s.sparse_count(f(&c["eps"])).unwrap();
                    assert_eq!(
                        (got.strict, got.non_strict),
                        (u(&c["strict"]), u(&c["non_strict"])),
                        "{ctx} {c}"
                    );
                }
                let q = layer_quality(&s, &QualityOptions::default()).unwrap();
                worst.check_opt("H", q.entropy, &l["H"], &ctx);
                worst.check_opt("H_norm", q.entropy_norm, &l["H_norm"], &ctx);
                assert_eq!(q.clean_n, Some(u(&l["n_clean"])), "{ctx}");
                worst.check_opt("H_clean", q.entropy_clean, &l["H_clean"], &ctx);
                worst.check_opt(
                    "H_clean_norm",
                    q.entropy_clean_norm,
                    &l["H_clean_norm"],
                    &ctx,
                );
                worst.check_opt(
                    "H_scaled",
                    variance_entropy(&s.scaled),
                    &l["H_scaled"],
                    &ctx,
                );
                let robust = QualityOptions {
                    scaled: true,
                    strict: false,
                    remove_sparse: true,
                    ..Default::default()
                };
                let r = layer_quality(&s, &robust).unwrap();
                assert_eq!(r.entropy_n, u(&l["n_robust"]), "{ctx}");
                worst.check_opt("H_robust", r.entropy, &l["H_robust"], &ctx);
                worst.check_opt("orthogonality", s.orthogonality, &l["orthogonality"], &ctx);
                for (g, w) in s.scaled.mean().iter().zip(vecf(&l["scaled_mean"])) {
                    worst.check("scaled_mean", *g, w, &ctx);
                }
                layers += 1;
            }
        }
        assert_eq!(layers, 2 * (4 + 5 + 4));
        eprintln!(
            "numpy agreement over {layers} layers, max relative error: {:?}",
            worst.0
        );
    }

    fn basis_json(v: &Value) -> Basis {
        let arr9 = |v: &Value| -> [f64; 9] { vecf(v).try_into().unwrap() };
        Basis {
            n: u(&v["n"]),
            mean: arr9(&v["mean"]),
            components: v["components"]
                .as_array()
                .unwrap()
                .iter()
                .map(arr9)
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
            eigenvalues: arr9(&v["eigenvalues"]),
            evr: arr9(&v["evr"]),
            cumulative_evr: arr9(&v["cumulative_evr"]),
        }
    }

    fn check_basis(worst: &mut Worst, got: &Basis, want: &Basis, ctx: &str) {
        assert_eq!(got.n, want.n, "{ctx}");
        for k in 0..9 {
            worst.check("basis mean", got.mean[k], want.mean[k], ctx);
            worst.check("eigenvalues", got.eigenvalues[k], want.eigenvalues[k], ctx);
            worst.check("evr", got.evr[k], want.evr[k], ctx);
            worst.check(
                "cumulative_evr",
                got.cumulative_evr[k],
                want.cumulative_evr[k],
                ctx,
            );
            for j in 0..9 {
                // Absolute: a loading near 0 has no meaningful relative error.
                let d = (got.components[k][j] - want.components[k][j]).abs();
                assert!(
                    d < 1e-9,
                    "{ctx} component {k}[{j}]: {} vs {}",
                    got.components[k][j],
                    want.components[k][j]
                );
                let w = worst.0.entry("components (abs)").or_insert(0.0);
                *w = w.max(d);
            }
        }
    }

    /// Scaled moments of every original layer of some fixtures, merged.
    fn scaled_moments(fixtures: &[&str]) -> (Moments, Vec<Vec<f32>>) {
        let mut m = Moments::default();
        let mut per_fixture = Vec::new();
        for fixture in fixtures {
            let exp = read_json(&format!("{fixture}.quality.json"));
            let values = read_f32(&format!("{fixture}.f32"));
            let mut all = Vec::new();
            for l in exp["layers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["variant"] == "original")
            {
                let filters = layer_filters(&values, l);
                m.merge(&LayerStats::of(&filters).scaled);
                all.extend(filters);
            }
            per_fixture.push(all);
        }
        (m, per_fixture)
    }

    #[test]
    fn basis_comparison_and_drift_match_numpy() {
        let g = read_json("global.quality.json");
        let mut worst = Worst::default();
        let (m, per_fixture) = scaled_moments(&FIXTURES);
        let basis = basis_from_moments(&m).unwrap();
        check_basis(&mut worst, &basis, &basis_json(&g["basis"]), "global basis");
        let (m0, _) = scaled_moments(&FIXTURES[..1]);
        let sub = basis_from_moments(&m0).unwrap();
        check_basis(&mut worst, &sub, &basis_json(&g["sub_basis"]), "sub basis");

        let cmp = compare_bases(&basis, &sub);
        let want = &g["comparison"];
        for i in 0..9 {
            for (j, w) in vecf(&want["abs_cos"][i]).into_iter().enumerate() {
                worst.check("abs_cos", cmp.abs_cos[i][j], w, "comparison");
            }
        }
        for (got, w) in cmp
            .matching
            .iter()
            .zip(want["matching"].as_array().unwrap())
        {
            assert_eq!((got.0 as u64, got.1 as u64), (u(&w[0]), u(&w[1])));
            worst.check("matching cos", got.2, f(&w[2]), "comparison");
        }
        assert_eq!(u(&want["principal_angles_k"]) as usize, PRINCIPAL_ANGLES_K);
        for (got, w) in cmp
            .principal_angles_deg
            .iter()
            .zip(vecf(&want["principal_angles_deg"]))
        {
            worst.check("principal angles", *got, w, "comparison");
        }
        for (got, w) in cmp.evr_diff.iter().zip(vecf(&want["evr_diff"])) {
            worst.check("evr_diff", *got, w, "comparison");
        }

        // Projections of scaled filters.
        for p in g["projections"].as_array().unwrap() {
            let fi = FIXTURES.iter().position(|x| p["fixture"] == *x).unwrap();
            let k = u(&p["filter"]) as usize;
            let filter: [f32; 9] = per_fixture[fi][k * 9..k * 9 + 9].try_into().unwrap();
            let c = project(&basis, &scale_linf(&filter));
            for (got, w) in c.iter().zip(vecf(&p["coefficients"])) {
                // scale_linf rounds f̃ to f32 (the basis itself uses f64 quotients): ~1e-7.
                assert!((got - w).abs() < 1e-6, "projection {p}: {got} vs {w}");
            }
        }

        // Drift: histograms of the f64-scaled coefficients on the global range, numpy's counts.
        let d = &g["drift"];
        let coeffs = |filters: &[f32]| -> Vec<[f64; 9]> {
            filters
                .chunks_exact(9)
                .map(|x| {
                    let m = x.iter().fold(0f64, |m, v| m.max(f64::from(*v).abs()));
                    let mut c = [0f64; 9];
                    for (k, comp) in basis.components.iter().enumerate() {
                        c[k] = (0..9)
                            .map(|j| {
                                comp[j]
                                    * ((if m > 0.0 { f64::from(x[j]) / m } else { 0.0 })
                                        - basis.mean[j])
                            })
                            .sum();
                    }
                    c
                })
                .collect()
        };
        let all: Vec<[f64; 9]> = per_fixture.iter().flat_map(|x| coeffs(x)).collect();
        let lo = all.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let hi = all
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        worst.check("coefficient range lo", lo, f(&d["lo"]), "drift");
        worst.check("coefficient range hi", hi, f(&d["hi"]), "drift");
        let bins = u(&d["bins"]) as usize;
        assert_eq!(bins, DEFAULT_HIST_BINS);
        let hists = |c: &[[f64; 9]]| -> [Vec<u64>; 9] {
            std::array::from_fn(|i| histogram(c.iter().map(|v| v[i]), lo, hi, bins))
        };
        let hp = hists(&coeffs(&per_fixture[0]));
        let hq = hists(&coeffs(&per_fixture[1]));
        let json_hists = |v: &Value| -> [Vec<u64>; 9] {
            std::array::from_fn(|i| v[i].as_array().unwrap().iter().map(u).collect())
        };
        let (np_p, np_q) = (json_hists(&d["hist_p"]), json_hists(&d["hist_q"]));
        assert_eq!(hp, np_p, "coefficient histograms of P");
        assert_eq!(hq, np_q, "coefficient histograms of Q");
        let w = (f(&d["hi"]) - f(&d["lo"])) / bins as f64;
        let (dd, s) = drift(&np_p, &np_q, w, &basis.evr).unwrap();
        for (got, want) in s.iter().zip(vecf(&d["S"])) {
            worst.check("S_i", *got, want, "drift");
        }
        worst.check("D (EVR weights)", dd, f(&d["D_evr"]), "drift");
        let (du, _) = drift(&np_p, &np_q, w, &[1.0 / 9.0; 9]).unwrap();
        worst.check("D (uniform)", du, f(&d["D_uniform"]), "drift");

        for t in g["th"].as_array().unwrap() {
            worst.check("TH", th(f(&t["n"])), f(&t["th"]), "th");
        }
        worst.check(
            "entropy10",
            entropy10(&vecf(&g["entropy10"]["p"])),
            f(&g["entropy10"]["h"]),
            "entropy10",
        );
        for c in g["spearman"].as_array().unwrap() {
            worst.check(
                "spearman",
                spearman(&vecf(&c["x"]), &vecf(&c["y"])).unwrap(),
                f(&c["rho"]),
                "spearman",
            );
        }
        eprintln!("numpy agreement, max relative error: {:?}", worst.0);
    }

    #[test]
    fn histogram_bin_matches_numpy() {
        let g = read_json("global.quality.json");
        let cases = g["histogram_cases"].as_array().unwrap();
        assert!(cases.len() > 300);
        for c in cases {
            let bits = |k: &str| f64::from_bits(u(&c[k]));
            let (x, lo, hi, bins) = (bits("x"), bits("lo"), bits("hi"), u(&c["bins"]) as usize);
            let want = c["bin"].as_u64().map(|b| b as usize);
            assert_eq!(
                histogram_bin(x, lo, hi, bins),
                want,
                "x = {x:e} in [{lo}, {hi}] / {bins}"
            );
        }
    }
}
