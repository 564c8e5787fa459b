//! CNN Filter DB bulk-import benchmark: filters/s of `cnnfdb::import` over a synthetic release,
//! as a ratio to `cat FILE > /dev/null` of the same HDF5 file measured in the same run, and the
//! import's peak RSS.
//!
//! The release is `FILTERDB_BENCH_FILTERS` float64 filters (default 1e8; `1e7` for a quick run)
//! in the real layout: an HDF5 dataset `filters` of shape (N, 3, 3), contiguous, written without
//! ever holding it in memory through hdf5-pure's block writer (`mat::MatBuilder::write_blocks`:
//! a MATLAB v7.3 file is HDF5 with a 512-byte user block; MATLAB dims [3, 3, N] are stored as
//! HDF5 (N, 3, 3)). The meta Parquet has one row per layer: layers of 256 x 256 = 65,536 filters,
//! 8 to 16 per model, as the converter writes it. Values are a hash of the element index.
//!
//! Order: write the files; `cat` once to warm the page cache, then time `cat`; import into a
//! fresh database in a child process of this binary (env `FILTERDB_BENCH_TASK=import`, so its
//! VmHWM is the import's own peak RSS); `cat` again. The ratio uses the mean of the two `cat`s.
//! Last, the durable-write floor: the N x 36 bytes of f32 values the store must persist, written
//! to a plain file on the same disk and fsynced — an import cannot be faster than that and keep
//! its acknowledged writes across a crash.
//!
//! Run: `cargo bench --bench cnnfdb_import`. `FILTERDB_BENCH_DIR` chooses where the files and the
//! database go (default: the system temp dir); `FILTERDB_BENCH_OUT` receives a JSON summary;
//! `FILTERDB_BENCH_KEEP=1` keeps the files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use filterdb::cnnfdb::{self, ImportOptions};
use filterdb::engine::Engine;
use hdf5_pure::mat::{Block, DataProducer, MatBuilder, MatError, Options};

const LAYER: u64 = 256 * 256;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Filter values: a hash of the element index mapped to [-0.25, 0.25).
struct Values;

impl DataProducer for Values {
    fn block_bytes(&self, block: Block, out: &mut Vec<u8>) -> Result<(), MatError> {
        out.reserve(block.len());
        for i in block.first_element..block.first_element + block.elements {
            let v = (splitmix(i) >> 11) as f64 / (1u64 << 53) as f64 * 0.5 - 0.25;
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
}

fn write_release(h5: &Path, meta: &Path, n: u64) -> anyhow::Result<()> {
    let mut mb = MatBuilder::new(Options::default());
    mb.write_blocks::<f64>("filters", &[3, 3, n as usize], Box::new(Values))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(h5)?);
    mb.finish_to(f).map_err(|e| anyhow::anyhow!("{e}"))?;

    // Meta: one row per layer.
    let (mut model, mut model_id, mut depth, mut norm, mut layer_id, mut ids, mut cin, mut cout) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    let mut at = 0u64;
    let mut m = 0i64;
    while at < n {
        let layers = 8 + (m % 9);
        for l in 0..layers {
            if at >= n {
                break;
            }
            let take = (n - at).min(LAYER);
            let (i, o) = if take == LAYER {
                (256, 256)
            } else {
                (1, take as i64)
            };
            model.push(format!("synthetic_wrn_{m:05}_13"));
            model_id.push(m);
            depth.push(l);
            norm.push(l as f64 / (layers - 1) as f64);
            layer_id.push(l);
            ids.push(format!("{at}:{}", at + take - 1));
            cin.push(i);
            cout.push(o);
            at += take;
        }
        m += 1;
    }
    let rows = model.len();
    let text = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; rows])) };
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("model_id", Arc::new(Int64Array::from(model_id))),
        ("conv_depth", Arc::new(Int64Array::from(depth))),
        ("conv_depth_norm", Arc::new(Float64Array::from(norm))),
        ("layer_id", Arc::new(Int64Array::from(layer_id))),
        ("model", Arc::new(StringArray::from(model))),
        ("filter_ids", Arc::new(StringArray::from(ids))),
        ("Name", text("WideResNet-28-10")),
        ("Training-Dataset", text("cifar10")),
        ("Visual Category", text("natural")),
        ("Task", text("Classification")),
        ("in_channels", Arc::new(Int64Array::from(cin))),
        ("out_channels", Arc::new(Int64Array::from(cout))),
    ];
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect())?;
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(meta)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}


fn time_cat(file: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' > /dev/null", file.display()))
        .status()?;
    anyhow::ensure!(st.success(), "cat failed");
    Ok(t.elapsed().as_secs_f64())
}

/// CPU time (user + system) of this process so far, all threads, from `/proc/self/stat`.
/// Seconds to write `bytes` (8 MiB writes) to a new file in `dir` and fsync it: what persisting
/// the imported values costs on this disk, whatever the storage engine.
fn time_durable_write(dir: &Path, bytes: u64) -> anyhow::Result<(f64, u64)> {
    use std::io::Write as _;
    let path = dir.join("durable-write-probe");
    let chunk: Vec<u8> = (0..8usize << 20).map(|i| (splitmix(i as u64) >> 56) as u8).collect();
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = bytes;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..take])?;
        left -= take as u64;
    }
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((secs, bytes))
}

fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Child: import into a fresh database, print
/// `seconds seconds_with_flush filters models vmhwm_kib cpu_seconds`.
fn child(h5: &Path, meta: &Path, db: &Path) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("filterdb::cnnfdb=info")
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let engine = Engine::open(db)?;
    let t = Instant::now();
    let p = cnnfdb::import(&engine, h5, meta, &ImportOptions::default(), &mut |_| true)?;
    let secs = t.elapsed().as_secs_f64();
    engine.store().flush()?;
    let flushed = t.elapsed().as_secs_f64();
    println!(
        "RESULT {secs} {flushed} {} {} {} {}",
        p.filters_done,
        p.models_created,
        common::status_kb("VmHWM:").unwrap_or(0),
        process_cpu_secs()
    );
    Ok(())
}

/// CPU time of the calling thread, ns (`/proc/thread-self/schedstat`): on a shared machine
/// it moves far less than wall time.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// `FILTERDB_BENCH_TASK=stats`: per-layer statistics alone on the bench's layer shape (256 x 256
/// filters, or `FILTERDB_BENCH_LAYER=OUT,IN`), split into moments (`LayerStats::of`) and
/// orthogonality: ns per filter, wall time on all cores and CPU time on one thread.
fn stats_only() {
    let (out, inp) = std::env::var("FILTERDB_BENCH_LAYER")
        .ok()
        .and_then(|s| {
            let (o, i) = s.split_once(',')?;
            Some((o.trim().parse::<usize>().ok()?, i.trim().parse::<usize>().ok()?))
        })
        .unwrap_or((256, 256));
    let n = out * inp;
    let filters: Vec<f32> = (0..n as u64 * 9)
        .map(|i| ((splitmix(i) >> 11) as f64 / (1u64 << 53) as f64 * 0.5 - 0.25) as f32)
        .collect();
    let reps = (20 * LAYER as usize / n).max(1);
    // (wall, calling-thread CPU) ns per filter
    let time = |f: &dyn Fn()| {
        f(); // warm-up
        let (t, c) = (Instant::now(), thread_cpu_ns());
        for _ in 0..reps {
            f();
        }
        let per = (reps * n) as f64;
        (
            t.elapsed().as_secs_f64() * 1e9 / per,
            (thread_cpu_ns() - c) as f64 / per,
        )
    };
    let moments = || {
        std::hint::black_box(filterdb::stats::LayerStats::of(&filters));
    };
    let ortho = || {
        std::hint::black_box(filterdb::stats::orthogonality(&filters, out, inp));
    };
    let (mw, ow) = (time(&moments).0, time(&ortho).0);
    println!(
        "per-layer statistics, {out} x {inp} filters, ns per filter, wall on all cores: moments {mw:.1}, orthogonality {ow:.1}"
    );
    if let Ok(p) = rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        let (m, o) = p.install(|| (time(&moments).1, time(&ortho).1));
        println!("CPU time on one thread: moments {m:.1}, orthogonality {o:.1}");
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::var("FILTERDB_BENCH_TASK").as_deref() == Ok("stats") {
        stats_only();
        return Ok(());
    }
    if std::env::var("FILTERDB_BENCH_TASK").as_deref() == Ok("import") {
        let a: Vec<PathBuf> = std::env::args_os()
            .skip(1)
            .take(3)
            .map(PathBuf::from)
            .collect();
        anyhow::ensure!(a.len() == 3, "child needs H5 META DB");
        return child(&a[0], &a[1], &a[2]);
    }
    let n = std::env::var("FILTERDB_BENCH_FILTERS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1e8) as u64;
    let base = std::env::var_os("FILTERDB_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new()
        .prefix("cnnfdb-bench")
        .tempdir_in(&base)?;
    let (h5, meta, db) = (
        dir.path().join("dataset.h5"),
        dir.path().join("meta.parquet"),
        dir.path().join("db"),
    );

    eprintln!(
        "writing a synthetic release of {n} float64 filters to {}",
        dir.path().display()
    );
    let t = Instant::now();
    write_release(&h5, &meta, n)?;
    let gen_s = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&h5)?.len();
    eprintln!("wrote {:.2} GB in {gen_s:.1} s", bytes as f64 / 1e9);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    time_cat(&h5)?; // warm the page cache (when the file fits)
    let cat1 = time_cat(&h5)?;
    let out = Command::new(std::env::current_exe()?)
        .env("FILTERDB_BENCH_TASK", "import")
        .env("RUST_LOG", "warn")
        .args([&h5, &meta, &db])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "import failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("no result: {stdout}"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 6, "bad result line {line}");
    let (secs, flushed, filters, models, hwm_kib, cpu) =
        (v[0], v[1], v[2] as u64, v[3] as u64, v[4] as u64, v[5]);
    anyhow::ensure!(filters == n, "imported {filters} filters of {n}");
    let log = String::from_utf8_lossy(&out.stderr);
    let split = log
        .lines()
        .find(|l| l.contains("import finished"))
        .unwrap_or_default()
        .to_string();
    let cat2 = time_cat(&h5)?;
    let cat = (cat1 + cat2) / 2.0;
    let db_bytes: u64 = common::dir_bytes(&db);
    let (write_s, write_bytes) = time_durable_write(dir.path(), n * 36)?;

    let fps = n as f64 / secs;
    let cat_fps = n as f64 / cat;
    println!(
        "\n## CNN Filter DB bulk import ({n} float64 filters, {models} models, {:.2} GB HDF5)\n",
        bytes as f64 / 1e9
    );
    println!("| measure | seconds | filters/s | MB/s of HDF5 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| `cat dataset.h5 > /dev/null` (mean of 2, warm) | {cat:.2} | {cat_fps:.3e} | {:.0} |",
        bytes as f64 / cat / 1e6
    );
    println!(
        "| `cnnfdb::import` (to last commit) | {secs:.2} | {fps:.3e} | {:.0} |",
        bytes as f64 / secs / 1e6
    );
    println!(
        "| `cnnfdb::import` + flush | {flushed:.2} | {:.3e} | |",
        n as f64 / flushed
    );
    println!(
        "| write the f32 values ({:.2} GB) to a file on the database's disk + fsync | {write_s:.2} | {:.3e} | |",
        write_bytes as f64 / 1e9,
        n as f64 / write_s
    );
    println!(
        "\nimport / cat throughput: **{:.1} %** (goal >= 50 %); import / durable write of the f32 bytes: **{:.1} %**",
        100.0 * cat / secs,
        100.0 * write_s / secs
    );
    println!(
        "import peak RSS (VmHWM): {:.0} MiB; database on disk: {:.2} GB",
        hwm_kib as f64 / 1024.0,
        db_bytes as f64 / 1e9
    );
    println!(
        "import CPU time (user + system, all threads, to flush): {cpu:.1} s = {:.0} ns per filter; load average before: {load}",
        cpu * 1e9 / n as f64
    );
    println!("import log: {split}");
    println!("(file generation took {gen_s:.1} s; cat runs: {cat1:.2} s, {cat2:.2} s)");
    if let Some(p) = std::env::var_os("FILTERDB_BENCH_OUT") {
        let j = serde_json::json!({"filters": n, "models": models, "hdf5_bytes": bytes, "cat_seconds": [cat1, cat2],
            "import_seconds": secs, "import_flushed_seconds": flushed, "filters_per_second": fps,
            "ratio_to_cat": cat / secs, "peak_rss_kib": hwm_kib, "db_bytes": db_bytes,
            "import_cpu_seconds": cpu, "load_average": load, "durable_write_seconds": write_s,
            "durable_write_bytes": write_bytes, "ratio_to_durable_write": write_s / secs});
        std::fs::write(p, serde_json::to_vec_pretty(&j)?)?;
    }
    if std::env::var_os("FILTERDB_BENCH_KEEP").is_some() {
        eprintln!("kept {}", dir.keep().display());
    }
    Ok(())
}

