//! Snapshots, exports, restore and Arrow Flight: a snapshot restores bit-identically (filters,
//! ids, statistics, basis, answers), DuckDB and pyarrow read it and agree with the server, a
//! pyarrow.flight client pulls an export, a snapshot taken during ingest holds no half model,
//! and kill -9 during a snapshot leaves nothing that looks complete.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use filterdb_proto as pb;
use pb::snapshots_client::SnapshotsClient;

use crate::harness::*;

fn server_binary() -> std::path::PathBuf {
    crate::harness::binary("filterdb-server")
}

fn python() -> String {
    std::env::var("FILTERDB_PYTHON").unwrap_or_else(|_| {
        let venv = "/var/cache/filterdb/venv/bin/python";
        if Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    })
}

async fn snapshots(url: &str) -> SnapshotsClient<tonic::transport::Channel> {
    SnapshotsClient::connect(url.to_string())
        .await
        .expect("connect snapshots")
}

/// Follows a Snapshot/Export stream; returns the phases seen and the result.
async fn finish(
    mut s: tonic::Streaming<pb::SnapshotProgress>,
) -> Result<(Vec<String>, pb::SnapshotResult), tonic::Status> {
    let mut phases = Vec::new();
    let mut result = None;
    while let Some(p) = s.message().await? {
        if phases.last() != Some(&p.phase) {
            phases.push(p.phase.clone());
        }
        if p.result.is_some() {
            result = p.result;
        }
    }
    Ok((phases, result.expect("result message")))
}

async fn take_snapshot(url: &str, out: &Path) -> pb::SnapshotResult {
    let s = snapshots(url)
        .await
        .snapshot(pb::SnapshotRequest {
            out_dir: out.display().to_string(),
        })
        .await
        .expect("snapshot");
    finish(s.into_inner()).await.expect("snapshot stream").1
}

/// Three models over two tasks, one visual category with a space, and a pinned basis.
async fn setup(dir: &Path) -> TestServer {
    let server = TestServer::start(dir).await;
    let mut c = server.client().await;
    ingest_fixture(
        &mut c,
        meta("ex_zip", "imagenet", "Classification", "resnet"),
        "tinynet_zip.pt",
    )
    .await
    .unwrap();
    let mut m = meta("ex_onnx", "cifar10", "Segmentation", "unet");
    m.visual_category = "medical xray".into();
    ingest_fixture(&mut c, m, "tinynet_initializers.onnx")
        .await
        .unwrap();
    ingest_fixture(
        &mut c,
        meta("ex_st", "places365", "Classification", "vgg"),
        "tinynet.safetensors",
    )
    .await
    .unwrap();
    let mut a = pb::analytics_client::AnalyticsClient::connect(server.url.clone())
        .await
        .unwrap();
    let mut s = a
        .pin_basis(pb::PinBasisRequest::default())
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    server
}

/// Everything a client can see, for comparing two servers (proto equality: maps compare as maps).
#[derive(Debug, PartialEq)]
struct Answers {
    models: pb::ListModelsResponse,
    layers: Vec<pb::ListLayersResponse>,
    filters: Vec<(Vec<u64>, Vec<u32>)>,
    census: pb::CensusResponse,
    pinned: pb::PinnedBasis,
    distributions: pb::DistributionsResponse,
    basis: pb::BasisResponse,
}

async fn answers(url: &str) -> Answers {
    let mut c = pb::filter_db_client::FilterDbClient::connect(url.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let mut a = pb::analytics_client::AnalyticsClient::connect(url.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let models = c
        .list_models(pb::ListModelsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut layers, mut filters) = (Vec::new(), Vec::new());
    for m in &models.models {
        let r = pb::ModelRef {
            r#ref: Some(pb::model_ref::Ref::Id(m.model_id)),
        };
        layers.push(
            c.list_layers(pb::ListLayersRequest {
                model: Some(r.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
        );
        let req = pb::GetFiltersRequest {
            target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
                model: Some(r),
                ..Default::default()
            })),
            batch_size: 1000,
        };
        let (ids, vals) = get_filters(&mut c, req).await.unwrap();
        filters.push((ids, vals.iter().map(|v| v.to_bits()).collect()));
    }
    let census = c
        .census(pb::CensusRequest {
            group_by: vec![pb::Field::Task as i32, pb::Field::VisualCategory as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Answers {
        models,
        layers,
        filters,
        census,
        pinned: a
            .get_pinned_basis(pb::GetPinnedBasisRequest {})
            .await
            .unwrap()
            .into_inner(),
        distributions: a
            .distributions(pb::DistributionsRequest::default())
            .await
            .unwrap()
            .into_inner(),
        basis: a
            .basis(pb::BasisRequest::default())
            .await
            .unwrap()
            .into_inner(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let snap = out.path().join("snap");
    let mut c = server.client().await;
    let (models, layers, filters) = totals(&mut c).await;
    let r = take_snapshot(&server.url, &snap).await;
    assert_eq!(
        (r.models, r.layers, r.filters),
        (models, layers, filters),
        "{r:?}"
    );
    let manifest = filterdb::export::read_manifest(&snap).unwrap();
    assert_eq!(manifest.kind, "snapshot");
    assert_eq!(manifest.basis_version, Some(1));
    assert!(
        manifest.files.iter().any(|f| f.path
            == "filters/task=Segmentation/visual_category=medical%20xray/part-00000.parquet"),
        "{:?}",
        manifest.files
    );
    // Only the finished folder is left (the partial one was renamed).
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["snap".to_string()]);
    // Never overwrites.
    let manifest_before = format!("{:?}", manifest.files);
    let e = snapshots(&server.url)
        .await
        .snapshot(pb::SnapshotRequest {
            out_dir: snap.display().to_string(),
        })
        .await;
    let e = match e {
        Ok(s) => finish(s.into_inner()).await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    // Relative paths are refused (the folder is on the server's host).
    let e = snapshots(&server.url)
        .await
        .snapshot(pb::SnapshotRequest {
            out_dir: "rel/dir".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Neither refusal wrote anything: the snapshot is as it was, and no other folder appeared.
    assert_eq!(format!("{:?}", filterdb::export::read_manifest(&snap).unwrap().files), manifest_before);
    let names_after: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names_after, vec!["snap".to_string()]);
    assert!(!std::path::Path::new("rel").exists());

    let want = answers(&server.url).await;
    server.stop().await;

    // `filterdb-server restore SNAPSHOT --data-dir NEW`, the real binary.
    let restored = tempfile::tempdir().unwrap();
    let o = Command::new(server_binary())
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--data-dir",
            restored.path().to_str().unwrap(),
        ])
        .output()
        .expect("run restore");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "restore failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line =
        format!("restored {models} models, {layers} layers, {filters} filters and basis version 1");
    assert!(stdout.contains(&line), "{stdout}");
    // Restoring over a database is refused.
    let o = Command::new(server_binary())
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--data-dir",
            restored.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a database"));

    let server2 = TestServer::start(restored.path()).await;
    let got = answers(&server2.url).await;
    assert_eq!(got.models, want.models);
    assert_eq!(got.layers, want.layers);
    assert!(got.filters == want.filters, "filters differ");
    assert_eq!(got.census, want.census);
    assert_eq!(got.pinned, want.pinned);
    assert_eq!(got.distributions, want.distributions);
    assert_eq!(got.basis, want.basis);
    // The restored database continues the id sequence.
    let mut c = server2.client().await;
    let r = ingest_fixture(
        &mut c,
        meta("after", "imagenet", "Classification", "resnet"),
        "tinynet_f16.safetensors",
    )
    .await
    .unwrap();
    assert_eq!(r.model.unwrap().model_id, 3);
    server2.stop().await;

    // A damaged file is detected before anything is written.
    let part = snap.join("layers.parquet");
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let e = filterdb::export::restore(&snap, fresh.path(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("damaged"), "{e}");
    // Nothing was stored: no database in the target.
    assert!(!fresh.path().join("db").exists(), "a damaged snapshot left a database behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_duckdb_pyarrow_and_flight_read_snapshot_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let snap = out.path().join("snap");
    take_snapshot(&server.url, &snap).await;
    let export = out.path().join("export");
    let s = snapshots(&server.url)
        .await
        .export(pb::ExportRequest {
            selection: Some(pb::Selection {
                expr: "task = Classification and layer_index <= 2".into(),
                ..Default::default()
            }),
            out_dir: export.display().to_string(),
        })
        .await
        .unwrap();
    let (phases, r) = finish(s.into_inner()).await.unwrap();
    assert_eq!(phases, ["models", "layers", "filters", "manifest", "done"]);
    assert_eq!(r.models, 2);
    let m = filterdb::export::read_manifest(&export).unwrap();
    assert_eq!(
        (m.kind.as_str(), m.selection.as_str()),
        ("export", "task = Classification and layer_index <= 2")
    );
    let url = server.url.trim_start_matches("http://").to_string();
    let o = tokio::process::Command::new(python())
        .arg(repo().join("tests/python/interop_test.py"))
        .args(["--server", &url])
        .arg("--snapshot")
        .arg(&snap)
        .arg("--export")
        .arg(&export)
        .arg("--proto-root")
        .arg(repo().join("proto"))
        .output()
        .await
        .expect("run python (set FILTERDB_PYTHON or run .ci/run, which creates the venv)");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "interop test failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "OK duckdb counts",
        "OK duckdb moments",
        "OK duckdb pruning",
        "OK pyarrow",
        "OK flight",
    ] {
        assert!(stdout.contains(line), "missing `{line}`:\n{stdout}");
    }
    server.stop().await;
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_during_concurrent_ingest_holds_no_half_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let ingest = tokio::spawn(async move {
        for i in 0..6u32 {
            let bytes = crate::crash::big_safetensors(2, i + 1);
            ingest_bytes(
                &mut c,
                meta(&format!("conc{i}"), "imagenet", "Classification", "vgg"),
                "b.safetensors",
                bytes,
                pb::NameConflict::Error,
            )
            .await
            .expect("ingest");
        }
    });
    let mut snaps = Vec::new();
    while !ingest.is_finished() || snaps.len() < 3 {
        let p = out.path().join(format!("s{}", snaps.len()));
        take_snapshot(&server.url, &p).await;
        snaps.push(p);
    }
    ingest.await.unwrap();
    let mut sizes = Vec::new();
    for s in &snaps {
        let m = filterdb::export::read_manifest(s).unwrap();
        // Every model is whole: 2 layers of 65,536 filters each.
        assert_eq!(
            (m.rows.layers, m.rows.filters),
            (2 * m.rows.models, 2 * 65_536 * m.rows.models),
            "{}",
            s.display()
        );
        // And restore (which checks every model's layers and filters against its record) accepts it.
        let fresh = tempfile::tempdir().unwrap();
        let r = filterdb::export::restore(s, fresh.path(), &|_| {}).unwrap();
        assert_eq!(r.rows, m.rows);
        sizes.push(m.rows.models);
    }
    assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
    server.stop().await;
}

struct Proc {
    child: Child,
    url: String,
}

impl Proc {
    fn start(dir: &Path) -> Proc {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server_binary())
            .args([
                "--data-dir",
                dir.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        Proc {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn client(&self) -> pb::filter_db_client::FilterDbClient<tonic::transport::Channel> {
        for _ in 0..200 {
            if let Ok(c) = pb::filter_db_client::FilterDbClient::connect(self.url.clone()).await {
                return c
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("server binary did not come up at {}", self.url)
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_snapshot_leaves_nothing_that_looks_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let proc = Proc::start(dir.path());
    let mut c = proc.client().await;
    ingest_bytes(
        &mut c,
        meta("big", "imagenet", "Classification", "vgg"),
        "big.safetensors",
        crate::crash::big_safetensors(24, 7),
        pb::NameConflict::Error,
    )
    .await
    .expect("ingest");
    let snap = out.path().join("snap");
    let mut s = snapshots(&proc.url)
        .await
        .snapshot(pb::SnapshotRequest {
            out_dir: snap.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        match s.message().await {
            Ok(Some(p)) if p.phase == "filters" && p.filters_done > 0 => break,
            Ok(Some(p)) => assert!(
                p.result.is_none(),
                "snapshot finished before the kill; make the model bigger"
            ),
            other => panic!("stream ended early: {other:?}"),
        }
    }
    proc.kill9();
    assert!(
        !snap.exists(),
        "a killed snapshot must not appear under its name"
    );
    for e in std::fs::read_dir(out.path()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        assert!(name.starts_with(".snap.partial-"), "unexpected {name}");
        assert!(
            !e.path().join("manifest.json").exists(),
            "debris must not look complete"
        );
        assert!(filterdb::export::read_manifest(&e.path()).is_err());
    }
    // After a restart the same target works.
    let proc = Proc::start(dir.path());
    let _ = proc.client().await;
    let r = take_snapshot(&proc.url, &snap).await;
    assert_eq!(r.filters, 24 * 65_536);
    proc.kill9();
}

fn cli_binary() -> PathBuf {
    crate::harness::binary("filterdb")
}

/// Runs the `filterdb` CLI against `url` from `cwd`; returns (success, stdout, stderr).
async fn run_cli(url: &str, cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let o = tokio::process::Command::new(cli_binary())
        .arg("--server")
        .arg(url)
        .args(args)
        .current_dir(cwd)
        .output()
        .await
        .expect("run filterdb");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_snapshot_and_export_write_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let url = server.url.clone();
    let mut c = server.client().await;
    let (models, layers, filters) = totals(&mut c).await;

    // `filterdb snapshot --out DIR`: a human summary line, a complete dataset.
    let snap = out.path().join("snap");
    let (ok, stdout, stderr) = run_cli(
        &url,
        out.path(),
        &["snapshot", "--out", snap.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{stdout}\n{stderr}");
    let want = format!(
        "snapshot {}: {models} models, {layers} layers, {filters} filters in ",
        snap.display()
    );
    assert!(stdout.starts_with(&want), "{stdout}");
    let m = filterdb::export::read_manifest(&snap).unwrap();
    assert_eq!(
        (
            m.kind.as_str(),
            m.rows.models,
            m.rows.layers,
            m.rows.filters
        ),
        ("snapshot", models, layers, filters)
    );
    // The same folder again: refused, nothing overwritten.
    let (ok, _, stderr) = run_cli(
        &url,
        out.path(),
        &["snapshot", "--out", snap.to_str().unwrap()],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(filterdb::export::read_manifest(&snap).unwrap(), m);

    // `filterdb snapshot` without --out: a new snapshot-<time> folder under <data-dir>/snapshots.
    let (ok, stdout, stderr) = run_cli(&url, out.path(), &["--json", "snapshot"]).await;
    assert!(ok, "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let auto = PathBuf::from(v["path"].as_str().unwrap());
    assert_eq!(auto.parent().unwrap(), dir.path().join("snapshots"));
    assert!(
        auto.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("snapshot-")
    );
    assert_eq!(v["filters"], filters);
    assert_eq!(v["manifest"]["kind"], "snapshot");
    assert!(auto.join("manifest.json").is_file());

    // `filterdb --json export --where ... --out REL`: relative to the CLI's working directory.
    let (ok, stdout, stderr) = run_cli(
        &url,
        out.path(),
        &[
            "--json",
            "export",
            "--where",
            "task = Classification and layer_index <= 2",
            "--out",
            "exp",
        ],
    )
    .await;
    assert!(ok, "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let export = out.path().join("exp");
    assert_eq!(v["path"], export.display().to_string());
    assert_eq!(v["models"], 2);
    assert_eq!(v["manifest"]["kind"], "export");
    assert_eq!(
        v["manifest"]["selection"],
        "task = Classification and layer_index <= 2"
    );
    let sel = c
        .census(pb::CensusRequest {
            selection: Some(pb::Selection {
                expr: "task = Classification and layer_index <= 2".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(
        (v["layers"].as_u64(), v["filters"].as_u64()),
        (Some(sel.layers), Some(sel.filters))
    );
    let m = filterdb::export::read_manifest(&export).unwrap();
    assert_eq!(m.rows.filters, sel.filters);
    assert!(
        m.files
            .iter()
            .all(|f| !f.path.starts_with("filters/") || f.path.contains("task=Classification/")),
        "{:?}",
        m.files
    );
    // A bad selection is refused by the CLI before anything is written.
    let (ok, _, stderr) = run_cli(
        &url,
        out.path(),
        &["export", "--where", "task ==== x", "--out", "bad"],
    )
    .await;
    assert!(!ok);
    assert!(!stderr.is_empty());
    assert!(!out.path().join("bad").exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_restore_then_rerun_restores_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let mut c = server.client().await;
    // Eight more models of 4 x 65,536 filters, so the restore can be killed after it has
    // committed some models and before it ends.
    const BIG: u64 = 4 * 65_536;
    for i in 0..8u32 {
        ingest_bytes(
            &mut c,
            meta(&format!("big{i}"), "imagenet", "Classification", "vgg"),
            "big.safetensors",
            crate::crash::big_safetensors(4, 100 + i),
            pb::NameConflict::Error,
        )
        .await
        .expect("ingest");
    }
    let snap = out.path().join("snap");
    let r = take_snapshot(&server.url, &snap).await;
    let want = answers(&server.url).await;
    server.stop().await;

    let data = out.path().join("restored");
    let restore = || {
        Command::new(server_binary())
            .args([
                "restore",
                snap.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn restore")
    };
    // Kill -9 once the hidden partial database holds the bytes of two big models (their
    // synced commits are in its write-ahead log), while later models are still to come.
    let mut child = restore();
    let threshold = 2 * BIG * 36;
    let started = std::time::Instant::now();
    let bytes_written = loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("restore ended ({st:?}) before the kill; make the snapshot bigger");
        }
        let partial = std::fs::read_dir(&data).ok().and_then(|rd| {
            rd.flatten()
                .find(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(filterdb::export::RESTORE_PARTIAL_PREFIX)
                })
                .map(|e| e.path())
        });
        let n = partial.map(|p| dir_size(&p)).unwrap_or(0);
        if n >= threshold {
            child.kill().unwrap();
            break n;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "restore wrote no database"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "{status:?}: restore finished before the kill"
    );
    assert!(bytes_written < r.filters * 36, "{bytes_written}");
    // The half-built database is only in a hidden partial folder; `db` does not exist.
    let names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!data.join("db").exists(), "{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n.starts_with(filterdb::export::RESTORE_PARTIAL_PREFIX)),
        "{names:?}"
    );

    // The rerun succeeds, removes the debris, and the result is bit-identical.
    let o = Command::new(server_binary())
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .output()
        .expect("rerun restore");
    assert!(
        o.status.success(),
        "rerun failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["db".to_string()]);
    let server2 = TestServer::start(&data).await;
    let got = answers(&server2.url).await;
    assert_eq!(got.models, want.models);
    assert_eq!(got.layers, want.layers);
    assert!(got.filters == want.filters, "filters differ");
    assert_eq!(got.census, want.census);
    assert_eq!(got.pinned, want.pinned);
    assert_eq!(got.distributions, want.distributions);
    assert_eq!(got.basis, want.basis);
    server2.stop().await;
}

/// The Spark check (tests/spark/run.sh): a standalone cluster on loopback (one master, two
/// 1-core workers) reads a snapshot and must compute the server's census per task and per-task
/// means. Needs Java 17+ and pyspark (run.sh installs it into a venv on first use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spark_cluster_reads_snapshot_and_agrees_with_server() {
    let java = std::process::Command::new("java").arg("-version").output();
    assert!(
        java.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs Java 17+ on PATH for Apache Spark (apt-get install openjdk-17-jre-headless): {java:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let snap = out.path().join("snap");
    take_snapshot(&server.url, &snap).await;
    // The server's answers: census per task from the CLI, means from the stored statistics.
    let (ok, census, stderr) = run_cli(
        &server.url,
        out.path(),
        &["--json", "census", "--group-by", "task"],
    )
    .await;
    assert!(ok, "{census}\n{stderr}");
    server.stop().await;
    let census_path = out.path().join("census.json");
    std::fs::write(&census_path, census).unwrap();
    let o = tokio::process::Command::new(python())
        .arg(repo().join("tests/spark/make_expected.py"))
        .arg("--census")
        .arg(&census_path)
        .arg("--layers")
        .arg(snap.join("layers.parquet"))
        .output()
        .await
        .expect("run make_expected.py (set FILTERDB_PYTHON or run .ci/run)");
    assert!(
        o.status.success(),
        "make_expected.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let expected = out.path().join("expected.json");
    std::fs::write(&expected, &o.stdout).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = tokio::process::Command::new(repo().join("tests/spark/run.sh"))
        .env("FILTERDB_SPARK_PORT", port.to_string())
        .arg(&snap)
        .arg(&expected)
        .output()
        .await
        .expect("run tests/spark/run.sh");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "spark check failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "OK cluster spark://127.0.0.1:",
        "OK spark census 2 tasks",
        "OK spark means 2 tasks x 9",
        "OK spark pruning task = ",
        "OK timing",
    ] {
        assert!(stdout.contains(line), "missing `{line}`:\n{stdout}");
    }
    println!("{stdout}");
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
