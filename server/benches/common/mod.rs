//! Helpers shared by the bench binaries (each includes this file with `mod common;`).
#![allow(dead_code)] // every bench uses a different subset

use std::path::Path;

/// Deterministic xorshift64 generator (benches need reproducible data, not crypto).
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Approximately standard normal (Irwin-Hall of 4, rescaled).
    pub fn normal(&mut self) -> f32 {
        let s = self.unit() + self.unit() + self.unit() + self.unit();
        (s - 2.0) * 3.0f32.sqrt()
    }
}

/// A kB field of /proc/self/status, e.g. "VmHWM:" (peak RSS).
pub fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Bytes of all files below `p` (a file's own size if `p` is a file).
pub fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Waits (at most 10 minutes) until RocksDB runs no flush or compaction and has none pending
/// in the filter-block CF, so timed queries do not share the cores with background work after
/// a bulk load. Returns the seconds waited.
#[allow(dead_code)] // not every bench uses it
pub fn settle(engine: &filterdb::engine::Engine) -> anyhow::Result<f64> {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(600) {
        let db = engine.store().db();
        let busy = db.property_int_value("rocksdb.num-running-compactions")?.unwrap_or(0)
            + db.property_int_value("rocksdb.num-running-flushes")?.unwrap_or(0)
            + match db.cf_handle(filterdb::store::keys::CF_FILTER_BLOCKS) {
                Some(cf) => db.property_int_value_cf(cf, "rocksdb.compaction-pending")?.unwrap_or(0),
                None => 0,
            };
        if busy == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(t.elapsed().as_secs_f64())
}
