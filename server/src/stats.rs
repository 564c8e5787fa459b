//! Per-layer statistics kept at ingest. They are additive over layers, so any selection's
//! mean and covariance follow from merged sums without touching the filters again.

use serde::{Deserialize, Serialize};

/// Additive statistics of a set of raw 3x3 filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Number of filters.
    pub n: u64,
    /// Σf (9 values), accumulated in f64.
    pub sum: Vec<f64>,
    /// Σffᵀ (81 values, row-major 9x9), accumulated in f64.
    pub sum_outer: Vec<f64>,
    /// max |w| over all values.
    pub abs_max: f64,
}

impl Default for LayerStats {
    fn default() -> Self {
        LayerStats { n: 0, sum: vec![0.0; 9], sum_outer: vec![0.0; 81], abs_max: 0.0 }
    }
}

impl LayerStats {
    /// Statistics of `filters` (9 values per filter; a trailing partial filter is ignored).
    pub fn of(filters: &[f32]) -> Self {
        let mut s = LayerStats::default();
        let mut sum = [0f64; 9];
        let mut outer = [0f64; 81];
        let mut abs_max = 0f64;
        for f in filters.chunks_exact(9) {
            let mut x = [0f64; 9];
            for (xi, v) in x.iter_mut().zip(f) {
                *xi = f64::from(*v);
                abs_max = abs_max.max(xi.abs());
            }
            for i in 0..9 {
                sum[i] += x[i];
                for j in i..9 {
                    outer[i * 9 + j] += x[i] * x[j];
                }
            }
        }
        for i in 0..9 {
            for j in 0..i {
                outer[i * 9 + j] = outer[j * 9 + i];
            }
        }
        s.n = (filters.len() / 9) as u64;
        s.sum = sum.to_vec();
        s.sum_outer = outer.to_vec();
        s.abs_max = abs_max;
        s
    }

    /// Adds another set's statistics (exact: sums are additive).
    pub fn merge(&mut self, o: &LayerStats) {
        self.n += o.n;
        for (a, b) in self.sum.iter_mut().zip(&o.sum) {
            *a += b;
        }
        for (a, b) in self.sum_outer.iter_mut().zip(&o.sum_outer) {
            *a += b;
        }
        self.abs_max = self.abs_max.max(o.abs_max);
    }

    /// Mean filter.
    pub fn mean(&self) -> [f64; 9] {
        let mut m = [0f64; 9];
        if self.n > 0 {
            for (mi, s) in m.iter_mut().zip(&self.sum) {
                *mi = s / self.n as f64;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    }
}
