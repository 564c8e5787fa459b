//! The Rust client library and the `filterdb` CLI against a real server on loopback.

use std::process::Command;

use filterdb_client::{Client, kernels, model_ref, selection};
use filterdb_proto as pb;

use crate::harness::*;

fn cli() -> std::path::PathBuf {
    crate::harness::binary("filterdb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_library_ingests_with_progress_and_reads_back_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = Client::connect(&server.url).await.unwrap();
    let mut phases = Vec::new();
    let header = pb::IngestHeader { meta: Some(meta("lib", "imagenet", "Classification", "resnet18")), ..Default::default() };
    let r = c
        .ingest_file(&fixture("tinynet_initializers.onnx"), header, |p| phases.push(p.phase))
        .await
        .unwrap();
    assert_eq!(r.outcome, pb::IngestOutcome::Created as i32);
    assert!(phases.contains(&(pb::IngestPhase::Receiving as i32)), "{phases:?}");
    assert!(phases.contains(&(pb::IngestPhase::Writing as i32)), "{phases:?}");
    let batches = c.get_filters(filterdb_client::model_filters(model_ref("lib"), None, None)).await.unwrap();
    let got: Vec<f32> = kernels::batches_kernels(&batches).unwrap().into_iter().flat_map(|(_, k)| k).collect();
    let (_, want) = expected("tinynet_initializers.onnx");
    assert_bits_eq("client library", &got, &want);
    let census = c.census(selection(Some("architecture = ResNet")).unwrap(), &[pb::Field::TrainingDataset]).await.unwrap();
    assert_eq!(census.groups.len(), 1);
    assert_eq!(census.groups[0].key, vec!["imagenet".to_string()]);
    assert_eq!(census.groups[0].filters, 480);
    let e = c.get_model(model_ref("missing")).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tour_ingest_list_filters_census_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let url = server.url.clone();
    let run = move |args: &[&str]| {
        let out = Command::new(cli()).arg("--server").arg(&url).args(args).output().expect("run filterdb");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let pt = fixture("tinynet_zip.pt");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        let pt = pt.clone();
        move || {
            run(&[
                "ingest",
                pt.to_str().unwrap(),
                "--model",
                "tour",
                "--dataset",
                "ILSVRC2012",
                "--task",
                "classification",
                "--architecture",
                "ResNet-18",
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "ingest failed: {out}\n{err}");
    assert!(out.contains("created"), "{out}");

    let raw = dir.path().join("tour.f32");
    let (ok, out, err) = run(&["filters", "tour", "--raw", raw.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    let bytes = std::fs::read(&raw).unwrap();
    let want = std::fs::read(repo().join("tests/fixtures/expected/tinynet_zip.pt.f32")).unwrap();
    assert!(bytes == want, "--raw export is not bit-exact");

    let (ok, out, err) = run(&["--json", "census", "--group-by", "task", "--where", "dataset = imagenet"]);
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("census --json is JSON");
    assert_eq!(v.to_string().matches("Classification").count(), 1, "{v}");
    assert!(v.to_string().contains("224"), "{v}");

    let (ok, out, _) = run(&["models"]);
    assert!(ok && out.contains("tour") && out.contains("imagenet"), "{out}");
    let (ok, out, _) = run(&["layers", "tour"]);
    assert!(ok && out.contains("conv2.weight"), "{out}");

    // Same bytes again: unchanged. A bad file: a non-zero exit naming the gRPC code.
    let (ok, out, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || {
            run(&["ingest", pt.to_str().unwrap(), "--model", "tour", "--dataset", "imagenet", "--task", "Classification", "--architecture", "resnet18"])
        }
    })
    .await
    .unwrap();
    assert!(ok && out.contains("unchanged"), "{out}\n{err}");
    let bad = fixture("bad/nan.safetensors");
    let (ok, _, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["ingest", bad.to_str().unwrap(), "--model", "bad", "--dataset", "imagenet", "--task", "Classification", "--architecture", "resnet18"])
    })
    .await
    .unwrap();
    assert!(!ok, "bad ingest must fail");
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("conv2.weight"), "{err}");

    let (ok, out, err) = run(&["delete", "tour", "--yes"]);
    assert!(ok, "{out}\n{err}");
    let (ok, out, _) = run(&["--json", "census"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.to_string().contains("\"filters\":0"), "{v}");
    server.stop().await;
}
