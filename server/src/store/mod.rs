//! RocksDB behind a small interface: open with schema checks and migrations, atomic commits of
//! whole models, deletes, and reads of records and filter blocks. Nothing above this module
//! knows a key encoding.

pub mod keys;
pub mod records;
mod view;

pub use view::BlockView;

#[path = "../../../migrations/mod.rs"]
pub mod migrations;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};

use crate::stats::LayerStats;
use keys::*;
use records::*;

/// Storage errors. The API maps them to INTERNAL (or FAILED_PRECONDITION for schema issues).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The directory was written by a newer FilterDB.
    #[error(
        "data directory {dir} has schema version {found}, but this FilterDB build understands versions up to {supported}; use a newer FilterDB (downgrades are not supported)"
    )]
    NewerSchema {
        /// Directory.
        dir: String,
        /// Stored version.
        found: u32,
        /// Version of this build.
        supported: u32,
    },
    /// A stored record does not decode.
    #[error("corrupt record in `{cf}`: {detail}")]
    Corrupt {
        /// Column family.
        cf: &'static str,
        /// What failed.
        detail: String,
    },
    /// A file next to the database (a block SST being built) could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// A migration step failed.
    #[error("migration to schema version {to} ({name}) failed: {detail}")]
    Migration {
        /// Target version.
        to: u32,
        /// Step name.
        name: &'static str,
        /// What failed.
        detail: String,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The open database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    dir: PathBuf,
    /// Block bytes from which a model's blocks are ingested as an SST file.
    sst_min_bytes: usize,
}

/// Block bytes from which a model's filter blocks are ingested as an SST file rather than put
/// in its write batch (the file costs a few fsyncs; a batch costs a WAL copy, a memtable copy,
/// a flush and compactions per byte).
pub const SST_MIN_BYTES: usize = 4 << 20;

/// Folder inside the database folder where block SST files are built.
const SST_STAGING: &str = "sst-staging";

/// Everything needed to rebuild the in-memory catalogue at startup.
pub struct Loaded {
    /// Models by id order.
    pub models: Vec<ModelRecord>,
    /// Layers by id order, with statistics.
    pub layers: Vec<StoredLayer>,
    /// Counters.
    pub next_ids: NextIds,
}

/// Target size of the filter-block CF's SST data blocks. A filter block (one value, up to
/// 147 KiB) is never split, so this matters for the many small layers: 4 KiB (RocksDB's
/// default) gave a search scan one data-block load per small layer; 256 KiB packs dozens of
/// them into one (measured, together with the read options of [`Store::filter_cursor`]: exact
/// scan of 1e7 filters 46 → 29–31 ms).
const FILTER_DATA_BLOCK_BYTES: usize = 256 << 10;

fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    if name == CF_FILTER_BLOCKS {
        // Trained float32 weights barely compress (their mantissas are noise), and search reads
        // single filters out of blocks: stored uncompressed and read through mmap, a point read
        // touches the 36 bytes it needs instead of decompressing a 144 KiB block.
        o.set_compression_type(rocksdb::DBCompressionType::None);
        o.set_bottommost_compression_type(rocksdb::DBCompressionType::None);
        // Point reads (search re-ranking) skip files that do not hold the key.
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_bloom_filter(10.0, false);
        t.set_block_size(FILTER_DATA_BLOCK_BYTES);
        // Every key a restart point: a seek inside a large data block (search re-ranking)
        // binary-searches the keys instead of walking up to 16 values of ~10 KiB each. Costs
        // 4 bytes per value.
        t.set_block_restart_interval(1);
        o.set_block_based_table_factory(&t);
    } else {
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
    }
    o
}

impl Store {
    /// Opens (creating if needed) the database in `dir`, checks the schema version and runs
    /// pending migrations; then removes blocks of ingests that crashed before their commit.
    pub fn open(dir: &Path) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_allow_mmap_reads(true);
        let cfs = ALL_CFS.iter().map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n)));
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let store = Store { db: Arc::new(db), dir: dir.to_path_buf(), sst_min_bytes: SST_MIN_BYTES };
        // SST files of ingests that never reached their ingestion.
        let _ = std::fs::remove_dir_all(store.sst_staging_dir());
        store.check_schema()?;
        store.cleanup_pending()?;
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying database (for snapshots and checkpoints).
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or(StoreError::Corrupt { cf: name, detail: "column family missing".into() })
    }

    /// The stored schema version, if any.
    pub fn schema_version(&self) -> Result<Option<u32>> {
        let v = self.db.get_cf(self.cf(CF_META)?, SCHEMA_VERSION_KEY)?;
        match v {
            None => Ok(None),
            Some(b) => {
                let arr: [u8; 4] = b.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    cf: CF_META,
                    detail: format!("schema_version has {} bytes, expected 4", b.len()),
                })?;
                Ok(Some(u32::from_le_bytes(arr)))
            }
        }
    }

    fn check_schema(&self) -> Result<()> {
        let found = self.schema_version()?.unwrap_or(0);
        let current = migrations::CURRENT_VERSION;
        if found > current {
            return Err(StoreError::NewerSchema { dir: self.dir.display().to_string(), found, supported: current });
        }
        for step in migrations::STEPS.iter().filter(|s| s.to > found && s.to <= current) {
            let mut batch = WriteBatch::default();
            (step.apply)(&self.db, &mut batch).map_err(|detail| StoreError::Migration {
                to: step.to,
                name: step.name,
                detail,
            })?;
            batch.put_cf(self.cf(CF_META)?, SCHEMA_VERSION_KEY, step.to.to_le_bytes());
            self.db.write_opt(batch, &sync_write())?;
            tracing::info!(to = step.to, name = step.name, "applied schema migration");
        }
        Ok(())
    }

    /// Deletes filter blocks left by ingests that never committed (crash between the block
    /// writes and the commit batch).
    fn cleanup_pending(&self) -> Result<()> {
        let meta = self.cf(CF_META)?;
        let mut stale = Vec::new();
        for item in self.db.iterator_cf(meta, IteratorMode::From(PENDING_PREFIX, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(PENDING_PREFIX) {
                break;
            }
            let p: PendingIngest = decode(CF_META, &v)?;
            stale.push((k.to_vec(), p));
        }
        for (k, p) in stale {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(
                self.cf(CF_FILTER_BLOCKS)?,
                block_key(p.first_layer_id, 0),
                block_key(p.end_layer_id, 0),
            );
            batch.delete_cf(meta, &k);
            self.db.write_opt(batch, &sync_write())?;
            tracing::warn!(first_layer_id = p.first_layer_id, "removed blocks of an ingest that did not commit");
        }
        Ok(())
    }

    /// Loads every model, layer and statistic (startup).
    pub fn load_all(&self) -> Result<Loaded> {
        let mut models = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_MODELS)?, IteratorMode::Start) {
            let (_, v) = item?;
            models.push(decode::<ModelRecord>(CF_MODELS, &v)?);
        }
        let stats_cf = self.cf(CF_LAYER_STATS)?;
        let mut layers = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS)?, IteratorMode::Start) {
            let (k, v) = item?;
            let record: LayerRecord = decode(CF_LAYERS, &v)?;
            let stats = match self.db.get_cf(stats_cf, &k)? {
                Some(s) => decode::<LayerStats>(CF_LAYER_STATS, &s)?,
                None => {
                    return Err(StoreError::Corrupt {
                        cf: CF_LAYER_STATS,
                        detail: format!("layer {} has no statistics", record.layer_id),
                    });
                }
            };
            layers.push(StoredLayer { record, stats });
        }
        let next_ids = match self.db.get_cf(self.cf(CF_META)?, NEXT_IDS_KEY)? {
            Some(v) => decode(CF_META, &v)?,
            None => NextIds::default(),
        };
        Ok(Loaded { models, layers, next_ids })
    }

    /// Stores a whole model atomically: after this returns, the model survives a crash, and
    /// before it, no part of it is visible. The filter blocks of a model of at least
    /// [`SST_MIN_BYTES`] are written as one SST file and ingested into the LSM tree (written
    /// once: no WAL, memtable, flush or compaction) under a pending marker, and the final
    /// synced batch makes them visible; smaller models put their blocks in that batch.
    /// `replaces` is deleted in the same final batch.
    pub fn commit_model(
        &self,
        model: &ModelRecord,
        layers: &[(LayerRecord, LayerStats, &[f32])],
        next_ids: NextIds,
        replaces: Option<(&ModelRecord, &[LayerRecord])>,
        histograms: &[(u32, u64, LayerHistogram)],
        segment: Option<(u32, &[u8])>,
    ) -> Result<()> {
        let blocks_cf = self.cf(CF_FILTER_BLOCKS)?;
        let total_bytes: usize = layers.iter().map(|(_, _, f)| f.len() * 4).sum();
        let mut batch = WriteBatch::default();
        let ahead = total_bytes >= self.sst_min_bytes;
        let pending = pending_key(model.model_id);
        if ahead {
            self.ingest_blocks(model, layers, &pending)?;
        } else {
            let mut buf = Vec::new();
            for (rec, _, filters) in layers {
                for (bi, chunk) in filters.chunks(BLOCK_FILTERS as usize * 9).enumerate() {
                    batch.put_cf(
                        blocks_cf,
                        block_key(rec.layer_id, bi as u32),
                        block_bytes(chunk, &mut buf),
                    );
                }
            }
        }
        if let Some((old, old_layers)) = replaces {
            self.delete_into(&mut batch, old, old_layers)?;
        }
        let id = id_key(model.model_id);
        batch.put_cf(self.cf(CF_MODELS)?, id, encode(model));
        batch.put_cf(self.cf(CF_MODEL_NAMES)?, model.name.as_bytes(), id);
        let hash = hex::decode(&model.content_sha256)
            .map_err(|e| StoreError::Corrupt { cf: CF_CONTENT_HASHES, detail: e.to_string() })?;
        batch.put_cf(self.cf(CF_CONTENT_HASHES)?, &hash, id);
        for (rec, stats, _) in layers {
            let lk = id_key(rec.layer_id);
            batch.put_cf(self.cf(CF_LAYERS)?, lk, encode(rec));
            batch.put_cf(self.cf(CF_LAYER_STATS)?, lk, encode(stats));
            batch.put_cf(self.cf(CF_FILTER_INDEX)?, id_key(rec.first_filter_id), lk);
        }
        for k in meta_index_keys(model) {
            batch.put_cf(self.cf(CF_META_INDEX)?, k, b"");
        }
        for (version, layer_id, h) in histograms {
            batch.put_cf(self.cf(CF_LAYER_HISTOGRAMS)?, histogram_key(*version, *layer_id), encode(h));
        }
        if let Some((version, bytes)) = segment {
            batch.put_cf(self.cf(CF_SEARCH_INDEX)?, segment_key(version, model.model_id), bytes);
        }
        batch.put_cf(self.cf(CF_META)?, NEXT_IDS_KEY, encode(&next_ids));
        if ahead {
            batch.delete_cf(self.cf(CF_META)?, &pending);
        }
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Writes a model's filter blocks into an SST file, marks them pending (synced), and
    /// ingests the file. Until the model's final batch deletes the marker, a restart removes
    /// the blocks again ([`Store::cleanup_pending`]).
    fn ingest_blocks(
        &self,
        model: &ModelRecord,
        layers: &[(LayerRecord, LayerStats, &[f32])],
        pending: &[u8],
    ) -> Result<()> {
        let staging = self.sst_staging_dir();
        std::fs::create_dir_all(&staging).map_err(|e| io_error(&staging, e))?;
        let path = staging.join(format!("blocks-{}-{}.sst", model.model_id, std::process::id()));
        let result = (|| {
            // Keys must be added in order: layers by id, blocks by index.
            let mut order: Vec<usize> = (0..layers.len()).collect();
            order.sort_by_key(|&i| layers[i].0.layer_id);
            // The column family's own settings: uncompressed blocks with bloom filters, so
            // search re-ranking reads single filters through mmap from these files too.
            let o = cf_options(CF_FILTER_BLOCKS);
            let mut w = rocksdb::SstFileWriter::create(&o);
            w.open(&path)?;
            let mut buf = Vec::new();
            for i in order {
                let (rec, _, filters) = &layers[i];
                for (bi, chunk) in filters.chunks(BLOCK_FILTERS as usize * 9).enumerate() {
                    w.put(block_key(rec.layer_id, bi as u32), block_bytes(chunk, &mut buf))?;
                }
            }
            w.finish()?;
            let p = PendingIngest {
                first_layer_id: model.first_layer_id,
                end_layer_id: model.first_layer_id + u64::from(model.n_layers),
            };
            let mut marker = WriteBatch::default();
            marker.put_cf(self.cf(CF_META)?, pending, encode(&p));
            self.db.write_opt(marker, &sync_write())?;
            let mut io = rocksdb::IngestExternalFileOptions::default();
            io.set_move_files(true);
            self.db.ingest_external_file_cf_opts(self.cf(CF_FILTER_BLOCKS)?, &io, vec![&path])?;
            Ok(())
        })();
        // Moved files are hard links: the staging name goes either way.
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Where SST files are built before ingestion: inside the database folder, so that the
    /// ingestion is a hard link (same filesystem) and a restart finds leftovers.
    fn sst_staging_dir(&self) -> PathBuf {
        self.dir.join(SST_STAGING)
    }

    fn delete_into(&self, batch: &mut WriteBatch, model: &ModelRecord, layers: &[LayerRecord]) -> Result<()> {
        batch.delete_cf(self.cf(CF_MODELS)?, id_key(model.model_id));
        batch.delete_cf(self.cf(CF_MODEL_NAMES)?, model.name.as_bytes());
        if let Ok(hash) = hex::decode(&model.content_sha256) {
            batch.delete_cf(self.cf(CF_CONTENT_HASHES)?, &hash);
        }
        for l in layers {
            batch.delete_cf(self.cf(CF_LAYERS)?, id_key(l.layer_id));
            batch.delete_cf(self.cf(CF_LAYER_STATS)?, id_key(l.layer_id));
            batch.delete_cf(self.cf(CF_FILTER_INDEX)?, id_key(l.first_filter_id));
        }
        let end = model.first_layer_id + u64::from(model.n_layers);
        batch.delete_range_cf(self.cf(CF_FILTER_BLOCKS)?, block_key(model.first_layer_id, 0), block_key(end, 0));
        for k in meta_index_keys(model) {
            batch.delete_cf(self.cf(CF_META_INDEX)?, k);
        }
        for version in self.basis_versions()? {
            batch.delete_range_cf(
                self.cf(CF_LAYER_HISTOGRAMS)?,
                histogram_key(version, model.first_layer_id),
                histogram_key(version, end),
            );
        }
        for version in self.quantizer_versions()? {
            batch.delete_cf(self.cf(CF_SEARCH_INDEX)?, segment_key(version, model.model_id));
        }
        Ok(())
    }

    /// Versions of every stored quantizer (the current one, and one being built).
    pub fn quantizer_versions(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let cf = self.cf(CF_SEARCH_INDEX)?;
        for item in self.db.iterator_cf(cf, IteratorMode::From(b"q", Direction::Forward)) {
            let (k, _) = item?;
            if k.first() != Some(&b'q') {
                break;
            }
            if let Some(v) = k.get(1..5).and_then(|b| b.try_into().ok()) {
                out.push(u32::from_be_bytes(v));
            }
        }
        Ok(out)
    }

    /// The current search-index version, if an index was ever built.
    pub fn search_index_version(&self) -> Result<Option<u32>> {
        match self.db.get_cf(self.cf(CF_SEARCH_INDEX)?, SEARCH_CURRENT_KEY)? {
            None => Ok(None),
            Some(b) => {
                let a: [u8; 4] = b.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    cf: CF_SEARCH_INDEX,
                    detail: format!("`cur` has {} bytes, expected 4", b.len()),
                })?;
                Ok(Some(u32::from_le_bytes(a)))
            }
        }
    }

    /// A stored quantizer record.
    pub fn get_quantizer(&self, version: u32) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_SEARCH_INDEX)?, quantizer_key(version))?)
    }

    /// Every segment record of a quantizer version, in model-id order.
    pub fn segments(&self, version: u32, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let cf = self.cf(CF_SEARCH_INDEX)?;
        let from = segment_key(version, 0);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(segment_key(version + 1, 0).to_vec());
        for item in self.db.iterator_cf_opt(cf, ro, IteratorMode::From(&from, Direction::Forward)) {
            let (k, v) = item?;
            let id = k.get(5..13).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(|| {
                StoreError::Corrupt { cf: CF_SEARCH_INDEX, detail: "short segment key".into() }
            })?;
            f(id, &v)?;
        }
        Ok(())
    }

    /// Stores a quantizer being built (not yet current).
    pub fn put_quantizer(&self, version: u32, bytes: &[u8]) -> Result<()> {
        self.db.put_cf_opt(self.cf(CF_SEARCH_INDEX)?, quantizer_key(version), bytes, &sync_write())?;
        Ok(())
    }

    /// Stores segments of a version in one synced batch. A segment whose model is no longer
    /// stored (deleted meanwhile) is skipped: the caller holds the write lock or re-checks.
    pub fn put_segments(&self, version: u32, segments: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_SEARCH_INDEX)?;
        for (model_id, bytes) in segments {
            batch.put_cf(cf, segment_key(version, *model_id), bytes);
        }
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Makes `version` current and deletes every other version's records, atomically.
    pub fn switch_search_index(&self, version: u32) -> Result<()> {
        let cf = self.cf(CF_SEARCH_INDEX)?;
        let mut batch = WriteBatch::default();
        for v in self.quantizer_versions()? {
            if v != version {
                batch.delete_cf(cf, quantizer_key(v));
                batch.delete_range_cf(cf, segment_key(v, 0), segment_key(v + 1, 0));
            }
        }
        batch.put_cf(cf, SEARCH_CURRENT_KEY, version.to_le_bytes());
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Deletes one segment record.
    pub fn delete_segment(&self, version: u32, model_id: u64) -> Result<()> {
        self.db.delete_cf_opt(self.cf(CF_SEARCH_INDEX)?, segment_key(version, model_id), &sync_write())?;
        Ok(())
    }

    /// Reads single filters of a layer by index within the layer, from a consistent view: each
    /// block is fetched once however many of its filters are asked for. (A point read copies
    /// its whole block — measured, 147 KiB per call — so hot paths read through a
    /// [`FilterCursor`] instead.)
    /// `idx` must be sorted ascending; returns the filters in that order.
    pub fn read_filters_at(&self, snapshot: Option<&rocksdb::Snapshot<'_>>, layer: &LayerRecord, idx: &[u64]) -> Result<Vec<[f32; 9]>> {
        let cf = self.cf(CF_FILTER_BLOCKS)?;
        let mut ro = ReadOptions::default();
        if let Some(s) = snapshot {
            ro.set_snapshot(s);
        }
        let mut out = Vec::with_capacity(idx.len());
        let mut i = 0;
        while i < idx.len() {
            let block = idx[i] / BLOCK_FILTERS;
            let v = self.db.get_pinned_cf_opt(cf, block_key(layer.layer_id, block as u32), &ro)?.ok_or_else(|| {
                StoreError::Corrupt { cf: CF_FILTER_BLOCKS, detail: format!("layer {} block {block} missing", layer.layer_id) }
            })?;
            while i < idx.len() && idx[i] / BLOCK_FILTERS == block {
                let off = (idx[i] % BLOCK_FILTERS) as usize * FILTER_BYTES;
                let b = v.get(off..off + FILTER_BYTES).ok_or_else(|| StoreError::Corrupt {
                    cf: CF_FILTER_BLOCKS,
                    detail: format!("layer {} block {block} holds no filter {}", layer.layer_id, idx[i]),
                })?;
                let mut f = [0f32; 9];
                for (x, c) in f.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                out.push(f);
                i += 1;
            }
        }
        Ok(out)
    }

    /// Versions of every stored basis record.
    pub fn basis_versions(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_BASES)?, IteratorMode::Start) {
            let (k, _) = item?;
            if let Ok(b) = <[u8; 4]>::try_from(&k[..]) {
                out.push(u32::from_be_bytes(b));
            }
        }
        Ok(out)
    }

    /// Writes (or overwrites) a basis record.
    pub fn put_basis(&self, b: &BasisRecord) -> Result<()> {
        self.db.put_cf_opt(self.cf(CF_BASES)?, basis_key(b.version), encode(b), &sync_write())?;
        Ok(())
    }

    /// Writes a batch of layer histograms of one basis version.
    pub fn put_histograms(&self, version: u32, rows: &[(u64, LayerHistogram)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (layer_id, h) in rows {
            batch.put_cf(self.cf(CF_LAYER_HISTOGRAMS)?, histogram_key(version, *layer_id), encode(h));
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Marks a basis ready and makes it the one answers use, atomically; older versions and
    /// their histograms are removed.
    pub fn make_current_basis(&self, b: &BasisRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        for v in self.basis_versions()? {
            if v != b.version {
                batch.delete_cf(self.cf(CF_BASES)?, basis_key(v));
                batch.delete_range_cf(self.cf(CF_LAYER_HISTOGRAMS)?, histogram_key(v, 0), histogram_key(v + 1, 0));
            }
        }
        batch.put_cf(self.cf(CF_BASES)?, basis_key(b.version), encode(b));
        batch.put_cf(self.cf(CF_META)?, CURRENT_BASIS_KEY, b.version.to_le_bytes());
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Removes an unfinished basis version (a pinning that failed or was interrupted).
    pub fn drop_basis(&self, version: u32) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_BASES)?, basis_key(version));
        batch.delete_range_cf(self.cf(CF_LAYER_HISTOGRAMS)?, histogram_key(version, 0), histogram_key(version + 1, 0));
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// The current basis and all its layer histograms, if a basis was pinned. Unfinished
    /// versions (a crash during pinning) are removed.
    pub fn load_current_basis(&self) -> Result<Option<(BasisRecord, std::collections::HashMap<u64, LayerHistogram>)>> {
        let current = match self.db.get_cf(self.cf(CF_META)?, CURRENT_BASIS_KEY)? {
            Some(v) => Some(u32::from_le_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                cf: CF_META,
                detail: "current_basis is not 4 bytes".into(),
            })?)),
            None => None,
        };
        for v in self.basis_versions()? {
            if Some(v) != current {
                self.drop_basis(v)?;
            }
        }
        let Some(version) = current else { return Ok(None) };
        let Some(raw) = self.db.get_cf(self.cf(CF_BASES)?, basis_key(version))? else {
            return Err(StoreError::Corrupt { cf: CF_BASES, detail: format!("current basis {version} missing") });
        };
        let record: BasisRecord = decode(CF_BASES, &raw)?;
        let mut hists = std::collections::HashMap::new();
        let from = histogram_key(version, 0);
        for item in self.db.iterator_cf(self.cf(CF_LAYER_HISTOGRAMS)?, IteratorMode::From(&from, Direction::Forward)) {
            let (k, v) = item?;
            if k.len() != 12 || k[..4] != version.to_be_bytes() {
                break;
            }
            let layer = decode_id(&k[4..]).unwrap_or(0);
            hists.insert(layer, decode::<LayerHistogram>(CF_LAYER_HISTOGRAMS, &v)?);
        }
        Ok(Some((record, hists)))
    }

    /// Deletes a model with all its layers, blocks, statistics and index entries, atomically.
    pub fn delete_model(&self, model: &ModelRecord, layers: &[LayerRecord]) -> Result<()> {
        let mut batch = WriteBatch::default();
        self.delete_into(&mut batch, model, layers)?;
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Replaces a model record (labels or name changed), keeping indexes in step.
    pub fn update_model(&self, old: &ModelRecord, new: &ModelRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        for k in meta_index_keys(old) {
            batch.delete_cf(self.cf(CF_META_INDEX)?, k);
        }
        if old.name != new.name {
            batch.delete_cf(self.cf(CF_MODEL_NAMES)?, old.name.as_bytes());
        }
        let id = id_key(new.model_id);
        batch.put_cf(self.cf(CF_MODEL_NAMES)?, new.name.as_bytes(), id);
        batch.put_cf(self.cf(CF_MODELS)?, id, encode(new));
        for k in meta_index_keys(new) {
            batch.put_cf(self.cf(CF_META_INDEX)?, k, b"");
        }
        self.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// Reads filters `[start, end)` (indices within the layer) of a layer, as f32 values,
    /// from a consistent view.
    pub fn read_layer_filters(
        &self,
        snapshot: Option<&rocksdb::Snapshot<'_>>,
        layer: &LayerRecord,
        start: u64,
        end: u64,
    ) -> Result<Vec<f32>> {
        let end = end.min(layer.n_filters);
        let mut out = Vec::with_capacity((end.saturating_sub(start) * 9) as usize);
        self.for_each_filter_run(snapshot, layer, start, end, |_, bytes| {
            out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        })?;
        Ok(out)
    }

    /// Calls `f(first, bytes)` for the filters `[start, end)` of a layer, one run per stored
    /// block, in order (see [`FilterCursor::for_each_run`]).
    pub fn for_each_filter_run(
        &self,
        snapshot: Option<&rocksdb::Snapshot<'_>>,
        layer: &LayerRecord,
        start: u64,
        end: u64,
        f: impl FnMut(u64, &[u8]),
    ) -> Result<()> {
        self.filter_cursor(snapshot, None, BlockCheck::Verify)?.for_each_run(layer, start, end, f)
    }

    /// A cursor over the filter blocks of a consistent view, for reading many layers (or parts)
    /// in key order with one RocksDB iterator: a read that continues where the last ended needs
    /// no seek. `until` bounds the iteration (exclusive: layer id, block) when known.
    pub fn filter_cursor<'a>(
        &'a self,
        snapshot: Option<&'a rocksdb::Snapshot<'a>>,
        until: Option<(u64, u32)>,
        check: BlockCheck,
    ) -> Result<FilterCursor<'a>> {
        let cf = self.cf(CF_FILTER_BLOCKS)?;
        let mut ro = ReadOptions::default();
        if let Some(s) = snapshot {
            ro.set_snapshot(s);
        }
        ro.set_verify_checksums(check == BlockCheck::Verify);
        // Search reads leave the block cache alone: the CF is read through mmap, uncompressed,
        // so a block is read in place; filling the cache made every block a scan touched a
        // cache insert (allocation, eviction of the rest), about a tenth of the scan's CPU.
        ro.fill_cache(check == BlockCheck::Verify);
        if let Some((layer, block)) = until {
            ro.set_iterate_upper_bound(block_key(layer, block).to_vec());
        }
        Ok(FilterCursor { it: self.db.raw_iterator_cf_opt(cf, ro), sequential: true, view: None, view_reads: 0, _snapshot: snapshot })
    }

    /// Writes a scheduled-ingestion job record (synced: job state must survive a crash).
    pub fn put_job(&self, source: &str, item: &str, value: &[u8]) -> Result<()> {
        self.db.put_cf_opt(self.cf(CF_JOBS)?, job_key(source, item), value, &sync_write())?;
        Ok(())
    }

    /// Reads a job record.
    pub fn get_job(&self, source: &str, item: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_JOBS)?, job_key(source, item))?)
    }

    /// Every job record of a source (or of all sources when `source` is None), raw JSON.
    pub fn list_jobs(&self, source: Option<&str>) -> Result<Vec<Vec<u8>>> {
        let prefix = source.map(|s| job_key(s, "")).unwrap_or_default();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_JOBS)?, IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(v.to_vec());
        }
        Ok(out)
    }

    /// Flushes memtables (used at shutdown, so restarts need no WAL replay).
    pub fn flush(&self) -> Result<()> {
        for name in ALL_CFS {
            self.db.flush_cf(self.cf(name)?)?;
        }
        Ok(())
    }
}

/// Whether a read of filter blocks verifies each block's checksum.
///
/// RocksDB checksums every block it reads (XXH3 over the block). A filter block is one value
/// of up to 4,096 filters (147 KiB), so a nearest-neighbour scan spent a quarter of its CPU
/// re-hashing blocks it had hashed on the previous query, and a re-ranking read hashed 147 KiB
/// to use 36 bytes. Search reads therefore use [`BlockCheck::Trusted`]; everything that hands
/// data out of the database or derives stored state from it (exports, snapshots, restores,
/// analytics scans, index builds) verifies, and so does every compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockCheck {
    /// Verify each block read (RocksDB's default).
    Verify,
    /// Skip the per-read verification (search hot paths).
    Trusted,
}

/// A forward cursor over stored filter blocks (see [`Store::filter_cursor`]).
pub struct FilterCursor<'a> {
    it: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
    /// Step past a run's last block (the next read usually starts there); off for point reads.
    sequential: bool,
    /// Runs whose blocks it holds are read from here (see [`FilterCursor::with_view`]).
    view: Option<Arc<BlockView>>,
    view_reads: u64,
    _snapshot: Option<&'a rocksdb::Snapshot<'a>>,
}

impl FilterCursor<'_> {
    /// For reads at scattered places (search re-ranking): the cursor stays on the block a run
    /// ended in instead of stepping to the next entry, which could load a data block nobody
    /// reads; the next run seeks, unless it starts in that same block.
    pub fn point_reads(mut self) -> Self {
        self.sequential = false;
        self
    }

    /// Runs whose blocks `view` holds are read from it (no iterator step or seek; see
    /// [`BlockView`]); the others through the cursor.
    pub fn with_view(mut self, view: Option<Arc<BlockView>>) -> Self {
        self.view = view;
        self
    }

    /// Filters read from the block view so far.
    pub fn view_reads(&self) -> u64 {
        self.view_reads
    }

    /// Calls `f(first, bytes)` for the filters `[start, end)` of a layer, one run per stored
    /// block, in order: `bytes` holds the run's filters (36 bytes each, 9 f32 LE) starting at
    /// index `first` of the layer, borrowed from RocksDB without a copy (the filter-block CF
    /// reads through mmap, uncompressed). Errors when a block is missing or short. Seeks only
    /// when the cursor is not already on the first block wanted.
    pub fn for_each_run(&mut self, layer: impl Into<LayerSpan>, start: u64, end: u64, mut f: impl FnMut(u64, &[u8])) -> Result<()> {
        let layer = layer.into();
        let end = end.min(layer.n_filters);
        if start >= end {
            return Ok(());
        }
        if let Some(v) = &self.view
            && v.for_each_run(layer, start, end, &mut f)
        {
            self.view_reads += end - start;
            return Ok(());
        }
        let first_block = (start / BLOCK_FILTERS) as u32;
        let last_block = ((end - 1) / BLOCK_FILTERS) as u32;
        let missing = |block: u32| StoreError::Corrupt {
            cf: CF_FILTER_BLOCKS,
            detail: format!("layer {} block {block} missing or malformed", layer.layer_id),
        };
        let want = block_key(layer.layer_id, first_block);
        if self.it.key() != Some(&want[..]) {
            self.it.seek(want);
        }
        let mut done = start;
        for expected in first_block..=last_block {
            let (Some(k), Some(v)) = (self.it.key(), self.it.value()) else {
                self.it.status()?;
                return Err(missing(expected));
            };
            if k != block_key(layer.layer_id, expected) || v.len() % FILTER_BYTES != 0 {
                return Err(missing(expected));
            }
            let block_start = u64::from(expected) * BLOCK_FILTERS;
            let n_in_block = (v.len() / FILTER_BYTES) as u64;
            let hi = (end - block_start).min(n_in_block);
            if block_start + hi < end.min(block_start + BLOCK_FILTERS) {
                return Err(missing(expected));
            }
            let lo = done - block_start;
            f(done, &v[lo as usize * FILTER_BYTES..hi as usize * FILTER_BYTES]);
            done = block_start + hi;
            if expected < last_block || self.sequential {
                self.it.next();
            }
        }
        if done != end {
            return Err(StoreError::Corrupt {
                cf: CF_FILTER_BLOCKS,
                detail: format!("layer {} holds fewer filters than its record says", layer.layer_id),
            });
        }
        Ok(())
    }
}

/// Filter values as stored (f32 little-endian, in order): the values themselves on a
/// little-endian machine (no copy), else encoded into `buf`.
fn block_bytes<'a>(values: &'a [f32], buf: &'a mut Vec<u8>) -> &'a [u8] {
    #[cfg(target_endian = "little")]
    {
        let _ = buf;
        bytemuck::cast_slice(values)
    }
    #[cfg(not(target_endian = "little"))]
    {
        buf.clear();
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf
    }
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io { path: path.display().to_string(), source }
}

fn sync_write() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Records are plain data (no maps with non-string keys), so serialisation cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(cf: &'static str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt { cf, detail: e.to_string() })
}

fn meta_index_keys(m: &ModelRecord) -> Vec<Vec<u8>> {
    use crate::vocab::key;
    let mut out = Vec::new();
    for d in &m.meta.training_datasets {
        out.push(meta_index_key(field_tag::TRAINING_DATASET, &key(&d.canonical), m.model_id));
    }
    for d in &m.meta.pretraining_datasets {
        out.push(meta_index_key(field_tag::PRETRAINING_DATASET, &key(&d.canonical), m.model_id));
    }
    out.push(meta_index_key(field_tag::TASK, &key(&m.meta.task.canonical), m.model_id));
    out.push(meta_index_key(field_tag::ARCHITECTURE, &key(&m.meta.architecture.canonical), m.model_id));
    out.push(meta_index_key(field_tag::VISUAL_CATEGORY, &key(&m.meta.visual_category.canonical), m.model_id));
    for t in &m.meta.tags {
        out.push(meta_index_key(field_tag::TAG, &key(t), m.model_id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: u64, first_layer: u64, first_filter: u64, n_layers: u32) -> ModelRecord {
        let label = crate::vocab::Label { raw: "x".into(), canonical: "x".into(), known: false };
        ModelRecord {
            model_id: id,
            name: format!("m{id}"),
            meta: NormalizedMeta {
                training_datasets: vec![label.clone()],
                pretraining_datasets: vec![],
                task: label.clone(),
                architecture: label.clone(),
                architecture_variant: "x".into(),
                visual_category: label,
                source_uri: String::new(),
                license: String::new(),
                tags: vec!["t".into()],
                vocabulary_version: 1,
            },
            format: crate::readers::Format::Safetensors,
            depth_definition: crate::readers::DepthDefinition::WeightOrder,
            content_sha256: format!("{id:064x}"),
            size_bytes: 1,
            file_name: "f".into(),
            n_layers,
            n_filters: 0,
            first_layer_id: first_layer,
            first_filter_id: first_filter,
            kernel_shape_counts: Default::default(),
            producer: None,
            opset: None,
            ingested_at_unix_ms: 0,
            excluded_tensors: vec![],
        }
    }

    fn count_keys(s: &Store) -> Vec<(&'static str, usize)> {
        ALL_CFS
            .iter()
            .map(|cf| (*cf, s.db.iterator_cf(s.cf(cf).unwrap(), IteratorMode::Start).count()))
            .collect()
    }

    #[test]
    fn newer_schema_is_refused_and_unversioned_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.schema_version().unwrap(), Some(migrations::CURRENT_VERSION));
            s.db.put_cf(s.cf(CF_META).unwrap(), SCHEMA_VERSION_KEY, 99u32.to_le_bytes()).unwrap();
        }
        let err = Store::open(dir.path()).err().expect("newer schema must be refused").to_string();
        assert!(err.contains("schema version 99") && err.contains(&format!("up to {}", migrations::CURRENT_VERSION)), "{err}");

        // A directory from before versioning (column families, no version key) is upgraded.
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.db.delete_cf(s.cf(CF_META).unwrap(), SCHEMA_VERSION_KEY).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), Some(migrations::CURRENT_VERSION));
        assert_eq!(s.load_all().unwrap().next_ids, NextIds::default());
    }

    /// Layers 0 and 1 of model 0, 5,000 filters each (filter ids 0..5000 and 5000..10000).
    fn two_layers() -> (LayerRecord, LayerRecord) {
        let l0 = LayerRecord {
            layer_id: 0,
            model_id: 0,
            layer_index: 0,
            tensor_name: "a".into(),
            out_channels: 50,
            in_channels: 100,
            groups: None,
            conv_depth: 0,
            conv_depth_norm: 0.0,
            first_filter_id: 0,
            n_filters: 5000,
        };
        let l1 = LayerRecord { layer_id: 1, layer_index: 1, first_filter_id: 5000, ..l0.clone() };
        (l0, l1)
    }

    #[test]
    fn blocks_ingested_as_an_sst_file_read_back_and_a_crash_before_the_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        s.sst_min_bytes = 1;
        let empty = count_keys(&s);
        let filters: Vec<f32> = (0..9 * 5000).map(|x| x as f32 * 0.5 - 7.0).collect();
        let mut m = model(0, 0, 0, 2);
        m.n_filters = 10_000;
        let (l0, l1) = two_layers();
        let stats = LayerStats::of(&filters);
        // Layers out of id order: the SST gets its keys sorted.
        let rows = vec![(l1.clone(), stats.clone(), filters.as_slice()), (l0.clone(), stats, filters.as_slice())];
        s.commit_model(&m, &rows, NextIds { model: 1, layer: 2, filter: 10_000 }, None, &[], None).unwrap();
        for l in [&l0, &l1] {
            assert_eq!(s.read_layer_filters(None, l, 0, 5000).unwrap(), filters);
        }
        assert!(s.db.get_cf(s.cf(CF_META).unwrap(), pending_key(0)).unwrap().is_none());
        assert_eq!(std::fs::read_dir(s.sst_staging_dir()).unwrap().count(), 0, "staging file removed");
        s.delete_model(&m, &[l0.clone(), l1.clone()]).unwrap();
        assert_eq!(count_keys(&s), empty);

        // Ingested but never committed (a crash before the final batch): the next open
        // removes the blocks and the marker.
        let mut m2 = model(1, 2, 10_000, 1);
        m2.n_filters = 5000;
        let l2 = LayerRecord { layer_id: 2, model_id: 1, first_filter_id: 10_000, ..l0 };
        let rows = vec![(l2.clone(), LayerStats::of(&filters), filters.as_slice())];
        s.ingest_blocks(&m2, &rows, &pending_key(1)).unwrap();
        assert!(s.db.get_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), block_key(2, 0)).unwrap().is_some());
        std::fs::write(s.sst_staging_dir().join("blocks-9-1.sst"), b"half written").unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.db.get_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), block_key(2, 0)).unwrap().is_none());
        assert!(s.db.get_cf(s.cf(CF_META).unwrap(), pending_key(1)).unwrap().is_none());
        assert!(!s.sst_staging_dir().exists(), "leftover SST files removed at open");
    }

    #[test]
    fn commit_then_delete_leaves_no_key_behind_and_pending_blocks_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let empty = count_keys(&s);
        let filters: Vec<f32> = (0..9 * 5000).map(|x| x as f32).collect();
        let mut m = model(0, 0, 0, 2);
        m.n_filters = 10_000;
        let (l0, l1) = two_layers();
        let stats = LayerStats::of(&filters);
        let rows = vec![(l0.clone(), stats.clone(), filters.as_slice()), (l1.clone(), stats, filters.as_slice())];
        s.commit_model(&m, &rows, NextIds { model: 1, layer: 2, filter: 10_000 }, None, &[], None).unwrap();
        // Blocks split at BLOCK_FILTERS and read back across the boundary.
        let got = s.read_layer_filters(None, &l1, 4090, 4100).unwrap();
        assert_eq!(got, filters[4090 * 9..4100 * 9]);
        s.delete_model(&m, &[l0, l1]).unwrap();
        // Only next_ids changed (ids are never reused); every other key of the model is gone.
        assert_eq!(count_keys(&s), empty);

        // Blocks written ahead of a commit that never happened are removed at the next open.
        let mut b = WriteBatch::default();
        b.put_cf(s.cf(CF_META).unwrap(), pending_key(7), encode(&PendingIngest { first_layer_id: 40, end_layer_id: 42 }));
        b.put_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), block_key(41, 0), [0u8; 36]);
        s.db.write(b).unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.db.get_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), block_key(41, 0)).unwrap().is_none());
        assert!(s.db.get_cf(s.cf(CF_META).unwrap(), pending_key(7)).unwrap().is_none());
    }

    #[test]
    fn a_block_view_keeps_its_bytes_through_deletes_flushes_and_compactions() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let filters: Vec<f32> = (0..9 * 5000).map(|x| (x as f32 * 0.37).sin()).collect();
        let (l0, l1) = two_layers();
        let stats = LayerStats::of(&filters);
        // Model 0 through the write batch (its blocks in the memtable), model 1 ingested as an
        // SST file, model 2 committed after the view was built.
        let mut m0 = model(0, 0, 0, 1);
        m0.n_filters = 5000;
        s.commit_model(&m0, &[(l0.clone(), stats.clone(), filters.as_slice())], NextIds { model: 1, layer: 1, filter: 5000 }, None, &[], None)
            .unwrap();
        s.sst_min_bytes = 1;
        let mut m1 = model(1, 1, 5000, 1);
        m1.n_filters = 5000;
        let l1 = LayerRecord { model_id: 1, ..l1 };
        s.commit_model(&m1, &[(l1.clone(), stats.clone(), filters.as_slice())], NextIds { model: 2, layer: 2, filter: 10_000 }, None, &[], None)
            .unwrap();
        // Blocks of a layer at or past the next layer id (an ingest not committed) stay out, and
        // so does a block past a gap in a layer's block numbers (a corrupt store: the cursor
        // that reads it instead reports the missing block).
        let mut b = WriteBatch::default();
        b.put_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), block_key(9, 0), [0u8; 36]);
        b.put_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), block_key(1, 3), [0u8; 36]);
        s.db.write(b).unwrap();

        let view = s.block_view(2).unwrap();
        assert_eq!(view.len(), 4, "two blocks (4,096 + 904 filters) for each of the two layers");
        assert!(view.filter(&LayerRecord { layer_id: 9, n_filters: 1, ..l0.clone() }, 0).is_none());
        assert!(view.filter(&LayerRecord { n_filters: 4 * 4096, ..l1.clone() }, 3 * 4096).is_none());
        assert!(view.filter(&l0, 5000).is_none(), "past the layer's end");
        let files_before: Vec<String> = s.db.live_files().unwrap().into_iter().map(|f| f.name).collect();
        let read_all = |v: &BlockView, l: &LayerRecord| -> Vec<f32> {
            (0..l.n_filters)
                .flat_map(|i| v.filter(l, i).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>())
                .collect()
        };
        assert_eq!(read_all(&view, &l0), filters);
        assert_eq!(read_all(&view, &l1), filters);
        // Runs, across block boundaries too, as the cursor hands them out.
        for (a, b) in [(0, 5000), (4000, 4200), (4095, 4097), (100, 101), (4999, 5000), (4096, 5000), (7, 7)] {
            let (mut by_view, mut by_cursor) = (Vec::new(), Vec::new());
            assert!(view.for_each_run(&l1, a, b, &mut |first, bytes| by_view.push((first, bytes.to_vec()))));
            s.for_each_filter_run(None, &l1, a, b, |first, bytes| by_cursor.push((first, bytes.to_vec()))).unwrap();
            assert_eq!(by_view, by_cursor, "[{a}, {b})");
        }
        // A range reaching past what a block holds is left to the cursor, untouched.
        let longer = LayerRecord { n_filters: 6000, ..l1.clone() };
        assert!(!view.for_each_run(&longer, 4000, 5500, &mut |_, _| panic!("no partial run")));

        // The memtable flushed, model 0 deleted, model 2 committed, everything compacted: the
        // files the view was built from are replaced (and would be unmapped, were the view not
        // holding them: the test then dies of a segmentation fault), and the view still reads
        // their bytes.
        s.flush().unwrap();
        s.delete_model(&m0, std::slice::from_ref(&l0)).unwrap();
        let mut m2 = model(2, 2, 10_000, 1);
        m2.n_filters = 5000;
        let l2 = LayerRecord { layer_id: 2, model_id: 2, first_filter_id: 10_000, ..l0.clone() };
        let other: Vec<f32> = filters.iter().map(|v| -v).collect();
        s.commit_model(&m2, &[(l2.clone(), stats, other.as_slice())], NextIds { model: 3, layer: 3, filter: 15_000 }, None, &[], None)
            .unwrap();
        s.flush().unwrap();
        s.db.compact_range_cf(s.cf(CF_FILTER_BLOCKS).unwrap(), None::<&[u8]>, None::<&[u8]>);
        let files_after: Vec<String> = s.db.live_files().unwrap().into_iter().map(|f| f.name).collect();
        assert!(files_before.iter().any(|f| !files_after.contains(f)), "the compaction replaced a file the view pins");
        assert_eq!(read_all(&view, &l0), filters, "a deleted layer's bytes, as pinned");
        assert_eq!(read_all(&view, &l1), filters);
        assert!(view.filter(&l2, 0).is_none(), "committed after the view was built");

        // A new view sees the current state.
        assert_ne!(s.filter_lsm_version().unwrap(), view.lsm_version());
        drop(view);
        let view = s.block_view(3).unwrap();
        assert!(view.filter(&l0, 0).is_none());
        assert_eq!(read_all(&view, &l1), filters);
        assert_eq!(read_all(&view, &l2), other);
    }
}
