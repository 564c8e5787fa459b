//! Bulk import of the CNN Filter DB release (Gavrikov & Keuper, CVPR 2022): the HDF5 `filters`
//! dataset read in bounded row windows, the meta table from the Parquet file that
//! `tools/cnnfdb_meta_to_parquet.py` writes (the release pickles it, so only Python reads it).
//!
//! [`plan`] reads and checks the meta (one row per 3x3 layer; `filter_ids` "start:end" with an
//! INCLUSIVE end; ranges tile `[0, N)`; `n = in_channels * out_channels`) and the dataset's shape
//! and type ((N, 3, 3) or (N, 9); float64 or float32; contiguous or chunked). [`run`] then stores
//! model after model, each one atomic, with a content id derived from the file identity, the
//! model and its filter range, so a re-run is a no-op. A job record per model (`jobs` column
//! family, source `cnnfdb:<file name>`) lets an interrupted import skip what it already stored
//! without reading those filters again.
//!
//! Reading, statistics ([`Engine::prepare_extracted`]) and commits
//! ([`Engine::commit_prepared`]) run as a pipeline on three threads; memory is bounded by three
//! models (one read ahead, one in statistics, one being committed), the one being read, and
//! one read window.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use arrow::array::{Array, Float64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

use crate::engine::{
    Engine, EngineError, IngestOutcome, IngestRequest, MetaInput, NameConflict, Prepared,
    PreparedIngest, Result,
};
use crate::jobs::{JobRecord, Outcome};
use crate::readers::{DepthDefinition, ExtractedLayer, ExtractedModel, Format};

/// Rows read per HDF5 window (72 bytes each as float64: 18 MiB).
pub const DEFAULT_WINDOW_ROWS: u64 = 1 << 18;

/// Names the release's filter dataset goes by (the README says `/filter`; the file has `filters`).
const DATASET_NAMES: [&str; 2] = ["filters", "filter"];

/// Import options.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Replace a stored model of the same name that holds other filters (else ALREADY_EXISTS).
    pub replace: bool,
    /// Stop after storing this many new models (staged imports; tests of resumption).
    pub max_models: Option<u64>,
    /// Rows per HDF5 read.
    pub window_rows: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            replace: false,
            max_models: None,
            window_rows: DEFAULT_WINDOW_ROWS,
        }
    }
}

/// What the import is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportPhase {
    /// Reading a model's filters from the HDF5 file.
    Reading,
    /// Computing statistics and committing a model.
    Storing,
    /// A model was stored earlier (job record or same content): not read again.
    Skipped,
    /// Finished (or stopped at `max_models`).
    Done,
}

impl ImportPhase {
    /// Lower-case name for the wire and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportPhase::Reading => "reading",
            ImportPhase::Storing => "storing",
            ImportPhase::Skipped => "skipped",
            ImportPhase::Done => "done",
        }
    }
}

/// Progress of an import; the last report is its summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProgress {
    /// Current phase.
    pub phase: ImportPhase,
    /// Model being read or stored (empty when done).
    pub model: String,
    /// Models in the release.
    pub models_total: u64,
    /// Models finished in this run (stored or skipped).
    pub models_done: u64,
    /// Models stored by this run (created or replaced).
    pub models_created: u64,
    /// Models found already stored.
    pub models_unchanged: u64,
    /// Filters in the release.
    pub filters_total: u64,
    /// Filters of finished models plus filters read of the current one.
    pub filters_done: u64,
    /// True when the run stopped at `max_models` before the end.
    pub stopped_early: bool,
}

/// One 3x3 layer of the meta table.
#[derive(Debug, Clone)]
struct LayerRow {
    row: usize,
    layer_id: u32,
    conv_depth: u32,
    conv_depth_norm: f64,
    in_channels: u32,
    out_channels: u32,
    start: u64,
    n: u64,
}

/// One model of the release: its labels and its layers in filter order.
#[derive(Debug, Clone)]
pub struct PlannedModel {
    /// The release's `model` string (the stored model name).
    pub name: String,
    meta: MetaInput,
    producer: Option<String>,
    opset: Option<i64>,
    kernel_shape_counts: BTreeMap<String, u64>,
    layers: Vec<LayerRow>,
    /// First filter id (HDF5 row).
    pub start: u64,
    /// Number of filters.
    pub n_filters: u64,
}

/// A checked release, ready to import.
#[derive(Debug, Clone)]
pub struct ImportPlan {
    filters_path: PathBuf,
    dataset: String,
    file_name: String,
    file_size: u64,
    element: Element,
    /// Models in filter order.
    pub models: Vec<PlannedModel>,
    /// Rows of the filter dataset.
    pub n_filters: u64,
}

impl ImportPlan {
    /// Job source name under which per-model progress is recorded.
    pub fn job_source(&self) -> String {
        format!("cnnfdb:{}", self.file_name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    F64Le,
    F64Be,
    F32Le,
    F32Be,
}

impl Element {
    fn size(self) -> usize {
        match self {
            Element::F64Le | Element::F64Be => 8,
            Element::F32Le | Element::F32Be => 4,
        }
    }
}

fn invalid(msg: String) -> EngineError {
    EngineError::InvalidArgument(msg)
}

/// Reads and checks the release: the filter dataset's shape and type, and the meta table.
pub fn plan(filters_path: &Path, meta_path: &Path) -> Result<ImportPlan> {
    let fname = filters_path.display().to_string();
    let file_size = std::fs::metadata(filters_path)
        .map_err(|e| invalid(format!("{fname}: {e}")))?
        .len();
    let file = hdf5_pure::File::open_streaming(filters_path)
        .map_err(|e| invalid(format!("{fname}: not a readable HDF5 file: {e}")))?;
    let (dataset, ds) = DATASET_NAMES
        .iter()
        .find_map(|n| file.dataset(n).ok().map(|d| (n.to_string(), d)))
        .ok_or_else(|| {
            let have = file.root().datasets().unwrap_or_default().join(", ");
            invalid(format!(
                "{fname}: no dataset `filters` (nor `filter`); the file holds [{have}]. Give the release's dataset.h5"
            ))
        })?;
    let shape = ds
        .shape()
        .map_err(|e| invalid(format!("{fname}/{dataset}: shape: {e}")))?;
    let n_filters = match shape.as_slice() {
        [n, 3, 3] | [n, 9] => *n,
        other => {
            return Err(invalid(format!(
                "{fname}/{dataset}: shape {other:?}; expected (N, 3, 3) or (N, 9)"
            )));
        }
    };
    use hdf5_pure::{Datatype, DatatypeByteOrder as B};
    let element = match ds
        .datatype()
        .map_err(|e| invalid(format!("{fname}/{dataset}: datatype: {e}")))?
    {
        Datatype::FloatingPoint {
            size: 8,
            byte_order: B::LittleEndian,
            ..
        } => Element::F64Le,
        Datatype::FloatingPoint {
            size: 8,
            byte_order: B::BigEndian,
            ..
        } => Element::F64Be,
        Datatype::FloatingPoint {
            size: 4,
            byte_order: B::LittleEndian,
            ..
        } => Element::F32Le,
        Datatype::FloatingPoint {
            size: 4,
            byte_order: B::BigEndian,
            ..
        } => Element::F32Be,
        other => {
            return Err(invalid(format!(
                "{fname}/{dataset}: element type {other:?}; expected float64 or float32"
            )));
        }
    };
    let file_name = filters_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| fname.clone());
    let models = read_meta(meta_path, n_filters)?;
    Ok(ImportPlan {
        filters_path: filters_path.to_path_buf(),
        dataset,
        file_name,
        file_size,
        element,
        models,
        n_filters,
    })
}

/// Columns of one record batch, cast to text or float64 by name.
struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a str,
}

impl Columns<'_> {
    fn text(&self, name: &str) -> Result<Option<StringArray>> {
        let Some(col) = self.batch.column_by_name(name) else {
            return Ok(None);
        };
        let c = cast(col, &DataType::Utf8)
            .map_err(|e| invalid(format!("{}: column `{name}` as text: {e}", self.path)))?;
        Ok(c.as_any().downcast_ref::<StringArray>().cloned())
    }

    fn num(&self, name: &str) -> Result<Option<Float64Array>> {
        let Some(col) = self.batch.column_by_name(name) else {
            return Ok(None);
        };
        let c = cast(col, &DataType::Float64).map_err(|e| {
            invalid(format!(
                "{}: column `{name}` is not numeric: {e}",
                self.path
            ))
        })?;
        Ok(c.as_any().downcast_ref::<Float64Array>().cloned())
    }
}

fn text_at(a: Option<&StringArray>, i: usize) -> String {
    match a {
        Some(a) if a.is_valid(i) => a.value(i).trim().to_string(),
        _ => String::new(),
    }
}

/// Model-level labels of a row (the release repeats them on every layer row).
#[derive(Debug, Clone)]
struct RowModel {
    meta: MetaInput,
    producer: Option<String>,
    opset: Option<i64>,
    kernel_shape_counts: BTreeMap<String, u64>,
}

fn read_meta(path: &Path, n_dataset: u64) -> Result<Vec<PlannedModel>> {
    let p = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| invalid(format!("{p}: {e}")))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(8192).build())
        .map_err(|e| {
            invalid(format!(
                "{p}: not a Parquet file: {e} (write it with tools/cnnfdb_meta_to_parquet.py)"
            ))
        })?;
    let mut rows: Vec<(String, LayerRow, RowModel)> = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| invalid(format!("{p}: {e}")))?;
        let c = Columns {
            batch: &batch,
            path: &p,
        };
        let need_text = |n: &str| -> Result<StringArray> {
            c.text(n)?.ok_or_else(|| {
                invalid(format!(
                    "{p}: no column `{n}` (is this the converter's output?)"
                ))
            })
        };
        let need_num = |n: &str| -> Result<Float64Array> {
            c.num(n)?.ok_or_else(|| {
                invalid(format!(
                    "{p}: no column `{n}` (is this the converter's output?)"
                ))
            })
        };
        let model = need_text("model")?;
        let filter_ids = need_text("filter_ids")?;
        let (layer_id, conv_depth, conv_depth_norm) = (
            need_num("layer_id")?,
            need_num("conv_depth")?,
            need_num("conv_depth_norm")?,
        );
        let (cin, cout) = (need_num("in_channels")?, need_num("out_channels")?);
        let task = need_text("Task")?;
        let training = need_text("Training-Dataset")?;
        let visual = match c.text("Visual Category")? {
            Some(v) => Some(v),
            None => c.text("Datatype")?, // v0.1.0's name for the column
        };
        let pretraining = c.text("Pretraining-Dataset")?;
        let arch_cols = [
            c.text("Backbone")?,
            c.text("architecture")?,
            c.text("Architecture")?,
            c.text("Name")?,
        ];
        let (producer, opset, accessible) =
            (c.text("producer")?, c.num("op_set")?, c.text("Accessible")?);
        let mut shape_cols = Vec::new();
        for field in batch.schema().fields() {
            if let Some(k) = kernel_shape_key(field.name())
                && let Some(a) = c.num(field.name())?
            {
                shape_cols.push((k, a));
            }
        }
        for i in 0..batch.num_rows() {
            let row = rows.len();
            let name = text_at(Some(&model), i);
            let ctx = |detail: String| invalid(format!("{p} row {row} (model `{name}`): {detail}"));
            if name.is_empty() {
                return Err(ctx("empty `model`".into()));
            }
            let fid = text_at(Some(&filter_ids), i);
            let (start, end) = parse_filter_ids(&fid).ok_or_else(|| {
                ctx(format!(
                    "filter_ids {fid:?} is not \"start:end\" (end inclusive, start <= end)"
                ))
            })?;
            let int = |a: &Float64Array, col: &str| -> Result<u32> {
                let v = if a.is_valid(i) { a.value(i) } else { f64::NAN };
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f64 {
                    Ok(v as u32)
                } else {
                    Err(ctx(format!(
                        "`{col}` is {v}; expected a non-negative integer"
                    )))
                }
            };
            let layer_id = int(&layer_id, "layer_id")?;
            let conv_depth = int(&conv_depth, "conv_depth")?;
            let (in_channels, out_channels) =
                (int(&cin, "in_channels")?, int(&cout, "out_channels")?);
            let norm = if conv_depth_norm.is_valid(i) {
                conv_depth_norm.value(i)
            } else {
                f64::NAN
            };
            // The pipeline divides by zero for a model with one conv level: NaN there means 0.
            let norm = if norm.is_nan() && conv_depth == 0 {
                0.0
            } else {
                norm
            };
            if !(0.0..=1.0).contains(&norm) {
                return Err(ctx(format!(
                    "conv_depth_norm is {norm}; expected a value in [0, 1]"
                )));
            }
            let n = end - start + 1;
            if n != in_channels as u64 * out_channels as u64 {
                return Err(ctx(format!(
                    "filter_ids {fid:?} holds {n} filters but in_channels {in_channels} x out_channels {out_channels} = {}",
                    in_channels as u64 * out_channels as u64
                )));
            }
            let arch = arch_cols
                .iter()
                .map(|a| text_at(a.as_ref(), i))
                .find(|s| !s.is_empty())
                .unwrap_or_else(|| name.clone());
            let list = |a: Option<&StringArray>| -> Vec<String> {
                let s = text_at(a, i);
                // The robustness DB stores a boolean in Pretraining-Dataset; that is no dataset.
                if s.is_empty()
                    || ["nan", "none", "true", "false"].contains(&s.to_ascii_lowercase().as_str())
                {
                    Vec::new()
                } else {
                    vec![s]
                }
            };
            let mut training_datasets = list(Some(&training));
            if training_datasets.is_empty() {
                training_datasets.push("unknown".into());
            }
            let task = match text_at(Some(&task), i) {
                t if t.is_empty() => "unknown".to_string(),
                t => t,
            };
            let source = text_at(accessible.as_ref(), i);
            let meta = MetaInput {
                name: name.clone(),
                training_datasets,
                pretraining_datasets: list(pretraining.as_ref()),
                task,
                architecture: arch,
                visual_category: text_at(visual.as_ref(), i),
                source_uri: source,
                license: String::new(),
                tags: vec!["cnnfdb".into()],
            };
            let mut kernel_shape_counts = BTreeMap::new();
            for (k, a) in &shape_cols {
                if a.is_valid(i) && a.value(i).is_finite() && a.value(i) > 0.0 {
                    kernel_shape_counts.insert(k.clone(), a.value(i) as u64);
                }
            }
            let producer = Some(text_at(producer.as_ref(), i)).filter(|s| !s.is_empty());
            let opset = opset
                .as_ref()
                .filter(|a| a.is_valid(i) && a.value(i).is_finite())
                .map(|a| a.value(i) as i64);
            rows.push((
                name.clone(),
                LayerRow {
                    row,
                    layer_id,
                    conv_depth,
                    conv_depth_norm: norm,
                    in_channels,
                    out_channels,
                    start,
                    n,
                },
                RowModel {
                    meta,
                    producer,
                    opset,
                    kernel_shape_counts,
                },
            ));
        }
    }
    group_models(&p, rows, n_dataset)
}

/// `"(3, 3) filters"` → `"3x3"`.
fn kernel_shape_key(col: &str) -> Option<String> {
    let inner = col
        .strip_suffix(" filters")?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    let (a, b) = inner.split_once(',')?;
    let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    Some(format!("{a}x{b}"))
}

/// `"start:end"` with an inclusive end → `(start, end)`.
fn parse_filter_ids(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Checks that the ranges tile `[0, n_dataset)` and each model's layers are consecutive, and
/// groups layer rows into models in filter order.
fn group_models(
    p: &str,
    mut rows: Vec<(String, LayerRow, RowModel)>,
    n_dataset: u64,
) -> Result<Vec<PlannedModel>> {
    if rows.is_empty() {
        return Err(invalid(format!("{p}: the meta table has no rows")));
    }
    rows.sort_by_key(|(_, l, _)| (l.start, l.row));
    let describe = |(m, l, _): &(String, LayerRow, RowModel)| {
        format!(
            "row {} (model `{m}`, layer_id {}, filter_ids \"{}:{}\")",
            l.row,
            l.layer_id,
            l.start,
            l.start + l.n - 1
        )
    };
    let mut next = 0u64;
    for (k, r) in rows.iter().enumerate() {
        let l = &r.1;
        if l.start < next {
            let prev = &rows[k - 1];
            return Err(invalid(format!(
                "{p}: {} overlaps {}",
                describe(r),
                describe(prev)
            )));
        }
        if l.start > next {
            let after = if k == 0 {
                "the start".to_string()
            } else {
                describe(&rows[k - 1])
            };
            return Err(invalid(format!(
                "{p}: filters {next}..{} belong to no layer (a gap between {after} and {})",
                l.start - 1,
                describe(r)
            )));
        }
        next = l.start + l.n;
    }
    if next != n_dataset {
        return Err(invalid(format!(
            "{p}: the meta's filter_ids cover filters 0..{} but the HDF5 dataset holds {n_dataset} rows; \
             is this the meta of that file?",
            next.saturating_sub(1)
        )));
    }
    let mut models: Vec<PlannedModel> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (name, layer, rm) in rows {
        match models.last_mut() {
            Some(m) if m.name == name => {
                if let Some(dup) = m.layers.iter().find(|x| x.layer_id == layer.layer_id) {
                    return Err(invalid(format!(
                        "{p}: row {} repeats layer_id {} of model `{name}` (row {})",
                        layer.row, layer.layer_id, dup.row
                    )));
                }
                m.n_filters += layer.n;
                m.layers.push(layer);
            }
            _ => {
                if let Some(&first) = seen.get(&name) {
                    return Err(invalid(format!(
                        "{p}: row {} puts filters of model `{name}` after another model's; a model's layers \
                         must be consecutive in filter id (its first rows start at row {})",
                        layer.row, models[first].layers[0].row
                    )));
                }
                seen.insert(name.clone(), models.len());
                models.push(PlannedModel {
                    name,
                    meta: rm.meta,
                    producer: rm.producer,
                    opset: rm.opset,
                    kernel_shape_counts: rm.kernel_shape_counts,
                    start: layer.start,
                    n_filters: layer.n,
                    layers: vec![layer],
                });
            }
        }
    }
    for m in &mut models {
        m.kernel_shape_counts
            .entry("3x3".into())
            .or_insert(m.n_filters);
    }
    Ok(models)
}

/// The content id of a model of the release: SHA-256 over ("cnnfdb", file name, file size,
/// model name, filter range). The file is identified by name and size, not hashed (98 GiB).
pub fn content_id(plan: &ImportPlan, m: &PlannedModel) -> String {
    let mut h = Sha256::new();
    for part in [
        "cnnfdb",
        &plan.file_name,
        &plan.file_size.to_string(),
        &m.name,
        &format!("{}:{}", m.start, m.start + m.n_filters),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

fn request(plan: &ImportPlan, m: &PlannedModel, opts: &ImportOptions) -> IngestRequest {
    IngestRequest {
        meta: m.meta.clone(),
        file_name: format!("{}#{}", plan.file_name, m.name),
        format: Some(Format::Onnx),
        sha256: content_id(plan, m),
        size_bytes: m.n_filters * 9 * plan.element.size() as u64,
        on_conflict: if opts.replace {
            NameConflict::Replace
        } else {
            NameConflict::Error
        },
    }
}

/// Decodes a window of raw HDF5 elements into f32 filters, refusing non-finite values.
fn decode(
    raw: &[u8],
    el: Element,
    first_id: u64,
    out: &mut Vec<f32>,
    model: &str,
    layer_id: u32,
) -> Result<()> {
    let base = out.len();
    match el {
        Element::F64Le => out.extend(
            raw.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32),
        ),
        Element::F64Be => out.extend(
            raw.chunks_exact(8)
                .map(|b| f64::from_be_bytes(b.try_into().unwrap_or([0; 8])) as f32),
        ),
        Element::F32Le => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap_or([0; 4]))),
        ),
        Element::F32Be => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_be_bytes(b.try_into().unwrap_or([0; 4]))),
        ),
    }
    if let Some(bad) = out[base..].iter().position(|v| !v.is_finite()) {
        let k = bad % 9;
        let orig = match el {
            Element::F64Le | Element::F64Be => {
                let b: [u8; 8] = raw[bad * 8..bad * 8 + 8].try_into().unwrap_or([0; 8]);
                if el == Element::F64Le {
                    f64::from_le_bytes(b)
                } else {
                    f64::from_be_bytes(b)
                }
            }
            _ => out[base + bad] as f64,
        };
        return Err(invalid(format!(
            "model `{model}`, layer_id {layer_id}: filter id {} holds {orig} at kernel position ({}, {}); \
             filters must be finite float32 values",
            first_id + (bad / 9) as u64,
            k / 3,
            k % 3
        )));
    }
    Ok(())
}

/// Reads one model's filters into layers, `window_rows` rows per read.
fn read_model(
    ds: &hdf5_pure::Dataset,
    plan: &ImportPlan,
    m: &PlannedModel,
    window_rows: u64,
    read: &AtomicU64,
) -> Result<ExtractedModel> {
    let fname = &plan.file_name;
    let mut layers = Vec::with_capacity(m.layers.len());
    for l in &m.layers {
        let mut filters: Vec<f32> = Vec::with_capacity((l.n * 9) as usize);
        let mut at = l.start;
        let end = l.start + l.n;
        while at < end {
            let take = (end - at).min(window_rows.max(1));
            let raw = ds.read_raw_rows(at, take).map_err(|e| {
                invalid(format!(
                    "{fname}/{}: reading filters {at}..{} of model `{}`: {e}",
                    plan.dataset,
                    at + take,
                    m.name
                ))
            })?;
            if raw.len() as u64 != take * 9 * plan.element.size() as u64 {
                return Err(invalid(format!(
                    "{fname}/{}: filters {at}..{} of model `{}` hold {} bytes, expected {}",
                    plan.dataset,
                    at + take,
                    m.name,
                    raw.len(),
                    take * 9 * plan.element.size() as u64
                )));
            }
            decode(&raw, plan.element, at, &mut filters, &m.name, l.layer_id)?;
            read.fetch_add(take, Ordering::Relaxed);
            at += take;
        }
        layers.push(ExtractedLayer {
            tensor_name: format!("layer_id {}", l.layer_id),
            out_channels: l.out_channels,
            in_channels: l.in_channels,
            groups: None,
            conv_depth: l.conv_depth,
            conv_depth_norm: l.conv_depth_norm,
            layer_index: l.layer_id,
            filters,
        });
    }
    Ok(ExtractedModel {
        format: Format::Onnx,
        layers,
        kernel_shape_counts: m.kernel_shape_counts.clone(),
        // The release's conv_depth is the paper's: longest-path rank over all conv levels.
        depth_definition: DepthDefinition::GraphLongestPath,
        producer: m.producer.clone(),
        opset: m.opset,
        excluded: Vec::new(),
    })
}

enum Fetched {
    Model(usize, Box<ExtractedModel>),
    Failed(EngineError),
}

/// Imports a planned release. `progress` is called often; returning `false` stops the import
/// after the model being stored (what is stored stays stored; a re-run continues from there).
pub fn run(
    engine: &Engine,
    plan: &ImportPlan,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(&ImportProgress) -> bool,
) -> Result<ImportProgress> {
    let source = plan.job_source();
    let mut p = ImportProgress {
        phase: ImportPhase::Reading,
        model: String::new(),
        models_total: plan.models.len() as u64,
        models_done: 0,
        models_created: 0,
        models_unchanged: 0,
        filters_total: plan.n_filters,
        filters_done: 0,
        stopped_early: false,
    };

    // What is already stored is skipped before anything is read: a done job record with this
    // content id, or (a crash between the commit and the job record) the model itself.
    let mut todo: Vec<usize> = Vec::new();
    let mut skip = vec![false; plan.models.len()];
    for (i, m) in plan.models.iter().enumerate() {
        let req = request(plan, m, opts);
        let stored = match engine.precheck(&req) {
            Ok(s) => s,
            // A name conflict surfaces when the model is stored, with the row named there.
            Err(EngineError::AlreadyExists(_)) => None,
            Err(e) => return Err(e),
        };
        // The catalogue decides (a model deleted since is imported again); the job record is
        // brought up to date for `filterdb jobs`.
        match stored {
            Some(s) => {
                skip[i] = true;
                let job_done = engine
                    .store()
                    .get_job(&source, &m.name)?
                    .and_then(|v| serde_json::from_slice::<JobRecord>(&v).ok())
                    .is_some_and(|j| j.outcome == Outcome::Done && j.sha256 == req.sha256);
                if !job_done {
                    save_job(
                        engine,
                        &source,
                        m,
                        &req.sha256,
                        Outcome::Done,
                        "",
                        Some(s.model_id),
                    )?;
                }
            }
            None => todo.push(i),
        }
    }
    for (i, m) in plan.models.iter().enumerate() {
        if skip[i] {
            p.models_done += 1;
            p.models_unchanged += 1;
            p.filters_done += m.n_filters;
        }
    }
    p.phase = ImportPhase::Skipped;
    if !progress(&p) {
        return Ok(p);
    }
    let limit = opts.max_models.unwrap_or(u64::MAX);
    let todo: Vec<usize> = todo
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .collect();
    let stopped_early = p.models_done + (todo.len() as u64) < p.models_total;

    // Three stages on their own threads, so that both cores stay busy: a reader decodes model
    // i + 1 (HDF5 rows to f32), this thread computes the statistics of model i (rayon, both
    // cores) and a committer stores model i − 1 (an SST file and a few fsyncs) with its job
    // record. Rendezvous channels bound memory to four models plus one read window. The
    // committer stores models in release order, each in its own atomic commit, so an
    // interruption leaves whole models only and a re-run continues after the last one.
    let read = AtomicU64::new(0);
    let mut t = Timings::default();
    let mut tally = Tally {
        finished_filters: p.filters_done,
        p,
    };
    let finished = std::thread::scope(|scope| -> Result<bool> {
        let (tx, rx) = mpsc::sync_channel::<Fetched>(0);
        let reader = {
            let (todo, read) = (&todo, &read);
            std::thread::Builder::new()
                .name("cnnfdb-reader".into())
                .spawn_scoped(scope, move || {
                    read_models(plan, todo, opts.window_rows, read, tx)
                })
                .map_err(|e| thread_error("reader", e))?
        };
        let (to_commit, commit_rx) = mpsc::sync_channel::<ToCommit>(0);
        let (done_tx, done) = mpsc::channel::<Result<Committed>>();
        let committer = {
            let source = &source;
            std::thread::Builder::new()
                .name("cnnfdb-commit".into())
                .spawn_scoped(scope, move || {
                    commit_models(engine, plan, source, commit_rx, done_tx)
                })
                .map_err(|e| thread_error("commit", e))?
        };
        let stage = Stage {
            engine,
            plan,
            opts,
            source: &source,
            todo: &todo,
            read: &read,
        };
        let r = stage.run(rx, to_commit, &done, &mut tally, &mut t, progress);
        // `run` dropped its ends of the channels: the reader stops at its next send, the
        // committer after the model it holds (stored whole, and reported here).
        let (committed, read_end) = (committer.join(), reader.join());
        let mut commit_err = match (&committed, read_end) {
            (Err(_), _) => Some(EngineError::FailedPrecondition(
                "the commit thread panicked".into(),
            )),
            (_, Err(_)) => Some(EngineError::FailedPrecondition(
                "the HDF5 reader panicked".into(),
            )),
            _ => None,
        };
        t.commit += committed.unwrap_or_default();
        for c in done.try_iter() {
            match c {
                Ok(c) => tally.committed(plan, c),
                Err(e) => {
                    commit_err.get_or_insert(e);
                }
            }
        }
        match (r, commit_err) {
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok(all), None) => Ok(all),
        }
    })?;
    let mut p = tally.p;
    if finished {
        p.stopped_early = stopped_early;
        p.phase = ImportPhase::Done;
        p.model.clear();
        tracing::info!(
            file = %plan.file_name, created = p.models_created, unchanged = p.models_unchanged,
            filters = p.filters_done, stopped_early = p.stopped_early,
            waiting_for_reads_s = t.read_wait.as_secs_f64(), statistics_s = t.stats.as_secs_f64(),
            waiting_for_commits_s = t.commit_wait.as_secs_f64(),
            committing_s = t.commit.as_secs_f64(),
            "CNN Filter DB import finished"
        );
        progress(&p);
    }
    Ok(p)
}

fn thread_error(what: &str, e: std::io::Error) -> EngineError {
    EngineError::FailedPrecondition(format!("cannot start the {what} thread: {e}"))
}

/// Where the import's time goes (logged at the end). The stages overlap: the commit time is the
/// committer's own, the waits are this thread's.
#[derive(Default)]
struct Timings {
    read_wait: Duration,
    stats: Duration,
    commit_wait: Duration,
    commit: Duration,
}

/// A model handed to the committer.
enum ToCommit {
    /// Statistics computed: commit it.
    Ready {
        index: usize,
        prepared: Box<PreparedIngest>,
        sha256: String,
    },
    /// Found stored meanwhile: only the job record.
    Unchanged {
        index: usize,
        model_id: u64,
        sha256: String,
    },
}

/// A model the committer finished.
struct Committed {
    index: usize,
    outcome: IngestOutcome,
}

/// The progress and the filters of finished models (stored, or found stored).
struct Tally {
    p: ImportProgress,
    finished_filters: u64,
}

impl Tally {
    fn committed(&mut self, plan: &ImportPlan, c: Committed) {
        match c.outcome {
            IngestOutcome::Unchanged => self.p.models_unchanged += 1,
            IngestOutcome::Created | IngestOutcome::Replaced => self.p.models_created += 1,
        }
        self.p.models_done += 1;
        self.finished_filters += plan.models[c.index].n_filters;
        self.p.filters_done = self.finished_filters;
    }
}

/// The reader stage: one model after another, in `todo` order.
fn read_models(
    plan: &ImportPlan,
    todo: &[usize],
    window: u64,
    read: &AtomicU64,
    tx: mpsc::SyncSender<Fetched>,
) {
    let open = hdf5_pure::File::open_streaming(&plan.filters_path)
        .map_err(|e| invalid(format!("{}: {e}", plan.filters_path.display())))
        .and_then(|f| {
            f.dataset(&plan.dataset)
                .map_err(|e| invalid(format!("{}/{}: {e}", plan.file_name, plan.dataset)))
                .map(|d| (f, d))
        });
    let (_file, ds) = match open {
        Ok(x) => x,
        Err(e) => {
            let _ = tx.send(Fetched::Failed(e));
            return;
        }
    };
    for &i in todo {
        let msg = match read_model(&ds, plan, &plan.models[i], window, read) {
            Ok(m) => Fetched::Model(i, Box::new(m)),
            Err(e) => Fetched::Failed(e),
        };
        let failed = matches!(msg, Fetched::Failed(_));
        if tx.send(msg).is_err() || failed {
            return;
        }
    }
}

/// The committer stage: stores what it is handed, in order, until the channel closes or a
/// commit fails. Returns the time it spent committing.
fn commit_models(
    engine: &Engine,
    plan: &ImportPlan,
    source: &str,
    rx: mpsc::Receiver<ToCommit>,
    done: mpsc::Sender<Result<Committed>>,
) -> Duration {
    let mut busy = Duration::ZERO;
    for item in rx {
        let t = std::time::Instant::now();
        let r = match item {
            ToCommit::Unchanged {
                index,
                model_id,
                sha256,
            } => save_job(
                engine,
                source,
                &plan.models[index],
                &sha256,
                Outcome::Done,
                "",
                Some(model_id),
            )
            .map(|()| Committed {
                index,
                outcome: IngestOutcome::Unchanged,
            }),
            ToCommit::Ready {
                index,
                prepared,
                sha256,
            } => {
                let m = &plan.models[index];
                match engine.commit_prepared(*prepared, &|_, _, _| {}) {
                    Ok((outcome, stored)) => save_job(
                        engine,
                        source,
                        m,
                        &sha256,
                        Outcome::Done,
                        "",
                        Some(stored.model_id),
                    )
                    .map(|()| Committed { index, outcome }),
                    Err(e) => Err(quarantine(engine, source, m, &sha256, e)),
                }
            }
        };
        busy += t.elapsed();
        let failed = r.is_err();
        if done.send(r).is_err() || failed {
            break;
        }
    }
    busy
}

/// Names the model and meta row in an ingest error; input errors (bad model, name taken) are
/// recorded as a quarantined job. Returns the error to report.
fn quarantine(
    engine: &Engine,
    source: &str,
    m: &PlannedModel,
    sha256: &str,
    e: EngineError,
) -> EngineError {
    let row = m.layers.first().map_or(0, |l| l.row);
    let e = match e {
        EngineError::InvalidArgument(s) => {
            invalid(format!("model `{}` (meta row {row}): {s}", m.name))
        }
        EngineError::AlreadyExists(s) => EngineError::AlreadyExists(format!(
            "model `{}` (meta row {row}): {s}; re-run with replace to overwrite it",
            m.name
        )),
        other => return other,
    };
    match save_job(
        engine,
        source,
        m,
        sha256,
        Outcome::Quarantined,
        &e.to_string(),
        None,
    ) {
        Ok(()) => e,
        Err(save) => save,
    }
}

/// The statistics stage (the calling thread) and what it needs.
struct Stage<'a> {
    engine: &'a Engine,
    plan: &'a ImportPlan,
    opts: &'a ImportOptions,
    source: &'a str,
    todo: &'a [usize],
    read: &'a AtomicU64,
}

impl Stage<'_> {
    /// Receives each model from the reader, computes its statistics and hands it to the
    /// committer, reporting progress (and the committer's results) as it goes. Returns false
    /// when `progress` asked to stop, true when every model was handed over; an error of the
    /// reader or the statistics ends it (an error of the committer ends the hand-over and is
    /// reported by the caller).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        rx: mpsc::Receiver<Fetched>,
        to_commit: mpsc::SyncSender<ToCommit>,
        done: &mpsc::Receiver<Result<Committed>>,
        tally: &mut Tally,
        t: &mut Timings,
        progress: &mut dyn FnMut(&ImportProgress) -> bool,
    ) -> Result<bool> {
        let plan = self.plan;
        // Rows of the models before the current one, to report the current one's read rows.
        let mut read_before = 0u64;
        for &i in self.todo {
            let m = &plan.models[i];
            tally.p.phase = ImportPhase::Reading;
            tally.p.model = m.name.clone();
            let t_wait = std::time::Instant::now();
            let fetched = loop {
                match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(f) => break f,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.collect(done, tally)?;
                        let current = self
                            .read
                            .load(Ordering::Relaxed)
                            .saturating_sub(read_before);
                        tally.p.filters_done = tally.finished_filters + current.min(m.n_filters);
                        if !progress(&tally.p) {
                            return Ok(false);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(EngineError::FailedPrecondition(
                            "the HDF5 reader stopped unexpectedly".into(),
                        ));
                    }
                }
            };
            t.read_wait += t_wait.elapsed();
            read_before += m.n_filters;
            let extracted = match fetched {
                Fetched::Model(j, x) if j == i => *x,
                Fetched::Model(j, _) => {
                    return Err(EngineError::FailedPrecondition(format!(
                        "reader out of order: model {j}, expected {i}"
                    )));
                }
                Fetched::Failed(e) => {
                    let sha = content_id(plan, m);
                    save_job(
                        self.engine,
                        self.source,
                        m,
                        &sha,
                        Outcome::Quarantined,
                        &e.to_string(),
                        None,
                    )?;
                    return Err(e);
                }
            };
            self.collect(done, tally)?;
            tally.p.phase = ImportPhase::Storing;
            if !progress(&tally.p) {
                return Ok(false);
            }
            let req = request(plan, m, self.opts);
            let t_stats = std::time::Instant::now();
            let prepared = self
                .engine
                .prepare_extracted(extracted, &req, &|_, _, _| {})
                .map_err(|e| quarantine(self.engine, self.source, m, &req.sha256, e))?;
            t.stats += t_stats.elapsed();
            let item = match prepared {
                Prepared::Unchanged(s) => ToCommit::Unchanged {
                    index: i,
                    model_id: s.model_id,
                    sha256: req.sha256,
                },
                Prepared::Ready(prepared) => ToCommit::Ready {
                    index: i,
                    prepared,
                    sha256: req.sha256,
                },
            };
            let t_hand = std::time::Instant::now();
            let sent = to_commit.send(item);
            t.commit_wait += t_hand.elapsed();
            if sent.is_err() {
                // The committer stopped on an error; the caller reports it.
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Takes the committer's results so far into the progress.
    fn collect(&self, done: &mpsc::Receiver<Result<Committed>>, tally: &mut Tally) -> Result<()> {
        for c in done.try_iter() {
            tally.committed(self.plan, c?);
        }
        Ok(())
    }
}

fn save_job(
    engine: &Engine,
    source: &str,
    m: &PlannedModel,
    sha: &str,
    outcome: Outcome,
    error: &str,
    model_id: Option<u64>,
) -> Result<()> {
    let prev_attempts = engine
        .store()
        .get_job(source, &m.name)?
        .and_then(|v| serde_json::from_slice::<JobRecord>(&v).ok())
        .filter(|j| j.sha256 == sha)
        .map(|j| j.attempts)
        .unwrap_or(0);
    let r = JobRecord {
        source: source.to_string(),
        item: m.name.clone(),
        sha256: sha.to_string(),
        outcome,
        attempts: prev_attempts + 1,
        last_error: error.to_string(),
        model_id,
        model: if model_id.is_some() {
            m.name.clone()
        } else {
            String::new()
        },
        updated_unix_ms: crate::engine::now_ms(),
        next_retry_unix_ms: 0,
    };
    let v = serde_json::to_vec(&r)
        .map_err(|e| EngineError::FailedPrecondition(format!("job record: {e}")))?;
    engine.store().put_job(source, &m.name, &v)?;
    Ok(())
}

/// Plans and runs an import (see [`plan`] and [`run`]).
pub fn import(
    engine: &Engine,
    filters_path: &Path,
    meta_path: &Path,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(&ImportProgress) -> bool,
) -> Result<ImportProgress> {
    let plan = plan(filters_path, meta_path)?;
    run(engine, &plan, opts, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_ids_end_is_inclusive() {
        assert_eq!(parse_filter_ids("0:191"), Some((0, 191)));
        assert_eq!(parse_filter_ids(" 5:5 "), Some((5, 5)));
        assert_eq!(parse_filter_ids("9:3"), None);
        assert_eq!(parse_filter_ids("a:3"), None);
        assert_eq!(parse_filter_ids("12"), None);
    }

    #[test]
    fn kernel_shape_columns() {
        assert_eq!(kernel_shape_key("(3, 3) filters").as_deref(), Some("3x3"));
        assert_eq!(kernel_shape_key("(1, 7) filters").as_deref(), Some("1x7"));
        assert_eq!(kernel_shape_key("total_filters"), None);
    }

    fn row(
        model: &str,
        row: usize,
        layer_id: u32,
        start: u64,
        n: u64,
    ) -> (String, LayerRow, RowModel) {
        (
            model.into(),
            LayerRow {
                row,
                layer_id,
                conv_depth: 0,
                conv_depth_norm: 0.0,
                in_channels: 1,
                out_channels: n as u32,
                start,
                n,
            },
            RowModel {
                meta: MetaInput::default(),
                producer: None,
                opset: None,
                kernel_shape_counts: BTreeMap::new(),
            },
        )
    }

    #[test]
    fn ranges_must_tile() {
        let ok = group_models(
            "m",
            vec![
                row("b", 2, 0, 5, 3),
                row("a", 0, 0, 0, 2),
                row("a", 1, 1, 2, 3),
            ],
            8,
        )
        .unwrap();
        assert_eq!(
            ok.iter()
                .map(|m| (m.name.as_str(), m.start, m.n_filters))
                .collect::<Vec<_>>(),
            vec![("a", 0, 5), ("b", 5, 3)]
        );
        let e = group_models("m", vec![row("a", 0, 0, 0, 4), row("a", 1, 1, 3, 3)], 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 1") && e.contains("overlaps row 0"), "{e}");
        let e = group_models("m", vec![row("a", 0, 0, 0, 2), row("a", 1, 1, 3, 3)], 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("filters 2..2 belong to no layer"), "{e}");
        let e = group_models("m", vec![row("a", 0, 0, 0, 2)], 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds 3 rows"), "{e}");
        let e = group_models(
            "m",
            vec![
                row("a", 0, 0, 0, 2),
                row("b", 1, 0, 2, 1),
                row("a", 2, 1, 3, 1),
            ],
            4,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be consecutive"), "{e}");
    }

    #[test]
    fn decode_rounds_f64_and_names_nan() {
        let vals = [0.1f64, -2.5, 1e-40, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        decode(&raw, Element::F64Le, 0, &mut out, "m", 0).unwrap();
        assert_eq!(out, vals.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let mut bad = vals;
        bad[4] = f64::NAN;
        let raw: Vec<u8> = bad.iter().flat_map(|v| v.to_be_bytes()).collect();
        let e = decode(&raw, Element::F64Be, 41, &mut Vec::new(), "m", 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model `m`, layer_id 3: filter id 41 holds NaN at kernel position (1, 1)"),
            "{e}"
        );
    }
}
