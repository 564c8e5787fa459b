//! Numbered schema upgrade steps (see README.md beside this file).

use rocksdb::{DB, WriteBatch};

mod m0001_initial;
mod m0002_search_index;

/// Schema version this build reads and writes.
pub const CURRENT_VERSION: u32 = 2;

/// One upgrade step from `to - 1` to `to`.
pub struct Step {
    /// Version after the step.
    pub to: u32,
    /// Short name.
    pub name: &'static str,
    /// Adds the step's writes to `batch` (committed atomically with the version bump).
    pub apply: fn(&DB, &mut WriteBatch) -> Result<(), String>,
}

/// All steps in order.
pub const STEPS: &[Step] = &[
    Step { to: 1, name: "initial layout", apply: m0001_initial::apply },
    Step { to: 2, name: "approximate search index", apply: m0002_search_index::apply },
];
