//! Test harness: servers on loopback, fixtures, and an ingest helper over the raw gRPC client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use filterdb::engine::Engine;
use filterdb::server::{ServerConfig, serve};
use filterdb_proto as pb;
use pb::filter_db_client::FilterDbClient;
use tonic::transport::Channel;

/// Repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A workspace binary (`filterdb-server`, `filterdb`) next to the test binary's folder: tests run
/// from <target>/debug/deps/it-<hash>, binaries live in <target>/debug.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join(name);
    assert!(bin.exists(), "{} not built: run `cargo nextest run --workspace`", bin.display());
    bin
}

/// A fixture file.
pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// An in-process server on 127.0.0.1:0 over a data directory.
pub struct TestServer {
    pub url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(dir: &Path) -> TestServer {
        Self::start_with(dir, |_| {}).await
    }

    /// [`TestServer::start`] with the engine adjusted by `setup` before it serves.
    pub async fn start_with(dir: &Path, setup: impl FnOnce(&Engine)) -> TestServer {
        let engine = Arc::new(Engine::open(dir).expect("open engine"));
        setup(&engine);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve(engine, listener, ServerConfig::default(), async move {
            let _ = rx.await;
        }));
        TestServer { url, shutdown: Some(tx), task: Some(task) }
    }

    pub async fn client(&self) -> FilterDbClient<Channel> {
        for _ in 0..50 {
            if let Ok(c) = FilterDbClient::connect(self.url.clone()).await {
                return c.max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("server at {} did not come up", self.url)
    }

    /// Graceful stop: returns once the database is flushed and closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server result");
        }
    }
}

/// Labels for a test model.
pub fn meta(name: &str, dataset: &str, task: &str, arch: &str) -> pb::ModelMeta {
    pb::ModelMeta {
        name: name.into(),
        training_datasets: vec![dataset.into()],
        task: task.into(),
        architecture: arch.into(),
        ..Default::default()
    }
}

/// Ingests bytes; returns the final result or the status.
pub async fn ingest_bytes(
    c: &mut FilterDbClient<Channel>,
    meta: pb::ModelMeta,
    file_name: &str,
    bytes: Vec<u8>,
    conflict: pb::NameConflict,
) -> Result<pb::IngestResult, tonic::Status> {
    let mut msgs = vec![pb::IngestRequest {
        part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
            meta: Some(meta),
            file_name: file_name.into(),
            total_bytes: bytes.len() as u64,
            on_name_conflict: conflict as i32,
            ..Default::default()
        })),
    }];
    for chunk in bytes.chunks(1 << 20) {
        msgs.push(pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(chunk.to_vec())) });
    }
    let mut stream = c.ingest(tokio_stream::iter(msgs)).await?.into_inner();
    let mut result = None;
    while let Some(m) = stream.message().await? {
        if let Some(pb::ingest_response::Part::Result(r)) = m.part {
            result = Some(r);
        }
    }
    result.ok_or_else(|| tonic::Status::internal("no result message"))
}

/// Ingests a fixture file.
pub async fn ingest_fixture(
    c: &mut FilterDbClient<Channel>,
    meta: pb::ModelMeta,
    name: &str,
) -> Result<pb::IngestResult, tonic::Status> {
    let bytes = std::fs::read(fixture(name)).expect("read fixture");
    ingest_bytes(c, meta, name, bytes, pb::NameConflict::Error).await
}

/// All filters of a request as f32 values, with the first filter id of each batch.
pub async fn get_filters(c: &mut FilterDbClient<Channel>, req: pb::GetFiltersRequest) -> Result<(Vec<u64>, Vec<f32>), tonic::Status> {
    let mut stream = c.get_filters(req).await?.into_inner();
    let (mut ids, mut vals) = (Vec::new(), Vec::new());
    while let Some(b) = stream.message().await? {
        assert_eq!(b.kernels.len(), b.count as usize * 36, "batch byte length");
        for k in 0..b.count as u64 {
            ids.push(b.first_filter_id + k);
        }
        vals.extend(b.kernels.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    Ok((ids, vals))
}

/// All filters of one model.
pub async fn model_filters(c: &mut FilterDbClient<Channel>, name: &str) -> Vec<f32> {
    let req = pb::GetFiltersRequest {
        target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
            model: Some(by_name(name)),
            ..Default::default()
        })),
        batch_size: 7, // deliberately odd and small: exercises batch boundaries
    };
    get_filters(c, req).await.expect("get filters").1
}

pub fn by_name(name: &str) -> pb::ModelRef {
    pb::ModelRef { r#ref: Some(pb::model_ref::Ref::Name(name.into())) }
}

/// Census totals (models, layers, filters) of everything.
pub async fn totals(c: &mut FilterDbClient<Channel>) -> (u64, u64, u64) {
    let r = c.census(pb::CensusRequest::default()).await.expect("census").into_inner();
    let t = r.total.expect("total");
    (t.models, t.layers, t.filters)
}

/// Expected layers of a fixture, as written by make_fixtures.py.
#[derive(Debug, serde::Deserialize)]
pub struct Expected {
    pub format: String,
    pub layers: Vec<ExpectedLayer>,
    pub kernel_shape_counts: std::collections::BTreeMap<String, u64>,
    pub n_filters: u64,
}

#[derive(Debug, serde::Deserialize)]
pub struct ExpectedLayer {
    pub tensor_name: String,
    pub out_channels: u32,
    pub in_channels: u32,
    pub layer_index: u32,
    pub conv_depth: u32,
    pub conv_depth_norm: f64,
    pub n_filters: u64,
    pub offset: u64,
}

/// Expected JSON and raw f32 values of a fixture stem.
pub fn expected(stem: &str) -> (Expected, Vec<f32>) {
    let dir = repo().join("tests/fixtures/expected");
    let json = std::fs::read(dir.join(format!("{stem}.json"))).expect("expected json");
    let e: Expected = serde_json::from_slice(&json).expect("parse expected json");
    let raw = std::fs::read(dir.join(format!("{stem}.f32"))).expect("expected f32");
    let vals = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (e, vals)
}

/// Bit-exact comparison of two f32 slices with a useful message.
pub fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: value count");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!("{what}: value {i} (filter {}, element {}) is {} but expected {}", i / 9, i % 9, got[i], want[i]);
    }
}
