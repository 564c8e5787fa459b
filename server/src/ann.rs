//! The approximate nearest-neighbour index over stored filters (raw space): an inverted file
//! (IVF) of int8 residual codes whose posting lists are sorted by filter id, so that a meta
//! selection — which the catalogue turns into a short sorted list of filter-id ranges — is
//! intersected with each probed list by a merge walk with skips, the way a search engine
//! intersects posting lists. Candidates are re-ranked exactly from the stored float32 values.
//!
//! Structure:
//! - a [`Quantizer`]: `k1` coarse centroids, each refined into fine centroids (the cells:
//!   about 1.3·√n for a store of n filters, at least 4096 when the store has 64 filters per
//!   cell to train on, at most 16384; see [`train_sample_size`]) in proportion to the share of the sample it holds, so that dense regions
//!   (the many small-magnitude filters of deep layers) get as many cells as they need; trained
//!   by Lloyd's k-means on a sample of stored filters;
//!   per cell and dimension a scale `s` such that a member's residual `(f − c)/s` lies in
//!   [−1, 1] (members beyond are clamped: their code distance is then a lower-quality estimate,
//!   and exact re-ranking repairs the order among the candidates);
//! - per filter 9 bytes of code `round(127 · (f − c)/s)` and its id, delta-coded in u16 with an
//!   escape for large gaps, with a skip entry every [`SKIP`] entries; in memory the codes of
//!   each group of [`SKIP`] entries are stored transposed (value-major), so a group's 64 code
//!   distances are nine vectorisable runs: 11 bytes and a little per
//!   filter in memory;
//! - persistence: one segment record per model (its entries grouped by cell) in the
//!   `search_index` column family, written in the same synced batch as the model itself and
//!   deleted in the same batch as the model, so the index is exactly as durable as the data
//!   (a kill -9 never leaves a model without its entries or entries without their model). The
//!   in-memory lists are rebuilt from the segments at startup. Models without a segment of the
//!   current quantizer version (stored while an index was being built) are answered by the
//!   exact scan until the background builder has encoded them.
//!
//! A query: distances from q to the `nlist` fine centroids (stored transposed as well) choose
//! the `nprobe` nearest cells (the nearest for −q too when sign invariant); `nprobe` is scaled
//! by √(1/selectivity) so a narrow selection still meets enough of its own filters; in each
//! probed list the groups that hold a selected id get their code distances computed (pass 1);
//! then the groups are visited in order of their nearest code, their ids decoded and
//! intersected with the selection, until the nearest code of the next group is beyond the
//! `k · rerank`-th best kept (pass 2); the kept candidates' exact distances (the exact mode's
//! formula, bit for bit) decide the answer. A selection of at most half the store keeps its
//! entries of each list as bits ([`SelectionMasks`], resolved per list on first use), so that
//! pass 1 computes only groups holding a selected entry and a group's nearest code is its
//! nearest *selected* code: pass 2 then visits only groups it may take from.
//!
//! The exact mode uses the same lists with bounds instead of a probe count
//! ([`Index::exact_walk`]): per cell, the box and radius of its unclamped codes and a box per
//! clamped direction (kept in memory, derived from the codes as segments are added) bound the
//! distance to any member, each code bounds its own filter's distance, and stored filters are
//! read in bound order until no bound reaches the k-th exact distance — the scan's answer,
//! reading a few dozen filters.

use std::collections::BinaryHeap;

use rayon::prelude::*;

/// Cells probed for a query over everything, unless the request says otherwise.
pub const DEFAULT_NPROBE: usize = 16;
/// Candidates re-ranked exactly: `k · rerank`.
pub const DEFAULT_RERANK: usize = 4;
/// Filters stored before an index is trained automatically.
pub const MIN_TRAIN_FILTERS: u64 = 20_000;
/// Most cells per level (so at most 16384 cells).
const MAX_PER_LEVEL: usize = 128;
/// Training sample: this many filters per cell.
const SAMPLE_PER_CELL: usize = 64;
/// Lloyd iterations per level.
const ITERS: usize = 10;
/// Entries per skip-table group.
pub const SKIP: usize = 64;
/// The escape word that announces an id written out in full (see `List::escapes`).
const FAR: u32 = u32::MAX;
/// Slack on the trained residual range, for members outside the training sample.
const SCALE_SLACK: f32 = 1.5;

const QUANTIZER_MAGIC: &[u8; 4] = b"FQZ1";
const SEGMENT_MAGIC: &[u8; 4] = b"FSG1";

/// Squared Euclidean distance in f32.
fn d2(a: &[f32; 9], b: &[f32; 9]) -> f32 {
    let mut s = 0f32;
    for k in 0..9 {
        let t = a[k] - b[k];
        s += t * t;
    }
    s
}

/// Keeps `best3` the three smallest (distance, index) offered, nearest first; an offer equal
/// to a kept distance goes after it (offers come in index order, so ties keep lower indices).
#[inline(always)]
fn insert3(best3: &mut [(f32, usize); 3], d: f32, i: usize) {
    if d < best3[2].0 {
        best3[2] = (d, i);
        if best3[2].0 < best3[1].0 {
            best3.swap(1, 2);
            if best3[1].0 < best3[0].0 {
                best3.swap(0, 1);
            }
        }
    }
}

/// The smallest value (+∞ for none; the values are distances, never NaN: the minimum then
/// does not depend on the order), by sixteen lane-wise minima, which vectorise where a
/// left-to-right fold is a serial chain of scalar compares (measured: a sixth of
/// `group_distances`, and most of the nearest-cell search of an index build).
#[inline(always)]
fn slice_min(v: &[f32]) -> f32 {
    let mut lanes = [f32::INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            if *x < *l {
                *l = *x;
            }
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::INFINITY, |m, &x| if x < m { x } else { m })
}

/// Index of the nearest centroid.
fn nearest(f: &[f32; 9], cs: &[[f32; 9]]) -> usize {
    let mut best = (f32::INFINITY, 0);
    for (i, c) in cs.iter().enumerate() {
        let d = d2(f, c);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

/// A small deterministic generator (sampling and k-means seeding must be reproducible).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Lloyd's k-means with `k ≤ points.len()` centroids seeded from distinct sample points.
/// (Maintained k-means crates either need a nightly compiler or bring a matrix stack; at 9
/// dimensions Lloyd's loop is a few lines.)
fn kmeans(points: &[[f32; 9]], k: usize, seed: u64) -> Vec<[f32; 9]> {
    let k = k.min(points.len()).max(1);
    if points.is_empty() {
        return vec![[0.0; 9]];
    }
    // Seed: k distinct positions by a partial Fisher-Yates shuffle of indices.
    let mut idx: Vec<usize> = (0..points.len()).collect();
    let mut rng = XorShift(seed | 1);
    for i in 0..k {
        let j = i + (rng.next() as usize) % (idx.len() - i);
        idx.swap(i, j);
    }
    let mut cs: Vec<[f32; 9]> = idx[..k].iter().map(|&i| points[i]).collect();
    let kernel = Kernel::detect();
    for _ in 0..ITERS {
        // Each point's nearest centroid from all distances at once (`nearest`'s answer: the
        // same sums, the first smallest).
        let ct: Vec<f32> = (0..9).flat_map(|d| cs.iter().map(move |c| c[d])).collect();
        let (sums, counts) = points
            .par_chunks(4096)
            .map(|chunk| {
                let mut sums = vec![[0f64; 9]; k];
                let mut counts = vec![0u64; k];
                let mut dist = vec![0f32; k];
                for p in chunk {
                    kernel.centroid_distances(&ct, p, &mut dist);
                    let m = slice_min(&dist);
                    let c = dist.iter().position(|&x| x == m).unwrap_or(0);
                    counts[c] += 1;
                    for d in 0..9 {
                        sums[c][d] += f64::from(p[d]);
                    }
                }
                (sums, counts)
            })
            .reduce(
                || (vec![[0f64; 9]; k], vec![0u64; k]),
                |(mut s1, mut c1), (s2, c2)| {
                    for i in 0..k {
                        c1[i] += c2[i];
                        for d in 0..9 {
                            s1[i][d] += s2[i][d];
                        }
                    }
                    (s1, c1)
                },
            );
        for i in 0..k {
            // An empty cluster keeps its centroid.
            if counts[i] > 0 {
                for d in 0..9 {
                    cs[i][d] = (sums[i][d] / counts[i] as f64) as f32;
                }
            }
        }
    }
    cs
}

/// The trained partition and code book.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantizer {
    /// Version (increases with every rebuild).
    pub version: u32,
    /// Fine cells of coarse centroid c: `offsets[c]..offsets[c + 1]`.
    pub offsets: Vec<usize>,
    /// Coarse centroids.
    pub coarse: Vec<[f32; 9]>,
    /// Fine centroids, grouped by coarse centroid.
    pub centroids: Vec<[f32; 9]>,
    /// Per cell and dimension, the residual half-range (> 0).
    pub scale: Vec<[f32; 9]>,
    /// Filters stored when it was trained.
    pub trained_on: u64,
}

/// Filters to sample for training the quantizer of a store of `total` filters:
/// 64 per cell, for the larger of 4096 cells and 1.3·√total (4096 cells at
/// 1e7 filters, 13,000 at 1e8), at most 16384 cells. Cells grow with √n, as the inverted-file
/// rule of thumb has it (FAISS suggests 4–16·√n cells of float vectors; int8 codes cost a
/// quarter as much to compare, so ours are fewer and larger): at 1e8 filters 4096 cells would
/// hold ~24,000 entries each and a query would compare twice as many codes as it needs.
pub fn train_sample_size(total: u64) -> u64 {
    let cells = (1.3 * (total as f64).sqrt()).round().clamp(4096.0, (MAX_PER_LEVEL * MAX_PER_LEVEL) as f64) as u64;
    SAMPLE_PER_CELL as u64 * cells
}

/// Cells per level for a training set of `n` filters.
fn per_level(n: usize) -> usize {
    let nlist = (n / SAMPLE_PER_CELL).clamp(1, MAX_PER_LEVEL * MAX_PER_LEVEL);
    ((nlist as f64).sqrt().floor() as usize).clamp(1, MAX_PER_LEVEL)
}

impl Quantizer {
    /// Trains on `sample` (filters drawn from the whole store) for a store of `total` filters.
    pub fn train(version: u32, sample: &[[f32; 9]], total: u64) -> Quantizer {
        let per = per_level(sample.len());
        let coarse = kmeans(sample, per, 0x9E37_79B9_7F4A_7C15 ^ u64::from(version));
        let k1 = coarse.len();
        let assign: Vec<usize> = sample.par_iter().map(|p| nearest(p, &coarse)).collect();
        let mut members: Vec<Vec<[f32; 9]>> = vec![Vec::new(); k1];
        for (p, &c) in sample.iter().zip(&assign) {
            members[c].push(*p);
        }
        // Cells per coarse cluster in proportion to its members (at least one, at most one
        // per member), about per·per in all.
        let target = per * per;
        let n = sample.len().max(1);
        let quota: Vec<usize> = members
            .iter()
            .map(|m| ((m.len() * target) as f64 / n as f64).round().clamp(1.0, m.len().max(1) as f64) as usize)
            .collect();
        let fine: Vec<Vec<[f32; 9]>> = members
            .par_iter()
            .zip(&quota)
            .enumerate()
            .map(|(c, (m, &q))| {
                if m.is_empty() {
                    vec![coarse[c]]
                } else {
                    kmeans(m, q, 0xD1B5_4A32_D192_ED03 ^ (c as u64) << 8 ^ u64::from(version))
                }
            })
            .collect();
        let mut offsets = vec![0usize];
        for f in &fine {
            offsets.push(offsets[offsets.len() - 1] + f.len());
        }
        let centroids: Vec<[f32; 9]> = fine.into_iter().flatten().collect();
        let mut q = Quantizer {
            version,
            offsets,
            coarse,
            centroids,
            scale: Vec::new(),
            trained_on: total,
        };
        let (t, kernel) = (q.transposed(), Kernel::detect());
        let cells: Vec<usize> = sample.par_iter().map_init(Vec::new, |scratch, p| q.cell_in(p, &t, kernel, scratch)).collect();
        let mut range = vec![[0f32; 9]; q.centroids.len()];
        for (p, &c) in sample.iter().zip(&cells) {
            for d in 0..9 {
                range[c][d] = range[c][d].max((p[d] - q.centroids[c][d]).abs());
            }
        }
        // A dimension with no spread in the sample borrows the largest spread of the cell (or
        // a tiny positive value), so every scale divides.
        q.scale = range
            .into_iter()
            .map(|r| {
                let fallback = r.iter().fold(0f32, |m, v| m.max(*v)).max(f32::MIN_POSITIVE);
                r.map(|v| if v > 0.0 { v * SCALE_SLACK } else { fallback * SCALE_SLACK })
            })
            .collect();
        q
    }

    /// Number of cells.
    pub fn nlist(&self) -> usize {
        self.centroids.len()
    }

    /// The cell of a filter: the nearest fine centroid among those of the three nearest
    /// coarse centroids (queries probe the truly nearest cells; looking past the nearest coarse
    /// cluster keeps filters near its border in the cell a query will probe). One filter at a
    /// time; training and builds use `Quantizer::cell_in`, which gives the same cell.
    pub fn cell(&self, f: &[f32; 9]) -> usize {
        let mut best = (f32::INFINITY, 0usize);
        for (d, c1) in self.nearest_coarse3(f) {
            if d.is_infinite() && best.0.is_finite() {
                continue;
            }
            let (a, b) = (self.offsets[c1], self.offsets[c1 + 1]);
            for j in a..b {
                let d = d2(f, &self.centroids[j]);
                if d < best.0 {
                    best = (d, j);
                }
            }
        }
        best.1
    }

    /// The coarse centroids transposed (value d of centroid i at `d·k1 + i`) and the fine ones
    /// transposed cluster by cluster (coarse cluster c's cells `a..b` of `offsets` hold value d
    /// of cell j at `9a + d·(b − a) + (j − a)`), for [`Quantizer::cell_in`].
    fn transposed(&self) -> (Vec<f32>, Vec<f32>) {
        let coarse = (0..9).flat_map(|d| self.coarse.iter().map(move |c| c[d])).collect();
        let mut fine = Vec::with_capacity(9 * self.centroids.len());
        for w in self.offsets.windows(2) {
            for d in 0..9 {
                fine.extend(self.centroids[w[0]..w[1]].iter().map(|c| c[d]));
            }
        }
        (coarse, fine)
    }

    /// [`Quantizer::cell`], with the distances to the coarse centroids and to each coarse
    /// cluster's fine centroids computed together (`t`: [`Quantizer::transposed`]; the same
    /// sums in the same order, and the same first nearest, so the same cell). Trained kernels
    /// crowd into a few coarse clusters, which get most of the fine cells in proportion (one
    /// held 3,115 of 13,000 on the benchmark's data), and `cell` compared most filters with
    /// thousands of centroids one at a time, each waiting on its chain of nine additions
    /// (measured: 96 % of an index build of 1e8 filters, 571 s).
    fn cell_in(&self, f: &[f32; 9], t: &(Vec<f32>, Vec<f32>), kernel: Kernel, scratch: &mut Vec<f32>) -> usize {
        scratch.clear();
        scratch.resize(self.coarse.len(), 0.0);
        kernel.centroid_distances(&t.0, f, scratch);
        let mut best3 = [(f32::INFINITY, 0usize); 3];
        for (i, &d) in scratch.iter().enumerate() {
            insert3(&mut best3, d, i);
        }
        let mut best = (f32::INFINITY, 0usize);
        for (d, c1) in best3 {
            if d.is_infinite() && best.0.is_finite() {
                continue;
            }
            let (a, b) = (self.offsets[c1], self.offsets[c1 + 1]);
            if a == b {
                continue;
            }
            scratch.clear();
            scratch.resize(b - a, 0.0);
            kernel.centroid_distances(&t.1[9 * a..9 * b], f, scratch);
            // The smallest, lane-wise (vectorised), then its first position: the first
            // strictly smaller than all before it, as `cell`'s loop finds.
            let m = slice_min(scratch);
            if m < best.0
                && let Some(j) = scratch.iter().position(|&x| x == m)
            {
                best = (m, a + j);
            }
        }
        best.1
    }

    /// The three nearest coarse centroids (distance, index), nearest first; ties by lower
    /// index.
    fn nearest_coarse3(&self, f: &[f32; 9]) -> [(f32, usize); 3] {
        let mut best3 = [(f32::INFINITY, 0usize); 3];
        for (i, c) in self.coarse.iter().enumerate() {
            insert3(&mut best3, d2(f, c), i);
        }
        best3
    }

    /// The 9-byte code of `f` in cell `c`.
    pub fn code(&self, f: &[f32; 9], c: usize) -> [i8; 9] {
        let (cen, s) = (&self.centroids[c], &self.scale[c]);
        let mut out = [0i8; 9];
        for d in 0..9 {
            let v = ((f[d] - cen[d]) / s[d] * 127.0).round();
            out[d] = if v.is_nan() { 0 } else { v.clamp(-127.0, 127.0) as i8 };
        }
        out
    }

    /// What a list walk of cell `c` needs for the queries `qs` (q, and −q when sign invariant),
    /// and the cell's bound on |f − reconstruction| (its `Approx::eps`).
    fn cell_query(&self, c: usize, qs: &[[f32; 9]]) -> (CellQuery, f32) {
        let (cen, s) = (&self.centroids[c], &self.scale[c]);
        // Distance in code units: Σ w_d (code_d − t_d)², t = 127 (q − c)/s, w = (s/127)².
        let mut cq = CellQuery { ts: [[0f32; 9]; 2], n: qs.len().min(2), w: std::array::from_fn(|d| (s[d] / 127.0) * (s[d] / 127.0)) };
        for (t, qv) in cq.ts.iter_mut().zip(qs) {
            *t = std::array::from_fn(|d| (qv[d] - cen[d]) / s[d] * 127.0);
        }
        // Rounding moves each coordinate by at most s/254.
        (cq, s.iter().map(|v| (v / 254.0) * (v / 254.0)).sum::<f32>().sqrt() * 1.001)
    }

    /// The values a member of cell `c` whose code for value `d` lies in `[lo, hi]` can hold:
    /// code = round(127 (f − c)/s) in f32 arithmetic puts f within s (0.5 + δ)/127 of the
    /// code's reconstruction (δ covers the three f32 roundings with a wide margin), and a code
    /// clamped at ±127 leaves that side open.
    fn interval(&self, c: usize, d: usize, lo: i8, hi: i8) -> (f64, f64) {
        const DELTA: f64 = 0.01;
        let (cen, s) = (f64::from(self.centroids[c][d]), f64::from(self.scale[c][d]));
        let a = if lo <= -127 { f64::NEG_INFINITY } else { cen + s * (f64::from(lo) - 0.5 - DELTA) / 127.0 };
        let b = if hi == 127 { f64::INFINITY } else { cen + s * (f64::from(hi) + 0.5 + DELTA) / 127.0 };
        (a, b)
    }

    /// An upper bound of |f − centroid| over the members of cell `c` with these codes, clamped
    /// ones left out: the largest reconstruction's distance plus the rounding bound of
    /// [`Quantizer::interval`], in f64, rounded up to f32.
    fn radius(&self, c: usize, codes: &[[i8; 9]]) -> f32 {
        let s = &self.scale[c];
        let mut most = 0f64;
        for code in codes {
            if code.iter().any(|v| v.unsigned_abs() >= 127) {
                continue;
            }
            let n2: f64 = (0..9).map(|d| (f64::from(code[d]) * f64::from(s[d]) / 127.0).powi(2)).sum();
            most = most.max(n2);
        }
        let round: f64 = (0..9).map(|d| (f64::from(s[d]) * 0.51 / 127.0).powi(2)).sum();
        f32_up((most.sqrt() + round.sqrt()) * (1.0 + 1e-9))
    }

    /// A lower bound of the squared distance from `q` to any point of cell `c` whose codes
    /// lie in `[lo, hi]` per value (exact arithmetic would give the box distance; the f64
    /// result is shrunk by far more than its rounding).
    fn box_lower_bound(&self, c: usize, lo: &[i8; 9], hi: &[i8; 9], q: &[f32; 9]) -> f64 {
        let mut sum = 0f64;
        for d in 0..9 {
            let (a, b) = self.interval(c, d, lo[d], hi[d]);
            let x = f64::from(q[d]);
            let gap = (a - x).max(x - b).max(0.0);
            sum += gap * gap;
        }
        sum * (1.0 - 1e-9)
    }

    /// Binary form: magic, version, nlist, k1, trained_on, the k1 + 1 offsets (u32), then
    /// coarse, centroids, scales as f32 LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + (self.coarse.len() + 2 * self.centroids.len()) * 36);
        b.extend_from_slice(QUANTIZER_MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.centroids.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.coarse.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.trained_on.to_le_bytes());
        for o in &self.offsets {
            b.extend_from_slice(&(*o as u32).to_le_bytes());
        }
        for v in self.coarse.iter().chain(&self.centroids).chain(&self.scale) {
            for x in v {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
        b
    }

    /// Reads [`Quantizer::encode`]'s form.
    pub fn decode(b: &[u8]) -> Result<Quantizer, String> {
        let mut r = Reader { b, at: 0 };
        if r.take(4)? != QUANTIZER_MAGIC {
            return Err("search index quantizer: bad magic".into());
        }
        let version = r.u32()?;
        let nlist = r.u32()? as usize;
        let k1 = r.u32()? as usize;
        let trained_on = r.u64()?;
        if k1 == 0 || k1 > nlist || nlist > 1 << 20 {
            return Err(format!("search index quantizer: {k1} coarse centroids for {nlist} cells"));
        }
        let offsets = (0..=k1).map(|_| r.u32().map(|v| v as usize)).collect::<Result<Vec<usize>, String>>()?;
        if offsets[0] != 0 || offsets[k1] != nlist || offsets.windows(2).any(|w| w[0] >= w[1]) {
            return Err("search index quantizer: cell offsets out of order".into());
        }
        let mut vecs = |n: usize| -> Result<Vec<[f32; 9]>, String> {
            (0..n).map(|_| r.vec9()).collect()
        };
        let coarse = vecs(k1)?;
        let centroids = vecs(nlist)?;
        let scale = vecs(nlist)?;
        Ok(Quantizer { version, offsets, coarse, centroids, scale, trained_on })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| format!("search index record truncated at byte {}", self.at))?;
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn vec9(&mut self) -> Result<[f32; 9], String> {
        let s = self.take(36)?;
        let mut v = [0f32; 9];
        for (x, c) in v.iter_mut().zip(s.chunks_exact(4)) {
            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(v)
    }
}

/// One model's entries, grouped by cell (the persisted form).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Quantizer version the codes belong to.
    pub version: u32,
    /// Owning model.
    pub model_id: u64,
    /// (cell, filter ids ascending, codes) for every non-empty cell, cells ascending.
    pub cells: Vec<(u32, Vec<u64>, Vec<[i8; 9]>)>,
}

impl Segment {
    /// Encodes the filters `filters` (9 values each) whose ids start at `first_filter_id`.
    /// Runs on the rayon pool.
    pub fn build(q: &Quantizer, model_id: u64, layers: &[(u64, &[f32])]) -> Segment {
        let (t, kernel) = (q.transposed(), Kernel::detect());
        // Pieces of at most 4096 filters, so one large layer is shared between the threads.
        let pieces: Vec<(u64, &[f32])> = layers
            .iter()
            .flat_map(|(first, vals)| vals.chunks(9 * 4096).enumerate().map(move |(p, v)| (first + 4096 * p as u64, v)))
            .collect();
        let mut entries: Vec<(u32, u64, [i8; 9])> = pieces
            .par_iter()
            .flat_map_iter(|(first, vals)| {
                vals.chunks_exact(9).enumerate().map(move |(i, f)| (*first + i as u64, f))
            })
            .map_init(Vec::new, |scratch, (id, f)| {
                let mut a = [0f32; 9];
                a.copy_from_slice(f);
                // A non-finite value cannot be stored (ingest refuses it); zero keeps codes sane.
                if a.iter().any(|v| !v.is_finite()) {
                    a = [0.0; 9];
                }
                let c = q.cell_in(&a, &t, kernel, scratch);
                (c as u32, id, q.code(&a, c))
            })
            .collect();
        entries.par_sort_unstable_by_key(|e| (e.0, e.1));
        let mut cells: Vec<(u32, Vec<u64>, Vec<[i8; 9]>)> = Vec::new();
        for (c, id, code) in entries {
            match cells.last_mut() {
                Some(last) if last.0 == c => {
                    last.1.push(id);
                    last.2.push(code);
                }
                _ => cells.push((c, vec![id], vec![code])),
            }
        }
        Segment { version: q.version, model_id, cells }
    }

    /// Entries in the segment.
    pub fn len(&self) -> usize {
        self.cells.iter().map(|c| c.1.len()).sum()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Binary form: magic, version, model id, cell count, then per cell: cell, count, ids
    /// (u64 LE), codes (9 bytes each).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(20 + self.len() * 17 + self.cells.len() * 8);
        b.extend_from_slice(SEGMENT_MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.model_id.to_le_bytes());
        b.extend_from_slice(&(self.cells.len() as u32).to_le_bytes());
        for (c, ids, codes) in &self.cells {
            b.extend_from_slice(&c.to_le_bytes());
            b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                b.extend_from_slice(&id.to_le_bytes());
            }
            for code in codes {
                b.extend(code.iter().map(|v| *v as u8));
            }
        }
        b
    }

    /// Reads [`Segment::encode`]'s form; `nlist` bounds the cell numbers.
    pub fn decode(b: &[u8], nlist: usize) -> Result<Segment, String> {
        let mut r = Reader { b, at: 0 };
        if r.take(4)? != SEGMENT_MAGIC {
            return Err("search index segment: bad magic".into());
        }
        let version = r.u32()?;
        let model_id = r.u64()?;
        let n = r.u32()? as usize;
        let mut cells = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let c = r.u32()?;
            if c as usize >= nlist {
                return Err(format!("search index segment of model {model_id}: cell {c} of {nlist}"));
            }
            let len = r.u32()? as usize;
            let ids = (0..len).map(|_| r.u64()).collect::<Result<Vec<u64>, String>>()?;
            let raw = r.take(len * 9)?;
            let codes = raw
                .chunks_exact(9)
                .map(|s| {
                    let mut a = [0i8; 9];
                    for (x, y) in a.iter_mut().zip(s) {
                        *x = *y as i8;
                    }
                    a
                })
                .collect();
            cells.push((c, ids, codes));
        }
        Ok(Segment { version, model_id, cells })
    }
}

/// One posting list: ids ascending, delta-coded; codes transposed per group of [`SKIP`]
/// entries (all value-0 bytes of the group, then all value-1 bytes, …), so that a group's code
/// distances are computed as nine runs of 64 lanes.
#[derive(Debug, Default, Clone)]
struct List {
    /// id − previous id, or 0 when the id is in `escapes` (first entry, or a gap ≥ 2¹⁶).
    deltas: Vec<u16>,
    /// Per escaped entry, one word: its gap from the previous id (from 0 for a list's first
    /// entry), below [`FAR`]; or three: [`FAR`], then the id's high and low halves (a gap of
    /// 2³² − 1 or more, or an id not above the previous one). Small cells at 1e8 filters
    /// escape one entry in a dozen, so one word instead of eight bytes saves ~0.3 B/filter.
    escapes: Vec<u32>,
    /// Per group of [`SKIP`] entries: (first id, escape words consumed before the group).
    skips: Vec<(u64, u32)>,
    /// 9 · SKIP bytes per full group: byte `d · SKIP + j` of group g is value d of entry
    /// g · SKIP + j.
    codes: Vec<i8>,
    /// The codes of the last, partial group, as they came (transposed when the group fills).
    tail: Vec<[i8; 9]>,
    /// Per group: bit j set when entry j's code is clamped (a value at ±127).
    clamped: Vec<u64>,
    /// Smallest and largest code per value over the unclamped entries pushed (the cell's box;
    /// `lo > hi` while there is none).
    lo: [i8; 9],
    hi: [i8; 9],
    last: Option<u64>,
}

/// What a walk over a list needs to know of one probed cell and query.
struct CellQuery {
    /// The query (and −q when `n` is 2) in code units: t = 127 (q − c)/s.
    ts: [[f32; 9]; 2],
    /// Queries in `ts`.
    n: usize,
    /// Per value: (s/127)².
    w: [f32; 9],
}

impl List {
    fn push(&mut self, id: u64, code: [i8; 9]) {
        let i = self.deltas.len();
        if i.is_multiple_of(SKIP) {
            self.skips.push((id, self.escapes.len() as u32));
            self.clamped.push(0);
        }
        if i == 0 {
            (self.lo, self.hi) = ([127; 9], [-127; 9]);
        }
        if code.iter().any(|v| v.unsigned_abs() >= 127) {
            if let Some(m) = self.clamped.last_mut() {
                *m |= 1 << (i % SKIP);
            }
        } else {
            widen(&mut self.lo, &mut self.hi, &code);
        }
        let delta = match self.last {
            Some(l) if id > l && id - l <= u64::from(u16::MAX) => (id - l) as u16,
            _ => 0,
        };
        if delta == 0 {
            let base = self.last.unwrap_or(0);
            match id.checked_sub(base).and_then(|g| u32::try_from(g).ok()) {
                Some(g) if g < FAR && (id > base || self.last.is_none()) => self.escapes.push(g),
                _ => self.escapes.extend([FAR, (id >> 32) as u32, id as u32]),
            }
        }
        self.deltas.push(delta);
        self.tail.push(code);
        if self.tail.len() == SKIP {
            let at = self.codes.len();
            self.codes.resize(at + 9 * SKIP, 0);
            transpose(&self.tail, &mut self.codes[at..]);
            self.tail.clear();
        }
        self.last = Some(id);
    }

    fn len(&self) -> usize {
        self.deltas.len()
    }

    fn bytes(&self) -> usize {
        self.deltas.capacity() * 2
            + self.escapes.capacity() * 4
            + self.skips.capacity() * 16
            + self.codes.capacity()
            + self.tail.capacity() * 9
            + self.clamped.capacity() * 8
    }

    /// Which entries of group `g` have a clamped code (bit j: entry g · SKIP + j).
    fn clamped_in(&self, g: usize) -> u64 {
        self.clamped.get(g).copied().unwrap_or(0)
    }

    /// Full (transposed) groups.
    fn full_groups(&self) -> usize {
        self.codes.len() / (9 * SKIP)
    }

    /// The code of entry `i`.
    fn code(&self, i: usize) -> [i8; 9] {
        let (g, j) = (i / SKIP, i % SKIP);
        if g < self.full_groups() {
            std::array::from_fn(|d| self.codes[g * 9 * SKIP + d * SKIP + j])
        } else {
            self.tail[j]
        }
    }

    /// The ids of group `g`'s entries into `out`; returns how many.
    fn group_ids(&self, g: usize, out: &mut [u64; SKIP]) -> usize {
        self.group_ids_upto(g, SKIP, out)
    }

    /// The ids of group `g`'s first `upto` entries (at most as many as it has) into `out`;
    /// returns how many.
    fn group_ids_upto(&self, g: usize, upto: usize, out: &mut [u64; SKIP]) -> usize {
        let Some(&(first, esc)) = self.skips.get(g) else { return 0 };
        let start = g * SKIP;
        let end = (start + upto.min(SKIP)).min(self.len());
        let mut e = esc as usize;
        let mut id = first;
        for (i, o) in (start..end).zip(out.iter_mut()) {
            let d = self.deltas[i];
            if d == 0 {
                let w = self.escapes[e];
                // The group's first id is the skip entry's; its escape is passed over.
                if w == FAR {
                    if i != start {
                        id = u64::from(self.escapes[e + 1]) << 32 | u64::from(self.escapes[e + 2]);
                    }
                    e += 3;
                } else {
                    if i != start {
                        id += u64::from(w);
                    }
                    e += 1;
                }
            } else if i != start {
                id += u64::from(d);
            }
            *o = id;
        }
        end - start
    }

    /// Which of the list's entries have an id in `ranges` (sorted, disjoint, half-open): per
    /// group, bit j for entry j. Ids ascend strictly, so a group's ids lie below the next
    /// group's first: a group wholly inside one range or wholly between two is settled from the
    /// skip table; only a group that a range boundary crosses has its ids decoded.
    fn selection_mask(&self, ranges: &[(u64, u64)]) -> Box<[u64]> {
        let mut out = vec![0u64; self.skips.len()];
        let mut ids = [0u64; SKIP];
        let mut r = 0;
        for (g, o) in out.iter_mut().enumerate() {
            let first = self.skips[g].0;
            let next_first = self.skips.get(g + 1).map_or(u64::MAX, |s| s.0);
            while r < ranges.len() && ranges[r].1 <= first {
                r += 1;
            }
            let Some(&(a, b)) = ranges.get(r) else { break };
            if a >= next_first {
                continue;
            }
            let len = (self.len() - g * SKIP).min(SKIP);
            if a <= first && b >= next_first {
                *o = low_bits(len);
                continue;
            }
            self.group_ids(g, &mut ids);
            let mut k = r;
            for (j, id) in ids[..len].iter().enumerate() {
                while k < ranges.len() && ranges[k].1 <= *id {
                    k += 1;
                }
                if k < ranges.len() && *id >= ranges[k].0 {
                    *o |= 1 << j;
                }
            }
        }
        out.into_boxed_slice()
    }

    /// Pass 1 of a probe: the code distances of every group that may hold an entry of
    /// `ranges` (sorted, disjoint, half-open; groups that lie wholly between ranges are skipped),
    /// appended to `dists`, with a [`GroupRef`] per group (`slot` names the list) in `groups`.
    /// Returns the codes whose distance was computed.
    fn distances_in(&self, sel: ListSel<'_>, cq: &CellQuery, kernel: Kernel, slot: u32, dists: &mut Vec<[f32; SKIP]>, groups: &mut Vec<GroupRef>) -> u64 {
        // First the groups to compute, then their codes fetched all at once (a group's 576
        // bytes are nine cache lines, and the groups of a narrow selection lie apart: fetched
        // one group at a time, each waited for its own misses), then the distances.
        let todo_from = groups.len();
        let mut todo = |g: usize, groups: &mut Vec<GroupRef>| {
            if let Some(c) = self.codes.get(g * 9 * SKIP..(g + 1) * 9 * SKIP) {
                for line in (0..9 * SKIP).step_by(64) {
                    crate::search::prefetch(c, line);
                }
            }
            groups.push(GroupRef { min: 0.0, slot, group: g as u32, dists: dists.len() as u32 });
            dists.push([f32::INFINITY; SKIP]);
        };
        if let Some(mask) = sel.mask {
            for (g, _) in mask.iter().enumerate().filter(|(_, m)| **m != 0) {
                todo(g, groups);
            }
        } else {
            self.groups_in(sel.ranges, |g| todo(g, groups));
        }
        self.compute(&mut groups[todo_from..], sel.mask, cq, kernel, dists)
    }

    /// The groups that may hold an entry of `ranges`, ascending (a group lying wholly between
    /// two ranges is skipped, a run of them by a search of the skip table).
    fn groups_in(&self, ranges: &[(u64, u64)], mut each: impl FnMut(usize)) {
        let (mut r, mut g) = (0, 0);
        while g < self.skips.len() && r < ranges.len() {
            let first = self.skips[g].0;
            let next_first = self.skips.get(g + 1).map_or(u64::MAX, |s| s.0);
            // Ranges ending before this group are done.
            while r < ranges.len() && ranges[r].1 <= first {
                r += 1;
            }
            if r == ranges.len() {
                break;
            }
            if ranges[r].0 >= next_first {
                // The whole group lies before the next range: jump to the group holding it.
                let target = ranges[r].0;
                let j = self.skips.partition_point(|s| s.0 <= target);
                g = j.saturating_sub(1).max(g + 1);
                continue;
            }
            each(g);
            g += 1;
        }
    }

    /// The code distances of `groups` (their minima set); returns the entries counted.
    fn compute(&self, groups: &mut [GroupRef], mask: Option<&[u64]>, cq: &CellQuery, kernel: Kernel, dists: &mut [[f32; SKIP]]) -> u64 {
        let mut computed = 0u64;
        let mut tail = [0i8; 9 * SKIP];
        for gr in groups {
            let g = gr.group as usize;
            let codes = match self.codes.get(g * 9 * SKIP..(g + 1) * 9 * SKIP) {
                Some(c) => c,
                None => {
                    transpose(&self.tail, &mut tail);
                    &tail[..]
                }
            };
            // The zero padding of the last, partial group is no entry; with a mask, only the
            // selected entries count: the group's minimum is theirs, so the walk orders and
            // stops by what it may take.
            let keep = match mask.and_then(|m| m.get(g)) {
                Some(&bits) => bits,
                None => low_bits(self.len() - g * SKIP),
            };
            gr.min = kernel.group(codes, cq, keep, &mut dists[gr.dists as usize]);
            computed += u64::from(keep.count_ones());
        }
        computed
    }

    /// Pass 2: calls `f(id, entry, distance, worst)` for the entries of group `g` that `sel`
    /// selects and whose distance (`dist`, from pass 1) is at most `*worst` (which
    /// `f` may lower), or whose bit is set in `always` (bit j: entry j of the group).
    fn visit(&self, g: usize, dist: &[f32; SKIP], sel: ListSel<'_>, always: u64, worst: &mut f32, mut f: impl FnMut(u64, usize, f32, &mut f32)) {
        // The entries within the current worst (a vectorised compare; most are not), then
        // those alone, in order, each checked again as `f` lowers the worst, and against the
        // selection: its mask's bits, or the ranges (ids ascend, so one forward walk). Ids are
        // decoded only as far as the last of them.
        let mut near = always;
        for (j, d) in dist.iter().enumerate() {
            if *d <= *worst {
                near |= 1 << j;
            }
        }
        if let Some(mask) = sel.mask {
            near &= mask.get(g).copied().unwrap_or(0);
        }
        if near == 0 {
            return;
        }
        let mut ids = [0u64; SKIP];
        let len = self.group_ids_upto(g, SKIP - near.leading_zeros() as usize, &mut ids);
        near &= low_bits(len);
        if sel.mask.is_some() {
            while near != 0 {
                let j = near.trailing_zeros() as usize;
                near &= near - 1;
                if dist[j] <= *worst || always >> j & 1 == 1 {
                    f(ids[j], g * SKIP + j, dist[j], worst);
                }
            }
            return;
        }
        let ranges = sel.ranges;
        let mut r = ranges.partition_point(|x| x.1 <= ids[0]);
        while near != 0 {
            let j = near.trailing_zeros() as usize;
            near &= near - 1;
            if !(dist[j] <= *worst || always >> j & 1 == 1) {
                continue;
            }
            let id = ids[j];
            while r < ranges.len() && ranges[r].1 <= id {
                r += 1;
            }
            if r == ranges.len() {
                return;
            }
            if id >= ranges[r].0 {
                f(id, g * SKIP + j, dist[j], worst);
            }
        }
    }
}

/// The lowest `n` bits set (all 64 for `n` ≥ 64): the entries of a group holding `n`.
fn low_bits(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// What a probe takes of one list: the entries with an id in `ranges`; when the selection's
/// mask for the list is resolved, the same entries as bits (see [`SelectionMasks`]).
#[derive(Debug, Clone, Copy)]
struct ListSel<'a> {
    ranges: &'a [(u64, u64)],
    mask: Option<&'a [u64]>,
}

/// A selection's entries in each posting list, as one bit per entry, resolved once per list
/// (by the first probe that opens it) and shared by every query over the same selection and
/// index state. With the bits, a probe computes only the groups holding a selected entry,
/// orders the groups by their nearest *selected* code and takes entries without walking the
/// ranges; with ranges alone, a selection of a tenth of the models still meets a selected id
/// in nearly every 64-entry group, and the walk visits many groups whose nearest code is one
/// it may not take. Masks cost one bit per entry of the lists opened; all the masks of one
/// index together are held to one byte per entry (about eight whole selections): a list
/// opened past that is walked by its ranges.
pub struct SelectionMasks {
    lists: Vec<std::sync::OnceLock<Option<Box<[u64]>>>>,
    held: std::sync::atomic::AtomicU64,
    /// Bytes of all the masks held over the index (shared with it), and their limit.
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
    limit: u64,
}

impl SelectionMasks {
    /// The mask of list `c` for `ranges` (the ranges this value was made for), resolved on
    /// first use; `None` when the budget is spent.
    fn list(&self, c: usize, list: &List, ranges: &[(u64, u64)]) -> Option<&[u64]> {
        use std::sync::atomic::Ordering::Relaxed;
        self.lists
            .get(c)?
            .get_or_init(|| {
                let bytes = list.skips.len() as u64 * 8;
                let used = self.budget.fetch_add(bytes, Relaxed);
                if used + bytes > self.limit {
                    self.budget.fetch_sub(bytes, Relaxed);
                    return None;
                }
                self.held.fetch_add(bytes, Relaxed);
                Some(list.selection_mask(ranges))
            })
            .as_deref()
    }

    /// Bytes of the masks resolved so far.
    pub fn bytes(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SelectionMasks {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.budget.fetch_sub(*self.held.get_mut(), Relaxed);
    }
}

impl std::fmt::Debug for SelectionMasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectionMasks").field("lists", &self.lists.len()).field("bytes", &self.bytes()).finish()
    }
}

/// The entries a query may take: filter-id ranges (sorted, disjoint, half-open), and, when the
/// caller keeps them, the same selection's [`SelectionMasks`] (made by [`Index::masks`] for
/// these ranges).
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub ranges: &'a [(u64, u64)],
    pub masks: Option<&'a SelectionMasks>,
}

impl<'a> Selected<'a> {
    /// The entries in `ranges`, walked by the ranges alone.
    pub fn ranges(ranges: &'a [(u64, u64)]) -> Selected<'a> {
        Selected { ranges, masks: None }
    }
}

thread_local! {
    /// A probe's pass-1 distances and groups, kept between the queries a thread answers: grown
    /// afresh for each query, they were a tenth of an approximate query (reallocation and copy).
    static PROBE_SCRATCH: std::cell::RefCell<(Vec<[f32; SKIP]>, Vec<GroupRef>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Pass-1 distance groups a thread keeps between probes (4 MiB); a probe that needed more
/// frees them after use.
const PROBE_SCRATCH_KEEP: usize = 16_384;

/// A group of [`SKIP`] entries whose code distances pass 1 computed.
#[derive(Debug, Clone, Copy)]
struct GroupRef {
    /// Its smallest code distance.
    min: f32,
    /// The probed list it belongs to (index into the probe's cells).
    slot: u32,
    /// Group number in that list.
    group: u32,
    /// Index of its distances.
    dists: u32,
}

/// Writes up to [`SKIP`] codes transposed into `out` (9 · SKIP bytes; zero past the codes).
fn transpose(codes: &[[i8; 9]], out: &mut [i8]) {
    out.fill(0);
    for (j, c) in codes.iter().enumerate().take(SKIP) {
        for (d, v) in c.iter().enumerate() {
            out[d * SKIP + j] = *v;
        }
    }
}

/// Code distances of one group of [`SKIP`] entries: Σ_d w_d (code_d − t_d)², summed in order
/// d = 0..8, the smaller over the query and −q; written to `out`, +∞ for the entries whose bit
/// is clear in `keep` (bit j: entry j); the smallest returned. The same arithmetic on every
/// path (no FMA), so the AVX2 build gives the portable build's values.
#[inline(always)]
fn group_distances(codes: &[i8], cq: &CellQuery, keep: u64, out: &mut [f32; SKIP]) -> f32 {
    *out = [f32::INFINITY; SKIP];
    for t in &cq.ts[..cq.n] {
        let mut acc = [0f32; SKIP];
        for (d, row) in codes.chunks_exact(SKIP).enumerate().take(9) {
            let (td, wd) = (t[d], cq.w[d]);
            for (a, c) in acc.iter_mut().zip(row) {
                let x = f32::from(*c) - td;
                *a += wd * x * x;
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = o.min(*a);
        }
    }
    if keep != u64::MAX {
        // Branch-free (a select per lane), so it vectorises.
        for (j, o) in out.iter_mut().enumerate() {
            *o = if keep >> j & 1 == 1 { *o } else { f32::INFINITY };
        }
    }
    slice_min(out)
}

/// Which build of [`group_distances`] runs.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Portable,
    /// Only [`Kernel::detect`] makes it, on a CPU with AVX2.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Only [`Kernel::detect`] makes it, on a CPU with AVX-512F: the same functions, 16 lanes
    /// wide (the same per-lane operations in the same order, so the same values).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// Every build this CPU can run, for the tests that check they agree.
    #[cfg(test)]
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                v.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    #[inline(always)]
    fn group(self, codes: &[i8], cq: &CellQuery, keep: u64, out: &mut [f32; SKIP]) -> f32 {
        match self {
            Kernel::Portable => group_distances(codes, cq, keep, out),
            // SAFETY: `Kernel::Avx2` (`Avx512`) is only made on a CPU that has AVX2 (AVX-512F),
            // the only feature the function enables.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { group_distances_avx2(codes, cq, keep, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { group_distances_avx512(codes, cq, keep, out) },
        }
    }

    fn box_distances(self, bt: &[f32], q: &[f32; 9], out: &mut [f32]) {
        match self {
            Kernel::Portable => box_distances(bt, q, out),
            // SAFETY: as in `group`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { box_distances_avx2(bt, q, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { box_distances_avx512(bt, q, out) },
        }
    }

    fn centroid_distances(self, ct: &[f32], q: &[f32; 9], out: &mut [f32]) {
        match self {
            Kernel::Portable => centroid_distances(ct, q, out),
            // SAFETY: as in `group`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { centroid_distances_avx2(ct, q, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { centroid_distances_avx512(ct, q, out) },
        }
    }
}

/// Squared distances from q to every centroid (`ct`: the centroids transposed, as
/// `Index::centroids_t`), each summed in order d = 0..8 as [`d2`] sums them.
#[inline(always)]
fn centroid_distances(ct: &[f32], q: &[f32; 9], out: &mut [f32]) {
    let n = out.len();
    out.fill(0.0);
    for (d, row) in ct.chunks_exact(n).enumerate().take(9) {
        let qd = q[d];
        for (o, c) in out.iter_mut().zip(row) {
            let t = qd - c;
            *o += t * t;
        }
    }
}

/// Lower bounds of the squared distance from q to every cell's box (`bt`: `Index::boxes_t`):
/// Σ_d gap_d², gap_d = max(lo_d − q_d, q_d − hi_d, 0), in f32, then shrunk by 10⁻⁵ relative
/// (the f32 sum is within 12·2⁻²⁴ of the exact one) and 10⁻³⁷ absolute (underflow); +∞ for an
/// empty cell.
#[inline(always)]
fn box_distances(bt: &[f32], q: &[f32; 9], out: &mut [f32]) {
    let n = out.len();
    out.fill(0.0);
    let (lo, hi) = bt.split_at(9 * n);
    for (d, (l, h)) in lo.chunks_exact(n).zip(hi.chunks_exact(n)).enumerate().take(9) {
        let qd = q[d];
        for ((o, a), b) in out.iter_mut().zip(l).zip(h) {
            let g = (a - qd).max(qd - b).max(0.0);
            *o += g * g;
        }
    }
    for o in out.iter_mut() {
        *o = (*o * (1.0 - 1e-5) - 1e-37).max(0.0);
    }
}

/// [`box_distances`] for one box (`ends`: 9 low ends, then 9 high ends), with the same margins.
#[inline(always)]
fn box_distance(ends: &[f32; 18], q: &[f32; 9]) -> f32 {
    let mut o = 0f32;
    for d in 0..9 {
        let g = (ends[d] - q[d]).max(q[d] - ends[9 + d]).max(0.0);
        o += g * g;
    }
    (o * (1.0 - 1e-5) - 1e-37).max(0.0)
}

/// [`box_distances`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn box_distances_avx2(bt: &[f32], q: &[f32; 9], out: &mut [f32]) {
    box_distances(bt, q, out)
}

/// [`box_distances`] compiled for AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn box_distances_avx512(bt: &[f32], q: &[f32; 9], out: &mut [f32]) {
    box_distances(bt, q, out)
}

/// Widens the box `[lo, hi]` (per value) to hold `code`.
fn widen(lo: &mut [i8; 9], hi: &mut [i8; 9], code: &[i8; 9]) {
    for ((l, h), v) in lo.iter_mut().zip(hi.iter_mut()).zip(code) {
        *l = (*l).min(*v);
        *h = (*h).max(*v);
    }
}

/// The largest f32 at most `x` (−∞ stays).
fn f32_down(x: f64) -> f32 {
    let y = x as f32;
    if f64::from(y) > x { y.next_down() } else { y }
}

/// The smallest f32 at least `x` (+∞ stays).
fn f32_up(x: f64) -> f32 {
    let y = x as f32;
    if f64::from(y) < x { y.next_up() } else { y }
}

/// [`centroid_distances`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn centroid_distances_avx2(ct: &[f32], q: &[f32; 9], out: &mut [f32]) {
    centroid_distances(ct, q, out)
}

/// [`group_distances`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn group_distances_avx2(codes: &[i8], cq: &CellQuery, keep: u64, out: &mut [f32; SKIP]) -> f32 {
    group_distances(codes, cq, keep, out)
}

/// [`centroid_distances`] compiled for AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn centroid_distances_avx512(ct: &[f32], q: &[f32; 9], out: &mut [f32]) {
    centroid_distances(ct, q, out)
}

/// [`group_distances`] compiled for AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn group_distances_avx512(codes: &[i8], cq: &CellQuery, keep: u64, out: &mut [f32; SKIP]) -> f32 {
    group_distances(codes, cq, keep, out)
}

/// A candidate by code distance.
#[derive(Debug, Clone, Copy)]
pub struct Approx {
    /// Code-estimated squared distance.
    pub d: f32,
    /// Filter id.
    pub id: u64,
    /// Bound on the distance between the filter and its reconstruction from the code
    /// (infinite for a code clamped at ±127): the true distance to q is at least
    /// (√d − eps)².
    pub eps: f32,
}

impl Approx {
    /// A lower bound of the exact squared distance (with slack for f32 rounding).
    pub fn lower_bound(&self) -> f64 {
        let r = f64::from(self.d).max(0.0).sqrt() * (1.0 - 1e-4) - f64::from(self.eps) * 1.0001;
        if r > 0.0 { r * r } else { 0.0 }
    }
}

impl PartialEq for Approx {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Approx {}
impl PartialOrd for Approx {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Approx {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.d.total_cmp(&o.d).then(self.id.cmp(&o.id))
    }
}

/// The best `m` candidates seen: offers are appended, and every time the buffer holds 4m
/// they are cut back to the m best by a selection (no per-offer heap sift; measured, the heap
/// was a fifth of an approximate query's walk). `worst` is the m-th best distance after the
/// last cut (+∞ before): an offer above it cannot be among the best.
struct Best {
    m: usize,
    buf: Vec<Approx>,
    worst: f32,
}

impl Best {
    fn new(m: usize) -> Best {
        Best { m: m.max(1), buf: Vec::with_capacity(4 * m.max(1)), worst: f32::INFINITY }
    }

    fn offer(&mut self, a: Approx) {
        self.buf.push(a);
        if self.buf.len() >= 4 * self.m {
            self.cut();
        }
    }

    fn cut(&mut self) {
        if self.buf.len() > self.m {
            self.buf.select_nth_unstable(self.m - 1);
            self.buf.truncate(self.m);
        }
        if self.buf.len() == self.m {
            self.worst = self.buf.iter().fold(f32::NEG_INFINITY, |w, a| w.max(a.d));
        }
    }

    /// The best m, by (distance, id).
    fn into_sorted(mut self) -> Vec<Approx> {
        self.cut();
        self.buf.sort_unstable();
        self.buf
    }
}

/// The in-memory index of one quantizer version.
#[derive(Debug)]
pub struct Index {
    /// The quantizer.
    pub quantizer: Quantizer,
    /// The cell centroids transposed: value d of centroid i at `d · nlist + i`.
    centroids_t: Vec<f32>,
    /// Each cell's box (see [`Quantizer::interval`]), transposed: the low end of value d of
    /// cell i at `d · nlist + i` (rounded down to f32), the high end at `(9 + d) · nlist + i`
    /// (rounded up); an empty cell's box is empty (+∞ low, −∞ high).
    boxes_t: Vec<f32>,
    /// Per cell: an upper bound of |f − centroid| over its unclamped members (0 while none).
    radius: Vec<f32>,
    /// Boxes of the clamped members: per cell, one per (first clamped value, sign), so that
    /// the open side of each box is shared by all its members: (cell, 9 low ends, then 9 high
    /// ends, rounded outwards to f32 as in `boxes_t`).
    clamped_boxes: Vec<(u32, [f32; 18])>,
    clamped_box_of: std::collections::HashMap<(u32, u8), u32>,
    lists: Vec<List>,
    /// Models whose entries are in the lists (deleted ones included until a rebuild).
    models: std::collections::HashSet<u64>,
    entries: u64,
    dead: u64,
    generation: u64,
    /// Bytes of the [`SelectionMasks`] made over this index and still held.
    mask_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What a probe did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeStats {
    /// Cells probed.
    pub cells: usize,
    /// Codes compared (entries in the selection).
    pub codes: u64,
}

impl Index {
    /// An empty index for a quantizer.
    pub fn new(quantizer: Quantizer) -> Index {
        let n = quantizer.nlist();
        let centroids_t = (0..9).flat_map(|d| quantizer.centroids.iter().map(move |c| c[d])).collect();
        let boxes_t = (0..18).flat_map(|h| std::iter::repeat_n(if h < 9 { f32::INFINITY } else { f32::NEG_INFINITY }, n)).collect();
        Index {
            quantizer,
            centroids_t,
            boxes_t,
            radius: vec![0.0; n],
            clamped_boxes: Vec::new(),
            clamped_box_of: Default::default(),
            lists: vec![List::default(); n],
            models: Default::default(),
            entries: 0,
            dead: 0,
            generation: 0,
            mask_bytes: Default::default(),
        }
    }

    /// Appends a segment. Segments must come in model-id order (ids ascend per list); one
    /// out of order is refused.
    pub fn add(&mut self, s: &Segment) -> Result<(), String> {
        if s.version != self.quantizer.version {
            return Err(format!(
                "segment of model {} has quantizer version {}, index has {}",
                s.model_id, s.version, self.quantizer.version
            ));
        }
        for (c, ids, codes) in &s.cells {
            let list = self
                .lists
                .get_mut(*c as usize)
                .ok_or_else(|| format!("segment of model {}: cell {c} out of range", s.model_id))?;
            if let (Some(l), Some(f)) = (list.last, ids.first())
                && *f <= l
            {
                return Err(format!("segment of model {} is out of id order", s.model_id));
            }
            for (id, code) in ids.iter().zip(codes) {
                list.push(*id, *code);
            }
            let (cell, c, nlist) = (*c, *c as usize, self.lists.len());
            let r = self.quantizer.radius(c, codes);
            self.radius[c] = self.radius[c].max(r);
            let (lo, hi) = (self.lists[c].lo, self.lists[c].hi);
            if lo[0] <= hi[0] {
                for d in 0..9 {
                    let (a, b) = self.quantizer.interval(c, d, lo[d], hi[d]);
                    self.boxes_t[d * nlist + c] = f32_down(a);
                    self.boxes_t[(9 + d) * nlist + c] = f32_up(b);
                }
            }
            for code in codes {
                let Some(d) = code.iter().position(|v| v.unsigned_abs() >= 127) else { continue };
                let key = (cell, d as u8 * 2 + u8::from(code[d] > 0));
                let at = *self.clamped_box_of.entry(key).or_insert_with(|| {
                    let mut empty = [f32::INFINITY; 18];
                    empty[9..].fill(f32::NEG_INFINITY);
                    self.clamped_boxes.push((cell, empty));
                    (self.clamped_boxes.len() - 1) as u32
                });
                let ends = &mut self.clamped_boxes[at as usize].1;
                for d in 0..9 {
                    let (lo, hi) = self.quantizer.interval(c, d, code[d], code[d]);
                    ends[d] = ends[d].min(f32_down(lo));
                    ends[9 + d] = ends[9 + d].max(f32_up(hi));
                }
            }
        }
        self.entries += s.len() as u64;
        self.models.insert(s.model_id);
        self.generation += 1;
        Ok(())
    }

    /// Releases spare capacity of the lists (after a bulk load).
    pub fn shrink(&mut self) {
        for l in &mut self.lists {
            l.deltas.shrink_to_fit();
            l.escapes.shrink_to_fit();
            l.skips.shrink_to_fit();
            l.codes.shrink_to_fit();
            l.tail.shrink_to_fit();
            l.clamped.shrink_to_fit();
        }
        self.clamped_boxes.shrink_to_fit();
        self.clamped_box_of.shrink_to_fit();
    }

    /// Marks a model's entries dead (they stay in the lists, never selected, until a rebuild).
    pub fn remove_model(&mut self, model_id: u64, n_filters: u64) {
        if self.models.remove(&model_id) {
            self.dead += n_filters;
        }
        self.generation += 1;
    }

    /// (quantizer version, change counter): what a cached plan over the index depends on.
    pub fn key(&self) -> (u32, u64) {
        (self.quantizer.version, self.generation)
    }

    /// Whether the model's filters are in the index.
    pub fn has_model(&self, model_id: u64) -> bool {
        self.models.contains(&model_id)
    }

    /// Live entries.
    pub fn live_entries(&self) -> u64 {
        self.entries - self.dead
    }

    /// Entries of deleted models still in the lists.
    pub fn dead_entries(&self) -> u64 {
        self.dead
    }

    /// Indexed models.
    pub fn n_models(&self) -> usize {
        self.models.len()
    }

    /// Bytes of the [`SelectionMasks`] held over the index (not in [`Index::bytes`]).
    pub fn mask_bytes(&self) -> u64 {
        self.mask_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Heap bytes held by the lists and the quantizer.
    pub fn bytes(&self) -> u64 {
        let q = (self.quantizer.coarse.len() + 2 * self.quantizer.centroids.len()) * 36 + (self.centroids_t.capacity() + self.boxes_t.capacity() + self.radius.capacity()) * 4;
        // The boxes of clamped codes, and their map entries (key, index, control byte).
        let clamped = self.clamped_boxes.capacity() * std::mem::size_of::<(u32, [f32; 18])>() + self.clamped_box_of.capacity() * 13;
        (self.lists.iter().map(List::bytes).sum::<usize>() + q + clamped + self.lists.len() * std::mem::size_of::<List>()) as u64
    }

    /// Empty masks for a selection over this index state (each list's resolved when a probe
    /// first opens it); all the masks held over the index are limited to one byte per entry
    /// (at least 1 MiB).
    pub fn masks(&self) -> SelectionMasks {
        self.masks_within(self.entries.max(1 << 20))
    }

    /// [`Index::masks`] with a limit of `limit` bytes for all the masks held over the index.
    fn masks_within(&self, limit: u64) -> SelectionMasks {
        SelectionMasks {
            lists: (0..self.lists.len()).map(|_| std::sync::OnceLock::new()).collect(),
            held: Default::default(),
            budget: self.mask_bytes.clone(),
            limit,
        }
    }

    /// What a probe takes of list `c`.
    fn list_sel<'a>(&'a self, c: usize, sel: Selected<'a>) -> ListSel<'a> {
        let mask = sel.masks.and_then(|m| m.list(c, &self.lists[c], sel.ranges));
        ListSel { ranges: sel.ranges, mask }
    }

    /// The `nprobe` cells nearest to each query (union, ascending); ties by lower cell.
    fn probe_cells(&self, qs: &[[f32; 9]], nprobe: usize, kernel: Kernel) -> Vec<usize> {
        let nlist = self.quantizer.nlist();
        let nprobe = nprobe.clamp(1, nlist);
        let mut cells = Vec::new();
        let mut d = vec![0f32; nlist];
        for q in qs {
            kernel.centroid_distances(&self.centroids_t, q, &mut d);
            if nprobe <= 64 {
                // A short sorted list of the best so far: most cells are farther than its last.
                let mut best: Vec<(f32, usize)> = Vec::with_capacity(nprobe + 1);
                // Distances are sums of squares of finite values: no NaN, so `<` orders them.
                // Sixteen at a time: once the list is full, a stretch whose smallest distance
                // is not below its last is skipped whole (a vectorised minimum; the threshold
                // only falls, so the skipped ones would each have been skipped too).
                for (c, stretch) in d.chunks(16).enumerate() {
                    if best.len() == nprobe
                        && let Some(w) = best.last()
                        && stretch.iter().fold(f32::INFINITY, |m, &x| if x < m { x } else { m }) >= w.0
                    {
                        continue;
                    }
                    for (j, &x) in stretch.iter().enumerate() {
                        if best.len() == nprobe && best.last().is_some_and(|w| x >= w.0) {
                            continue;
                        }
                        let at = best.partition_point(|b| b.0 <= x);
                        best.insert(at, (x, c * 16 + j));
                        best.truncate(nprobe);
                    }
                }
                cells.extend(best.into_iter().map(|b| b.1));
            } else {
                let mut v: Vec<(f32, usize)> = d.iter().copied().zip(0..).collect();
                if nprobe < nlist {
                    v.select_nth_unstable_by(nprobe - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    v.truncate(nprobe);
                }
                cells.extend(v.into_iter().map(|x| x.1));
            }
        }
        cells.sort_unstable();
        cells.dedup();
        cells
    }

    /// The `m` best candidates by code distance among the selected entries of the `nprobe`
    /// cells nearest to q (and to −q when `qs` has two).
    pub fn candidates(&self, qs: &[[f32; 9]], nprobe: usize, sel: Selected<'_>, m: usize) -> (Vec<Approx>, ProbeStats) {
        let kernel = Kernel::detect();
        let cells = self.probe_cells(qs, nprobe, kernel);
        let q = &self.quantizer;
        // Two passes over the probed lists: every code distance first, then the groups in
        // order of their nearest code, so the heap holds near candidates early and the walk
        // stops at the first group whose nearest code is beyond the worst kept — most groups'
        // ids are never decoded.
        let scan = |cells: &[usize]| -> (Best, u64) {
            PROBE_SCRATCH.with_borrow_mut(|(dists, groups)| {
                dists.clear();
                groups.clear();
                let mut eps = Vec::with_capacity(cells.len());
                let mut sels = Vec::with_capacity(cells.len());
                let mut codes = 0u64;
                for (slot, &c) in cells.iter().enumerate() {
                    let (cq, e) = q.cell_query(c, qs);
                    eps.push(e);
                    sels.push(self.list_sel(c, sel));
                    codes += self.lists[c].distances_in(sels[slot], &cq, kernel, slot as u32, dists, groups);
                }
                groups.sort_unstable_by(|a, b| a.min.total_cmp(&b.min));
                let mut best = Best::new(m);
                for gr in groups.iter() {
                    if gr.min > best.worst {
                        break;
                    }
                    let list = &self.lists[cells[gr.slot as usize]];
                    let eps = eps[gr.slot as usize];
                    let clamped = list.clamped_in(gr.group as usize);
                    let mut worst = best.worst;
                    list.visit(gr.group as usize, &dists[gr.dists as usize], sels[gr.slot as usize], 0, &mut worst, |id, i, d, worst| {
                        let eps = if clamped >> (i % SKIP) & 1 == 1 { f32::INFINITY } else { eps };
                        best.offer(Approx { d, id, eps });
                        *worst = best.worst;
                    });
                }
                if dists.capacity() > PROBE_SCRATCH_KEEP {
                    *dists = Vec::new();
                }
                (best, codes)
            })
        };
        let work: usize = cells.iter().map(|&c| self.lists[c].len()).sum();
        let (best, codes) = if work < 65_536 {
            // Small probes run on the calling thread: concurrent queries fill the cores.
            scan(&cells)
        } else {
            cells.par_chunks(cells.len().div_ceil(rayon::current_num_threads() * 4).max(1)).map(scan).reduce(
                || (Best::new(m), 0u64),
                |(mut b1, c1), (b2, c2)| {
                    for a in b2.buf {
                        b1.offer(a);
                    }
                    (b1, c1 + c2)
                },
            )
        };
        let v = best.into_sorted();
        (v, ProbeStats { cells: cells.len(), codes })
    }

    /// The exact search through the index: finds every entry of `ranges` that can be among the
    /// nearest to q (or −q when `qs` has two) and hands it to `rerank`, which computes its exact
    /// distance into the caller's top k and returns the k-th distance held so far (+∞ until k
    /// are held). Cells are opened in order of the lower bound of their box, entries re-ranked
    /// in order of their own lower bound (from the code distance and the cell's rounding bound,
    /// or from the code's box when clamped), whichever is smaller; the walk ends when no
    /// unopened cell and no waiting entry has a bound at or below the k-th distance. Every
    /// entry it does not re-rank is then provably farther than the k-th, so the caller's top
    /// k equals that of reading every entry — ties included, since an entry whose bound equals
    /// the k-th distance is still read.
    ///
    /// `Ok(None)`: the budget ran out first (the caller falls back to a scan).
    pub fn exact_walk<E>(
        &self,
        qs: &[[f32; 9]],
        sel: Selected<'_>,
        budget: WalkBudget,
        mut rerank: impl FnMut(u64) -> Result<f64, E>,
    ) -> Result<Option<WalkStats>, E> {
        use std::cmp::Reverse;
        let kernel = Kernel::detect();
        let q = &self.quantizer;
        let nlist = q.nlist();
        // A cell's bound: for its unclamped members the larger of their box's and their ball's
        // (|q − c| − radius)², for its clamped members the smallest of their boxes', each the
        // smaller over q and −q. The ball's: the f32 centroid distance is within 12·2⁻²⁴ of
        // the exact one, so 10⁻⁵ less is below it.
        let (mut bounds, mut boxed, mut ball) = (vec![f32::INFINITY; nlist], vec![0f32; nlist], vec![0f32; nlist]);
        let mut near = vec![f32::INFINITY; nlist];
        for qv in qs {
            kernel.box_distances(&self.boxes_t, qv, &mut boxed);
            kernel.centroid_distances(&self.centroids_t, qv, &mut ball);
            for ((((b, x), y), r), n) in bounds.iter_mut().zip(&boxed).zip(&ball).zip(&self.radius).zip(near.iter_mut()) {
                *n = n.min(*y);
                let gap = (f64::from(*y) * (1.0 - 1e-5)).sqrt() - f64::from(*r);
                let by_ball = if gap > 0.0 { f32_down(gap * gap * (1.0 - 1e-9)) } else { 0.0 };
                *b = b.min(x.max(by_ball));
            }
            for (c, ends) in &self.clamped_boxes {
                let b = &mut bounds[*c as usize];
                *b = b.min(box_distance(ends, qv));
            }
        }
        // Non-negative floats order as their bits do. Among cells of equal bound (many hold q
        // in their box) the one with the nearer centroid opens first.
        let mut cells: BinaryHeap<Reverse<(u32, u32, u32)>> = bounds
            .iter()
            .zip(&near)
            .enumerate()
            .filter(|(c, _)| self.lists[*c].len() > 0)
            .map(|(c, (b, n))| Reverse((b.to_bits(), n.to_bits(), c as u32)))
            .collect();
        let mut waiting: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
        let mut kth = f64::INFINITY;
        let mut stats = WalkStats::default();
        let (mut dists, mut groups) = (Vec::new(), Vec::new());
        loop {
            let next_cell = cells.peek().map_or(f64::INFINITY, |Reverse((b, ..))| f64::from(f32::from_bits(*b)));
            // Entries in bound order; before k are held, the best waiting ones regardless of
            // the cells still closed (out of order, but a finite k-th early keeps the walk
            // from queueing whole cells).
            while let Some(&Reverse((b, id))) = waiting.peek() {
                let lb = f64::from_bits(b);
                if (lb > next_cell && kth.is_finite()) || lb > kth {
                    break;
                }
                waiting.pop();
                if stats.reranked >= budget.reranks {
                    return Ok(None);
                }
                stats.reranked += 1;
                kth = rerank(id)?;
            }
            let next_entry = waiting.peek().map_or(f64::INFINITY, |Reverse((b, _))| f64::from_bits(*b));
            if next_cell.min(next_entry) > kth {
                break;
            }
            let Some(Reverse((_, _, c))) = cells.pop() else { break };
            let (c, list) = (c as usize, &self.lists[c as usize]);
            let (cq, eps) = q.cell_query(c, qs);
            dists.clear();
            groups.clear();
            stats.cells += 1;
            let lsel = self.list_sel(c, sel);
            stats.codes += list.distances_in(lsel, &cq, kernel, 0, &mut dists, &mut groups);
            if stats.codes > budget.codes {
                return Ok(None);
            }
            // An unclamped entry's bound (√d·(1 − 10⁻⁴) − 1.0001·eps)² is at most the k-th
            // distance only when d is at most this.
            let dmax = if kth.is_finite() {
                f32_up(((kth.sqrt() + f64::from(eps) * 1.0001) / (1.0 - 1e-4)).powi(2) * (1.0 + 1e-9))
            } else {
                f32::INFINITY
            };
            for gr in &groups {
                let clamped = list.clamped_in(gr.group as usize);
                if gr.min > dmax && clamped == 0 {
                    continue;
                }
                let mut worst = dmax;
                list.visit(gr.group as usize, &dists[gr.dists as usize], lsel, clamped, &mut worst, |id, i, d, _| {
                    let lb = if clamped >> (i % SKIP) & 1 == 1 {
                        let code = list.code(i);
                        qs.iter().map(|qv| q.box_lower_bound(c, &code, &code, qv)).fold(f64::INFINITY, f64::min)
                    } else {
                        Approx { d, id, eps }.lower_bound()
                    };
                    if lb <= kth {
                        waiting.push(Reverse((lb.to_bits(), id)));
                    }
                });
            }
        }
        Ok(Some(stats))
    }
}

/// Limits of [`Index::exact_walk`], past which a scan is cheaper.
#[derive(Debug, Clone, Copy)]
pub struct WalkBudget {
    /// Entries re-ranked (each is a read of the stored filter).
    pub reranks: u64,
    /// Codes compared.
    pub codes: u64,
}

/// What [`Index::exact_walk`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkStats {
    /// Cells opened.
    pub cells: usize,
    /// Codes compared.
    pub codes: u64,
    /// Entries re-ranked.
    pub reranked: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clustered(n: usize, seed: u64) -> Vec<[f32; 9]> {
        let mut r = XorShift(seed);
        let mut u = move || (r.next() >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
        let centres: Vec<[f32; 9]> = (0..50).map(|_| std::array::from_fn(|_| u() * 4.0)).collect();
        (0..n)
            .map(|i| {
                let c = &centres[i % centres.len()];
                std::array::from_fn(|d| c[d] + u() * 0.2)
            })
            .collect()
    }

    #[test]
    fn the_vectorised_cell_assignment_equals_the_one_at_a_time_one() {
        // Skewed like trained kernels: most filters crowd around a few centres, so a few
        // coarse clusters get most of the fine cells; plus points far from everything.
        let mut pts = clustered(30_000, 5);
        for (i, p) in pts.iter_mut().enumerate() {
            if i % 3 != 0 {
                *p = p.map(|v| v * 0.01);
            }
        }
        let q = Quantizer::train(1, &pts, pts.len() as u64);
        let t = q.transposed();
        let mut scratch = Vec::new();
        let mut r = XorShift(99);
        let far: Vec<[f32; 9]> = (0..2000).map(|_| std::array::from_fn(|_| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e3)).collect();
        for kernel in Kernel::available() {
            for &p in pts.iter().chain(&far).chain(&q.centroids) {
                assert_eq!(q.cell_in(&p, &t, kernel, &mut scratch), q.cell(&p), "{p:?} {kernel:?}");
            }
        }
    }

    #[test]
    fn list_ids_round_trip_through_deltas_and_one_and_three_word_escapes() {
        // Gaps on both sides of every width boundary (u16 delta, one-word escape, full id),
        // entries landing on group starts, ids near the top of u64, and an id below its
        // predecessor.
        let gaps = [1u64, 65_535, 65_536, 1 << 20, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, 1 << 40, 3];
        let mut ids = vec![0u64];
        for i in 0..700 {
            ids.push(ids[ids.len() - 1] + gaps[i % gaps.len()] + (i as u64 % 7));
        }
        ids.extend([u64::MAX - 5, u64::MAX, 17, 17, 1 << 33]);
        for start in [0usize, 1, 63, 64, 65] {
            let mut l = List::default();
            for &id in &ids[start..] {
                l.push(id, [0; 9]);
            }
            let mut got = Vec::new();
            let mut out = [0u64; SKIP];
            for g in 0..l.len().div_ceil(SKIP) {
                let n = l.group_ids(g, &mut out);
                got.extend_from_slice(&out[..n]);
            }
            assert_eq!(got, ids[start..], "from entry {start}");
        }
        // One word per escape that fits: 300 entries with gaps of 2¹⁶ hold 300 words.
        let mut l = List::default();
        for i in 0..300u64 {
            l.push(1 + i * 65_536, [0; 9]);
        }
        assert_eq!(l.escapes.len(), 300);
    }

    #[test]
    fn list_walk_visits_exactly_the_ids_in_the_ranges() {
        let mut l = List::default();
        // Gaps small and large (escapes), ids from 0.
        let ids: Vec<u64> = (0..1000u64).map(|i| i * i * 37 + i).collect();
        for &id in &ids {
            l.push(id, [id as i8; 9]);
        }
        let ranges = [(0, 1), (500, 90_000), (1_000_000, 1_000_001), (5_000_000, 20_000_000), (36_000_000, u64::MAX)];
        let cq = CellQuery { ts: [[0.0; 9]; 2], n: 1, w: [1.0; 9] };
        // Both passes, groups in list order, every distance accepted.
        // Walked by the ranges, and by the selection's mask (the same entries as bits).
        let walk_within = |ranges: &[(u64, u64)], masked: bool, kernel: Kernel, mut worst: f32| {
            let mask = l.selection_mask(ranges);
            let sel = ListSel { ranges, mask: masked.then_some(&mask[..]) };
            let (mut dists, mut groups) = (Vec::new(), Vec::new());
            let computed = l.distances_in(sel, &cq, kernel, 0, &mut dists, &mut groups);
            let mut got = Vec::new();
            for gr in &groups {
                let bits = if masked { mask[gr.group as usize] } else { u64::MAX };
                assert_ne!(bits, 0, "a group without a selected entry was computed");
                // With the mask, the group's minimum is its selected entries'.
                let min = dists[gr.dists as usize].iter().enumerate().filter(|(j, _)| bits >> j & 1 == 1).fold(f32::INFINITY, |m, (_, v)| m.min(*v));
                assert_eq!(gr.min, min);
                l.visit(gr.group as usize, &dists[gr.dists as usize], sel, 0, &mut worst, |id, i, d, _| {
                    let code = l.code(i);
                    assert_eq!(code[0], id as i8);
                    assert_eq!(d, 9.0 * f32::from(code[0]) * f32::from(code[0]));
                    got.push(id);
                });
            }
            (got, computed)
        };
        let want: Vec<u64> =
            ids.iter().copied().filter(|id| ranges.iter().any(|r| *id >= r.0 && *id < r.1)).collect();
        // A range inside one group, one ending on a group boundary, ranges past the last id.
        let (g3, g4) = (ids[3 * SKIP], ids[4 * SKIP]);
        let edges = [(ids[70] + 1, ids[75]), (g3, g4), (ids[999] + 1, u64::MAX)];
        let want_edges: Vec<u64> = ids.iter().copied().filter(|id| edges.iter().any(|r| *id >= r.0 && *id < r.1)).collect();
        assert_eq!(want_edges.len(), 4 + SKIP);
        for kernel in Kernel::available() {
            for masked in [false, true] {
                let walk = |ranges: &[(u64, u64)]| walk_within(ranges, masked, kernel, f32::INFINITY);
                assert_eq!(walk(&ranges).0, want);
                assert_eq!(walk(&[(0, u64::MAX)]).0, ids);
                let (got, computed) = walk(&edges);
                assert_eq!(got, want_edges);
                if masked {
                    // Only the selected entries are counted, and only their groups computed.
                    assert_eq!(computed, want_edges.len() as u64);
                }
                assert!(walk(&[]).0.is_empty());
            }
        }
        // The mask of a range set: bit j of group g set exactly for the ids in the ranges.
        let mask = l.selection_mask(&ranges);
        assert_eq!(mask.len(), 1000usize.div_ceil(SKIP));
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(mask[i / SKIP] >> (i % SKIP) & 1 == 1, want.contains(id), "entry {i}, id {id}");
        }
        assert_eq!(mask[1000 / SKIP] >> (1000 % SKIP), 0, "bits past the last entry");
        // A bound on the distance skips the entries beyond it.
        for masked in [false, true] {
            let (near, computed) = walk_within(&[(0, u64::MAX)], masked, Kernel::detect(), 9.0 * 10.0 * 10.0);
            assert_eq!(near, ids.iter().copied().filter(|id| (*id as i8).unsigned_abs() <= 10).collect::<Vec<_>>());
            assert_eq!(computed, 1000);
        }
    }

    #[test]
    fn cells_grow_with_the_square_root_of_the_store_between_4096_and_16384() {
        // Cells a store gets: its sample size (never more than the store) split per level.
        let cells = |total: u64| per_level(train_sample_size(total).min(total) as usize).pow(2);
        assert_eq!(cells(100_000), 39 * 39, "a small store: 64 sample filters per cell");
        assert_eq!(cells(1_000_000), 4096);
        assert_eq!(cells(10_000_000), 4096, "1.3·√1e7 = 4111 → 64 per level");
        assert_eq!(cells(20_000_000), 76 * 76, "1.3·√2e7 = 5814");
        assert_eq!(cells(100_000_000), 114 * 114, "1.3·√1e8 = 13000");
        assert_eq!(cells(1_460_000_000), 128 * 128, "the CNN Filter DB release: the cap");
        let mut last = 0;
        for t in (0..40).map(|i| 10f64.powf(5.0 + i as f64 * 0.1) as u64) {
            let c = cells(t);
            assert!(c >= last && c <= 16384, "{t} filters: {c} cells after {last}");
            last = c;
        }
    }

    #[test]
    fn codes_reconstruct_within_the_cell_scale_and_records_round_trip() {
        let pts = clustered(20_000, 3);
        let q = Quantizer::train(1, &pts, pts.len() as u64);
        assert!(q.nlist() >= 64, "{}", q.nlist());
        for p in pts.iter().take(2000) {
            let c = q.cell(p);
            let code = q.code(p, c);
            for d in 0..9 {
                let back = q.centroids[c][d] + f32::from(code[d]) / 127.0 * q.scale[c][d];
                assert!((back - p[d]).abs() <= q.scale[c][d] / 127.0 * 0.51 + 1e-6, "dim {d}");
            }
        }
        assert_eq!(Quantizer::decode(&q.encode()).unwrap(), q);
        let flat: Vec<f32> = pts.iter().flatten().copied().collect();
        let s = Segment::build(&q, 7, &[(100, &flat[..900]), (5000, &flat[900..])]);
        assert_eq!(s.len(), 20_000);
        assert_eq!(Segment::decode(&s.encode(), q.nlist()).unwrap(), s);
    }

    #[test]
    fn every_kernel_build_gives_the_portable_values_bit_for_bit() {
        let mut r = XorShift(4242);
        let mut r2 = XorShift(77);
        let mut f = |scale: f32| (r.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 * scale - scale;
        let kernels = Kernel::available();
        for round in 0..200 {
            // Group distances: random codes, one or two queries, weights of many magnitudes.
            let codes: Vec<i8> = (0..9 * SKIP).map(|_| f(128.0) as i8).collect();
            let n = 1 + round % 2;
            let cq = CellQuery { ts: [std::array::from_fn(|_| f(300.0)), std::array::from_fn(|_| f(300.0))], n, w: std::array::from_fn(|d| f(1.0).abs() * 10f32.powi(d as i32 - 4)) };
            // Centroids (transposed) and boxes of an odd count, so every build has a tail.
            let cells = 37 + round;
            let ct: Vec<f32> = (0..9 * cells).map(|_| f(2.0)).collect();
            let bt: Vec<f32> = (0..18 * cells).map(|i| if i < 9 * cells { f(1.0) - 1.0 } else { f(1.0) + 1.0 }).collect();
            let q: [f32; 9] = std::array::from_fn(|_| f(2.5));
            // Every entry kept, or a random set (the masking of unselected entries).
            let keep = if round % 3 == 0 { u64::MAX } else { r2.next() & r2.next() };
            let run = |k: Kernel| {
                let mut g = [0f32; SKIP];
                let min = k.group(&codes, &cq, keep, &mut g);
                assert!(g.iter().enumerate().all(|(j, x)| keep >> j & 1 == 1 || x.is_infinite()));
                assert_eq!(min, g.iter().fold(f32::INFINITY, |m, x| m.min(*x)));
                let (mut c, mut b) = (vec![0f32; cells], vec![0f32; cells]);
                k.centroid_distances(&ct, &q, &mut c);
                k.box_distances(&bt, &q, &mut b);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                (min.to_bits(), bits(&g), bits(&c), bits(&b))
            };
            let want = run(Kernel::Portable);
            for &k in &kernels {
                assert_eq!(run(k), want, "round {round}, {k:?}");
            }
        }
    }

    #[test]
    fn probed_cells_are_the_nearest_centroids_ties_by_lower_cell() {
        let pts = clustered(20_000, 9);
        let q = Quantizer::train(1, &pts, pts.len() as u64);
        let idx = Index::new(q.clone());
        let mut r = XorShift(77);
        for t in 0..40 {
            // Some queries sit exactly on a centroid (a tie at distance 0 with any duplicate).
            let query: [f32; 9] = if t % 4 == 0 { q.centroids[t * 7 % q.nlist()] } else { std::array::from_fn(|_| (r.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0) };
            let mut all: Vec<(f32, usize)> = q.centroids.iter().enumerate().map(|(i, c)| (d2(&query, c), i)).collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for np in [1, 2, 7, 64, 65, 300] {
                let mut want: Vec<usize> = all.iter().take(np).map(|x| x.1).collect();
                want.sort_unstable();
                for kernel in Kernel::available() {
                    assert_eq!(idx.probe_cells(&[query], np, kernel), want, "query {t}, nprobe {np}, {kernel:?}");
                }
            }
        }
    }

    /// The exact walk against brute force: the same k nearest (ties by lower id) over random
    /// queries, selections, q and −q, with duplicated points (ties) and points far outside the
    /// training sample (clamped codes); and far fewer stored filters read than a scan reads.
    #[test]
    fn the_exact_walk_equals_brute_force_ties_and_clamped_codes_included() {
        let mut pts = clustered(30_000, 11);
        let q = Quantizer::train(1, &pts[..20_000], 20_000);
        // Exact duplicates at other ids (ties), and outliers beyond every cell's trained range.
        for i in 0..2_000 {
            pts.push(pts[i * 7]);
        }
        let mut r = XorShift(5);
        for _ in 0..500 {
            pts.push(std::array::from_fn(|_| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0));
        }
        let flat: Vec<f32> = pts.iter().flatten().copied().collect();
        let mut idx = Index::new(q.clone());
        idx.add(&Segment::build(&q, 0, &[(0, &flat[..15_000 * 9]), (15_000, &flat[15_000 * 9..])])).unwrap();
        let clamped: u32 = idx.lists.iter().map(|l| l.clamped.iter().map(|m| m.count_ones()).sum::<u32>()).sum();
        assert!(clamped >= 400, "only {clamped} clamped codes: the test would not cover them");
        // The exact scan's distance: f64, summed in order.
        let dist = |f: &[f32; 9], qv: &[f32; 9]| (0..9).fold(0f64, |a, d| a + (f64::from(f[d]) - f64::from(qv[d])).powi(2));
        let n = pts.len() as u64;
        let selections: [&[(u64, u64)]; 3] = [&[(0, n)], &[(100, 5_000), (12_000, 12_010), (29_000, n)], &[(3, 4), (31_000, 31_500)]];
        let mut read_total = 0u64;
        for t in 0..60 {
            let query: [f32; 9] = if t % 5 == 0 { pts[t * 131] } else { std::array::from_fn(|_| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0) };
            let qs: Vec<[f32; 9]> = if t % 3 == 0 { vec![query, query.map(|v| -v)] } else { vec![query] };
            let d_of = |id: u64| qs.iter().map(|qv| dist(&pts[id as usize], qv)).fold(f64::INFINITY, f64::min);
            for (si, ranges) in selections.iter().enumerate() {
                let masks = idx.masks();
                for k in [1usize, 10, 100] {
                    // By the ranges alone, or with the selection's masks (odd queries, and k = 10).
                    let sel = Selected { ranges, masks: (t % 2 == 1 || k == 10).then_some(&masks) };
                    let mut want: Vec<(f64, u64)> = ranges.iter().flat_map(|r| r.0..r.1).map(|id| (d_of(id), id)).collect();
                    want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    want.truncate(k);
                    let mut top: Vec<(f64, u64)> = Vec::new();
                    let mut read = std::collections::HashSet::new();
                    let stats = idx
                        .exact_walk(&qs, sel, WalkBudget { reranks: u64::MAX, codes: u64::MAX }, |id| -> Result<f64, ()> {
                            assert!(ranges.iter().any(|r| (r.0..r.1).contains(&id)), "id {id} outside the selection");
                            assert!(read.insert(id), "id {id} re-ranked twice");
                            top.push((d_of(id), id));
                            top.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                            top.truncate(k);
                            Ok(if top.len() == k { top[k - 1].0 } else { f64::INFINITY })
                        })
                        .unwrap()
                        .unwrap();
                    assert_eq!(top, want, "query {t}, selection {si}, k {k}");
                    assert_eq!(stats.reranked, read.len() as u64);
                    read_total += stats.reranked;
                }
            }
        }
        // A scan reads every selected filter: 60 queries × (32,500 + 6,430 + 501) × 3 values of k.
        assert!(read_total < 60 * 39_431 * 3 / 20, "the walk read {read_total} filters");
        // A budget that runs out says so.
        let none = idx.exact_walk(&[pts[0]], Selected::ranges(&[(0, n)]), WalkBudget { reranks: 3, codes: u64::MAX }, |_| -> Result<f64, ()> { Ok(f64::INFINITY) }).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn the_best_buffer_keeps_the_m_smallest_by_distance_then_id() {
        let mut r = XorShift(3);
        for m in [1, 7, 40] {
            let mut best = Best::new(m);
            let mut all = Vec::new();
            for id in 0..1000u64 {
                // Few distinct distances: many ties, decided by the id.
                let a = Approx { d: (r.next() % 50) as f32, id, eps: 0.0 };
                all.push(a);
                best.offer(a);
                // Pruning above `worst` is safe: m seen so far are at or below it.
                assert!(best.worst.is_infinite() || all.iter().filter(|x| x.d <= best.worst).count() >= m);
            }
            all.sort_unstable();
            all.truncate(m);
            let got = best.into_sorted();
            assert_eq!(got.iter().map(|a| (a.d, a.id)).collect::<Vec<_>>(), all.iter().map(|a| (a.d, a.id)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn probing_every_cell_finds_the_true_nearest_among_the_candidates() {
        let pts = clustered(30_000, 5);
        let q = Quantizer::train(1, &pts, pts.len() as u64);
        let flat: Vec<f32> = pts.iter().flatten().copied().collect();
        let mut idx = Index::new(q.clone());
        idx.add(&Segment::build(&q, 0, &[(0, &flat)])).unwrap();
        let query = [0.1f32, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.2, -0.3];
        let ranges = [(1000, 20_000)];
        let (cands, stats) = idx.candidates(&[query], q.nlist(), Selected::ranges(&ranges), 50);
        // Whole groups are computed: the selected 19,000 and at most a group each side per list.
        assert!((19_000..=19_000 + 2 * SKIP as u64 * q.nlist() as u64).contains(&stats.codes), "{}", stats.codes);
        let mut exact: Vec<(f32, u64)> =
            (1000..20_000u64).map(|i| (d2(&pts[i as usize], &query), i)).collect();
        exact.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let got: std::collections::HashSet<u64> = cands.iter().map(|a| a.id).collect();
        for (_, id) in exact.iter().take(10) {
            assert!(got.contains(id), "true neighbour {id} missing from the candidates");
        }
        assert!(cands.iter().all(|a| (1000..20_000).contains(&a.id)));
    }

    /// A probe with the selection's masks returns what the probe by ranges returns, the same
    /// candidates in the same order, while computing only selected entries; lists past the
    /// masks' budget are walked by their ranges, and dropped masks give their bytes back.
    #[test]
    fn selection_masks_give_the_candidates_of_the_ranges_within_their_budget() {
        let pts = clustered(40_000, 9);
        let q = Quantizer::train(1, &pts[..20_000], 20_000);
        let flat: Vec<f32> = pts.iter().flatten().copied().collect();
        let mut idx = Index::new(q.clone());
        // Four "models" of 10,000 filters, ids with a gap between them.
        for m in 0..4u64 {
            let part = &flat[(m * 10_000 * 9) as usize..((m + 1) * 10_000 * 9) as usize];
            idx.add(&Segment::build(&q, m, &[(m * 20_000, part)])).unwrap();
        }
        let id_of = |i: usize| (i / 10_000 * 20_000 + i % 10_000) as u64;
        // A tenth of the ids in runs of 50, a run inside one model, and everything.
        let tenth: Vec<(u64, u64)> = (0..4u64).flat_map(|m| (0..20u64).map(move |r| (m * 20_000 + r * 500, m * 20_000 + r * 500 + 50))).collect();
        let selections: [&[(u64, u64)]; 3] = [&tenth, &[(20_100, 27_000)], &[(0, u64::MAX)]];
        let mut r = XorShift(13);
        for ranges in selections {
            let selected = (0..pts.len()).filter(|&i| ranges.iter().any(|x| (x.0..x.1).contains(&id_of(i)))).count() as u64;
            for limit in [u64::MAX, 3_000] {
                let masks = idx.masks_within(limit);
                for t in 0..30 {
                    let query: [f32; 9] = if t % 3 == 0 { pts[t * 977] } else { std::array::from_fn(|_| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0) };
                    let qs: Vec<[f32; 9]> = if t % 4 == 0 { vec![query, query.map(|v| -v)] } else { vec![query] };
                    for nprobe in [1, 5, q.nlist()] {
                        let (plain, ps) = idx.candidates(&qs, nprobe, Selected::ranges(ranges), 40);
                        let (masked, ms) = idx.candidates(&qs, nprobe, Selected { ranges, masks: Some(&masks) }, 40);
                        let key = |v: &[Approx]| v.iter().map(|a| (a.d.to_bits(), a.id, a.eps.to_bits())).collect::<Vec<_>>();
                        assert_eq!(key(&masked), key(&plain), "query {t}, nprobe {nprobe}");
                        assert!(masked.iter().all(|a| ranges.iter().any(|x| (x.0..x.1).contains(&a.id))));
                        assert!(ms.codes <= ps.codes);
                        if nprobe == q.nlist() && limit == u64::MAX {
                            // Every list opened: exactly the selected entries were computed.
                            assert_eq!(ms.codes, selected);
                        }
                    }
                }
                assert!(masks.bytes() > 0 && masks.bytes() <= limit);
                assert_eq!(idx.mask_bytes.load(std::sync::atomic::Ordering::Relaxed), masks.bytes());
                if limit != u64::MAX {
                    assert!(masks.lists.iter().any(|m| m.get().is_some_and(|m| m.is_none())), "the budget never ran out");
                }
            }
            assert_eq!(idx.mask_bytes.load(std::sync::atomic::Ordering::Relaxed), 0, "dropped masks keep their bytes");
        }
    }
}
