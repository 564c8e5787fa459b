//! Snapshot / export / restore benchmark (issue 5): throughput on `FILTERDB_BENCH_FILTERS`
//! filters (default 1e8) in MB/s and as a ratio to `cp -r` of the produced bytes (same run), the
//! peak RSS of each operation, and the sizes on disk.
//!
//! What one run does, each step in its own child process of this binary (env
//! `FILTERDB_BENCH_TASK`), so each step's peak RSS is the VmHWM of its own process:
//!
//! 1. `build`: a synthetic database through `Engine::ingest_extracted`: VGG-16-like models (13
//!    3x3 layers, 1.6 M filters at width 1) at widths 0.5, 1, 1.5 and 2 (the largest model is
//!    6.5 M filters, 235 MB of f32: restore holds one model, like ingest), spread over 8 tasks
//!    (Segmentation ~10 %, the export's selection) and 4 visual categories, seeded xorshift
//!    Gaussian weights scaled per layer; then pins the reference basis (70 bins), so
//!    `layers.parquet` carries the histograms, and flushes.
//! 2. `snapshot`: `Engine::open` + `Engine::snapshot_to` (timed separately).
//! 3. `cp -r` of the snapshot folder, then `sync` (timed separately), in the parent.
//! 4. `export`: `Engine::export_to` of `task = Segmentation` (~10 % of the filters).
//! 5. `cp -r` of the export folder.
//! 6. `restore`: `filterdb::export::restore` of the snapshot into a new data directory (sha256
//!    verification of every file, then every model committed through the store), and a check
//!    that the restored catalogue has the snapshot's counts.
//!
//! Run: `cargo bench --bench snapshot`. Env: `FILTERDB_BENCH_FILTERS` (e.g. `1e6`),
//! `FILTERDB_BENCH_DIR` (default the system temp dir; put it on the disk you care about),
//! `FILTERDB_BENCH_OUT` (write the markdown report there too), `FILTERDB_BENCH_KEEP=1` (keep the
//! data), `FILTERDB_BENCH_PIN=0` (no pinned basis).

mod common;
use common::{XorShift, dir_bytes, status_kb};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use filterdb::engine::{Engine, IngestRequest, MetaInput, NameConflict};
use filterdb::readers::{DepthDefinition, ExtractedLayer, ExtractedModel, Format};
use filterdb::selection::{Field, MatchValue, Pred};
use rayon::prelude::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const TASK_ENV: &str = "FILTERDB_BENCH_TASK";
const MB: f64 = 1e6;
/// VGG-16's 3x3 convolutions (out, in) at width 1.
const VGG16: [(u32, u32); 13] = [
    (64, 3),
    (64, 64),
    (128, 64),
    (128, 128),
    (256, 128),
    (256, 256),
    (256, 256),
    (512, 256),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
];
const WIDTHS: [f64; 4] = [1.0, 2.0, 0.5, 1.5];
/// Tasks and their target share of the filters.
const TASKS: [(&str, f64); 8] = [
    ("Classification", 0.58),
    ("Segmentation", 0.10),
    ("GAN-Generator", 0.08),
    ("Object Detection", 0.08),
    ("Style Transfer", 0.05),
    ("Super Resolution", 0.05),
    ("Face Detection", 0.04),
    ("Depth Estimation", 0.02),
];
const CATEGORIES: [&str; 4] = ["natural", "medical xray", "faces", "handwriting"];
const EXPORT_TASK: &str = "Segmentation";


/// A planned model: width and labels.
struct PlannedModel {
    name: String,
    width: f64,
    task: &'static str,
    category: &'static str,
}

fn layers_of(width: f64) -> Vec<(u32, u32)> {
    VGG16
        .iter()
        .enumerate()
        .map(|(i, &(o, inp))| {
            let o = ((o as f64 * width).round() as u32).max(1);
            let inp = if i == 0 {
                inp
            } else {
                ((inp as f64 * width).round() as u32).max(1)
            };
            (o, inp)
        })
        .collect()
}

fn filters_of(width: f64) -> u64 {
    layers_of(width)
        .iter()
        .map(|&(o, i)| u64::from(o) * u64::from(i))
        .sum()
}

/// Models until the total reaches `target` filters; each gets the task furthest below its share.
fn plan(target: u64) -> Vec<PlannedModel> {
    let mut out = Vec::new();
    let mut per_task = [0u64; TASKS.len()];
    let mut total = 0u64;
    let mut i = 0usize;
    while total < target {
        let width = WIDTHS[i % WIDTHS.len()];
        let n = filters_of(width);
        let t = (0..TASKS.len())
            .max_by(|&a, &b| {
                let da = TASKS[a].1 * (total + n) as f64 - per_task[a] as f64;
                let db = TASKS[b].1 * (total + n) as f64 - per_task[b] as f64;
                da.total_cmp(&db)
            })
            .unwrap_or(0);
        per_task[t] += n;
        total += n;
        out.push(PlannedModel {
            name: format!("bench{i:04}"),
            width,
            task: TASKS[t].0,
            category: CATEGORIES[i % CATEGORIES.len()],
        });
        i += 1;
    }
    out
}

fn gen_model(mi: usize, m: &PlannedModel) -> ExtractedModel {
    let shapes = layers_of(m.width);
    let n_layers = shapes.len();
    let layers: Vec<ExtractedLayer> = shapes
        .par_iter()
        .enumerate()
        .map(|(li, &(o, inp))| {
            let n = o as usize * inp as usize;
            let mut r = XorShift::new(((mi as u64) << 16) ^ li as u64 ^ 0xB5EED);
            let std = (2.0 / (inp as f32 * 9.0)).sqrt();
            let filters: Vec<f32> = (0..n * 9).map(|_| r.normal() * std).collect();
            ExtractedLayer {
                tensor_name: format!("features.{li}.weight"),
                out_channels: o,
                in_channels: inp,
                groups: Some(1),
                conv_depth: li as u32,
                conv_depth_norm: li as f64 / (n_layers - 1) as f64,
                layer_index: li as u32,
                filters,
            }
        })
        .collect();
    let n: u64 = layers.iter().map(|l| l.n_filters()).sum();
    ExtractedModel {
        format: Format::Safetensors,
        layers,
        kernel_shape_counts: BTreeMap::from([("3x3".to_string(), n)]),
        depth_definition: DepthDefinition::WeightOrder,
        producer: None,
        opset: None,
        excluded: Vec::new(),
    }
}



fn child(task: Value) -> Value {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .env(TASK_ENV, task.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("spawn child");
    assert!(out.status.success(), "child {task} failed: {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().next_back().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("child {task} replied {last:?}: {e}"))
}

/// Progress on stderr, at most every 10 s.
fn progress_printer(label: &'static str) -> impl Fn(filterdb::export::Progress) + Sync {
    let last = std::sync::Mutex::new(Instant::now());
    move |p| {
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if l.elapsed().as_secs() >= 10 {
            *l = Instant::now();
            eprintln!("  {label} {}: {}/{}", p.phase, p.done, p.total);
        }
    }
}

fn run_child_task(task: &str) {
    let t: Value = serde_json::from_str(task).expect("task json");
    let s = |k: &str| PathBuf::from(t[k].as_str().unwrap_or_else(|| panic!("task field {k}")));
    let reply = match t["task"].as_str().unwrap_or("") {
        "build" => {
            let target = t["filters"].as_u64().expect("filters");
            let pin = t["pin"].as_bool().unwrap_or(true);
            let engine = Engine::open(&s("data")).expect("open engine");
            let models = plan(target);
            let t0 = Instant::now();
            let (mut gen_s, mut ingest_s, mut n) = (0.0, 0.0, 0u64);
            let mut largest = 0u64;
            for (mi, m) in models.iter().enumerate() {
                let t = Instant::now();
                let extracted = gen_model(mi, m);
                gen_s += t.elapsed().as_secs_f64();
                let nf = extracted.n_filters();
                largest = largest.max(nf);
                let req = IngestRequest {
                    meta: MetaInput {
                        name: m.name.clone(),
                        training_datasets: vec!["imagenet".into()],
                        task: m.task.into(),
                        architecture: "VGG".into(),
                        visual_category: m.category.into(),
                        ..Default::default()
                    },
                    file_name: format!("{}.safetensors", m.name),
                    format: Some(Format::Safetensors),
                    sha256: hex::encode(Sha256::digest(
                        format!("filterdb-snapshot-bench/{mi}").as_bytes(),
                    )),
                    size_bytes: nf * 36,
                    on_conflict: NameConflict::Error,
                };
                let t = Instant::now();
                engine
                    .ingest_extracted(extracted, &req, &|_, _, _| {})
                    .expect("ingest");
                ingest_s += t.elapsed().as_secs_f64();
                n += nf;
                if mi % 10 == 9 {
                    eprintln!(
                        "  build: {}/{} models, {n} filters, {:.0} s",
                        mi + 1,
                        models.len(),
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
            let t = Instant::now();
            if pin {
                engine
                    .pin_basis(&Pred::True, "", 70, &|_, _, _, _| {})
                    .expect("pin basis");
            }
            let pin_s = t.elapsed().as_secs_f64();
            engine.store().flush().expect("flush");
            json!({
                "models": models.len(), "filters": n, "largest_model_filters": largest,
                "gen_s": gen_s, "ingest_s": ingest_s, "pin_s": pin_s,
                "vmhwm_kb": status_kb("VmHWM:"),
            })
        }
        "snapshot" => {
            let t0 = Instant::now();
            let engine = Engine::open(&s("data")).expect("open engine");
            let open_s = t0.elapsed().as_secs_f64();
            let t = Instant::now();
            let sum = engine
                .snapshot_to(&s("out"), &progress_printer("snapshot"))
                .expect("snapshot");
            json!({
                "open_s": open_s, "secs": t.elapsed().as_secs_f64(), "bytes": sum.bytes,
                "filters": sum.manifest.rows.filters, "files": sum.manifest.files.len(),
                "vmhwm_kb": status_kb("VmHWM:"),
            })
        }
        "export" => {
            let engine = Engine::open(&s("data")).expect("open engine");
            let pred = Pred::Match(
                Field::Task,
                vec![MatchValue::Text(filterdb::vocab::key(EXPORT_TASK))],
            );
            let t = Instant::now();
            let sum = engine
                .export_to(
                    &pred,
                    &format!("task = {EXPORT_TASK}"),
                    &s("out"),
                    &progress_printer("export"),
                )
                .expect("export");
            json!({
                "secs": t.elapsed().as_secs_f64(), "bytes": sum.bytes,
                "filters": sum.manifest.rows.filters, "files": sum.manifest.files.len(),
                "vmhwm_kb": status_kb("VmHWM:"),
            })
        }
        "restore" => {
            let t = Instant::now();
            let r = filterdb::export::restore(&s("snapshot"), &s("data"), &|p| {
                progress_printer("restore")(p)
            })
            .expect("restore");
            let secs = t.elapsed().as_secs_f64();
            let hwm = status_kb("VmHWM:");
            let engine = Engine::open(&s("data")).expect("open restored");
            let (models, filters) = engine.with_catalog(|c| {
                (
                    c.n_models() as u64,
                    c.models_after(None).map(|m| m.n_filters).sum::<u64>(),
                )
            });
            assert_eq!(
                (models, filters),
                (r.rows.models, r.rows.filters),
                "restored catalogue"
            );
            json!({"secs": secs, "filters": r.rows.filters, "vmhwm_kb": hwm})
        }
        other => panic!("unknown task {other}"),
    };
    println!("{reply}");
}

fn timed_cmd(args: &[&str]) -> f64 {
    let t = Instant::now();
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run command");
    assert!(st.success(), "{args:?} failed");
    t.elapsed().as_secs_f64()
}

fn human(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

fn mib(kb: &Value) -> String {
    kb.as_u64()
        .map(|k| format!("{:.0} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "-".into())
}

fn main() {
    if let Ok(task) = std::env::var(TASK_ENV) {
        run_child_task(&task);
        return;
    }
    // `cargo bench` passes `--bench`; any other argument would be a filter: nothing to filter.
    let filters: u64 = std::env::var("FILTERDB_BENCH_FILTERS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(100_000_000);
    let pin = std::env::var("FILTERDB_BENCH_PIN").map_or(true, |v| v != "0");
    let keep = std::env::var("FILTERDB_BENCH_KEEP").is_ok_and(|v| v == "1");
    let base = std::env::var("FILTERDB_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let work = base.join(format!("filterdb-snapshot-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("create work dir");
    let p = |n: &str| work.join(n).display().to_string();
    let t_all = Instant::now();
    eprintln!("snapshot bench: {filters} filters in {}", work.display());

    let build = child(json!({"task": "build", "data": p("data"), "filters": filters, "pin": pin}));
    eprintln!("build: {build}");
    let db_bytes = dir_bytes(&work.join("data/db"));
    let n = build["filters"].as_u64().unwrap_or(0);
    let raw = n * 36;

    let snap = child(json!({"task": "snapshot", "data": p("data"), "out": p("snap")}));
    eprintln!("snapshot: {snap}");
    let cp_s = timed_cmd(&["cp", "-r", &p("snap"), &p("snap-cp")]);
    let sync_s = timed_cmd(&["sync", "-f", &p("snap-cp")]);
    let snap_bytes = snap["bytes"].as_u64().unwrap_or(0);
    eprintln!("cp -r: {cp_s:.2} s, sync {sync_s:.2} s");
    std::fs::remove_dir_all(work.join("snap-cp")).expect("remove copy");

    let export = child(json!({"task": "export", "data": p("data"), "out": p("export")}));
    eprintln!("export: {export}");
    let ecp_s = timed_cmd(&["cp", "-r", &p("export"), &p("export-cp")]);
    let esync_s = timed_cmd(&["sync", "-f", &p("export-cp")]);
    let export_bytes = export["bytes"].as_u64().unwrap_or(0);
    let export_filters = export["filters"].as_u64().unwrap_or(0);
    std::fs::remove_dir_all(work.join("export-cp")).expect("remove copy");

    let restore = child(json!({"task": "restore", "snapshot": p("snap"), "data": p("restored")}));
    eprintln!("restore: {restore}");
    let restored_bytes = dir_bytes(&work.join("restored/db"));

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (snap_s, exp_s, res_s) = (f(&snap, "secs"), f(&export, "secs"), f(&restore, "secs"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Snapshot / export / restore ({} filters, {} models, largest model {} filters)\n",
        n, build["models"], build["largest_model_filters"]
    );
    let _ = writeln!(
        md,
        "| operation | rows | time s | output bytes | MB/s of output | MB/s of raw f32 (36 B/filter) | `cp -r` of the output s | ratio to `cp -r` | `cp -r` + `sync` s | ratio to cp + sync | peak RSS |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| snapshot | {n} | {snap_s:.1} | {} | {:.0} | {:.0} | {cp_s:.2} | {:.1}x | {:.2} | {:.1}x | {} |",
        human(snap_bytes),
        snap_bytes as f64 / MB / snap_s,
        raw as f64 / MB / snap_s,
        snap_s / cp_s,
        cp_s + sync_s,
        snap_s / (cp_s + sync_s),
        mib(&snap["vmhwm_kb"])
    );
    let _ = writeln!(
        md,
        "| export `task = {EXPORT_TASK}` | {export_filters} | {exp_s:.1} | {} | {:.0} | {:.0} | {ecp_s:.2} | {:.1}x | {:.2} | {:.1}x | {} |",
        human(export_bytes),
        export_bytes as f64 / MB / exp_s,
        (export_filters * 36) as f64 / MB / exp_s,
        exp_s / ecp_s,
        ecp_s + esync_s,
        exp_s / (ecp_s + esync_s),
        mib(&export["vmhwm_kb"])
    );
    let _ = writeln!(
        md,
        "| restore (reads the snapshot) | {} | {res_s:.1} | {} (RocksDB) | {:.0} (of snapshot read) | {:.0} | - | {:.1}x of snapshot `cp -r` | - | - | {} |",
        f(&restore, "filters"),
        human(restored_bytes),
        snap_bytes as f64 / MB / res_s,
        raw as f64 / MB / res_s,
        res_s / cp_s,
        mib(&restore["vmhwm_kb"])
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "- Build: generation {:.1} s, `Engine::ingest_extracted` {:.1} s, pin basis {:.1} s; peak RSS {}.",
        f(&build, "gen_s"),
        f(&build, "ingest_s"),
        f(&build, "pin_s"),
        mib(&build["vmhwm_kb"])
    );
    let _ = writeln!(
        md,
        "- On disk: raw f32 {}, RocksDB {} (restored: {}), snapshot {} in {} files ({:.2} of raw), export {} in {} files.",
        human(raw),
        human(db_bytes),
        human(restored_bytes),
        human(snap_bytes),
        snap["files"],
        snap_bytes as f64 / raw as f64,
        human(export_bytes),
        export["files"]
    );
    let _ = writeln!(
        md,
        "- Snapshot time excludes `Engine::open` ({:.1} s). Peak RSS is the VmHWM of the child process that did the step (restore: before reopening to check).",
        f(&snap, "open_s")
    );
    let _ = writeln!(
        md,
        "- Total bench wall time {:.0} s.",
        t_all.elapsed().as_secs_f64()
    );
    println!("{md}");
    if let Ok(out) = std::env::var("FILTERDB_BENCH_OUT") {
        std::fs::write(&out, &md).expect("write report");
    }
    if keep {
        eprintln!("kept {}", work.display());
    } else {
        std::fs::remove_dir_all(&work).expect("remove bench data");
    }
}
