//! kill -9 during ingest: after a restart no partial model is visible and every acknowledged
//! ingest is there, bit-exact. Uses the real `filterdb-server` binary.

use std::process::{Child, Command, Stdio};

use filterdb_proto as pb;
use pb::filter_db_client::FilterDbClient;

use crate::harness::*;

fn server_binary() -> std::path::PathBuf {
    crate::harness::binary("filterdb-server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Proc {
    child: Child,
    pub url: String,
}

impl Proc {
    pub fn start(dir: &std::path::Path) -> Proc {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &std::path::Path, extra: &[&str]) -> Proc {
        let port = free_port();
        let child = Command::new(server_binary())
            .args(["--data-dir", dir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        Proc { child, url: format!("http://127.0.0.1:{port}") }
    }

    pub async fn client(&self) -> FilterDbClient<tonic::transport::Channel> {
        for _ in 0..200 {
            if let Ok(c) = FilterDbClient::connect(self.url.clone()).await {
                return c.max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("server binary did not come up at {}", self.url)
    }

    pub fn kill9(mut self) {
        // SIGKILL: no shutdown hooks, no flush.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A safetensors file of `layers` conv weights [256, 256, 3, 3] with deterministic values.
pub fn big_safetensors(layers: usize, seed: u32) -> Vec<u8> {
    let per = 256 * 256 * 9;
    let mut header = serde_json::Map::new();
    for l in 0..layers {
        header.insert(
            format!("features.{l}.weight"),
            serde_json::json!({"dtype": "F32", "shape": [256, 256, 3, 3], "data_offsets": [l * per * 4, (l + 1) * per * 4]}),
        );
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + layers * per * 4);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for _ in 0..layers * per {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&((x as f32 / u32::MAX as f32) - 0.5).to_le_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingest_loses_no_acknowledged_write_and_shows_no_partial_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged: Vec<(String, &str)> = Vec::new();
    // Kill points: while uploading, while parsing, while writing (the commit may or may not
    // have happened: either way the model must be whole or absent).
    let kill_after = [pb::IngestPhase::Receiving, pb::IngestPhase::Parsing, pb::IngestPhase::Writing];
    for (round, phase) in kill_after.iter().enumerate() {
        let proc = Proc::start(dir.path());
        let mut c = proc.client().await;
        // Every earlier acknowledged model is intact.
        for (name, file) in &acknowledged {
            let (_, want) = expected(file);
            assert_bits_eq(&format!("round {round}: {name}"), &model_filters(&mut c, name).await, &want);
        }
        check_consistent(&mut c, round).await;
        // Acknowledge one more small model.
        let file = ["tinynet_zip.pt", "tinynet.safetensors", "tinynet_initializers.onnx"][round];
        let name = format!("ack{round}");
        ingest_fixture(&mut c, meta(&name, "imagenet", "Classification", "vgg"), file).await.expect("small ingest");
        acknowledged.push((name, file));
        // Start a ~70 MB ingest and kill the server at the chosen phase.
        let big = big_safetensors(30, round as u32);
        let len = big.len() as u64;
        let mut msgs = vec![pb::IngestRequest {
            part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
                meta: Some(meta(&format!("big{round}"), "imagenet", "Classification", "vgg")),
                file_name: "big.safetensors".into(),
                total_bytes: len,
                ..Default::default()
            })),
        }];
        for chunk in big.chunks(1 << 20) {
            msgs.push(pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(chunk.to_vec())) });
        }
        let mut stream = c.ingest(tokio_stream::iter(msgs)).await.expect("ingest call").into_inner();
        loop {
            match stream.message().await {
                Ok(Some(pb::IngestResponse { part: Some(pb::ingest_response::Part::Progress(p)) })) if p.phase >= *phase as i32 => break,
                Ok(Some(_)) => {}
                other => panic!("round {round}: stream ended before phase {phase:?}: {other:?}"),
            }
        }
        proc.kill9();
    }
    // Final restart: all acknowledged models, nothing partial.
    let proc = Proc::start(dir.path());
    let mut c = proc.client().await;
    for (name, file) in &acknowledged {
        let (_, want) = expected(file);
        assert_bits_eq(name, &model_filters(&mut c, name).await, &want);
    }
    check_consistent(&mut c, 99).await;
    proc.kill9();
}

/// Every visible model is whole: its layers' filters are all readable and counts add up.
async fn check_consistent(c: &mut FilterDbClient<tonic::transport::Channel>, round: usize) {
    let models = c.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    let (tm, tl, tf) = totals(c).await;
    assert_eq!(tm as usize, models.len(), "round {round}");
    assert_eq!(tl, models.iter().map(|m| u64::from(m.n_layers)).sum::<u64>(), "round {round}");
    assert_eq!(tf, models.iter().map(|m| m.n_filters).sum::<u64>(), "round {round}");
    for m in &models {
        if m.name.starts_with("big") {
            assert_eq!((m.n_layers, m.n_filters), (30, 30 * 65_536), "round {round}: {} is partial", m.name);
        }
        let got = model_filters_count(c, m.model_id).await;
        assert_eq!(got, m.n_filters, "round {round}: model {} filters readable", m.name);
    }
}

async fn model_filters_count(c: &mut FilterDbClient<tonic::transport::Channel>, id: u64) -> u64 {
    let req = pb::GetFiltersRequest {
        target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
            model: Some(pb::ModelRef { r#ref: Some(pb::model_ref::Ref::Id(id)) }),
            ..Default::default()
        })),
        batch_size: 0,
    };
    let mut s = c.get_filters(req).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(b) = s.message().await.unwrap() {
        n += u64::from(b.count);
    }
    n
}
