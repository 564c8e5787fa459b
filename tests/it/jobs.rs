//! Scheduled ingestion end to end: an inbox folder and an HTTP catalog on loopback, job state
//! in RocksDB, quarantine and retries, and kill -9 in the middle of a job.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use filterdb::engine::Engine;
use filterdb::jobs::SourceConfig;
use filterdb::server::{ServerConfig, serve};
use filterdb_proto as pb;
use pb::jobs_client::JobsClient;
use sha2::Digest;
use tonic::transport::Channel;

use crate::harness::*;

struct JobsServer {
    url: String,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(dir: &Path, sources: Vec<SourceConfig>) -> JobsServer {
    let engine = Arc::new(Engine::open(dir).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let config = ServerConfig { sources, ..Default::default() };
    let task = tokio::spawn(serve(engine, listener, config, async move {
        let _ = rx.await;
    }));
    JobsServer { url, shutdown: tx, task }
}

async fn jobs(url: &str) -> JobsClient<Channel> {
    for _ in 0..50 {
        if let Ok(c) = JobsClient::connect(url.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no server")
}

fn source(name: &str) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        inbox: None,
        catalog_url: None,
        every: None,
        cron: None,
        max_download_bytes: 1 << 30,
        max_attempts: 2,
        retry_base: Some("1ms".into()),
    }
}

fn drop_into(inbox: &Path, file: &str, as_name: &str, model: &str) {
    std::fs::copy(fixture(file), inbox.join(as_name)).unwrap();
    let sidecar = serde_json::json!({"name": model, "datasets": "imagenet", "task": "Classification", "architecture": "ResNet-18"});
    std::fs::write(inbox.join(format!("{as_name}.json")), sidecar.to_string()).unwrap();
}

async fn job_map(c: &mut JobsClient<Channel>) -> std::collections::BTreeMap<String, pb::JobState> {
    let list = c.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    list.into_iter().map(|j| (j.item.clone(), j)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_schedule_quarantine_duplicates_and_new_versions() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let mut src = source("inbox");
    src.inbox = Some(inbox.path().to_path_buf());
    src.every = Some("200ms".into());
    drop_into(inbox.path(), "tinynet_zip.pt", "a.pt", "inbox_a");
    // A checkpoint without its sidecar is not ready and is left alone.
    std::fs::copy(fixture("tinynet.safetensors"), inbox.path().join("pending.safetensors")).unwrap();
    let server = start(dir.path(), vec![src]).await;
    let mut j = jobs(&server.url).await;

    // The schedule picks the file up by itself (200 ms interval: no waiting for minutes).
    let mut done = false;
    for _ in 0..100 {
        if job_map(&mut j).await.get("a.pt").is_some_and(|s| s.outcome == "done") {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "the scheduled run did not ingest a.pt");
    let m = job_map(&mut j).await;
    assert!(!m.contains_key("pending.safetensors"));

    // Corrupt, duplicate under the same name, duplicate under another name, new version.
    drop_into(inbox.path(), "bad/truncated.pt", "corrupt.pt", "inbox_bad");
    drop_into(inbox.path(), "tinynet_zip.pt", "same_again.pt", "inbox_a");
    drop_into(inbox.path(), "tinynet_zip.pt", "other_name.pt", "inbox_other");
    drop_into(inbox.path(), "tinynet_legacy.pt", "a_v2.pt", "inbox_a");
    let r = j.run_source(pb::RunSourceRequest { source: "inbox".into() }).await.unwrap().into_inner();
    let m = job_map(&mut j).await;
    assert_eq!(m["corrupt.pt"].outcome, "quarantined");
    assert!(m["corrupt.pt"].last_error.contains("malformed pytorch file"), "{}", m["corrupt.pt"].last_error);
    assert_eq!(m["same_again.pt"].outcome, "done");
    assert_eq!(m["other_name.pt"].outcome, "quarantined");
    assert!(m["other_name.pt"].last_error.contains("already stored as model"), "{}", m["other_name.pt"].last_error);
    assert_eq!(m["a_v2.pt"].outcome, "done");
    assert!(r.ingested >= 1 && r.quarantined >= 2, "{r:?}");

    // One model named inbox_a, holding the new version's bytes.
    let mut c = pb::filter_db_client::FilterDbClient::connect(server.url.clone()).await.unwrap();
    let models = c.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    let a: Vec<&pb::Model> = models.iter().filter(|m| m.name == "inbox_a").collect();
    assert_eq!(a.len(), 1);
    let legacy_sha = hex::encode(sha2::Sha256::digest(std::fs::read(fixture("tinynet_legacy.pt")).unwrap()));
    assert_eq!(a[0].content_sha256, legacy_sha);
    assert_eq!(models.len(), 1, "nothing else was stored");

    // Another run: everything already handled, quarantined items are not retried.
    let r = j.run_source(pb::RunSourceRequest { source: "inbox".into() }).await.unwrap().into_inner();
    assert_eq!((r.ingested, r.quarantined, r.retry), (0, 0, 0), "{r:?}");
    let s = j.list_sources(pb::ListSourcesRequest {}).await.unwrap().into_inner().sources;
    assert_eq!(s[0].kind, "inbox");
    assert_eq!(s[0].schedule, "every 200ms");
    assert_eq!((s[0].done, s[0].quarantined), (3, 2));
    assert!(s[0].next_run_unix_ms > 0 && s[0].last_run_unix_ms > 0);
    let e = j.run_source(pb::RunSourceRequest { source: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let _ = server.shutdown.send(());
    server.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_catalog_downloads_checks_sha256_retries_then_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let www = tempfile::tempdir().unwrap();
    for f in ["tinynet_zip.pt", "tinynet.safetensors", "bad/truncated.onnx"] {
        std::fs::copy(fixture(f), www.path().join(Path::new(f).file_name().unwrap())).unwrap();
    }
    let sha = |f: &str| hex::encode(sha2::Sha256::digest(std::fs::read(fixture(f)).unwrap()));
    let entry = |name: &str, url: &str, sha: String| {
        serde_json::json!({"name": name, "url": url, "sha256": sha, "datasets": ["cifar10"], "task": "Classification", "architecture": "vgg16"})
    };
    let catalog = serde_json::json!({"checkpoints": [
        entry("good", "tinynet_zip.pt", sha("tinynet_zip.pt")),
        entry("wrong_hash", "tinynet.safetensors", "00".repeat(32)),
        entry("missing", "nowhere.pt", "11".repeat(32)),
        entry("corrupt", "truncated.onnx", sha("bad/truncated.onnx")),
    ]});
    std::fs::write(www.path().join("catalog.json"), catalog.to_string()).unwrap();
    // A real HTTP server on loopback: Python's http.server.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut http = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(www.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let url = format!("http://127.0.0.1:{port}/catalog.json");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut src = source("catalog");
    src.catalog_url = Some(url);
    let server = start(dir.path(), vec![src]).await;
    let mut j = jobs(&server.url).await;
    let r1 = j.run_source(pb::RunSourceRequest { source: "catalog".into() }).await.unwrap().into_inner();
    assert_eq!((r1.ingested, r1.retry, r1.quarantined), (1, 2, 1), "{r1:?}");
    let m = job_map(&mut j).await;
    assert_eq!(m["good"].outcome, "done");
    assert_eq!(m["wrong_hash"].outcome, "retry");
    assert!(m["wrong_hash"].last_error.contains("sha256"), "{}", m["wrong_hash"].last_error);
    assert_eq!(m["missing"].outcome, "retry");
    assert_eq!(m["corrupt"].outcome, "quarantined");
    tokio::time::sleep(Duration::from_millis(20)).await; // backoff base is 1 ms
    // Second run: the good one is skipped; the transient ones reach max_attempts (2).
    let r2 = j.run_source(pb::RunSourceRequest { source: "catalog".into() }).await.unwrap().into_inner();
    assert_eq!((r2.ingested, r2.skipped, r2.quarantined), (0, 2, 2), "{r2:?}");
    let m = job_map(&mut j).await;
    assert!(m["missing"].last_error.starts_with("gave up after 2 attempts"), "{}", m["missing"].last_error);
    // Only the good checkpoint was stored: nothing from the bad or missing ones.
    let mut c = pb::filter_db_client::FilterDbClient::connect(server.url.clone()).await.unwrap();
    let models = c.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["good"]);
    let _ = http.kill();
    let _ = http.wait();
    let _ = server.shutdown.send(());
    server.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_job_then_a_complete_run_with_no_duplicate_and_no_partial_model() {
    use crate::crash::{Proc, big_safetensors};
    let dir = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let config = dir.path().join("filterdb.toml");
    std::fs::write(
        &config,
        format!("[[source]]\nname = \"inbox\"\ninbox = \"{}\"\nevery = \"100ms\"\n", inbox.path().display()),
    )
    .unwrap();
    std::fs::write(inbox.path().join("big.safetensors"), big_safetensors(30, 7)).unwrap();
    let meta = serde_json::json!({"name": "big_job", "datasets": "imagenet", "task": "Classification", "architecture": "vgg"});
    let data = dir.path().join("data");
    // Kill the server while the scheduled job works on the file: once its staged copy appears.
    let proc = Proc::start_with(&data, &["--config", config.to_str().unwrap()]);
    let _ = proc.client().await;
    std::fs::write(inbox.path().join("big.safetensors.json"), meta.to_string()).unwrap();
    let staging = data.join("staging");
    let mut seen = false;
    for _ in 0..400 {
        if std::fs::read_dir(&staging).map(|d| d.count() > 0).unwrap_or(false) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the job never started");
    tokio::time::sleep(Duration::from_millis(150)).await;
    proc.kill9();

    // Restart: the schedule runs the job again; it completes, once.
    let proc = Proc::start_with(&data, &["--config", config.to_str().unwrap()]);
    let mut c = proc.client().await;
    let mut j = jobs(&proc.url).await;
    let mut state = None;
    for _ in 0..300 {
        if let Some(s) = job_map(&mut j).await.get("big.safetensors").filter(|s| s.outcome == "done") {
            state = Some(s.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = state.expect("the job did not complete after the restart");
    let models = c.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1, "no duplicate");
    assert_eq!((models[0].name.as_str(), models[0].n_layers, models[0].n_filters), ("big_job", 30, 30 * 65_536));
    assert_eq!(state.model_id, models[0].model_id);
    let (m, l, f) = totals(&mut c).await;
    assert_eq!((m, l, f), (1, 30, 30 * 65_536), "no partial model");
    proc.kill9();
}
