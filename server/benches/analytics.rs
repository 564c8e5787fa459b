//! Analytics benchmark (issue 3): `DriftMatrix` Task × Task, `Basis` per visual category,
//! `LayerQuality` over all layers and `Census` by task, measured end to end through gRPC against
//! an in-process server, and the same answers computed by DuckDB from a Parquet export of the
//! same filters (`analytics_duckdb.py`), which doubles as the exactness check.
//!
//! What one run does:
//!
//! 1. Plans, from a seed, a synthetic CNN Filter DB: 647 models with the paper's skewed task and
//!    visual-category counts (cnn-filter-db-analyses.md §1.4), datasets and architectures, 10–100
//!    3x3 layers per model (~20,000 layers), conv_depth up to 100, layer sizes from 27 to
//!    1,048,576 filters (log-scale sizes whose skew is solved so the total is
//!    `FILTERDB_BENCH_FILTERS`, default 1e8).
//! 2. Generates each model's filters (seeded xorshift; a mixture around 384 centre kernels with
//!    Gaussian noise, scaled per layer, task/category-dependent centre preferences, a few near-zero
//!    and all-zero filters), ingests it with `Engine::ingest_extracted` and appends it to a Parquet
//!    file (one row per filter, zstd, row groups of 2^20 rows).
//! 3. Pins the reference basis (`Engine::pin_basis`, 70 bins), flushes, measures sizes and the
//!    largest per-layer state (LayerStats JSON + histogram JSON).
//! 4. Starts `filterdb::server::serve` on 127.0.0.1:0 and times each query `FILTERDB_BENCH_RUNS`
//!    times (default 30, after 3 warm-ups) through the generated gRPC clients; also times the
//!    same engine calls without gRPC, for attribution.
//! 5. Runs `analytics_duckdb.py` (DuckDB 2.0.0, `SET threads=2`, best of 3 per answer, query plus
//!    numpy post-processing) with the pinned basis, and compares every number.
//!
//! Run: `cargo bench --bench analytics` (release). Env: `FILTERDB_BENCH_FILTERS` (e.g. `1e6` for
//! a quick exactness run), `FILTERDB_BENCH_SEED`, `FILTERDB_BENCH_RUNS`, `FILTERDB_BENCH_DIR`
//! (where the database and the Parquet file go; default the system temp dir),
//! `FILTERDB_BENCH_OUT` (markdown report), `FILTERDB_BENCH_PYTHON` (default the project venv),
//! `FILTERDB_BENCH_KEEP=1` (keep the data), `FILTERDB_BENCH_SKIP_DUCKDB=1`,
//! `FILTERDB_BENCH_REUSE=1` (keep the database and Parquet file in
//! `FILTERDB_BENCH_DIR/filterdb-analytics-bench-<filters>-<seed>` and, when a finished one is
//! there, time the queries against it instead of building it again; delete the folder after a
//! change of the store format or of the generator).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, DictionaryArray, Float32Array, Float64Array, Int32Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field as ArrowField, Int32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use filterdb::analytics::{Grouping, Weights};
use filterdb::engine::{Engine, IngestRequest, MetaInput, NameConflict};
use filterdb::quality::QualityOptions;
use filterdb::readers::{DepthDefinition, ExtractedLayer, ExtractedModel, Format};
use filterdb::selection::{Field, Pred};
use filterdb::server::{ServerConfig, serve};
use filterdb_proto as pb;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use prost::Message;
use rayon::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const DEFAULT_FILTERS: f64 = 1e8;
const DEFAULT_SEED: u64 = 0x00F1_17E2_DB5E_ED01;
const N_CENTRES: usize = 384;
const MIN_LAYER: u64 = 27;
const MAX_LAYER: u64 = 1 << 20;
const ROW_GROUP_ROWS: usize = 1 << 20;
const WARMUP: usize = 3;
const BINS: u32 = 70;
const GOAL_MS: f64 = 20.0;
const GOAL_RATIO: f64 = 100.0;
const STATE_LIMIT: usize = 64 << 10;

/// The paper's 11 tasks with their model counts (v1.0.0 figure; sum 647).
const TASKS: [(&str, usize); 11] = [
    ("Classification", 555),
    ("Segmentation", 28),
    ("GAN-Generator", 24),
    ("Object Detection", 16),
    ("GAN-Discriminator", 7),
    ("Style Transfer", 5),
    ("Super Resolution", 4),
    ("Face Detection", 4),
    ("Depth Estimation", 2),
    ("Face Recognition", 1),
    ("Auto-Encoder", 1),
];

/// The paper's 16 visual categories with model counts (sum 647) and training datasets.
const CATEGORIES: [(&str, usize, &[&str]); 16] = [
    ("natural", 557, &["imagenet", "cifar10", "cifar100", "svhn", "coco", "pascal voc", "cityscapes", "places365", "kitti", "tinyimagenet", "stl10", "ade20k"]),
    ("handwriting", 36, &["mnist", "kmnist", "emnist"]),
    ("faces", 16, &["celeba", "ffhq", "lfw", "widerface"]),
    ("medical xray", 9, &["mimic_cxr", "chexpert", "nih chestxray14", "kaggle rsna"]),
    ("art", 5, &["wikiart"]),
    ("seismic", 4, &["seismic f3 netherlands"]),
    ("medical ct", 4, &["lidc-idri", "kits19"]),
    ("medical mri", 3, &["kaggle lgg", "nitrc_iitmean_b0"]),
    ("depth", 2, &["nyu depth v2"]),
    ("map", 2, &["spacenet"]),
    ("astronomy", 2, &["galaxy10"]),
    ("fractals", 2, &["fractaldb"]),
    ("textures", 2, &["dtd"]),
    ("thermal", 1, &["flir"]),
    ("cars", 1, &["kaggle carvana"]),
    ("plants", 1, &["plantvillage"]),
];

/// Single-channel inputs (first layer has 1 input channel).
const GRAYSCALE: [&str; 7] = ["handwriting", "medical xray", "medical ct", "medical mri", "seismic", "thermal", "depth"];

fn architectures(task: &str) -> &'static [&'static str] {
    match task {
        "Classification" => &[
            "ResNet", "WideResNet", "PreActResNet", "VGG", "DenseNet", "MobileNet", "EfficientNet", "Inception", "RegNet",
            "ConvNeXt", "ResNeXt", "ShuffleNet", "SqueezeNet", "RepVGG", "GhostNet", "MNASNet", "LeNet", "DPN", "Xception",
        ],
        "Segmentation" => &["UNet", "DeepLab", "FCN", "HRNet"],
        "GAN-Generator" => &["DCGAN", "StyleGAN", "CycleGAN", "Pix2Pix"],
        "GAN-Discriminator" => &["DCGAN", "StyleGAN", "Pix2Pix"],
        "Object Detection" => &["YOLO", "YOLOX", "SSD", "Faster R-CNN", "RetinaNet", "Mask R-CNN"],
        "Style Transfer" => &["VGG", "CycleGAN"],
        "Super Resolution" => &["ESRGAN", "SRResNet"],
        "Face Detection" => &["MTCNN", "RetinaNet"],
        "Depth Estimation" => &["UNet", "ResNet"],
        "Face Recognition" => &["ResNet"],
        _ => &["UNet"],
    }
}

/// Architectures with depthwise 3x3 convs (in_channels = 1 per group).
const DEPTHWISE_ARCHS: [&str; 5] = ["MobileNet", "EfficientNet", "MNASNet", "GhostNet", "ShuffleNet"];

// ---------------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------------

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64* seeded through splitmix64, one independent stream per (seed, stream).
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut s = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Rng(splitmix(&mut s) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, 1), f32.
    fn unit32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform integer below n (n < 2^32).
    fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
    /// Approximately standard normal: Irwin–Hall sum of the four 16-bit quarters of one draw.
    fn normal(&mut self) -> f32 {
        let x = self.next_u64();
        let s = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        (s as f32 - 131_070.0) * (1.732_050_8 / 65_536.0)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The synthetic database plan
// ---------------------------------------------------------------------------------------------

struct LayerPlan {
    out: u32,
    inp: u32,
    conv_depth: u32,
    conv_depth_norm: f64,
}

struct ModelPlan {
    name: String,
    task: &'static str,
    category: &'static str,
    dataset: &'static str,
    architecture: &'static str,
    layers: Vec<LayerPlan>,
    /// Indices into the global centres this model draws from, with cumulative weights.
    centres: Vec<usize>,
}

impl ModelPlan {
    fn n_filters(&self) -> u64 {
        self.layers.iter().map(|l| u64::from(l.out) * u64::from(l.inp)).sum()
    }
}

/// Random draws of a non-first layer; its shape follows from them and the global skew k.
#[derive(Clone, Copy)]
struct SizeDraw {
    u: f64,
    jitter: f64,
    depthwise: bool,
}

/// (out, in) of a layer of about `exp(ln 27 + (ln max − ln 27)·u^k)` filters.
fn layer_shape(d: SizeDraw, k: f64, max_n: u64) -> (u32, u32) {
    let (lo, hi) = ((MIN_LAYER as f64).ln(), (max_n as f64).ln());
    let s = (lo + (hi - lo) * d.u.powf(k)).exp();
    if d.depthwise && s <= 2048.0 {
        let out = ((s / 8.0).round() as u32 * 8).max(32);
        return (out, 1);
    }
    let out = (((s.sqrt() * 2f64.powf(0.75 * d.jitter)) / 8.0).round().max(1.0) as u32 * 8).clamp(8, 4096);
    let mut inp = ((s / f64::from(out)).round() as u32).clamp(3, 4096);
    if u64::from(out) * u64::from(inp) > max_n {
        inp = ((max_n / u64::from(out)) as u32).max(1);
    }
    if u64::from(out) * u64::from(inp) < MIN_LAYER {
        return (9, 3);
    }
    (out, inp)
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

struct Plan {
    models: Vec<ModelPlan>,
    centres: Vec<[f32; 9]>,
    skew_k: f64,
    max_layer: u64,
}

fn plan(seed: u64, target: u64) -> Plan {
    let mut r = Rng::new(seed, 0);
    // Centre kernels: edges, blobs, separable patterns and random ones, L∞ = 1.
    let mut centres = Vec::with_capacity(N_CENTRES);
    for c in 0..N_CENTRES {
        let mut k = [0f32; 9];
        match c % 4 {
            0 => {
                let th = r.unit() * std::f64::consts::TAU;
                for (j, v) in k.iter_mut().enumerate() {
                    let (y, x) = ((j / 3) as f64 - 1.0, (j % 3) as f64 - 1.0);
                    *v = (th.cos() * x + th.sin() * y) as f32 + 0.15 * r.normal();
                }
            }
            1 => {
                let (cy, cx, w) = (r.unit() - 0.5, r.unit() - 0.5, 0.4 + r.unit());
                let sign = if r.unit() < 0.5 { -1.0 } else { 1.0 };
                for (j, v) in k.iter_mut().enumerate() {
                    let (y, x) = ((j / 3) as f64 - 1.0 - cy, (j % 3) as f64 - 1.0 - cx);
                    *v = (sign * (-(x * x + y * y) / w).exp()) as f32 - 0.2 + 0.1 * r.normal();
                }
            }
            2 => {
                let a: [f32; 3] = std::array::from_fn(|_| r.normal());
                let b: [f32; 3] = std::array::from_fn(|_| r.normal());
                for (j, v) in k.iter_mut().enumerate() {
                    *v = a[j / 3] * b[j % 3];
                }
            }
            _ => {
                for v in k.iter_mut() {
                    *v = r.normal();
                }
            }
        }
        let m = k.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        centres.push(k.map(|v| v / m));
    }
    // Centre preferences per task and per category (log-normal weights).
    let pref = |r: &mut Rng| -> Vec<f64> { (0..N_CENTRES).map(|_| f64::from(1.6 * r.normal()).exp()).collect() };
    let task_pref: Vec<Vec<f64>> = TASKS.iter().map(|_| pref(&mut r)).collect();
    let cat_pref: Vec<Vec<f64>> = CATEGORIES.iter().map(|_| pref(&mut r)).collect();

    // Model labels with the paper's counts.
    let mut tasks: Vec<usize> = TASKS.iter().enumerate().flat_map(|(i, (_, n))| std::iter::repeat_n(i, *n)).collect();
    let mut cats: Vec<usize> = CATEGORIES.iter().enumerate().flat_map(|(i, (_, n, _))| std::iter::repeat_n(i, *n)).collect();
    r.shuffle(&mut tasks);
    r.shuffle(&mut cats);
    // Plausible pairings for the face and depth tasks (swaps keep both marginals).
    let task_idx = |name: &str| TASKS.iter().position(|(t, _)| *t == name).unwrap_or(0);
    let cat_idx = |name: &str| CATEGORIES.iter().position(|(c, _, _)| *c == name).unwrap_or(0);
    for (t, c) in [("Face Recognition", "faces"), ("Face Detection", "faces"), ("Depth Estimation", "depth")] {
        let (ti, ci) = (task_idx(t), cat_idx(c));
        for m in 0..tasks.len() {
            if tasks[m] != ti || cats[m] == ci {
                continue;
            }
            if let Some(o) = (0..tasks.len()).find(|&o| cats[o] == ci && tasks[o] == task_idx("Classification")) {
                cats.swap(m, o);
            }
        }
    }

    // Layer counts, depths and size draws.
    struct Pre {
        task: usize,
        cat: usize,
        arch: &'static str,
        dataset: &'static str,
        first: (u32, u32),
        draws: Vec<SizeDraw>,
        depths: Vec<(u32, f64)>,
        centres: Vec<usize>,
    }
    let mut pre = Vec::with_capacity(tasks.len());
    for (m, (&ti, &ci)) in tasks.iter().zip(&cats).enumerate() {
        let (task, _) = TASKS[ti];
        let (cat, _, datasets) = CATEGORIES[ci];
        let archs = architectures(task);
        let arch = archs[r.below(archs.len())];
        let dataset = datasets[r.below(datasets.len())];
        let u = r.unit();
        let n_layers = 10 + (91.0 * u * u * u) as usize;
        // Depth levels: 3x3 layers plus ranks taken by other kernel shapes, at most 101 (0..=100).
        let n_levels = (n_layers + (n_layers as f64 * 0.5 * r.unit()) as usize + 1).min(101);
        let mut depths: Vec<u32> = (0..n_layers).map(|_| r.below(n_levels) as u32).collect();
        depths.sort_unstable();
        if r.unit() < 0.6 {
            depths[0] = 0;
        }
        let max_level = (n_levels - 1) as u32;
        let depths: Vec<(u32, f64)> = depths
            .into_iter()
            .map(|d| (d, if max_level == 0 { 0.0 } else { f64::from(d) / f64::from(max_level) }))
            .collect();
        let gray = GRAYSCALE.contains(&cat);
        let first = if m == 0 {
            (9, 3)
        } else if gray {
            ([32u32, 48, 64][r.below(3)], 1)
        } else {
            ([16u32, 24, 32, 48, 64][r.below(5)], 3)
        };
        let depthwise_arch = DEPTHWISE_ARCHS.contains(&arch);
        let draws = (1..n_layers)
            .map(|_| SizeDraw { u: r.unit(), jitter: 2.0 * r.unit() - 1.0, depthwise: depthwise_arch && r.unit() < 0.4 })
            .collect();
        // The model's centres: 48 draws weighted by its task's and category's preferences.
        let w: Vec<f64> = (0..N_CENTRES).map(|c| task_pref[ti][c] * cat_pref[ci][c]).collect();
        let total: f64 = w.iter().sum();
        let mut cum = Vec::with_capacity(N_CENTRES);
        let mut acc = 0.0;
        for x in &w {
            acc += x / total;
            cum.push(acc);
        }
        let centres =
            (0..48)
            .map(|_| {
                let x = r.unit();
                cum.partition_point(|&c| c < x).min(N_CENTRES - 1)
            })
            .collect();
        pre.push(Pre { task: ti, cat: ci, arch, dataset, first, draws, depths, centres });
    }

    // The largest draw becomes the one maximal layer; solve the skew k for the total.
    let max_layer = MAX_LAYER.min((target / 64).max(MIN_LAYER));
    let (mut big_m, mut big_l, mut big_u) = (0, 0, -1.0);
    for (m, p) in pre.iter().enumerate() {
        for (l, d) in p.draws.iter().enumerate() {
            if d.u > big_u {
                (big_m, big_l, big_u) = (m, l, d.u);
            }
        }
    }
    let big_shape = {
        let mut out = 1u64;
        while (out * 2) * (out * 2) <= max_layer {
            out *= 2;
        }
        (out as u32, (max_layer / out) as u32)
    };
    let shapes = |k: f64| -> Vec<Vec<(u32, u32)>> {
        pre.iter()
            .enumerate()
            .map(|(m, p)| {
                std::iter::once(p.first)
                    .chain(p.draws.iter().enumerate().map(|(l, d)| {
                        if (m, l) == (big_m, big_l) { big_shape } else { layer_shape(*d, k, max_layer) }
                    }))
                    .collect()
            })
            .collect()
    };
    let total = |k: f64| -> u64 {
        shapes(k).iter().flatten().map(|(o, i)| u64::from(*o) * u64::from(*i)).sum()
    };
    let (mut lo, mut hi) = ((0.05f64).ln(), (2000f64).ln());
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if total(mid.exp()) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let skew_k = (0.5 * (lo + hi)).exp();
    let shapes = shapes(skew_k);

    let models = pre
        .into_iter()
        .zip(shapes)
        .enumerate()
        .map(|(m, (p, shapes))| ModelPlan {
            name: format!("{}_{}_{m:03}", slug(p.arch), slug(p.dataset)),
            task: TASKS[p.task].0,
            category: CATEGORIES[p.cat].0,
            dataset: p.dataset,
            architecture: p.arch,
            layers: shapes
                .into_iter()
                .zip(&p.depths)
                .map(|((out, inp), &(conv_depth, conv_depth_norm))| LayerPlan { out, inp, conv_depth, conv_depth_norm })
                .collect(),
            centres: p.centres,
        })
        .collect();
    Plan { models, centres, skew_k, max_layer }
}

/// One layer's filters: a mixture around a few of the model's centres with Gaussian noise,
/// scaled like a trained layer (Kaiming-like), with near-zero, all-zero and random-like layers.
fn gen_layer(seed: u64, model_idx: usize, layer_idx: usize, m: &ModelPlan, centres: &[[f32; 9]]) -> Vec<f32> {
    let lp = &m.layers[layer_idx];
    let mut r = Rng::new(seed, 1 + ((model_idx as u64) << 16) + layer_idx as u64);
    let n = lp.out as usize * lp.inp as usize;
    let k = 4 + r.below(28);
    let picks: Vec<usize> = (0..k).map(|_| m.centres[r.below(m.centres.len())]).collect();
    let mut cum = Vec::with_capacity(k);
    let mut acc = 0f32;
    for _ in 0..k {
        let u = 0.05 + r.unit32();
        acc += u * u * u;
        cum.push(acc);
    }
    let random_like = (m.task == "GAN-Discriminator" && r.unit() < 0.7) || r.unit() < 0.02;
    let sigma = if random_like {
        4.0
    } else {
        let u = r.unit32();
        (0.05 + 0.6 * u * u) * (1.0 + 0.8 * lp.conv_depth_norm as f32)
    };
    let scale = (2.0 / (9.0 * lp.inp as f32)).sqrt() * (0.3 * r.normal()).exp();
    let p_sparse = if r.unit() < 0.06 {
        0.15 + 0.5 * r.unit32()
    } else {
        let u = r.unit32();
        0.002 + 0.04 * u * u
    };
    let mut out = vec![0f32; n * 9];
    for f in out.chunks_exact_mut(9) {
        let u = r.unit32();
        if u < p_sparse {
            if u < 0.03 * p_sparse {
                continue; // all-zero filter
            }
            // Near-zero: 10^-3.5 .. 10^-1.5 of the layer scale, so some straddle the 1 % threshold.
            let a = scale * 10f32.powf(-3.5 + 2.0 * r.unit32());
            for v in f.iter_mut() {
                *v = a * r.normal();
            }
            continue;
        }
        let x = r.unit32() * acc;
        let c = &centres[picks[cum.partition_point(|&y| y < x).min(k - 1)]];
        let amp = (0.35 * r.normal()).exp() * if r.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
        for (v, cj) in f.iter_mut().zip(c) {
            *v = scale * (amp * cj + sigma * r.normal());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Parquet export
// ---------------------------------------------------------------------------------------------

fn parquet_schema() -> SchemaRef {
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let mut fields = vec![
        ArrowField::new("filter_id", DataType::Int64, false),
        ArrowField::new("model", dict.clone(), false),
        ArrowField::new("layer_id", DataType::Int64, false),
        ArrowField::new("task", dict.clone(), false),
        ArrowField::new("visual_category", dict, false),
        ArrowField::new("conv_depth", DataType::Int32, false),
        ArrowField::new("conv_depth_norm", DataType::Float64, false),
    ];
    for j in 0..9 {
        fields.push(ArrowField::new(format!("w{j}"), DataType::Float32, false));
    }
    Arc::new(Schema::new(fields))
}

fn parquet_writer(path: &Path, schema: SchemaRef) -> anyhow::Result<ArrowWriter<std::fs::File>> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    for col in ["filter_id", "w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8"] {
        props = props.set_column_dictionary_enabled(ColumnPath::from(col), false);
    }
    Ok(ArrowWriter::try_new(std::fs::File::create(path)?, schema, Some(props.build()))?)
}

fn dict_column(value: &str, n: usize) -> anyhow::Result<ArrayRef> {
    let keys = Int32Array::from(vec![0; n]);
    let values: ArrayRef = Arc::new(StringArray::from(vec![value]));
    Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(keys, values)?))
}

struct LayerRows<'a> {
    first_filter_id: u64,
    layer_id: u64,
    model: &'a str,
    task: &'a str,
    category: &'a str,
    conv_depth: u32,
    conv_depth_norm: f64,
    filters: &'a [f32],
}

fn layer_batch(schema: &SchemaRef, l: &LayerRows<'_>) -> anyhow::Result<RecordBatch> {
    let n = l.filters.len() / 9;
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| l.first_filter_id as i64 + i))),
        dict_column(l.model, n)?,
        Arc::new(Int64Array::from(vec![l.layer_id as i64; n])),
        dict_column(l.task, n)?,
        dict_column(l.category, n)?,
        Arc::new(Int32Array::from(vec![l.conv_depth as i32; n])),
        Arc::new(Float64Array::from(vec![l.conv_depth_norm; n])),
    ];
    for j in 0..9 {
        cols.push(Arc::new(Float32Array::from_iter_values(l.filters.chunks_exact(9).map(|f| f[j]))));
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers
// ---------------------------------------------------------------------------------------------

struct Timing {
    p50: f64,
    p95: f64,
}

fn timing(mut ds: Vec<Duration>) -> Timing {
    ds.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rank = |p: f64| ds[((p * ds.len() as f64).ceil() as usize).clamp(1, ds.len()) - 1];
    Timing { p50: ms(rank(0.5)), p95: ms(rank(0.95)) }
}


/// Protobuf encode and decode of an answer, p50 ms of 20 runs each: the message format's share
/// of a call (the server encodes once, the client decodes once).
fn codec_ms<M: Message + Default>(m: &M) -> (f64, f64) {
    let runs = |f: &dyn Fn()| {
        timing((0..20).map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        }).collect())
        .p50
    };
    let bytes = m.encode_to_vec();
    (runs(&|| drop(std::hint::black_box(m.encode_to_vec()))), runs(&|| drop(std::hint::black_box(M::decode(bytes.as_slice())))))
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|v| v.trim().replace('_', "").parse::<f64>().ok())
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn fv(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().map(f).collect()).unwrap_or_default()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(u64::MAX)
}

/// Outcome of one comparison: passed, and a short note for the table.
struct Check {
    ok: bool,
    note: String,
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

struct Answers {
    drift: pb::DriftMatrixResponse,
    basis: pb::BasisResponse,
    quality: pb::LayerQualityResponse,
    census: pb::CensusResponse,
    distributions: pb::DistributionsResponse,
    pinned: pb::PinnedBasis,
}

fn main() -> anyhow::Result<()> {
    let t_all = Instant::now();
    let target = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .find_map(|a| a.replace('_', "").parse::<f64>().ok())
        .or_else(|| env_f64("FILTERDB_BENCH_FILTERS"))
        .unwrap_or(DEFAULT_FILTERS) as u64;
    let seed = env_f64("FILTERDB_BENCH_SEED").map(|s| s as u64).unwrap_or(DEFAULT_SEED);
    let runs = env_f64("FILTERDB_BENCH_RUNS").map(|r| r as usize).unwrap_or(30).max(20);
    let keep = std::env::var("FILTERDB_BENCH_KEEP").is_ok_and(|v| v == "1");
    let skip_duckdb = std::env::var("FILTERDB_BENCH_SKIP_DUCKDB").is_ok_and(|v| v == "1");
    let reuse = std::env::var("FILTERDB_BENCH_REUSE").is_ok_and(|v| v == "1");
    let base = std::env::var_os("FILTERDB_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = if reuse {
        base.join(format!("filterdb-analytics-bench-{target}-{seed:x}"))
    } else {
        base.join(format!("filterdb-analytics-bench-{}", std::process::id()))
    };
    std::fs::create_dir_all(&work)?;
    eprintln!("analytics bench: target {target} filters, seed {seed:#x}, data in {}", work.display());

    let result = run(target, seed, runs, skip_duckdb, reuse, &work, t_all);
    if keep || reuse {
        eprintln!("keeping {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn run(target: u64, seed: u64, runs: usize, skip_duckdb: bool, reuse: bool, work: &Path, t_all: Instant) -> anyhow::Result<()> {
    // 1. Plan.
    let t = Instant::now();
    let plan = plan(seed, target);
    let n_models = plan.models.len();
    let n_layers: usize = plan.models.iter().map(|m| m.layers.len()).sum();
    let n_filters: u64 = plan.models.iter().map(ModelPlan::n_filters).sum();
    let sizes: Vec<u64> = plan.models.iter().flat_map(|m| m.layers.iter().map(|l| u64::from(l.out) * u64::from(l.inp))).collect();
    let (min_layer, max_layer) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
    let max_depth = plan.models.iter().flat_map(|m| m.layers.iter().map(|l| l.conv_depth)).max().unwrap_or(0);
    eprintln!(
        "plan: {n_models} models, {n_layers} layers, {n_filters} filters (layer sizes {min_layer}..{max_layer}, cap {}, skew k = {:.3}, max conv_depth {max_depth}) in {:.2?}",
        plan.max_layer,
        plan.skew_k,
        t.elapsed()
    );

    // 2. Generate, ingest, export (or reuse a finished earlier build).
    let ready = work.join("READY");
    let reused = reuse && ready.exists();
    if reuse && !reused {
        // An unfinished earlier build: start over.
        let _ = std::fs::remove_dir_all(work.join("db"));
    }
    let engine = Arc::new(Engine::open(&work.join("db"))?);
    let parquet_path = work.join("filters.parquet");
    let (mut t_gen, mut t_ingest, mut t_parquet) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let t_build = Instant::now();
    if reused {
        eprintln!("reusing the database and Parquet file of an earlier run in {}", work.display());
    } else {
        let schema = parquet_schema();
        let mut writer = parquet_writer(&parquet_path, schema.clone())?;
        let mut done_filters = 0u64;
        let mut next_report = 0.0;
        for (mi, m) in plan.models.iter().enumerate() {
            let t = Instant::now();
            let layers: Vec<Vec<f32>> =
                (0..m.layers.len()).into_par_iter().map(|li| gen_layer(seed, mi, li, m, &plan.centres)).collect();
            t_gen += t.elapsed();
            let t = Instant::now();
            let extracted = ExtractedModel {
                format: Format::Onnx,
                layers: layers
                    .into_iter()
                    .zip(&m.layers)
                    .enumerate()
                    .map(|(li, (filters, lp))| ExtractedLayer {
                        tensor_name: format!("features.{li}.conv.weight"),
                        out_channels: lp.out,
                        in_channels: lp.inp,
                        groups: Some(if lp.inp == 1 { lp.out } else { 1 }),
                        conv_depth: lp.conv_depth,
                        conv_depth_norm: lp.conv_depth_norm,
                        layer_index: li as u32,
                        filters,
                    })
                    .collect(),
                kernel_shape_counts: BTreeMap::from([("3x3".to_string(), m.n_filters())]),
                depth_definition: DepthDefinition::GraphLongestPath,
                producer: Some("filterdb analytics bench (synthetic)".into()),
                opset: Some(13),
                excluded: Vec::new(),
            };
            let sha = hex::encode(Sha256::digest(format!("filterdb-analytics-bench/{seed}/{mi}").as_bytes()));
            let req = IngestRequest {
                meta: MetaInput {
                    name: m.name.clone(),
                    training_datasets: vec![m.dataset.to_string()],
                    task: m.task.to_string(),
                    architecture: m.architecture.to_string(),
                    visual_category: m.category.to_string(),
                    ..Default::default()
                },
                file_name: format!("{}.onnx", m.name),
                format: Some(Format::Onnx),
                sha256: sha,
                size_bytes: m.n_filters() * 36,
                on_conflict: NameConflict::Error,
            };
            // Export first (the ingest consumes the filters), with the ids the ingest will assign:
            // ids are dense in allocation order, so they are the catalogue's next ids (checked below).
            let next = engine.with_catalog(|c| c.next_ids);
            let meta = engine.normalize_meta(&req.meta)?;
            t_ingest += t.elapsed();
            let t = Instant::now();
            let mut first_filter_id = next.filter;
            for (li, (lp, l)) in m.layers.iter().zip(&extracted.layers).enumerate() {
                let batch = layer_batch(
                    &schema,
                    &LayerRows {
                        first_filter_id,
                        layer_id: next.layer + li as u64,
                        model: &m.name,
                        task: &meta.task.canonical,
                        category: &meta.visual_category.canonical,
                        conv_depth: lp.conv_depth,
                        conv_depth_norm: lp.conv_depth_norm,
                        filters: &l.filters,
                    },
                )?;
                writer.write(&batch)?;
                first_filter_id += l.n_filters();
            }
            t_parquet += t.elapsed();
            let t = Instant::now();
            let (_, rec) = engine.ingest_extracted(extracted, &req, &|_, _, _| {})?;
            t_ingest += t.elapsed();
            anyhow::ensure!(
                rec.first_filter_id == next.filter && rec.first_layer_id == next.layer && rec.name == m.name,
                "model {}: ids ({}, {}) differ from the exported ({}, {})",
                m.name,
                rec.first_layer_id,
                rec.first_filter_id,
                next.layer,
                next.filter
            );
            done_filters += m.n_filters();
            let frac = done_filters as f64 / n_filters as f64;
            if frac >= next_report {
                eprintln!(
                    "  {:>3.0}%  {}/{n_models} models, {done_filters} filters, {:.1?} (gen {:.1?}, ingest {:.1?}, parquet {:.1?})",
                    frac * 100.0,
                    mi + 1,
                    t_build.elapsed(),
                    t_gen,
                    t_ingest,
                    t_parquet
                );
                next_report += 0.1;
            }
        }
        let t = Instant::now();
        writer.close()?;
        t_parquet += t.elapsed();
    }
    let build = t_build.elapsed();

    // 3. Pin, flush, sizes, state.
    let t = Instant::now();
    let basis = match engine.pinned_basis() {
        Some(b) if reused => b,
        _ => engine.pin_basis(&Pred::True, "", BINS, &|_, _, _, _| {})?,
    };
    let t_pin = t.elapsed();
    eprintln!("pinned basis v{} in {t_pin:.1?} (range {:.4} .. {:.4})", basis.version, basis.range_min, basis.range_max);
    engine.store().flush()?;
    if reuse && !reused {
        std::fs::write(&ready, format!("{n_filters} filters, seed {seed:#x}\n"))?;
    }
    let db_bytes = common::dir_bytes(&work.join("db"));
    let parquet_bytes = std::fs::metadata(&parquet_path)?.len();
    let (stats_max, stats_layer, layers_seen) = engine.with_catalog(|c| {
        let mut best = (0usize, 0u64, 0usize);
        c.for_each_selected_arc(&Pred::True, |_, l| {
            let n = serde_json::to_vec(&l.stats).map(|v| v.len()).unwrap_or(0);
            best.2 += 1;
            if n > best.0 {
                best = (n, l.record.layer_id, best.2);
            }
        });
        best
    });
    let hist_sizes: HashMap<u64, usize> = match engine.store().load_current_basis()? {
        Some((_, hs)) => hs.iter().map(|(id, h)| (*id, serde_json::to_vec(h).map(|v| v.len()).unwrap_or(0))).collect(),
        None => HashMap::new(),
    };
    let hist_max = hist_sizes.values().copied().max().unwrap_or(0);
    let combined_max = engine.with_catalog(|c| {
        let mut best = 0usize;
        c.for_each_selected_arc(&Pred::True, |_, l| {
            let n = serde_json::to_vec(&l.stats).map(|v| v.len()).unwrap_or(0)
                + hist_sizes.get(&l.record.layer_id).copied().unwrap_or(0);
            best = best.max(n);
        });
        best
    });
    eprintln!(
        "sizes: db {} (filters {}), parquet {}; largest state: stats {stats_max} B (layer {stats_layer}), histogram {hist_max} B, stats+histogram {combined_max} B over {layers_seen} layers",
        human_bytes(db_bytes),
        human_bytes(n_filters * 36),
        human_bytes(parquet_bytes)
    );

    // Steady state before timing: RocksDB's background compactions after the bulk build would
    // otherwise share the 2 cores with the queries.
    let settled = common::settle(&engine)?;
    eprintln!("background compactions settled after {settled:.1} s");

    // 4a. Engine-only timings (no gRPC), for attribution.
    let engine_ms = {
        let e = &engine;
        let time = |f: &dyn Fn()| -> Timing {
            for _ in 0..WARMUP {
                f();
            }
            timing((0..runs).map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            }).collect())
        };
        let drift = time(&|| {
            std::hint::black_box(e.drift_matrix(&Pred::True, &Grouping::Field(Field::Task), &Weights::Evr, false, (0, None, None)).ok());
        });
        let basis = time(&|| {
            std::hint::black_box(e.basis(&Pred::True, &Grouping::Field(Field::VisualCategory), false));
        });
        let quality = time(&|| {
            std::hint::black_box(e.layer_quality(&Pred::True, &QualityOptions::default(), 0).ok());
        });
        let census = time(&|| {
            std::hint::black_box(e.census(&Pred::True, &[Field::Task]));
        });
        [drift, basis, quality, census]
    };

    // Optional: loop one engine call so `perf record -p PID` can attach (profiling aid).
    if let Ok(spec) = std::env::var("FILTERDB_BENCH_PROFILE") {
        let (what, secs) = spec.split_once(':').unwrap_or((spec.as_str(), "20"));
        let secs: f64 = secs.parse().unwrap_or(20.0);
        eprintln!("profiling {what} for {secs} s in pid {}", std::process::id());
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < secs {
            match what {
                "drift" => drop(engine.drift_matrix(&Pred::True, &Grouping::Field(Field::Task), &Weights::Evr, false, (0, None, None))),
                "basis" => drop(engine.basis(&Pred::True, &Grouping::Field(Field::VisualCategory), false)),
                "quality" => drop(engine.layer_quality(&Pred::True, &QualityOptions::default(), 0)),
                _ => drop(engine.census(&Pred::True, &[Field::Task])),
            }
            n += 1;
        }
        eprintln!("profiling done: {n} calls, {:.3} ms each", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    }

    // 4b. Through gRPC: the server as shipped (`serve` sets TCP_NODELAY on accepted sockets).
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg: String = loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (grpc_ms, answers, sizes_bytes) = rt.block_on(grpc_round(&engine, runs))?;
    let codec = [codec_ms(&answers.drift), codec_ms(&answers.basis), codec_ms(&answers.quality), codec_ms(&answers.census)];
    for (i, name) in ["DriftMatrix", "Basis", "LayerQuality", "Census"].iter().enumerate() {
        eprintln!(
            "server {name:<13} p50 {:>9.3} ms  p95 {:>9.3} ms  (engine only p50 {:>9.3} ms)",
            grpc_ms[i].p50, grpc_ms[i].p95, engine_ms[i].p50
        );
    }
    drop(engine);

    // 5. DuckDB.
    let duck = if skip_duckdb { None } else { Some(run_duckdb(work, &parquet_path, &answers, n_filters)?) };

    // 6. Compare and report.
    let checks = duck.as_ref().map(|d| compare(&answers, d));
    let duck_s = |key: &str| duck.as_ref().map(|d| f(&d["timings"][key]["best_s"]));
    let mut md = String::new();
    writeln!(md, "## FilterDB analytics benchmark (issue 3)\n")?;
    writeln!(
        md,
        "Synthetic DB (seed {seed:#x}): {} models, {} layers, {} filters; layer sizes {}..{} filters; max conv_depth {max_depth}; 11 tasks, 16 visual categories. Host: {} CPUs, load average {loadavg} when the queries were timed. Server: in-process tonic on 127.0.0.1, {runs} timed runs after {WARMUP} warm-ups. DuckDB {}: `SET threads=2`, Parquet in page cache, best of 3, query + numpy post-processing.\n",
        thousands(n_models as u64),
        thousands(n_layers as u64),
        thousands(n_filters),
        thousands(min_layer),
        thousands(max_layer),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        duck.as_ref().and_then(|d| d["duckdb_version"].as_str().map(String::from)).unwrap_or_else(|| "(skipped)".into()),
    )?;
    writeln!(md, "| query | server p50 ms | server p95 ms | DuckDB s | ratio | exact? |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let names = ["DriftMatrix Task×Task", "Basis per visual category", "LayerQuality all layers", "Census by task"];
    let keys = ["drift", "basis", "quality", "census"];
    let mut goals = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let g = &grpc_ms[i];
        let ds = duck_s(keys[i]);
        let ratio = ds.map(|s| s * 1e3 / g.p50);
        let exact = checks.as_ref().map(|c| {
            let c = &c[i];
            format!("{}: {}", if c.ok { "yes" } else { "**NO**" }, c.note)
        });
        writeln!(
            md,
            "| {name} | {:.2} | {:.2} | {} | {} | {} |",
            g.p50,
            g.p95,
            ds.map(|s| format!("{s:.3}")).unwrap_or_else(|| "-".into()),
            ratio.map(|r| format!("{r:.0}x")).unwrap_or_else(|| "-".into()),
            exact.unwrap_or_else(|| "-".into())
        )?;
        goals.push((name, g.p50 <= GOAL_MS, ratio.map(|r| r >= GOAL_RATIO)));
    }
    writeln!(md)?;
    writeln!(md, "Attribution: the same call on the `Engine` without gRPC, the response size, and the protobuf codec alone.\n")?;
    writeln!(md, "| query | engine-only p50 ms | engine-only p95 ms | response bytes | protobuf encode / decode ms | p50 goal ≤ {GOAL_MS} ms | ratio goal ≥ {GOAL_RATIO}x |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for (i, name) in names.iter().enumerate() {
        let (_, p50_ok, ratio_ok) = goals[i];
        writeln!(
            md,
            "| {name} | {:.2} | {:.2} | {} | {:.2} / {:.2} | {} | {} |",
            engine_ms[i].p50,
            engine_ms[i].p95,
            thousands(sizes_bytes[i] as u64),
            codec[i].0,
            codec[i].1,
            if p50_ok { "met" } else { "**missed**" },
            match ratio_ok {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "-",
            }
        )?;
    }
    writeln!(md)?;
    let build_s = build.as_secs_f64();
    if reused {
        writeln!(md, "- Build and pin: reused from an earlier run (`FILTERDB_BENCH_REUSE=1`, {}).", work.display())?;
    } else {
        writeln!(md, "- Build: {build_s:.1} s for {} filters ({:.2} M filters/s): generation {:.1} s, `Engine::ingest_extracted` {:.1} s, Parquet export {:.1} s.", thousands(n_filters), n_filters as f64 / build_s / 1e6, t_gen.as_secs_f64(), t_ingest.as_secs_f64(), t_parquet.as_secs_f64())?;
        writeln!(md, "- Pin basis (fit + range pass + 70-bin histograms of every layer): {:.1} s.", t_pin.as_secs_f64())?;
    }
    writeln!(md, "- On disk: RocksDB {} after flush ({} bytes; raw f32 filters are {}), Parquet {} ({} bytes, zstd, row groups of {} rows).", human_bytes(db_bytes), thousands(db_bytes), human_bytes(n_filters * 36), human_bytes(parquet_bytes), thousands(parquet_bytes), thousands(ROW_GROUP_ROWS as u64))?;
    writeln!(
        md,
        "- Largest per-layer aggregate state: LayerStats JSON {} B, histogram JSON {} B, stats + histogram {} B (limit {} B: {}).",
        thousands(stats_max as u64),
        thousands(hist_max as u64),
        thousands(combined_max as u64),
        thousands(STATE_LIMIT as u64),
        if combined_max <= STATE_LIMIT { "met" } else { "**exceeded**" }
    )?;
    if let Some(d) = &duck {
        let mut parts = Vec::new();
        for k in keys {
            let t = &d["timings"][k];
            parts.push(format!("{k} {:?}", fv(&t["runs_s"]).iter().map(|x| (x * 1000.0).round() / 1000.0).collect::<Vec<_>>()));
        }
        writeln!(md, "- DuckDB runs (s): {}.", parts.join("; "))?;
        if let Some(n) = d["bins_checked_with_numpy"].as_u64() {
            writeln!(md, "- SQL binning cross-checked against numpy.histogram on {} coefficients.", thousands(n))?;
        }
    }
    if let Some(cs) = &checks {
        for (name, c) in names.iter().zip(cs) {
            if !c.ok {
                writeln!(md, "- MISMATCH in {name}: {}", c.note)?;
            }
        }
    }
    writeln!(md, "- Total bench wall time: {:.1} s.", t_all.elapsed().as_secs_f64())?;
    print!("{md}");
    if let Some(out) = std::env::var_os("FILTERDB_BENCH_OUT") {
        std::fs::write(&out, &md)?;
        eprintln!("wrote {}", PathBuf::from(out).display());
    }
    if let Some(cs) = &checks
        && cs.iter().any(|c| !c.ok)
    {
        anyhow::bail!("DuckDB and the server disagree (see the table)");
    }
    Ok(())
}

async fn grpc_round(engine: &Arc<Engine>, runs: usize) -> anyhow::Result<([Timing; 4], Answers, [usize; 4])> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(engine.clone(), listener, ServerConfig::default(), async move {
        let _ = rx.await;
    }));
    let channel = {
        let mut last = None;
        for _ in 0..100 {
            // The same HTTP/2 windows the filterdb client library uses: the default 64 KiB
            // window costs round trips on multi-MB answers (LayerQuality was 2.25 MB).
            match tonic::transport::Endpoint::from_shared(url.clone())?
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(16 << 20))
                .connect()
                .await
            {
                Ok(c) => {
                    last = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        last.ok_or_else(|| anyhow::anyhow!("server at {url} did not come up"))?
    };
    let analytics = pb::analytics_client::AnalyticsClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let fdb = pb::filter_db_client::FilterDbClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let group = |field: pb::Field| Some(pb::GroupSpec { field: field as i32, selections: Vec::new() });
    let drift_req = pb::DriftMatrixRequest { group: group(pb::Field::Task), ..Default::default() };
    let basis_req = pb::BasisRequest { group: group(pb::Field::VisualCategory), ..Default::default() };
    let quality_req = pb::LayerQualityRequest::default();
    let census_req = pb::CensusRequest { group_by: vec![pb::Field::Task as i32], ..Default::default() };

    macro_rules! measure {
        ($client:expr, $method:ident, $req:expr) => {{
            let mut ds = Vec::with_capacity(runs);
            let mut last = None;
            for i in 0..WARMUP + runs {
                let mut c = $client.clone();
                let t = Instant::now();
                let r = c.$method($req.clone()).await?.into_inner();
                let d = t.elapsed();
                if i >= WARMUP {
                    ds.push(d);
                }
                last = Some(r);
            }
            (timing(ds), last.expect("at least one run"))
        }};
    }
    let (t_drift, drift) = measure!(analytics, drift_matrix, drift_req);
    let (t_basis, basis) = measure!(analytics, basis, basis_req);
    let (t_quality, quality) = measure!(analytics, layer_quality, quality_req);
    let (t_census, census) = measure!(fdb, census, census_req);
    let distributions = analytics
        .clone()
        .distributions(pb::DistributionsRequest { group: group(pb::Field::Task), ..Default::default() })
        .await?
        .into_inner();
    let pinned = analytics.clone().get_pinned_basis(pb::GetPinnedBasisRequest {}).await?.into_inner();
    let sizes_bytes = [drift.encoded_len(), basis.encoded_len(), quality.encoded_len(), census.encoded_len()];
    let _ = tx.send(());
    server.await??;
    Ok(([t_drift, t_basis, t_quality, t_census], Answers { drift, basis, quality, census, distributions, pinned }, sizes_bytes))
}

fn run_duckdb(work: &Path, parquet: &Path, a: &Answers, n_filters: u64) -> anyhow::Result<Value> {
    let b = a.pinned.basis.as_ref().ok_or_else(|| anyhow::anyhow!("pinned basis without basis"))?;
    let params = json!({
        "parquet": parquet,
        "mean": b.mean,
        "components": b.components,
        "evr": b.evr,
        "range_min": a.pinned.range_min,
        "range_max": a.pinned.range_max,
        "bins": a.pinned.bins,
        "sparsity_eps": 0.01,
        "validate_bins": n_filters <= 20_000_000,
        "repeats": 3,
    });
    let params_path = work.join("duckdb_params.json");
    std::fs::write(&params_path, serde_json::to_vec_pretty(&params)?)?;
    let python = std::env::var_os("FILTERDB_BENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/filterdb/venv/bin/python"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/analytics_duckdb.py");
    eprintln!("running {} {} ...", python.display(), script.display());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(&params_path)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("{} failed with {}", script.display(), out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn compare(a: &Answers, d: &Value) -> Vec<Check> {
    vec![compare_drift(a, &d["drift"]), compare_basis(a, &d["basis"]), compare_quality(a, &d["quality"]), compare_census(a, &d["census"])]
}

fn compare_drift(a: &Answers, d: &Value) -> Check {
    let keys: Vec<String> = d["keys"].as_array().map(|k| k.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
    let dm = &a.drift;
    let mut problems = Vec::new();
    if keys != dm.keys {
        problems.push(format!("keys differ: server {:?}, duckdb {:?}", dm.keys, keys));
        return Check { ok: false, note: problems.join("; ") };
    }
    let g = keys.len();
    // Histogram counts, exactly (server's Distributions RPC vs DuckDB GROUPING SETS).
    let mut hist_equal = true;
    for (gi, key) in keys.iter().enumerate() {
        let Some(sg) = a.distributions.groups.iter().find(|x| &x.key == key) else {
            problems.push(format!("no server histogram for {key}"));
            hist_equal = false;
            continue;
        };
        let dh = &d["hist"][gi];
        for (i, comp) in sg.components.iter().enumerate() {
            let want: Vec<u64> = dh[i].as_array().map(|x| x.iter().map(u).collect()).unwrap_or_default();
            if want != comp.counts {
                hist_equal = false;
                if problems.len() < 4 {
                    problems.push(format!("histogram {key} component {i} differs"));
                }
            }
        }
    }
    let dd = fv(&d["d"]);
    let mut worst = 0f64;
    for (x, y) in dm.d.iter().zip(&dd) {
        let rel = (x - y).abs() / x.abs().max(y.abs()).max(1e-300);
        if x != y {
            worst = worst.max(rel);
        }
    }
    let ok_d = dd.len() == g * g && worst <= 1e-9;
    if !ok_d {
        problems.push(format!("D max relative difference {worst:.2e} (or size {} vs {})", dd.len(), g * g));
    }
    let ok = ok_d && hist_equal && problems.is_empty();
    let note = if ok {
        format!("{g}×{g} D max rel. Δ {worst:.1e}; 9×70 histograms of all {g} tasks equal")
    } else {
        problems.join("; ")
    };
    Check { ok, note }
}

fn compare_basis(a: &Answers, d: &Value) -> Check {
    let groups = d.as_object();
    let mut problems = Vec::new();
    let (mut worst_evr, mut worst_mean, mut min_cos) = (0f64, 0f64, 1f64);
    let mut n_groups = 0;
    for g in &a.basis.groups {
        let Some(want) = groups.and_then(|m| m.get(&g.key)) else {
            problems.push(format!("DuckDB has no group {}", g.key));
            continue;
        };
        let Some(b) = &g.basis else { continue };
        n_groups += 1;
        if u(&want["n"]) != b.n {
            problems.push(format!("{}: n {} vs {}", g.key, b.n, u(&want["n"])));
        }
        for (x, y) in b.evr.iter().zip(fv(&want["evr"])) {
            worst_evr = worst_evr.max((x - y).abs());
        }
        for (x, y) in b.mean.iter().zip(fv(&want["mean"])) {
            worst_mean = worst_mean.max((x.abs() - y.abs()).abs());
        }
        let comps = fv(&want["components"]);
        for k in 0..9 {
            if comps.len() < 81 {
                break;
            }
            let c: f64 = (0..9).map(|j| b.components[9 * k + j] * comps[9 * k + j]).sum::<f64>().abs();
            min_cos = min_cos.min(c);
        }
    }
    if groups.map(|m| m.len()).unwrap_or(0) != a.basis.groups.len() {
        problems.push(format!("{} server groups vs {} DuckDB groups", a.basis.groups.len(), groups.map(|m| m.len()).unwrap_or(0)));
    }
    let ok = problems.is_empty() && worst_evr <= 1e-6 && worst_mean <= 1e-6;
    let note = if ok {
        format!("{n_groups} groups, max |ΔEVR| {worst_evr:.1e}, max |Δ|μ|| {worst_mean:.1e} (min |cos| of matched components {min_cos:.6})")
    } else {
        format!("{} max |ΔEVR| {worst_evr:.2e}, max |Δ|μ|| {worst_mean:.2e}", problems.join("; "))
    };
    Check { ok, note }
}

fn compare_quality(a: &Answers, d: &Value) -> Check {
    let ids: Vec<u64> = d["layer_id"].as_array().map(|x| x.iter().map(u).collect()).unwrap_or_default();
    let ns: Vec<u64> = d["n"].as_array().map(|x| x.iter().map(u).collect()).unwrap_or_default();
    let sparse: Vec<u64> = d["sparse"].as_array().map(|x| x.iter().map(u).collect()).unwrap_or_default();
    let h: Vec<Option<f64>> = d["entropy"].as_array().map(|x| x.iter().map(|v| v.as_f64()).collect()).unwrap_or_default();
    let by_id: HashMap<u64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut problems = Vec::new();
    let (mut s_equal, mut worst_h) = (0usize, 0f64);
    let q = &a.quality;
    let n = q.layer_id.len();
    if [q.n.len(), q.sparsity.len(), q.entropy.len()].iter().any(|&l| l != n) {
        return Check { ok: false, note: "the server's LayerQuality columns differ in length".into() };
    }
    for (k, &layer_id) in q.layer_id.iter().enumerate() {
        let (row_n, row_s, row_h) = (q.n[k], q.sparsity[k], q.entropy[k]);
        let Some(&i) = by_id.get(&layer_id) else {
            problems.push(format!("layer {layer_id} missing in DuckDB"));
            continue;
        };
        if ns[i] != row_n {
            problems.push(format!("layer {layer_id}: n {row_n} vs {}", ns[i]));
        }
        let s = if ns[i] > 0 { sparse[i] as f64 / ns[i] as f64 } else { 0.0 };
        if s == row_s {
            s_equal += 1;
        } else if problems.len() < 5 {
            problems.push(format!("layer {layer_id}: S {row_s} vs {s}"));
        }
        match (h[i], row_h.is_nan()) {
            (Some(x), false) => worst_h = worst_h.max((x - row_h).abs()),
            (None, true) => {}
            _ => problems.push(format!("layer {layer_id}: H {row_h} vs {:?}", h[i])),
        }
    }
    if ids.len() != n {
        problems.push(format!("{n} server layers vs {} DuckDB layers", ids.len()));
    }
    let ok = problems.is_empty() && worst_h <= 1e-6;
    let note = if ok {
        format!("S equal in {}/{} layers, max |ΔH| {worst_h:.1e}", thousands(s_equal as u64), thousands(n as u64))
    } else {
        format!("{} (S equal {s_equal}/{n}, max |ΔH| {worst_h:.2e})", problems.join("; "))
    };
    Check { ok, note }
}

fn compare_census(a: &Answers, d: &Value) -> Check {
    let mut problems = Vec::new();
    let want = d.as_object();
    for g in &a.census.groups {
        let key = g.key.first().cloned().unwrap_or_default();
        match want.and_then(|m| m.get(&key)) {
            Some(w) => {
                let got = [g.models, g.layers, g.filters];
                let exp = [u(&w["models"]), u(&w["layers"]), u(&w["filters"])];
                if got != exp {
                    problems.push(format!("{key}: server {got:?} vs DuckDB {exp:?}"));
                }
            }
            None => problems.push(format!("DuckDB has no task {key}")),
        }
    }
    if want.map(|m| m.len()).unwrap_or(0) != a.census.groups.len() {
        problems.push("group counts differ".into());
    }
    let ok = problems.is_empty();
    let note = if ok {
        format!("{} tasks: models, layers, filters equal", a.census.groups.len())
    } else {
        problems.join("; ")
    };
    Check { ok, note }
}
