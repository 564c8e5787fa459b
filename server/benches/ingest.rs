//! Ingest throughput benchmark: filters/s and MB/s of ingesting a >= 100 MB checkpoint, as a
//! ratio to `cp` of the same file, measured in the same run.
//!
//! Generates two deterministic WideResNet-28-10 checkpoints (seeded xorshift, ~146 MB of F32
//! weights each): a safetensors state dict and an ONNX `ModelProto` with the weights as
//! `raw_data` initializers. For each file it times (median of `FILTERDB_BENCH_RUNS`, default 3):
//!
//! - `cp FILE COPY` (file in page cache), and `cp` followed by an fsync of the copy, for context;
//! - `Engine::ingest` on the file, fresh data directory each run (the SHA-256 the engine needs is
//!   computed beforehand and timed separately);
//! - an end-to-end gRPC ingest to an in-process server on 127.0.0.1 (1 MiB chunks read from the
//!   file while uploading, until the result arrives), fresh data directory and server each run.
//!
//! Ingest time is split into phases from the engine's progress callback (engine runs) and from
//! the progress messages' arrival times (gRPC runs). The files are generated, and each ingest
//! mode's runs are measured, in child processes of this binary (env `FILTERDB_BENCH_TASK`), so
//! a mode's peak RSS is the VmHWM of its own process, not the allocator's leftovers.
//!
//! Run: `cargo bench --bench ingest`. Prints markdown tables; writes JSON to `$FILTERDB_BENCH_OUT`
//! when set. `FILTERDB_BENCH_DIR` chooses where the files and databases go (default: the system
//! temp dir, which should be on the disk you care about: `cp` and RocksDB both write there).

mod common;
use common::{XorShift, status_kb};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use filterdb::engine::{Engine, IngestOutcome, IngestRequest, MetaInput, NameConflict, Phase};
use filterdb::onnx_pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};
use filterdb::server::{ServerConfig, serve};
use filterdb_proto as pb;
use pb::filter_db_client::FilterDbClient;
use prost::Message;
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;
const MB: f64 = 1e6;

// ---------------------------------------------------------------------------------------------
// Deterministic weights
// ---------------------------------------------------------------------------------------------


#[derive(Clone, Copy)]
enum Init {
    /// Kaiming-normal for a conv or linear weight with this fan-in.
    Kaiming(usize),
    /// BatchNorm-like vector around a centre.
    Around(f32, f32),
    /// `num_batches_tracked`: one I64.
    Count,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn nbytes(&self) -> usize {
        match self.init {
            Init::Count => 8,
            _ => self.numel() * 4,
        }
    }
    /// Little-endian bytes; seeded by the tensor's index so every format holds the same weights.
    fn bytes(&self, index: usize) -> Vec<u8> {
        let mut r = XorShift::new(0x5EED_0000 + index as u64);
        let n = self.numel();
        let mut out = Vec::with_capacity(self.nbytes());
        match self.init {
            Init::Count => out.extend_from_slice(&78_200i64.to_le_bytes()),
            Init::Kaiming(fan_in) => {
                let std = (2.0 / fan_in as f32).sqrt();
                for _ in 0..n {
                    out.extend_from_slice(&(r.normal() * std).to_le_bytes());
                }
            }
            Init::Around(c, w) => {
                for _ in 0..n {
                    out.extend_from_slice(&(c + w * (r.unit() - 0.5)).to_le_bytes());
                }
            }
        }
        out
    }
}

/// The layers of WideResNet-28-10 (pre-activation, as in the reference PyTorch implementation),
/// as a list of operations and the state dict they own.
#[derive(Clone)]
enum Op {
    /// `conv(weight, in, out, k, stride)`; input/output names are assigned by the graph builder.
    Conv { w: String, stride: i64, k: i64 },
    /// Pre-activation BN + ReLU with the BN's prefix.
    BnRelu(String),
    /// Block start marker: remember the block input.
    BlockIn,
    /// Shortcut: 1x1 conv (weight, stride) on the pre-activated input, or identity; then Add.
    Residual(Option<(String, i64)>),
    /// Saves the current activation as the pre-activated input (for a conv shortcut).
    MarkPreact,
    /// Pool + fc.
    Head,
}

fn wrn_28_10() -> (Vec<Spec>, Vec<Op>) {
    let mut specs = Vec::new();
    let mut ops = Vec::new();
    let conv = |specs: &mut Vec<Spec>, name: String, o: usize, i: usize, k: usize| {
        specs.push(Spec { name, shape: vec![o, i, k, k], init: Init::Kaiming(i * k * k) });
    };
    let bn = |specs: &mut Vec<Spec>, prefix: &str, c: usize| {
        specs.push(Spec { name: format!("{prefix}.weight"), shape: vec![c], init: Init::Around(1.0, 0.2) });
        specs.push(Spec { name: format!("{prefix}.bias"), shape: vec![c], init: Init::Around(0.0, 0.2) });
        specs.push(Spec { name: format!("{prefix}.running_mean"), shape: vec![c], init: Init::Around(0.0, 0.5) });
        specs.push(Spec { name: format!("{prefix}.running_var"), shape: vec![c], init: Init::Around(1.0, 0.5) });
        specs.push(Spec { name: format!("{prefix}.num_batches_tracked"), shape: vec![], init: Init::Count });
    };
    conv(&mut specs, "conv1.weight".into(), 16, 3, 3);
    ops.push(Op::Conv { w: "conv1.weight".into(), stride: 1, k: 3 });
    let n = (28 - 4) / 6;
    let mut in_planes = 16;
    for (g, (width, stride)) in [(160usize, 1i64), (320, 2), (640, 2)].into_iter().enumerate() {
        for l in 0..n {
            let p = format!("block{}.layer.{l}", g + 1);
            let cin = if l == 0 { in_planes } else { width };
            let s = if l == 0 { stride } else { 1 };
            let equal = cin == width;
            ops.push(Op::BlockIn);
            bn(&mut specs, &format!("{p}.bn1"), cin);
            ops.push(Op::BnRelu(format!("{p}.bn1")));
            ops.push(Op::MarkPreact);
            conv(&mut specs, format!("{p}.conv1.weight"), width, cin, 3);
            ops.push(Op::Conv { w: format!("{p}.conv1.weight"), stride: s, k: 3 });
            bn(&mut specs, &format!("{p}.bn2"), width);
            ops.push(Op::BnRelu(format!("{p}.bn2")));
            conv(&mut specs, format!("{p}.conv2.weight"), width, width, 3);
            ops.push(Op::Conv { w: format!("{p}.conv2.weight"), stride: 1, k: 3 });
            if equal {
                ops.push(Op::Residual(None));
            } else {
                conv(&mut specs, format!("{p}.convShortcut.weight"), width, cin, 1);
                ops.push(Op::Residual(Some((format!("{p}.convShortcut.weight"), s))));
            }
        }
        in_planes = width;
    }
    bn(&mut specs, "bn1", 640);
    ops.push(Op::BnRelu("bn1".into()));
    specs.push(Spec { name: "fc.weight".into(), shape: vec![10, 640], init: Init::Kaiming(640) });
    specs.push(Spec { name: "fc.bias".into(), shape: vec![10], init: Init::Around(0.0, 0.1) });
    ops.push(Op::Head);
    (specs, ops)
}

fn write_safetensors(path: &Path, specs: &[Spec]) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for s in specs {
        let dtype = if matches!(s.init, Init::Count) { "I64" } else { "F32" };
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": s.shape, "data_offsets": [off, off + s.nbytes()]}),
        );
        off += s.nbytes();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(CHUNK, std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for (i, s) in specs.iter().enumerate() {
        f.write_all(&s.bytes(i))?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn write_onnx(path: &Path, specs: &[Spec], ops: &[Op]) -> std::io::Result<()> {
    let index_of = |name: &str| specs.iter().position(|s| s.name == name).expect("spec");
    let ints = |name: &str, v: Vec<i64>| AttributeProto {
        name: Some(name.into()),
        ints: v,
        r#type: Some(7),
        ..Default::default()
    };
    let int = |name: &str, v: i64| AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(2), ..Default::default() };
    let mut nodes: Vec<NodeProto> = Vec::new();
    let mut counter = 0usize;
    let mut fresh = |prefix: &str| {
        counter += 1;
        format!("/{prefix}_output_{counter}")
    };
    let node = |op: &str, name: String, input: Vec<String>, output: Vec<String>, attribute: Vec<AttributeProto>| NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input,
        output,
        attribute,
        ..Default::default()
    };
    let conv_node = |w: &str, x: String, y: String, stride: i64, k: i64| {
        let pad = k / 2;
        node(
            "Conv",
            format!("/{}/Conv", w.trim_end_matches(".weight")),
            vec![x, w.to_string()],
            vec![y],
            vec![
                ints("dilations", vec![1, 1]),
                int("group", 1),
                ints("kernel_shape", vec![k, k]),
                ints("pads", vec![pad, pad, pad, pad]),
                ints("strides", vec![stride, stride]),
            ],
        )
    };
    let mut cur = "x".to_string();
    let mut block_in = String::new();
    let mut preact = String::new();
    for op in ops {
        match op {
            Op::Conv { w, stride, k } => {
                let y = fresh("Conv");
                nodes.push(conv_node(w, cur.clone(), y.clone(), *stride, *k));
                cur = y;
            }
            Op::BnRelu(p) => {
                let b = fresh("BatchNormalization");
                nodes.push(node(
                    "BatchNormalization",
                    format!("/{p}/BatchNormalization"),
                    vec![
                        cur.clone(),
                        format!("{p}.weight"),
                        format!("{p}.bias"),
                        format!("{p}.running_mean"),
                        format!("{p}.running_var"),
                    ],
                    vec![b.clone()],
                    vec![AttributeProto { name: Some("epsilon".into()), f: Some(1e-5), r#type: Some(1), ..Default::default() }],
                ));
                let r = fresh("Relu");
                nodes.push(node("Relu", format!("/{p}/Relu"), vec![b], vec![r.clone()], vec![]));
                cur = r;
            }
            Op::BlockIn => block_in = cur.clone(),
            Op::MarkPreact => preact = cur.clone(),
            Op::Residual(sc) => {
                let skip = match sc {
                    None => block_in.clone(),
                    Some((w, s)) => {
                        let y = fresh("Conv");
                        nodes.push(conv_node(w, preact.clone(), y.clone(), *s, 1));
                        y
                    }
                };
                let a = fresh("Add");
                nodes.push(node("Add", format!("/Add_{}", nodes.len()), vec![skip, cur.clone()], vec![a.clone()], vec![]));
                cur = a;
            }
            Op::Head => {
                let p = fresh("GlobalAveragePool");
                nodes.push(node("GlobalAveragePool", "/GlobalAveragePool".into(), vec![cur.clone()], vec![p.clone()], vec![]));
                let f = fresh("Flatten");
                nodes.push(node("Flatten", "/Flatten".into(), vec![p], vec![f.clone()], vec![int("axis", 1)]));
                nodes.push(node(
                    "Gemm",
                    "/fc/Gemm".into(),
                    vec![f, "fc.weight".into(), "fc.bias".into()],
                    vec!["logits".into()],
                    vec![int("transB", 1)],
                ));
                cur = "logits".into();
            }
        }
    }
    // Initializers in state-dict order; num_batches_tracked is not exported by torch.onnx.
    let initializer: Vec<TensorProto> = specs
        .iter()
        .filter(|s| !matches!(s.init, Init::Count))
        .map(|s| TensorProto {
            name: Some(s.name.clone()),
            dims: s.shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(1),
            raw_data: Some(s.bytes(index_of(&s.name))),
            ..Default::default()
        })
        .collect();
    let model = ModelProto {
        ir_version: Some(8),
        producer_name: Some("pytorch".into()),
        producer_version: Some("2.1.0".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(GraphProto {
            node: nodes,
            name: Some("main_graph".into()),
            initializer,
            input: vec![ValueInfoProto { name: Some("x".into()) }],
            output: vec![ValueInfoProto { name: Some(cur) }],
        }),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    drop(model);
    let mut f = std::fs::File::create(path)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers
// ---------------------------------------------------------------------------------------------

fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}


fn warm_page_cache(path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn cp_once(src: &Path, dst: &Path, fsync: bool) -> Duration {
    let _ = std::fs::remove_file(dst);
    let t = Instant::now();
    let st = Command::new("cp").arg(src).arg(dst).status().expect("run cp");
    assert!(st.success(), "cp failed: {st}");
    if fsync {
        std::fs::File::open(dst).and_then(|f| f.sync_all()).expect("fsync copy");
    }
    let d = t.elapsed();
    let _ = std::fs::remove_file(dst);
    d
}

fn meta(name: &str) -> MetaInput {
    MetaInput {
        name: name.into(),
        training_datasets: vec!["cifar10".into()],
        task: "Classification".into(),
        architecture: "WideResNet-28-10".into(),
        ..Default::default()
    }
}

/// Phase times of one ingest, seconds: (before parse = upload or 0, parse, stats, write).
#[derive(Clone, Copy, Default, Debug)]
struct Phases {
    upload: f64,
    parse: f64,
    stats: f64,
    write: f64,
}

impl Phases {
    fn median(xs: &[Phases]) -> Phases {
        let m = |f: fn(&Phases) -> f64| {
            let mut v: Vec<f64> = xs.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        Phases { upload: m(|p| p.upload), parse: m(|p| p.parse), stats: m(|p| p.stats), write: m(|p| p.write) }
    }
}

struct RunResult {
    total: Duration,
    phases: Phases,
    filters: u64,
    layers: u32,
    rocks: RocksLog,
}

/// What RocksDB's info LOG says about one ingest's database.
#[derive(Clone, Copy, Default, Debug)]
struct RocksLog {
    flushes: u32,
    stalls: u32,
}

fn rocks_log(data_dir: &Path) -> RocksLog {
    let log = std::fs::read_to_string(data_dir.join("db/LOG")).unwrap_or_default();
    RocksLog {
        flushes: log.matches("\"event\": \"flush_started\"").count() as u32,
        stalls: (log.matches("Stalling writes").count() + log.matches("Stopping writes").count()) as u32,
    }
}

fn engine_run(file: &Path, sha256: &str, work: &Path) -> RunResult {
    let dir = tempfile::tempdir_in(work).expect("data dir");
    let engine = Engine::open(dir.path()).expect("open engine");
    let size = std::fs::metadata(file).expect("stat").len();
    let req = IngestRequest {
        meta: meta("wrn-28-10"),
        file_name: file.file_name().unwrap_or_default().to_string_lossy().into_owned(),
        format: None,
        sha256: sha256.into(),
        size_bytes: size,
        on_conflict: NameConflict::Error,
    };
    let marks: Mutex<Vec<(Phase, Instant)>> = Mutex::new(Vec::new());
    let progress = |p: Phase, _: u32, _: u32| marks.lock().unwrap_or_else(|e| e.into_inner()).push((p, Instant::now()));
    let t0 = Instant::now();
    let (outcome, model) = engine.ingest(file, &req, &progress).expect("engine ingest");
    let t1 = Instant::now();
    assert_eq!(outcome, IngestOutcome::Created);
    let marks = marks.into_inner().unwrap_or_else(|e| e.into_inner());
    let at = |p: Phase| marks.iter().find(|(q, _)| *q == p).map(|(_, t)| *t).expect("phase mark");
    let (tp, ts, tw) = (at(Phase::Parsing), at(Phase::Statistics), at(Phase::Writing));
    let phases = Phases {
        upload: secs(tp - t0), // label validation + precheck only
        parse: secs(ts - tp),
        stats: secs(tw - ts),
        write: secs(t1 - tw),
    };
    let rocks = rocks_log(dir.path());
    drop(engine);
    RunResult { total: t1 - t0, phases, filters: model.n_filters, layers: model.n_layers, rocks }
}

async fn grpc_run(file: &Path, work: &Path) -> RunResult {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir_in(work).expect("data dir");
    let engine = Arc::new(Engine::open(dir.path()).expect("open engine"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(engine, listener, ServerConfig::default(), async move {
        let _ = stop_rx.await;
    }));
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = FilterDbClient::connect(url.clone()).await {
            client = Some(c.max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = client.expect("server did not come up");
    let size = std::fs::metadata(file).expect("stat").len();
    let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();

    // Timed: open the file, stream it in 1 MiB chunks as the CLI does, wait for the result.
    let t0 = Instant::now();
    let f = tokio::fs::File::open(file).await.expect("open file");
    let header = pb::IngestRequest {
        part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
            meta: Some(pb::ModelMeta {
                name: "wrn-28-10".into(),
                training_datasets: vec!["cifar10".into()],
                task: "Classification".into(),
                architecture: "WideResNet-28-10".into(),
                ..Default::default()
            }),
            file_name: name,
            total_bytes: size,
            ..Default::default()
        })),
    };
    let chunks = futures::stream::unfold(Some(f), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            let k = f.read(&mut buf[n..]).await.expect("read file");
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            return None;
        }
        buf.truncate(n);
        Some((pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(buf)) }, Some(f)))
    });
    let stream = futures::StreamExt::chain(futures::stream::iter([header]), chunks);
    let mut responses = client.ingest(stream).await.expect("ingest call").into_inner();
    let mut marks: Vec<(i32, Instant)> = Vec::new();
    let mut result = None;
    while let Some(m) = responses.message().await.expect("ingest stream") {
        match m.part {
            Some(pb::ingest_response::Part::Progress(p)) => marks.push((p.phase, Instant::now())),
            Some(pb::ingest_response::Part::Result(r)) => result = Some(r),
            None => {}
        }
    }
    let t1 = Instant::now();
    let result = result.expect("no result");
    assert_eq!(result.outcome, pb::IngestOutcome::Created as i32);
    let model = result.model.expect("model");
    // Progress messages are best effort (try_send); a missing phase leaves its share in the next.
    let first = |ph: pb::IngestPhase| marks.iter().find(|(p, _)| *p == ph as i32).map(|(_, t)| *t);
    let tp = first(pb::IngestPhase::Parsing).unwrap_or(t0);
    let ts = first(pb::IngestPhase::Statistics).unwrap_or(tp);
    let tw = first(pb::IngestPhase::Writing).unwrap_or(ts);
    let phases = Phases { upload: secs(tp - t0), parse: secs(ts - tp), stats: secs(tw - ts), write: secs(t1 - tw) };
    let rocks = rocks_log(dir.path());
    drop(client);
    let _ = stop_tx.send(());
    server.await.expect("server task").expect("server");
    RunResult { total: t1 - t0, phases, filters: model.n_filters, layers: model.n_layers, rocks }
}

// ---------------------------------------------------------------------------------------------
// Child processes: generation and each measured ingest mode run in a fresh process, so each
// mode's peak RSS (VmHWM at the child's end) is its own and not the allocator's leftovers.
// ---------------------------------------------------------------------------------------------

const TASK_ENV: &str = "FILTERDB_BENCH_TASK";

/// Runs `task` (JSON) in a child process of this binary; returns the child's JSON reply.
fn child(task: serde_json::Value) -> serde_json::Value {
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

fn run_child_task(task: &str) {
    let t: serde_json::Value = serde_json::from_str(task).expect("task json");
    let s = |k: &str| t[k].as_str().unwrap_or_else(|| panic!("task field {k}")).to_string();
    let path = PathBuf::from(s("path"));
    let reply = match s("task").as_str() {
        "generate" => {
            let (specs, ops) = wrn_28_10();
            let t0 = Instant::now();
            match s("format").as_str() {
                "safetensors" => write_safetensors(&path, &specs).expect("write safetensors"),
                "onnx" => write_onnx(&path, &specs, &ops).expect("write onnx"),
                other => panic!("unknown format {other}"),
            }
            serde_json::json!({"generate_s": t0.elapsed().as_secs_f64()})
        }
        mode @ ("engine" | "grpc") => {
            let runs = t["runs"].as_u64().unwrap_or(3) as usize;
            let work = PathBuf::from(s("work"));
            let sha = s("sha256");
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
            let label = s("format");
            let mut out = Vec::new();
            for _ in 0..runs {
                let r = if mode == "engine" { engine_run(&path, &sha, &work) } else { rt.block_on(grpc_run(&path, &work)) };
                eprintln!("  {label} {mode}: {:.3} s  {:?}  {:?}", secs(r.total), r.phases, r.rocks);
                out.push(serde_json::json!({
                    "total_s": secs(r.total),
                    "filters": r.filters,
                    "layers": r.layers,
                    "phases": [r.phases.upload, r.phases.parse, r.phases.stats, r.phases.write],
                    "rocksdb_flushes": r.rocks.flushes,
                    "rocksdb_stall_lines": r.rocks.stalls,
                }));
            }
            drop(rt);
            serde_json::json!({"runs": out, "vmhwm_kb": status_kb("VmHWM:")})
        }
        other => panic!("unknown task {other}"),
    };
    println!("{reply}");
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

struct ModeResult {
    mode: &'static str,
    runs: Vec<Duration>,
    phases: Option<Phases>,
    peak_rss_kb: Option<u64>,
    rocks: Vec<RocksLog>,
}

struct FileResult {
    label: &'static str,
    bytes: u64,
    filters: u64,
    layers: u32,
    gen_s: f64,
    hash_s: f64,
    modes: Vec<ModeResult>,
}

fn main() {
    if let Ok(task) = std::env::var(TASK_ENV) {
        run_child_task(&task);
        return;
    }
    let runs: usize = std::env::var("FILTERDB_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let base = std::env::var_os("FILTERDB_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("bench dir");
    let work_dir = tempfile::tempdir_in(base).expect("work dir");
    let work = work_dir.path();

    let (specs, _) = wrn_28_10();
    let conv3: usize = specs.iter().filter(|s| s.shape.len() == 4 && s.shape[2] == 3).map(Spec::numel).sum();
    eprintln!(
        "WideResNet-28-10: {} tensors, {:.2} M params in 3x3 convs ({} filters), {:.2} M params total; work dir {}",
        specs.len(),
        conv3 as f64 / 1e6,
        conv3 / 9,
        specs.iter().filter(|s| !matches!(s.init, Init::Count)).map(Spec::numel).sum::<usize>() as f64 / 1e6,
        work.display()
    );

    let mut results = Vec::new();
    for (label, file) in [("safetensors", "wrn28_10.safetensors"), ("onnx", "wrn28_10.onnx")] {
        let path = work.join(file);
        let path_s = path.to_string_lossy().into_owned();
        let g = child(serde_json::json!({"task": "generate", "format": label, "path": path_s}));
        let gen_s = g["generate_s"].as_f64().unwrap_or(0.0);
        let bytes = std::fs::metadata(&path).expect("stat").len();
        eprintln!("{label}: generated {:.1} MB in {gen_s:.2} s", bytes as f64 / MB);
        assert!(bytes >= 100_000_000, "{label} checkpoint is only {bytes} bytes");
        warm_page_cache(&path).expect("read file");

        let t = Instant::now();
        let sha = sha256_file(&path).expect("hash");
        let hash_s = t.elapsed().as_secs_f64();

        let mut modes = Vec::new();
        let copy = work.join("copy.bin");
        for (mode, fsync) in [("cp", false), ("cp+fsync", true)] {
            let d: Vec<Duration> = (0..runs).map(|_| cp_once(&path, &copy, fsync)).collect();
            eprintln!("  {label} {mode}: {d:?}");
            modes.push(ModeResult { mode, runs: d, phases: None, peak_rss_kb: None, rocks: Vec::new() });
        }

        let (mut filters, mut layers) = (None, 0);
        for mode in ["engine", "grpc"] {
            warm_page_cache(&path).expect("read file");
            let r = child(serde_json::json!({
                "task": mode, "format": label, "path": path_s, "sha256": sha, "runs": runs,
                "work": work.to_string_lossy(),
            }));
            let rs = r["runs"].as_array().expect("runs");
            let mut d = Vec::new();
            let mut ph = Vec::new();
            let mut rocks = Vec::new();
            for x in rs {
                d.push(Duration::from_secs_f64(x["total_s"].as_f64().expect("total")));
                let p: Vec<f64> = x["phases"].as_array().expect("phases").iter().map(|v| v.as_f64().unwrap_or(0.0)).collect();
                ph.push(Phases { upload: p[0], parse: p[1], stats: p[2], write: p[3] });
                rocks.push(RocksLog {
                    flushes: x["rocksdb_flushes"].as_u64().unwrap_or(0) as u32,
                    stalls: x["rocksdb_stall_lines"].as_u64().unwrap_or(0) as u32,
                });
                let got = x["filters"].as_u64().expect("filters");
                assert_eq!(*filters.get_or_insert(got), got, "{label}: {mode} stored a different filter count");
                layers = x["layers"].as_u64().unwrap_or(0) as u32;
            }
            modes.push(ModeResult {
                mode,
                runs: d,
                phases: Some(Phases::median(&ph)),
                peak_rss_kb: r["vmhwm_kb"].as_u64(),
                rocks,
            });
        }
        assert_eq!(filters, Some((conv3 / 9) as u64), "{label}: stored filters differ from the generated 3x3 weights");
        results.push(FileResult { label, bytes, filters: filters.unwrap_or(0), layers, gen_s, hash_s, modes });
        let _ = std::fs::remove_file(&path);
    }
    let parent_hwm = status_kb("VmHWM:");
    report(&results, runs, parent_hwm);
}

fn report(results: &[FileResult], runs: usize, parent_hwm: Option<u64>) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load3 = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut md = String::new();
    md.push_str(&format!(
        "Ingest throughput, WideResNet-28-10 checkpoints; median of {runs} runs; MB = 10^6 bytes; {cpus} CPUs; loadavg at end: {load3}\n\n"
    ));
    md.push_str("| file | MB | 3x3 layers | filters | mode | median s | runs s | MB/s | filters/s | time / cp | fraction of cp speed | peak RSS MB |\n");
    md.push_str("|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|\n");
    let mut json_files = Vec::new();
    for f in results {
        let mb = f.bytes as f64 / MB;
        let cp = secs(median(&f.modes.iter().find(|m| m.mode == "cp").expect("cp").runs));
        let mut json_modes = Vec::new();
        for m in &f.modes {
            let t = secs(median(&m.runs));
            let runs_s: Vec<String> = m.runs.iter().map(|d| format!("{:.3}", secs(*d))).collect();
            let is_ingest = m.phases.is_some();
            let fps = if is_ingest { format!("{:.0}", f.filters as f64 / t) } else { String::new() };
            let rss = m.peak_rss_kb.map(|k| format!("{:.0}", k as f64 / 1024.0)).unwrap_or_else(|| "—".into());
            md.push_str(&format!(
                "| {} | {:.1} | {} | {} | {} | {:.3} | {} | {:.0} | {} | {:.1} | {:.3} | {} |\n",
                f.label,
                mb,
                f.layers,
                f.filters,
                m.mode,
                t,
                runs_s.join(" / "),
                mb / t,
                fps,
                t / cp,
                cp / t,
                rss
            ));
            json_modes.push(serde_json::json!({
                "mode": m.mode,
                "median_s": t,
                "runs_s": m.runs.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
                "mb_per_s": mb / t,
                "filters_per_s": if is_ingest { Some(f.filters as f64 / t) } else { None },
                "time_over_cp": t / cp,
                "fraction_of_cp_speed": cp / t,
                "peak_rss_mb": m.peak_rss_kb.map(|k| k as f64 / 1024.0),
                "phases_median_s": m.phases.map(|p| serde_json::json!({
                    "before_parse": p.upload, "parse": p.parse, "statistics": p.stats, "write_commit": p.write
                })),
                "rocksdb_flushes_per_run": m.rocks.iter().map(|r| r.flushes).collect::<Vec<_>>(),
                "rocksdb_stall_lines_per_run": m.rocks.iter().map(|r| r.stalls).collect::<Vec<_>>(),
            }));
        }
        json_files.push(serde_json::json!({
            "file": f.label, "bytes": f.bytes, "mb": mb, "layers_3x3": f.layers, "filters": f.filters,
            "generate_s": f.gen_s, "sha256_separate_pass_s": f.hash_s, "modes": json_modes,
        }));
    }
    md.push_str(
        "\nWhere the ingest time goes (median per phase, seconds; engine: its progress callback; gRPC: arrival of the \
         progress messages at the client):\n\n",
    );
    md.push_str("| file | mode | upload (SHA-256 + staging write) | parse (read + decode + cut) | statistics | RocksDB write + synced commit | total | SHA-256 alone | RocksDB flushes / stall lines per run |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for f in results {
        for m in f.modes.iter() {
            let Some(p) = m.phases else { continue };
            let up = if m.mode == "engine" { format!("{:.3} (hash not timed)", p.upload) } else { format!("{:.3}", p.upload) };
            let rocks: Vec<String> = m.rocks.iter().map(|r| format!("{}/{}", r.flushes, r.stalls)).collect();
            md.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                f.label,
                m.mode,
                up,
                p.parse,
                p.stats,
                p.write,
                secs(median(&m.runs)),
                f.hash_s,
                rocks.join(", ")
            ));
        }
    }
    md.push_str(&format!(
        "\nPeak RSS: VmHWM at the end of the child process that ran the mode's {runs} ingests (engine + RocksDB; for \
         gRPC also the in-process client and server); the parent (generation in its own child, cp, hashing) peaked at {:.0} MB.\n",
        parent_hwm.unwrap_or(0) as f64 / 1024.0
    ));
    print!("{md}");
    if let Some(out) = std::env::var_os("FILTERDB_BENCH_OUT") {
        let j = serde_json::json!({
            "benchmark": "ingest",
            "model": "WideResNet-28-10",
            "runs": runs,
            "cpus": cpus,
            "loadavg_end": load.trim(),
            "parent_vmhwm_mb": parent_hwm.map(|k| k as f64 / 1024.0),
            "files": json_files,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&j).expect("json")).expect("write FILTERDB_BENCH_OUT");
        eprintln!("wrote {}", PathBuf::from(out).display());
    }
}
