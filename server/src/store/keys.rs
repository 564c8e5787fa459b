//! The storage layout: column families and key encodings, in one place.
//!
//! Schema version 2 (see `migrations/`). All integers in keys are big-endian so that RocksDB's
//! byte order is numeric order; values are JSON records (`records.rs`) except filter blocks.
//!
//! | column family    | key                                   | value                               |
//! |------------------|---------------------------------------|-------------------------------------|
//! | `meta`           | `schema_version`                      | u32 LE                              |
//! |                  | `next_ids`                            | JSON [`NextIds`](super::records::NextIds) |
//! |                  | `pending/` model_id                   | JSON pending ingest (crash cleanup) |
//! | `models`         | model_id                              | JSON `ModelRecord`                  |
//! | `model_names`    | model name (UTF-8)                    | model_id                            |
//! | `content_hashes` | SHA-256 of the checkpoint (32 bytes)  | model_id                            |
//! | `layers`         | layer_id                              | JSON `LayerRecord`                  |
//! | `layer_stats`    | layer_id                              | JSON `LayerStats`                   |
//! | `filter_blocks`  | layer_id, block index (u32)           | ≤ [`BLOCK_FILTERS`] filters, 9 f32 LE each |
//! | `filter_index`   | first filter_id of a layer            | layer_id                            |
//! | `meta_index`     | field tag (u8), canonical key, 0x00, model_id | empty                       |
//! | `bases`          | basis version (u32)                   | JSON `BasisRecord` (pinned reference bases) |
//! | `layer_histograms` | basis version (u32), layer_id       | JSON `LayerHistogram` (9 × bins counts) |
//! | `jobs`           | source name, 0x00, item               | JSON `JobRecord` (scheduled ingestion) |
//! | `search_index`   | `cur`                                 | u32 LE: quantizer version answers use |
//! |                  | `q`, version (u32)                    | quantizer (binary, `ann::Quantizer`) |
//! |                  | `s`, version (u32), model_id          | the model's codes (binary, `ann::Segment`) |
//!
//! A layer's filters are stored contiguously in blocks of [`BLOCK_FILTERS`]; filter `k` of the
//! layer is in block `k / BLOCK_FILTERS` at offset `(k % BLOCK_FILTERS) * 36` bytes.

/// Column family names, in creation order.
pub const CF_META: &str = "meta";
/// Model records.
pub const CF_MODELS: &str = "models";
/// Unique name index.
pub const CF_MODEL_NAMES: &str = "model_names";
/// Content-hash index (idempotent ingest).
pub const CF_CONTENT_HASHES: &str = "content_hashes";
/// Layer records.
pub const CF_LAYERS: &str = "layers";
/// Per-layer statistics.
pub const CF_LAYER_STATS: &str = "layer_stats";
/// Layer-contiguous filter blocks.
pub const CF_FILTER_BLOCKS: &str = "filter_blocks";
/// filter_id → layer lookup.
pub const CF_FILTER_INDEX: &str = "filter_index";
/// Meta-value → model index.
pub const CF_META_INDEX: &str = "meta_index";

/// Pinned reference bases by version.
pub const CF_BASES: &str = "bases";
/// Per-layer coefficient histograms by (basis version, layer).
pub const CF_LAYER_HISTOGRAMS: &str = "layer_histograms";

/// Scheduled-ingestion job state.
pub const CF_JOBS: &str = "jobs";

/// Approximate search index (schema version 2).
pub const CF_SEARCH_INDEX: &str = "search_index";

/// All column families (schema version 2).
pub const ALL_CFS: &[&str] = &[
    CF_META,
    CF_MODELS,
    CF_MODEL_NAMES,
    CF_CONTENT_HASHES,
    CF_LAYERS,
    CF_LAYER_STATS,
    CF_FILTER_BLOCKS,
    CF_FILTER_INDEX,
    CF_META_INDEX,
    CF_BASES,
    CF_LAYER_HISTOGRAMS,
    CF_JOBS,
    CF_SEARCH_INDEX,
];

/// `search_index` key of the current quantizer version.
pub const SEARCH_CURRENT_KEY: &[u8] = b"cur";

/// `search_index` key of a quantizer.
pub fn quantizer_key(version: u32) -> [u8; 5] {
    let mut k = [b'q'; 5];
    k[1..].copy_from_slice(&version.to_be_bytes());
    k
}

/// `search_index` key of a model's segment.
pub fn segment_key(version: u32, model_id: u64) -> [u8; 13] {
    let mut k = [b's'; 13];
    k[1..5].copy_from_slice(&version.to_be_bytes());
    k[5..].copy_from_slice(&model_id.to_be_bytes());
    k
}

/// Key of a job record.
pub fn job_key(source: &str, item: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(source.len() + item.len() + 1);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(item.as_bytes());
    k
}

/// `meta` key naming the basis version answers use.
pub const CURRENT_BASIS_KEY: &[u8] = b"current_basis";

/// Key of a basis record.
pub fn basis_key(version: u32) -> [u8; 4] {
    version.to_be_bytes()
}

/// Key of a layer's histogram under a basis version.
pub fn histogram_key(version: u32, layer_id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&version.to_be_bytes());
    k[4..].copy_from_slice(&layer_id.to_be_bytes());
    k
}

/// `meta` key holding the schema version.
pub const SCHEMA_VERSION_KEY: &[u8] = b"schema_version";
/// `meta` key holding the id counters.
pub const NEXT_IDS_KEY: &[u8] = b"next_ids";
/// Prefix of `meta` keys marking an ingest whose filter blocks were written before its commit.
pub const PENDING_PREFIX: &[u8] = b"pending/";

/// Filters per block: 4096 × 36 B = 144 KiB values, a good RocksDB value size.
pub const BLOCK_FILTERS: u64 = 4096;
/// Bytes per stored filter.
pub const FILTER_BYTES: usize = 9 * 4;

/// An id as a big-endian key.
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Decodes an 8-byte big-endian id.
pub fn decode_id(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// Key of block `block` of layer `layer_id`.
pub fn block_key(layer_id: u64, block: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&layer_id.to_be_bytes());
    k[8..].copy_from_slice(&block.to_be_bytes());
    k
}

/// Pending-ingest marker key for a model id.
pub fn pending_key(model_id: u64) -> Vec<u8> {
    let mut k = PENDING_PREFIX.to_vec();
    k.extend_from_slice(&model_id.to_be_bytes());
    k
}

/// Field tags used in `meta_index` keys.
pub mod field_tag {
    /// Training dataset.
    pub const TRAINING_DATASET: u8 = 1;
    /// Pretraining dataset.
    pub const PRETRAINING_DATASET: u8 = 2;
    /// Task.
    pub const TASK: u8 = 3;
    /// Architecture family.
    pub const ARCHITECTURE: u8 = 4;
    /// Visual category.
    pub const VISUAL_CATEGORY: u8 = 5;
    /// Tag.
    pub const TAG: u8 = 6;
}

/// Key of a `meta_index` entry.
pub fn meta_index_key(tag: u8, canonical: &str, model_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(canonical.len() + 10);
    k.push(tag);
    k.extend_from_slice(canonical.as_bytes());
    k.push(0);
    k.extend_from_slice(&model_id.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically() {
        assert!(id_key(255) < id_key(256));
        assert!(block_key(1, u32::MAX) < block_key(2, 0));
        assert!(block_key(7, 1) < block_key(7, 2));
        assert_eq!(decode_id(&id_key(123_456_789)), Some(123_456_789));
        assert_eq!(decode_id(&[1, 2]), None);
        let k = meta_index_key(field_tag::TASK, "Classification", 9);
        assert_eq!(k[0], 3);
        assert_eq!(&k[k.len() - 8..], &9u64.to_be_bytes());
    }
}
