//! Snapshots, exports and restore: point-in-time Parquet datasets of the database.
//!
//! # Layout (dataset layout version [`LAYOUT_VERSION`])
//!
//! ```text
//! DIR/manifest.json        written last (schema versions, basis version, row counts, sha256 of every file)
//! DIR/models.parquet       one row per model
//! DIR/layers.parquet       one row per layer: record, statistics, pinned-basis histograms
//! DIR/basis.json           the pinned reference basis, when there is one
//! DIR/filters/task=<t>/visual_category=<v>/part-00000.parquet   one row per 3x3 filter
//! ```
//!
//! Everything comes from one RocksDB snapshot taken under the ingest lock together with a copy
//! of the catalogue, so a dataset never holds half a model. It is written into a hidden
//! `.NAME.partial-*` sibling folder, the manifest last (all files fsynced), then renamed into
//! place: a folder named like a dataset with a `manifest.json` is complete; anything else is
//! debris of a crash.
//!
//! **Partitions.** Filters are hive-partitioned by the model's canonical `task` and
//! `visual_category`: both are single-valued per model (training datasets are multi-valued and
//! would duplicate rows), have few distinct values (a handful each, so files stay large), and
//! are the CNN Filter DB's main grouping axes, so `WHERE task = ...` or
//! `visual_category = ...` reads only matching folders. Values are percent-encoded outside
//! `[A-Za-z0-9._-]`; an empty value is `__HIVE_DEFAULT_PARTITION__` (NULL). DuckDB, pyarrow
//! and Spark decode both. Within a partition rows are in filter-id order (so a model's rows
//! are contiguous and `model_id`/`layer_id` min/max statistics prune row groups), in row groups
//! of [`ROW_GROUP_ROWS`] and part files of at most [`PART_MAX_ROWS`] rows.
//!
//! **Kernel column.** `kernel` is `FixedSizeList<float32, 9>`, row-major `w[0,0] .. w[2,2]`,
//! with no scalar `w0..w8` beside it. Measured with DuckDB 2.0.0 on 4 M random kernels
//! (zstd, 1 M-row groups, 2 threads): the list-only file is 141 MB, scalar-only 158 MB, both
//! 294 MB (+109 %); DuckDB reads the column as `FLOAT[]` and `kernel[1]..kernel[9]` work
//! without a cast; 9 means took 0.61 s (list) vs 0.48 s (scalars) and the 45 cross sums of a
//! covariance 1.14 s vs 0.80 s. Doubling the bytes for a 1.3-1.4x scan speed-up is not worth
//! it; `kernel::FLOAT[9]` is the one documented cast, needed only for `array_*` functions
//! (e.g. `array_distance`). pyarrow reads the column back as `fixed_size_list<float, 9>`.
//!
//! Filter columns: `filter_id, model_id, layer_id: uint64; layer_index, conv_depth: uint32;
//! conv_depth_norm: float64; out_channel, in_channel: uint32; kernel` (plus `task` and
//! `visual_category` from the path). Meta strings in `models.parquet` and `layers.parquet` are
//! Arrow dictionaries; every file is zstd-compressed.
//!
//! **Memory.** One partition is written at a time, one row group buffered (2^20 filter rows,
//! or `LAYER_BATCH` (4,096) layer rows, each tens of MiB), batches of [`BATCH_ROWS`] rows read
//! through the snapshot: peak memory is bounded by a row group plus the catalogue copy (records
//! and statistics behind `Arc`s; the pinned-basis histograms are shared `Arc`s, only the map of
//! pointers is copied), whatever the number of filters. Restore streams the filter files and
//! holds one model's filters at a time (as ingest does: bounded by the largest model, ~2x its
//! f32 bytes while committing) plus every layer's record, statistics and histogram read from
//! `layers.parquet` (catalogue-sized, like the server's own catalogue). Measured by
//! `cargo bench --bench snapshot`.
//!
//! **Restore is crash-safe**: it builds the database in `<data-dir>/.db.partial-<pid>-<nanos>`
//! and renames it to `<data-dir>/db` once flushed and closed; a rerun after a crash removes the
//! debris and starts again (see [`restore`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, DictionaryArray, FixedSizeListArray, Float32Array, Float64Array,
    Int64Array, ListBuilder, StringArray, StringBuilder, UInt32Array, UInt32Builder, UInt64Array,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, FieldRef, Int32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{Catalog, CatalogLayer};
use crate::engine::{Engine, EngineError, Result};
use crate::selection::Pred;
use crate::stats::LayerStats;
use crate::store::Store;
use crate::store::records::{BasisRecord, LayerHistogram, LayerRecord, ModelRecord, NextIds};

/// The pinned basis and its histograms as a snapshot sees them.
type PinnedView = (Arc<BasisRecord>, HashMap<u64, Arc<LayerHistogram>>);

/// Name written in `manifest.json` `format`.
pub const DATASET_FORMAT: &str = "filterdb-dataset";
/// Version of the dataset layout (files, columns, manifest).
pub const LAYOUT_VERSION: u32 = 1;
/// Hive partition keys of the filter files, outermost first.
pub const PARTITION_KEYS: [&str; 2] = ["task", "visual_category"];
/// Rows per Parquet row group of the filter files.
pub const ROW_GROUP_ROWS: usize = 1 << 20;
/// Rows per Arrow batch read from the store (and per Flight batch).
pub const BATCH_ROWS: usize = 1 << 16;
/// Rows per filter part file.
pub const PART_MAX_ROWS: u64 = 16 << 20;
/// The manifest's file name; written last.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Hive's name for a NULL (here: empty) partition value.
const HIVE_NULL: &str = "__HIVE_DEFAULT_PARTITION__";
/// Layers per batch of `layers.parquet`.
const LAYER_BATCH: usize = 4096;

/// `manifest.json`: what a dataset holds, written after every other file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`DATASET_FORMAT`].
    pub format: String,
    /// Dataset layout version ([`LAYOUT_VERSION`]).
    pub layout_version: u32,
    /// RocksDB schema version of the server that wrote it.
    pub store_schema_version: u32,
    /// `snapshot` (the whole database, restorable) or `export` (a selection).
    pub kind: String,
    /// The selection text of an export ("" for a snapshot).
    pub selection: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// Version of the pinned basis in the data, when there is one.
    pub basis_version: Option<u32>,
    /// The id counters at snapshot time (restore continues from them).
    pub next_ids: NextIds,
    /// Hive partition keys of `filters/`.
    pub partition_keys: Vec<String>,
    /// Row counts.
    pub rows: RowCounts,
    /// Every file of the dataset except the manifest, with its checksum.
    pub files: Vec<FileEntry>,
}

/// Rows per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCounts {
    /// Models.
    pub models: u64,
    /// Layers.
    pub layers: u64,
    /// Filters.
    pub filters: u64,
}

/// One file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the dataset folder, `/`-separated.
    pub path: String,
    /// Rows (0 for JSON files).
    pub rows: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
}

/// What a finished snapshot or export wrote.
#[derive(Debug, Clone)]
pub struct DatasetSummary {
    /// Folder of the dataset.
    pub path: PathBuf,
    /// The manifest as written.
    pub manifest: Manifest,
    /// `manifest.json` text.
    pub manifest_json: String,
    /// Bytes of all files including the manifest.
    pub bytes: u64,
}

/// Progress of a snapshot, export or restore.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Phase: models, layers, filters, manifest, verify, restore.
    pub phase: &'static str,
    /// Filters done.
    pub done: u64,
    /// Filters in total.
    pub total: u64,
}

/// A consistent view: a copy of the catalogue and a RocksDB snapshot of the same instant.
struct View<'a> {
    catalog: Catalog,
    snapshot: rocksdb::Snapshot<'a>,
    basis: Option<PinnedView>,
}

/// The selected part of a view, grouped by partition.
struct Selected {
    models: Vec<Arc<ModelRecord>>,
    layers: Vec<Arc<CatalogLayer>>,
    /// (task, visual_category) → layers in id order.
    partitions: BTreeMap<(String, String), Vec<Arc<CatalogLayer>>>,
}

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::FailedPrecondition(format!("{}: {what}: {e}", path.display()))
}

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::FailedPrecondition(format!("{}: parquet: {e}", path.display()))
}

impl Engine {
    /// Takes the catalogue copy and the RocksDB snapshot under the ingest lock, so both show
    /// the same committed models (ingest, delete and relabel commit and update the catalogue
    /// while holding that lock).
    fn consistent_view(&self) -> View<'_> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let catalog = self.read_catalog().clone();
        let snapshot = self.store.db().snapshot();
        let basis = self
            .read_basis()
            .as_ref()
            .map(|p| (p.record.clone(), p.hists.clone()));
        View {
            catalog,
            snapshot,
            basis,
        }
    }

    /// The folder periodic and unnamed snapshots go to (`<data dir>/snapshots`).
    pub fn snapshot_root(&self) -> PathBuf {
        let db = self.store.dir();
        db.parent().unwrap_or(db).join("snapshots")
    }

    /// Writes a snapshot of the whole database to `out` (which must not exist).
    pub fn snapshot_to(
        &self,
        out: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<DatasetSummary> {
        let view = self.consistent_view();
        let sel = select(&view.catalog, &Pred::True, true);
        write_dataset(&self.store, &view, &sel, "snapshot", "", out, progress)
    }

    /// Writes the selected layers, their filters and models to `out` (which must not exist).
    pub fn export_to(
        &self,
        pred: &Pred,
        expr: &str,
        out: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<DatasetSummary> {
        let view = self.consistent_view();
        let sel = select(&view.catalog, pred, false);
        write_dataset(&self.store, &view, &sel, "export", expr, out, progress)
    }

    /// Writes a snapshot under [`Engine::snapshot_root`] named by the time, then keeps only the
    /// newest `retain` complete snapshots there (0 keeps all) and removes crash debris.
    pub fn snapshot_auto(
        &self,
        retain: usize,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<DatasetSummary> {
        let root = self.snapshot_root();
        std::fs::create_dir_all(&root).map_err(|e| io_err(&root, "cannot create", e))?;
        let name = format!(
            "snapshot-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        );
        let summary = self.snapshot_to(&root.join(name), progress)?;
        prune_snapshots(&root, retain)?;
        Ok(summary)
    }

    /// Streams the filter rows of a selection as Arrow batches (with `task` and
    /// `visual_category` columns), from one consistent view; `send` returns false to stop.
    pub fn filter_batches(&self, pred: &Pred, send: &mut dyn FnMut(Result<RecordBatch>) -> bool) {
        let view = self.consistent_view();
        let sel = select(&view.catalog, pred, false);
        let schema = filter_schema(true);
        for ((task, vc), layers) in &sel.partitions {
            let mut rows = FilterRows::new(&self.store, &view.snapshot, layers);
            loop {
                match rows.next_batch(BATCH_ROWS) {
                    Ok(None) => break,
                    Ok(Some(cols)) => {
                        let n = cols[0].len();
                        let mut all: Vec<ArrayRef> = vec![
                            Arc::new(StringArray::from(vec![task.as_str(); n])),
                            Arc::new(StringArray::from(vec![vc.as_str(); n])),
                        ];
                        all.extend(cols);
                        let batch = RecordBatch::try_new(schema.clone(), all)
                            .map_err(|e| EngineError::FailedPrecondition(format!("arrow: {e}")));
                        if !send(batch) {
                            return;
                        }
                    }
                    Err(e) => {
                        send(Err(e));
                        return;
                    }
                }
            }
        }
    }
}

/// Layers (and their models) selected by `pred`, grouped by partition. With `all_models`,
/// models without any 3x3 layer are kept too (a snapshot holds every model).
fn select(c: &Catalog, pred: &Pred, all_models: bool) -> Selected {
    let mut layers = Vec::new();
    let mut model_ids = HashSet::new();
    let mut partitions: BTreeMap<(String, String), Vec<Arc<CatalogLayer>>> = BTreeMap::new();
    c.for_each_selected_arc(pred, |m, l| {
        model_ids.insert(m.model_id);
        layers.push(l.clone());
        partitions
            .entry(partition_of(m))
            .or_default()
            .push(l.clone());
    });
    let models = c
        .models_after(None)
        .filter(|m| all_models || model_ids.contains(&m.model_id))
        .cloned()
        .collect();
    Selected {
        models,
        layers,
        partitions,
    }
}

fn partition_of(m: &ModelRecord) -> (String, String) {
    (
        m.meta.task.canonical.clone(),
        m.meta.visual_category.canonical.clone(),
    )
}

/// A hive path segment value: percent-encoded outside `[A-Za-z0-9._-]`, empty → NULL marker.
pub fn hive_value(v: &str) -> String {
    if v.is_empty() {
        return HIVE_NULL.to_string();
    }
    let mut s = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Schema of the filter rows; with `partition_columns`, `task` and `visual_category` first
/// (Flight, where there is no path to carry them).
pub fn filter_schema(partition_columns: bool) -> SchemaRef {
    let mut fields = Vec::new();
    if partition_columns {
        fields.push(Field::new("task", DataType::Utf8, false));
        fields.push(Field::new("visual_category", DataType::Utf8, false));
    }
    fields.extend([
        Field::new("filter_id", DataType::UInt64, false),
        Field::new("model_id", DataType::UInt64, false),
        Field::new("layer_id", DataType::UInt64, false),
        Field::new("layer_index", DataType::UInt32, false),
        Field::new("conv_depth", DataType::UInt32, false),
        Field::new("conv_depth_norm", DataType::Float64, false),
        Field::new("out_channel", DataType::UInt32, false),
        Field::new("in_channel", DataType::UInt32, false),
        Field::new("kernel", DataType::FixedSizeList(kernel_item(), 9), false),
    ]);
    Arc::new(Schema::new(fields))
}

fn kernel_item() -> FieldRef {
    Arc::new(Field::new("item", DataType::Float32, false))
}

/// Reads the filters of a list of layers through a snapshot, batch by batch.
struct FilterRows<'a> {
    store: &'a Store,
    snapshot: &'a rocksdb::Snapshot<'a>,
    layers: &'a [Arc<CatalogLayer>],
    layer: usize,
    pos: u64,
}

impl<'a> FilterRows<'a> {
    fn new(
        store: &'a Store,
        snapshot: &'a rocksdb::Snapshot<'a>,
        layers: &'a [Arc<CatalogLayer>],
    ) -> Self {
        FilterRows {
            store,
            snapshot,
            layers,
            layer: 0,
            pos: 0,
        }
    }

    /// The next up to `max` rows as the filter columns (without partition columns).
    fn next_batch(&mut self, max: usize) -> Result<Option<Vec<ArrayRef>>> {
        let mut filter_id = Vec::with_capacity(max);
        let mut model_id = Vec::with_capacity(max);
        let mut layer_id = Vec::with_capacity(max);
        let mut layer_index = Vec::with_capacity(max);
        let mut conv_depth = Vec::with_capacity(max);
        let mut depth_norm = Vec::with_capacity(max);
        let mut out_ch = Vec::with_capacity(max);
        let mut in_ch = Vec::with_capacity(max);
        let mut kernel: Vec<f32> = Vec::with_capacity(max * 9);
        while filter_id.len() < max && self.layer < self.layers.len() {
            let r = &self.layers[self.layer].record;
            if self.pos >= r.n_filters {
                self.layer += 1;
                self.pos = 0;
                continue;
            }
            let end = (self.pos + (max - filter_id.len()) as u64).min(r.n_filters);
            let vals = self
                .store
                .read_layer_filters(Some(self.snapshot), r, self.pos, end)?;
            kernel.extend_from_slice(&vals);
            let in_c = u64::from(r.in_channels.max(1));
            for k in self.pos..end {
                filter_id.push(r.first_filter_id + k);
                model_id.push(r.model_id);
                layer_id.push(r.layer_id);
                layer_index.push(r.layer_index);
                conv_depth.push(r.conv_depth);
                depth_norm.push(r.conv_depth_norm);
                out_ch.push((k / in_c) as u32);
                in_ch.push((k % in_c) as u32);
            }
            self.pos = end;
        }
        if filter_id.is_empty() {
            return Ok(None);
        }
        let kernel = FixedSizeListArray::try_new(
            kernel_item(),
            9,
            Arc::new(Float32Array::from(kernel)),
            None,
        )
        .map_err(|e| EngineError::FailedPrecondition(format!("arrow: {e}")))?;
        Ok(Some(vec![
            Arc::new(UInt64Array::from(filter_id)),
            Arc::new(UInt64Array::from(model_id)),
            Arc::new(UInt64Array::from(layer_id)),
            Arc::new(UInt32Array::from(layer_index)),
            Arc::new(UInt32Array::from(conv_depth)),
            Arc::new(Float64Array::from(depth_norm)),
            Arc::new(UInt32Array::from(out_ch)),
            Arc::new(UInt32Array::from(in_ch)),
            Arc::new(kernel),
        ]))
    }
}

/// A writer that hashes and counts what passes through.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl HashingWriter {
    fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| io_err(path, "cannot create", e))?;
        Ok(HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, f),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Flushes, fsyncs and returns (bytes, sha256).
    fn finish(self, path: &Path) -> Result<(u64, String)> {
        let f = self
            .inner
            .into_inner()
            .map_err(|e| io_err(path, "cannot write", e.error()))?;
        f.sync_all().map_err(|e| io_err(path, "cannot sync", e))?;
        Ok((self.bytes, hex::encode(self.hasher.finalize())))
    }
}

fn props(kernel: bool) -> WriterProperties {
    // The writer buffers a whole row group: filter rows are ~40 B, so 2^20 rows is tens of MiB;
    // a layer row carries its statistics and histograms (several KiB), so layer (and model)
    // files close a row group every LAYER_BATCH rows to keep the buffer at that size too.
    let rows = if kernel { ROW_GROUP_ROWS } else { LAYER_BATCH };
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(rows))
        .set_created_by(format!("filterdb {}", env!("CARGO_PKG_VERSION")));
    if kernel {
        // Float weights almost never repeat: a dictionary only costs time before the fallback.
        for p in ["kernel.list.item", "kernel.list.element"] {
            b = b.set_column_dictionary_enabled(ColumnPath::from(p), false);
        }
    }
    b.build()
}

/// Writes one Parquet file from batches; returns its manifest entry.
fn write_parquet(
    dir: &Path,
    rel: &str,
    schema: SchemaRef,
    kernel: bool,
    mut next: impl FnMut() -> Result<Option<RecordBatch>>,
) -> Result<FileEntry> {
    let path = dir.join(rel);
    let w = HashingWriter::create(&path)?;
    let mut writer =
        ArrowWriter::try_new(w, schema, Some(props(kernel))).map_err(|e| parquet_err(&path, e))?;
    let mut rows = 0u64;
    while let Some(batch) = next()? {
        rows += batch.num_rows() as u64;
        writer.write(&batch).map_err(|e| parquet_err(&path, e))?;
    }
    let w = writer.into_inner().map_err(|e| parquet_err(&path, e))?;
    let (bytes, sha256) = w.finish(&path)?;
    Ok(FileEntry {
        path: rel.to_string(),
        rows,
        bytes,
        sha256,
    })
}

fn write_json_file(dir: &Path, rel: &str, text: &[u8]) -> Result<FileEntry> {
    let path = dir.join(rel);
    let mut w = HashingWriter::create(&path)?;
    w.write_all(text)
        .map_err(|e| io_err(&path, "cannot write", e))?;
    let (bytes, sha256) = w.finish(&path)?;
    Ok(FileEntry {
        path: rel.to_string(),
        rows: 0,
        bytes,
        sha256,
    })
}

fn check_target(out: &Path) -> Result<(PathBuf, PathBuf)> {
    if out.exists() {
        return Err(EngineError::AlreadyExists(format!(
            "{} already exists; give a new folder (snapshots and exports never overwrite)",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| {
            EngineError::InvalidArgument(format!("{}: not a folder name", out.display()))
        })?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(EngineError::FailedPrecondition(format!(
            "{}: the parent folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{name}.partial-{}-{nanos}", std::process::id()));
    Ok((parent.to_path_buf(), tmp))
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not supported everywhere, so best effort.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_dataset(
    store: &Store,
    view: &View<'_>,
    sel: &Selected,
    kind: &str,
    selection: &str,
    out: &Path,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<DatasetSummary> {
    let (parent, tmp) = check_target(out)?;
    std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, "cannot create", e))?;
    let result = write_dataset_into(store, view, sel, kind, selection, &tmp, progress);
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io_err(
            out,
            "cannot rename the finished dataset into place",
            e,
        ));
    }
    sync_dir(&parent);
    let manifest_json = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    let bytes = manifest.files.iter().map(|f| f.bytes).sum::<u64>() + manifest_json.len() as u64;
    tracing::info!(path = %out.display(), kind, models = manifest.rows.models, layers = manifest.rows.layers, filters = manifest.rows.filters, bytes, "dataset written");
    metrics::counter!("filterdb_dataset_bytes_total", "kind" => kind.to_string()).increment(bytes);
    metrics::counter!("filterdb_dataset_filters_total", "kind" => kind.to_string()).increment(manifest.rows.filters);
    Ok(DatasetSummary {
        path: out.to_path_buf(),
        manifest,
        manifest_json,
        bytes,
    })
}

fn write_dataset_into(
    store: &Store,
    view: &View<'_>,
    sel: &Selected,
    kind: &str,
    selection: &str,
    dir: &Path,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Manifest> {
    let total: u64 = sel.layers.iter().map(|l| l.record.n_filters).sum();
    let mut files = Vec::new();

    progress(Progress {
        phase: "models",
        done: 0,
        total,
    });
    let mut models_done = false;
    files.push(write_parquet(
        dir,
        "models.parquet",
        models_schema(),
        false,
        || {
            if models_done {
                return Ok(None);
            }
            models_done = true;
            models_batch(&sel.models).map(Some)
        },
    )?);

    progress(Progress {
        phase: "layers",
        done: 0,
        total,
    });
    let hist_of = |id: u64| view.basis.as_ref().and_then(|(_, h)| h.get(&id).cloned());
    let mut chunks = sel.layers.chunks(LAYER_BATCH);
    files.push(write_parquet(
        dir,
        "layers.parquet",
        layers_schema(),
        false,
        || match chunks.next() {
            None => Ok(None),
            Some(ls) => layers_batch(&view.catalog, ls, &hist_of).map(Some),
        },
    )?);

    let basis_version = view.basis.as_ref().map(|(b, _)| b.version);
    if let Some((b, _)) = &view.basis {
        let text = serde_json::to_vec_pretty(b.as_ref()).unwrap_or_default();
        files.push(write_json_file(dir, "basis.json", &text)?);
    }

    let mut done = 0u64;
    progress(Progress {
        phase: "filters",
        done,
        total,
    });
    let schema = filter_schema(false);
    for ((task, vc), layers) in &sel.partitions {
        let rel_dir = format!(
            "filters/task={}/visual_category={}",
            hive_value(task),
            hive_value(vc)
        );
        let abs = dir.join(&rel_dir);
        std::fs::create_dir_all(&abs).map_err(|e| io_err(&abs, "cannot create", e))?;
        let mut rows = FilterRows::new(store, &view.snapshot, layers);
        let mut part = 0u32;
        let mut pending: Option<RecordBatch> = None;
        loop {
            let mut in_part = 0u64;
            let mut exhausted = false;
            let entry = write_parquet(
                dir,
                &format!("{rel_dir}/part-{part:05}.parquet"),
                schema.clone(),
                true,
                || {
                    if in_part >= PART_MAX_ROWS {
                        return Ok(None);
                    }
                    if let Some(b) = pending.take() {
                        in_part += b.num_rows() as u64;
                        return Ok(Some(b));
                    }
                    let max = (PART_MAX_ROWS - in_part).min(BATCH_ROWS as u64) as usize;
                    match rows.next_batch(max)? {
                        None => {
                            exhausted = true;
                            Ok(None)
                        }
                        Some(cols) => {
                            let b = RecordBatch::try_new(schema.clone(), cols).map_err(|e| {
                                EngineError::FailedPrecondition(format!("arrow: {e}"))
                            })?;
                            in_part += b.num_rows() as u64;
                            done += b.num_rows() as u64;
                            progress(Progress {
                                phase: "filters",
                                done,
                                total,
                            });
                            Ok(Some(b))
                        }
                    }
                },
            )?;
            files.push(entry);
            part += 1;
            if exhausted {
                break;
            }
            // Peek so that a partition ending exactly at a part boundary gets no empty part.
            match rows.next_batch(BATCH_ROWS)? {
                None => break,
                Some(cols) => {
                    let b = RecordBatch::try_new(schema.clone(), cols)
                        .map_err(|e| EngineError::FailedPrecondition(format!("arrow: {e}")))?;
                    done += b.num_rows() as u64;
                    pending = Some(b);
                }
            }
        }
    }
    if done != total {
        return Err(EngineError::FailedPrecondition(format!(
            "wrote {done} filters but the selected layers hold {total}"
        )));
    }

    progress(Progress {
        phase: "manifest",
        done,
        total,
    });
    let manifest = Manifest {
        format: DATASET_FORMAT.to_string(),
        layout_version: LAYOUT_VERSION,
        store_schema_version: crate::store::migrations::CURRENT_VERSION,
        kind: kind.to_string(),
        selection: selection.to_string(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        basis_version,
        next_ids: view.catalog.next_ids,
        partition_keys: PARTITION_KEYS.iter().map(|s| s.to_string()).collect(),
        rows: RowCounts {
            models: sel.models.len() as u64,
            layers: sel.layers.len() as u64,
            filters: done,
        },
        files,
    };
    // Every data file is fsynced; the manifest goes last, so its presence means completeness.
    let text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    let path = dir.join(MANIFEST_FILE);
    let mut w = HashingWriter::create(&path)?;
    w.write_all(text.as_bytes())
        .map_err(|e| io_err(&path, "cannot write", e))?;
    w.finish(&path)?;
    sync_dir(dir);
    progress(Progress {
        phase: "done",
        done,
        total,
    });
    Ok(manifest)
}

fn dict_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn str_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// Schema of `models.parquet`.
pub fn models_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("model_id", DataType::UInt64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("task", dict_type(), false),
        Field::new("architecture", dict_type(), false),
        Field::new("architecture_variant", dict_type(), false),
        Field::new("visual_category", dict_type(), false),
        Field::new("training_datasets", str_list_type(), false),
        Field::new("pretraining_datasets", str_list_type(), false),
        Field::new("tags", str_list_type(), false),
        Field::new("license", dict_type(), false),
        Field::new("source_uri", DataType::Utf8, false),
        Field::new("format", dict_type(), false),
        Field::new("depth_definition", dict_type(), false),
        Field::new("producer", dict_type(), true),
        Field::new("opset", DataType::Int64, true),
        Field::new("file_name", DataType::Utf8, false),
        Field::new("content_sha256", DataType::Utf8, false),
        Field::new("size_bytes", DataType::UInt64, false),
        Field::new("n_layers", DataType::UInt32, false),
        Field::new("n_filters", DataType::UInt64, false),
        Field::new("first_layer_id", DataType::UInt64, false),
        Field::new("first_filter_id", DataType::UInt64, false),
        Field::new("ingested_at_unix_ms", DataType::Int64, false),
        // The stored record, exact (raw labels, kernel shape counts...): what restore reads.
        Field::new("record_json", DataType::Utf8, false),
    ]))
}

fn dict<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(it.collect::<DictionaryArray<Int32Type>>())
}

fn str_lists<'a>(rows: impl Iterator<Item = Vec<&'a str>>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for r in rows {
        for s in r {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

fn models_batch(models: &[Arc<ModelRecord>]) -> Result<RecordBatch> {
    let ms = models;
    let depth_def = |m: &ModelRecord| -> String {
        serde_json::to_value(m.depth_definition)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    };
    let depth_defs: Vec<String> = ms.iter().map(|m| depth_def(m)).collect();
    let producer: DictionaryArray<Int32Type> = ms.iter().map(|m| m.producer.as_deref()).collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(ms.iter().map(|m| m.model_id))),
        Arc::new(StringArray::from_iter_values(
            ms.iter().map(|m| m.name.as_str()),
        )),
        dict(ms.iter().map(|m| m.meta.task.canonical.as_str())),
        dict(ms.iter().map(|m| m.meta.architecture.canonical.as_str())),
        dict(ms.iter().map(|m| m.meta.architecture_variant.as_str())),
        dict(ms.iter().map(|m| m.meta.visual_category.canonical.as_str())),
        str_lists(ms.iter().map(|m| {
            m.meta
                .training_datasets
                .iter()
                .map(|d| d.canonical.as_str())
                .collect()
        })),
        str_lists(ms.iter().map(|m| {
            m.meta
                .pretraining_datasets
                .iter()
                .map(|d| d.canonical.as_str())
                .collect()
        })),
        str_lists(
            ms.iter()
                .map(|m| m.meta.tags.iter().map(String::as_str).collect()),
        ),
        dict(ms.iter().map(|m| m.meta.license.as_str())),
        Arc::new(StringArray::from_iter_values(
            ms.iter().map(|m| m.meta.source_uri.as_str()),
        )),
        dict(ms.iter().map(|m| m.format.as_str())),
        dict(depth_defs.iter().map(String::as_str)),
        Arc::new(producer),
        Arc::new(Int64Array::from(
            ms.iter().map(|m| m.opset).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(
            ms.iter().map(|m| m.file_name.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            ms.iter().map(|m| m.content_sha256.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            ms.iter().map(|m| m.size_bytes),
        )),
        Arc::new(UInt32Array::from_iter_values(ms.iter().map(|m| m.n_layers))),
        Arc::new(UInt64Array::from_iter_values(
            ms.iter().map(|m| m.n_filters),
        )),
        Arc::new(UInt64Array::from_iter_values(
            ms.iter().map(|m| m.first_layer_id),
        )),
        Arc::new(UInt64Array::from_iter_values(
            ms.iter().map(|m| m.first_filter_id),
        )),
        Arc::new(Int64Array::from_iter_values(
            ms.iter().map(|m| m.ingested_at_unix_ms),
        )),
        Arc::new(StringArray::from_iter_values(
            ms.iter()
                .map(|m| serde_json::to_string(m.as_ref()).unwrap_or_default()),
        )),
    ];
    RecordBatch::try_new(models_schema(), cols)
        .map_err(|e| EngineError::FailedPrecondition(format!("models.parquet: {e}")))
}

fn f64_fsl(n: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float64, false)), n)
}

fn u32_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt32, true)))
}

fn u64_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt64, true)))
}

/// Schema of `layers.parquet`.
pub fn layers_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("layer_id", DataType::UInt64, false),
        Field::new("model_id", DataType::UInt64, false),
        Field::new("layer_index", DataType::UInt32, false),
        Field::new("tensor_name", DataType::Utf8, false),
        Field::new("out_channels", DataType::UInt32, false),
        Field::new("in_channels", DataType::UInt32, false),
        Field::new("groups", DataType::UInt32, true),
        Field::new("conv_depth", DataType::UInt32, false),
        Field::new("conv_depth_norm", DataType::Float64, false),
        Field::new("first_filter_id", DataType::UInt64, false),
        Field::new("n_filters", DataType::UInt64, false),
        Field::new("task", dict_type(), false),
        Field::new("architecture", dict_type(), false),
        Field::new("visual_category", dict_type(), false),
        // Raw-filter moments (f64 sums; mean = sum / n, covariance from sum_outer).
        Field::new("n", DataType::UInt64, false),
        Field::new("sum", f64_fsl(9), true),
        Field::new("sum_outer", f64_fsl(81), true),
        Field::new("abs_max", DataType::Float64, false),
        Field::new("zero_filters", DataType::UInt64, false),
        Field::new("orthogonality", DataType::Float64, true),
        // Every statistic, exact (scaled and clean moments, sparse counts): what restore reads.
        Field::new("stats_json", DataType::Utf8, false),
        // Coefficient histograms in the pinned basis (basis.json), when there is one.
        Field::new("hist_counts", u32_list(), true),
        Field::new("hist_out_of_range", u64_list(), true),
    ]))
}

fn f64_fsl_array(n: usize, rows: impl Iterator<Item = Option<Vec<f64>>>) -> Result<ArrayRef> {
    let mut values = Vec::new();
    let mut valid = Vec::new();
    for r in rows {
        match r.filter(|v| v.len() == n) {
            Some(v) => {
                values.extend(v);
                valid.push(true);
            }
            None => {
                values.extend(std::iter::repeat_n(0.0, n));
                valid.push(false);
            }
        }
    }
    let nulls = valid
        .iter()
        .any(|v| !v)
        .then(|| arrow::buffer::NullBuffer::from(valid));
    let a = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float64, false)),
        n as i32,
        Arc::new(Float64Array::from(values)),
        nulls,
    )
    .map_err(|e| EngineError::FailedPrecondition(format!("layers.parquet: {e}")))?;
    Ok(Arc::new(a))
}

fn layers_batch(
    c: &Catalog,
    ls: &[Arc<CatalogLayer>],
    hist_of: &dyn Fn(u64) -> Option<Arc<LayerHistogram>>,
) -> Result<RecordBatch> {
    let rec = |l: &Arc<CatalogLayer>| l.record.clone();
    let recs: Vec<LayerRecord> = ls.iter().map(rec).collect();
    let model = |id: u64| c.model(id);
    let label = |id: u64, f: fn(&ModelRecord) -> &str| {
        model(id).map(|m| f(m).to_string()).unwrap_or_default()
    };
    let tasks: Vec<String> = recs
        .iter()
        .map(|r| label(r.model_id, |m| &m.meta.task.canonical))
        .collect();
    let archs: Vec<String> = recs
        .iter()
        .map(|r| label(r.model_id, |m| &m.meta.architecture.canonical))
        .collect();
    let vcs: Vec<String> = recs
        .iter()
        .map(|r| label(r.model_id, |m| &m.meta.visual_category.canonical))
        .collect();
    let mut hc = ListBuilder::new(UInt32Builder::new());
    let mut ho = ListBuilder::new(UInt64Builder::new());
    for l in ls {
        match hist_of(l.record.layer_id) {
            Some(h) => {
                hc.values().append_slice(&h.counts);
                hc.append(true);
                ho.values().append_slice(&h.out_of_range);
                ho.append(true);
            }
            None => {
                hc.append_null();
                ho.append_null();
            }
        }
    }
    let st = |l: &Arc<CatalogLayer>| l.stats.clone();
    let stats: Vec<LayerStats> = ls.iter().map(st).collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            recs.iter().map(|r| r.layer_id),
        )),
        Arc::new(UInt64Array::from_iter_values(
            recs.iter().map(|r| r.model_id),
        )),
        Arc::new(UInt32Array::from_iter_values(
            recs.iter().map(|r| r.layer_index),
        )),
        Arc::new(StringArray::from_iter_values(
            recs.iter().map(|r| r.tensor_name.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(
            recs.iter().map(|r| r.out_channels),
        )),
        Arc::new(UInt32Array::from_iter_values(
            recs.iter().map(|r| r.in_channels),
        )),
        Arc::new(UInt32Array::from(
            recs.iter().map(|r| r.groups).collect::<Vec<_>>(),
        )),
        Arc::new(UInt32Array::from_iter_values(
            recs.iter().map(|r| r.conv_depth),
        )),
        Arc::new(Float64Array::from_iter_values(
            recs.iter().map(|r| r.conv_depth_norm),
        )),
        Arc::new(UInt64Array::from_iter_values(
            recs.iter().map(|r| r.first_filter_id),
        )),
        Arc::new(UInt64Array::from_iter_values(
            recs.iter().map(|r| r.n_filters),
        )),
        dict(tasks.iter().map(String::as_str)),
        dict(archs.iter().map(String::as_str)),
        dict(vcs.iter().map(String::as_str)),
        Arc::new(UInt64Array::from_iter_values(stats.iter().map(|s| s.n))),
        f64_fsl_array(9, stats.iter().map(|s| Some(s.sum.clone())))?,
        f64_fsl_array(81, stats.iter().map(|s| Some(s.sum_outer.clone())))?,
        Arc::new(Float64Array::from_iter_values(
            stats.iter().map(|s| s.abs_max),
        )),
        Arc::new(UInt64Array::from_iter_values(
            stats.iter().map(|s| s.zero_filters),
        )),
        Arc::new(Float64Array::from(
            stats.iter().map(|s| s.orthogonality).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(
            stats
                .iter()
                .map(|s| serde_json::to_string(s).unwrap_or_default()),
        )),
        Arc::new(hc.finish()),
        Arc::new(ho.finish()),
    ];
    RecordBatch::try_new(layers_schema(), cols)
        .map_err(|e| EngineError::FailedPrecondition(format!("layers.parquet: {e}")))
}

/// Keeps the newest `retain` complete `snapshot-*` folders of `root` (0 keeps all) and removes
/// partial folders left by crashes (no process writes them any more: names carry the pid).
pub fn prune_snapshots(root: &Path, retain: usize) -> Result<()> {
    let entries = std::fs::read_dir(root).map_err(|e| io_err(root, "cannot list", e))?;
    let mut complete = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        if name.starts_with(".snapshot-") && name.contains(".partial-") {
            let pid = name
                .rsplit(".partial-")
                .next()
                .and_then(|s| s.split('-').next())
                .unwrap_or("");
            if pid != std::process::id().to_string() {
                let _ = std::fs::remove_dir_all(&path);
            }
        } else if name.starts_with("snapshot-") && path.join(MANIFEST_FILE).is_file() {
            complete.push(name);
        }
    }
    complete.sort();
    if retain > 0 && complete.len() > retain {
        for name in &complete[..complete.len() - retain] {
            let p = root.join(name);
            std::fs::remove_dir_all(&p).map_err(|e| io_err(&p, "cannot remove old snapshot", e))?;
            tracing::info!(path = %p.display(), "removed old snapshot (retention)");
        }
    }
    Ok(())
}

/// Takes a snapshot every `interval` into [`Engine::snapshot_root`], keeping `retain`.
pub fn spawn_periodic(
    engine: Arc<Engine>,
    interval: std::time::Duration,
    retain: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let e = engine.clone();
            match tokio::task::spawn_blocking(move || e.snapshot_auto(retain, &|_| {})).await {
                Ok(Ok(s)) => tracing::info!(path = %s.path.display(), "periodic snapshot written"),
                Ok(Err(e)) => tracing::error!(error = %e, "periodic snapshot failed"),
                Err(e) => tracing::error!(error = %e, "periodic snapshot task failed"),
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Restore

/// What a restore rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Rows restored.
    pub rows: RowCounts,
    /// Basis version restored, if any.
    pub basis_version: Option<u32>,
}

/// Reads and checks a dataset's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&path).map_err(|e| {
        io_err(
            &path,
            "cannot read (a folder without a manifest is not a complete snapshot)",
            e,
        )
    })?;
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| io_err(&path, "not a FilterDB manifest", e))?;
    if m.format != DATASET_FORMAT || m.layout_version > LAYOUT_VERSION {
        return Err(EngineError::FailedPrecondition(format!(
            "{}: format `{}` layout version {}; this build reads `{DATASET_FORMAT}` up to version {LAYOUT_VERSION}",
            path.display(),
            m.format,
            m.layout_version
        )));
    }
    Ok(m)
}

fn verify_files(dir: &Path, m: &Manifest) -> Result<()> {
    for f in &m.files {
        if f.path.split('/').any(|s| s == ".." || s.is_empty()) {
            return Err(EngineError::FailedPrecondition(format!(
                "manifest lists an unsafe path `{}`",
                f.path
            )));
        }
        let path = dir.join(&f.path);
        let mut file = File::open(&path).map_err(|e| io_err(&path, "cannot open", e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = file
                .read(&mut buf)
                .map_err(|e| io_err(&path, "cannot read", e))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        let sha = hex::encode(h.finalize());
        if n != f.bytes || sha != f.sha256 {
            return Err(EngineError::FailedPrecondition(format!(
                "{}: {n} bytes, sha256 {sha}; the manifest says {} bytes, sha256 {}: the snapshot is damaged",
                path.display(),
                f.bytes,
                f.sha256
            )));
        }
    }
    Ok(())
}

fn reader(
    path: &Path,
    batch: usize,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    let f = File::open(path).map_err(|e| io_err(path, "cannot open", e))?;
    ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(batch).build())
        .map_err(|e| parquet_err(path, e))
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "{}: column `{name}` missing or of another type",
                path.display()
            ))
        })
}

fn bad(path: &Path, what: impl std::fmt::Display) -> EngineError {
    EngineError::FailedPrecondition(format!("{}: {what}", path.display()))
}

/// A layer read back from `layers.parquet`.
struct RestoredLayer {
    record: LayerRecord,
    stats: LayerStats,
    hist: Option<LayerHistogram>,
    filters: Vec<f32>,
}

/// Rebuilds a database in `data_dir` (which must hold no models) from the snapshot in `dir`,
/// through the store's normal commit path with the original ids, so records, statistics,
/// histograms, filters and id counters are bit-identical.
///
/// Crash-safe: the database is built in a hidden `<data_dir>/.db.partial-<pid>-<nanos>` folder,
/// flushed and closed, then renamed to `<data_dir>/db` (and the folder fsynced). A restore
/// killed midway leaves only such a folder, which the next restore into the same `data_dir`
/// removes (when its process is gone) before starting again; `db` itself is never half filled.
/// An existing `db` is accepted only when it holds no model (e.g. a server was started once on
/// the folder); it is replaced by the restored one.
pub fn restore(dir: &Path, data_dir: &Path, progress: &dyn Fn(Progress)) -> Result<RestoreSummary> {
    let m = read_manifest(dir)?;
    if m.kind != "snapshot" {
        return Err(EngineError::FailedPrecondition(format!(
            "{}: this is an {} of a selection (`{}`); restore needs a snapshot of the whole database",
            dir.display(),
            m.kind,
            m.selection
        )));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| io_err(data_dir, "cannot create", e))?;
    let final_db = data_dir.join("db");
    if final_db.exists() {
        let store = Store::open(&final_db)?;
        let loaded = store.load_all()?;
        if !loaded.models.is_empty() || loaded.next_ids != NextIds::default() {
            return Err(EngineError::FailedPrecondition(format!(
                "{}: already holds a database ({} models); restore into a new --data-dir",
                data_dir.display(),
                loaded.models.len()
            )));
        }
    }
    progress(Progress {
        phase: "verify",
        done: 0,
        total: m.rows.filters,
    });
    verify_files(dir, &m)?;

    remove_restore_debris(data_dir);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = data_dir.join(format!(
        "{RESTORE_PARTIAL_PREFIX}{}-{nanos}",
        std::process::id()
    ));
    let summary = match restore_into(dir, &m, &tmp, progress) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // The store is closed (restore_into dropped it): move the finished database into place.
    if final_db.exists() {
        std::fs::remove_dir_all(&final_db)
            .map_err(|e| io_err(&final_db, "cannot remove the empty database", e))?;
    }
    std::fs::rename(&tmp, &final_db).map_err(|e| {
        io_err(
            &final_db,
            "cannot rename the restored database into place",
            e,
        )
    })?;
    sync_dir(data_dir);
    Ok(summary)
}

/// Prefix of the folder a restore builds its database in (inside the data directory).
pub const RESTORE_PARTIAL_PREFIX: &str = ".db.partial-";

/// Removes `.db.partial-<pid>-*` folders of restores whose process is gone (killed midway).
fn remove_restore_debris(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(RESTORE_PARTIAL_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        let alive = pid != std::process::id().to_string()
            && !pid.is_empty()
            && Path::new("/proc").join(pid).exists();
        if alive {
            tracing::warn!(path = %e.path().display(), "partial restore of a running process left alone");
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => {
                tracing::info!(path = %e.path().display(), "removed an interrupted restore")
            }
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an interrupted restore")
            }
        }
    }
}

/// Builds the database of snapshot `dir` (manifest `m`, files verified) in `db_dir` (new).
fn restore_into(
    dir: &Path,
    m: &Manifest,
    db_dir: &Path,
    progress: &dyn Fn(Progress),
) -> Result<RestoreSummary> {
    let store = Store::open(db_dir)?;

    // Models.
    let path = dir.join("models.parquet");
    let mut models: BTreeMap<u64, ModelRecord> = BTreeMap::new();
    for b in reader(&path, 8192)? {
        let b = b.map_err(|e| parquet_err(&path, e))?;
        let json = col::<StringArray>(&b, "record_json", &path)?;
        for i in 0..b.num_rows() {
            let rec: ModelRecord = serde_json::from_str(json.value(i))
                .map_err(|e| bad(&path, format!("row {i}: record_json: {e}")))?;
            models.insert(rec.model_id, rec);
        }
    }

    // Layers with statistics and histograms.
    let path = dir.join("layers.parquet");
    let mut layers: BTreeMap<u64, Vec<RestoredLayer>> = BTreeMap::new();
    let mut n_layers = 0u64;
    for b in reader(&path, LAYER_BATCH)? {
        let b = b.map_err(|e| parquet_err(&path, e))?;
        let u64c = |n: &str| col::<UInt64Array>(&b, n, &path);
        let u32c = |n: &str| col::<UInt32Array>(&b, n, &path);
        let (layer_id, model_id, first, nf) = (
            u64c("layer_id")?,
            u64c("model_id")?,
            u64c("first_filter_id")?,
            u64c("n_filters")?,
        );
        let (li, oc, ic, gr, cd) = (
            u32c("layer_index")?,
            u32c("out_channels")?,
            u32c("in_channels")?,
            u32c("groups")?,
            u32c("conv_depth")?,
        );
        let cdn = col::<Float64Array>(&b, "conv_depth_norm", &path)?;
        let tn = col::<StringArray>(&b, "tensor_name", &path)?;
        let sj = col::<StringArray>(&b, "stats_json", &path)?;
        let hc = b
            .column_by_name("hist_counts")
            .and_then(|c| c.as_list_opt::<i32>().cloned());
        let ho = b
            .column_by_name("hist_out_of_range")
            .and_then(|c| c.as_list_opt::<i32>().cloned());
        for i in 0..b.num_rows() {
            let record = LayerRecord {
                layer_id: layer_id.value(i),
                model_id: model_id.value(i),
                layer_index: li.value(i),
                tensor_name: tn.value(i).to_string(),
                out_channels: oc.value(i),
                in_channels: ic.value(i),
                groups: gr.is_valid(i).then(|| gr.value(i)),
                conv_depth: cd.value(i),
                conv_depth_norm: cdn.value(i),
                first_filter_id: first.value(i),
                n_filters: nf.value(i),
            };
            let stats: LayerStats = serde_json::from_str(sj.value(i))
                .map_err(|e| bad(&path, format!("row {i}: stats_json: {e}")))?;
            let hist = match (&hc, &ho) {
                (Some(c), Some(o)) if c.is_valid(i) && o.is_valid(i) => {
                    let (c, o) = (c.value(i), o.value(i));
                    let counts = c.as_primitive_opt::<arrow::datatypes::UInt32Type>();
                    let out = o.as_primitive_opt::<arrow::datatypes::UInt64Type>();
                    match (counts, out) {
                        (Some(c), Some(o)) => Some(LayerHistogram {
                            counts: c.values().to_vec(),
                            out_of_range: o.values().to_vec(),
                        }),
                        _ => {
                            return Err(bad(
                                &path,
                                "hist_counts / hist_out_of_range are not integer lists",
                            ));
                        }
                    }
                }
                _ => None,
            };
            layers
                .entry(record.model_id)
                .or_default()
                .push(RestoredLayer {
                    record,
                    stats,
                    hist,
                    filters: Vec::new(),
                });
            n_layers += 1;
        }
    }
    for ls in layers.values_mut() {
        ls.sort_by_key(|l| l.record.layer_id);
    }
    if models.len() as u64 != m.rows.models || n_layers != m.rows.layers {
        return Err(EngineError::FailedPrecondition(format!(
            "{}: {} models and {n_layers} layers, the manifest says {} and {}",
            dir.display(),
            models.len(),
            m.rows.models,
            m.rows.layers
        )));
    }
    let basis: Option<BasisRecord> = match m.files.iter().find(|f| f.path == "basis.json") {
        Some(f) => {
            let p = dir.join(&f.path);
            let text = std::fs::read(&p).map_err(|e| io_err(&p, "cannot read", e))?;
            Some(serde_json::from_slice(&text).map_err(|e| bad(&p, e))?)
        }
        None => None,
    };

    // Filters, one model at a time: a model's rows are contiguous in its partition.
    let mut committed: HashSet<u64> = HashSet::new();
    let mut current: Option<(u64, Vec<RestoredLayer>)> = None;
    let mut done = 0u64;
    let commit = |store: &Store,
                  model_id: u64,
                  ls: Vec<RestoredLayer>,
                  committed: &mut HashSet<u64>|
     -> Result<()> {
        let model = models.get(&model_id).ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "filters of model {model_id}, which models.parquet lacks"
            ))
        })?;
        if ls.len() != model.n_layers as usize {
            return Err(EngineError::FailedPrecondition(format!(
                "model `{}` has {} layers in the snapshot, its record says {}: the snapshot holds half a model",
                model.name,
                ls.len(),
                model.n_layers
            )));
        }
        for l in &ls {
            if l.filters.len() as u64 != l.record.n_filters * 9 {
                return Err(EngineError::FailedPrecondition(format!(
                    "layer {} of model `{}`: {} filters in the snapshot, the record says {}",
                    l.record.layer_id,
                    model.name,
                    l.filters.len() / 9,
                    l.record.n_filters
                )));
            }
        }
        let rows: Vec<(LayerRecord, LayerStats, &[f32])> = ls
            .iter()
            .map(|l| (l.record.clone(), l.stats.clone(), l.filters.as_slice()))
            .collect();
        let hists: Vec<(u32, u64, LayerHistogram)> = match &basis {
            Some(b) => ls
                .iter()
                .filter_map(|l| l.hist.clone().map(|h| (b.version, l.record.layer_id, h)))
                .collect(),
            None => Vec::new(),
        };
        store.commit_model(model, &rows, m.next_ids, None, &hists, None)?;
        committed.insert(model_id);
        Ok(())
    };
    for f in m.files.iter().filter(|f| f.path.starts_with("filters/")) {
        let path = dir.join(&f.path);
        for b in reader(&path, BATCH_ROWS)? {
            let b = b.map_err(|e| parquet_err(&path, e))?;
            let fid = col::<UInt64Array>(&b, "filter_id", &path)?;
            let mid = col::<UInt64Array>(&b, "model_id", &path)?;
            let kernel = col::<FixedSizeListArray>(&b, "kernel", &path)?;
            if kernel.value_length() != 9 {
                return Err(bad(&path, "kernel is not a list of 9 values"));
            }
            let values = kernel
                .values()
                .as_primitive_opt::<arrow::datatypes::Float32Type>()
                .ok_or_else(|| bad(&path, "kernel values are not float32"))?
                .values();
            for i in 0..b.num_rows() {
                let model_id = mid.value(i);
                if current.as_ref().is_none_or(|(id, _)| *id != model_id) {
                    if let Some((id, ls)) = current.take() {
                        commit(&store, id, ls, &mut committed)?;
                    }
                    if committed.contains(&model_id) {
                        return Err(bad(
                            &path,
                            format!("rows of model {model_id} are not contiguous"),
                        ));
                    }
                    let ls = layers.remove(&model_id).ok_or_else(|| {
                        bad(
                            &path,
                            format!(
                                "filters of model {model_id}, whose layers layers.parquet lacks"
                            ),
                        )
                    })?;
                    current = Some((model_id, ls));
                }
                let Some((_, ls)) = current.as_mut() else {
                    continue;
                };
                let id = fid.value(i);
                let l = ls
                    .iter_mut()
                    .find(|l| {
                        id >= l.record.first_filter_id
                            && id < l.record.first_filter_id + l.record.n_filters
                    })
                    .ok_or_else(|| {
                        bad(
                            &path,
                            format!("filter {id} belongs to no layer of model {model_id}"),
                        )
                    })?;
                let expected = l.record.first_filter_id + (l.filters.len() / 9) as u64;
                if id != expected {
                    return Err(bad(
                        &path,
                        format!("filter {id} out of order (expected {expected})"),
                    ));
                }
                let s = kernel.value_offset_at(i);
                let v = values
                    .get(s..s + 9)
                    .ok_or_else(|| bad(&path, "kernel values shorter than the rows"))?;
                l.filters.extend_from_slice(v);
            }
            done += b.num_rows() as u64;
            progress(Progress {
                phase: "restore",
                done,
                total: m.rows.filters,
            });
        }
    }
    if let Some((id, ls)) = current.take() {
        commit(&store, id, ls, &mut committed)?;
    }
    // Models without filters (no 3x3 layer, or only empty layers).
    let rest: Vec<u64> = models
        .keys()
        .filter(|id| !committed.contains(id))
        .copied()
        .collect();
    for id in rest {
        let ls = layers.remove(&id).unwrap_or_default();
        commit(&store, id, ls, &mut committed)?;
    }
    if done != m.rows.filters {
        return Err(EngineError::FailedPrecondition(format!(
            "{}: {done} filters read, the manifest says {}",
            dir.display(),
            m.rows.filters
        )));
    }
    if models.is_empty() && m.next_ids != NextIds::default() {
        // Ids are never reused, even when every model was deleted: keep the counters.
        store
            .db()
            .put_cf(
                store
                    .db()
                    .cf_handle(crate::store::keys::CF_META)
                    .ok_or_else(|| {
                        EngineError::FailedPrecondition("meta column family missing".into())
                    })?,
                crate::store::keys::NEXT_IDS_KEY,
                serde_json::to_vec(&m.next_ids).unwrap_or_default(),
            )
            .map_err(crate::store::StoreError::from)?;
    }
    if let Some(b) = &basis {
        store.make_current_basis(b)?;
    }
    store.flush()?;
    Ok(RestoreSummary {
        rows: m.rows,
        basis_version: basis.map(|b| b.version),
    })
}

/// `filterdb-server restore SNAPSHOT --data-dir NEW`: restores with progress on stderr and a
/// summary on stdout.
pub fn restore_cli(snapshot: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let last = std::sync::Mutex::new((std::time::Instant::now(), ""));
    let progress = |p: Progress| {
        // Phase changes always; within a phase at most one line a second, and the last one.
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if p.phase != l.1 || l.0.elapsed() >= std::time::Duration::from_secs(1) || p.done == p.total
        {
            *l = (std::time::Instant::now(), p.phase);
            let pct = if p.total > 0 {
                100.0 * p.done as f64 / p.total as f64
            } else {
                100.0
            };
            eprintln!(
                "{:>8}: {}/{} filters ({pct:.1} %)",
                p.phase, p.done, p.total
            );
        }
    };
    let t = std::time::Instant::now();
    let s = restore(snapshot, data_dir, &progress)
        .map_err(|e| anyhow::anyhow!("restore failed: {e}"))?;
    println!(
        "restored {} models, {} layers, {} filters{} from {} into {} in {:.1} s",
        s.rows.models,
        s.rows.layers,
        s.rows.filters,
        s.basis_version
            .map(|v| format!(" and basis version {v}"))
            .unwrap_or_default(),
        snapshot.display(),
        data_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_values_are_percent_encoded() {
        assert_eq!(hive_value("Classification"), "Classification");
        assert_eq!(hive_value("medical xray"), "medical%20xray");
        assert_eq!(hive_value("a/b=c%"), "a%2Fb%3Dc%25");
        assert_eq!(hive_value(""), "__HIVE_DEFAULT_PARTITION__");
    }
}
