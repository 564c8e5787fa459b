//! CNN Filter DB bulk import over gRPC into a real server, from the miniature release that
//! tests/fixtures/cnnfdb/make_mini_release.py wrote with h5py and pandas in the real layout
//! (float64 (N, 3, 3) `filters`; meta via DataFrame.to_hdf, converted to Parquet by
//! tools/cnnfdb_meta_to_parquet.py): bit-exact filters, labels normalised, idempotent re-runs,
//! resumption after an interruption, and bad input named by row.

use std::path::PathBuf;

use filterdb_proto as pb;
use pb::cnn_fdb_import_client::CnnFdbImportClient;

use crate::harness::*;

fn fx(name: &str) -> PathBuf {
    fixture(&format!("cnnfdb/{name}"))
}

#[derive(Debug, serde::Deserialize)]
struct Release {
    n_filters: u64,
    models: Vec<ReleaseModel>,
}

#[derive(Debug, serde::Deserialize)]
struct ReleaseModel {
    model: String,
    n_filters: u64,
    layers: Vec<ReleaseLayer>,
}

#[derive(Debug, serde::Deserialize)]
struct ReleaseLayer {
    layer_id: u32,
    in_channels: u32,
    out_channels: u32,
    conv_depth: u32,
    conv_depth_norm: f64,
    start: u64,
    n_filters: u64,
}

fn release() -> (Release, Vec<f32>) {
    let r: Release =
        serde_json::from_slice(&std::fs::read(fx("expected.json")).expect("expected.json"))
            .expect("parse");
    let raw = std::fs::read(fx("expected.f32")).expect("expected.f32");
    (
        r,
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn request(filters: &str, meta: &str, max_models: u64) -> pb::ImportCnnFdbRequest {
    pb::ImportCnnFdbRequest {
        filters_path: fx(filters).display().to_string(),
        meta_path: fx(meta).display().to_string(),
        replace: false,
        max_models,
    }
}

/// Runs an import to its end (or to `stop_after` messages, then drops the stream).
async fn import(
    url: &str,
    req: pb::ImportCnnFdbRequest,
    stop_after: Option<usize>,
) -> Result<Vec<pb::ImportCnnFdbProgress>, tonic::Status> {
    let mut c = CnnFdbImportClient::connect(url.to_string())
        .await
        .expect("connect");
    let mut s = c.import(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(p) = s.message().await? {
        out.push(p);
        if stop_after.is_some_and(|n| out.len() >= n) {
            break;
        }
    }
    Ok(out)
}

fn last(ps: &[pb::ImportCnnFdbProgress]) -> &pb::ImportCnnFdbProgress {
    ps.last().expect("at least one progress message")
}

async fn check_release(
    c: &mut pb::filter_db_client::FilterDbClient<tonic::transport::Channel>,
    r: &Release,
    want: &[f32],
) {
    assert_eq!(
        totals(c).await,
        (
            r.models.len() as u64,
            r.models.iter().map(|m| m.layers.len() as u64).sum(),
            r.n_filters
        )
    );
    for m in &r.models {
        let got = model_filters(c, &m.model).await;
        let s = m.layers[0].start as usize;
        assert_bits_eq(&m.model, &got, &want[s * 9..(s + m.n_filters as usize) * 9]);
        let l = c
            .list_layers(pb::ListLayersRequest {
                model: Some(by_name(&m.model)),
                ..Default::default()
            })
            .await
            .expect("layers")
            .into_inner();
        let model = l.model.expect("model");
        assert_eq!(model.n_filters, m.n_filters);
        assert_eq!(
            model.depth_definition,
            pb::DepthDefinition::GraphLongestPath as i32
        );
        assert_eq!(l.layers.len(), m.layers.len(), "{}", m.model);
        for (got, want) in l.layers.iter().zip(&m.layers) {
            let what = format!("{} layer_id {}", m.model, want.layer_id);
            assert_eq!(got.layer_index, want.layer_id, "{what}");
            assert_eq!(
                (got.in_channels, got.out_channels),
                (want.in_channels, want.out_channels),
                "{what}"
            );
            assert_eq!(got.conv_depth, want.conv_depth, "{what}");
            assert_eq!(got.conv_depth_norm, want.conv_depth_norm, "{what}");
            assert_eq!(got.n_filters, want.n_filters, "{what}");
            // Ids are dense per model and in layer order; the stored ids are the server's own.
            assert_eq!(
                got.first_filter_id - model.first_filter_id,
                want.start - m.layers[0].start,
                "{what}"
            );
        }
    }
}

#[tokio::test]
async fn cnnfdb_import_is_bit_exact_normalised_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let (r, want) = release();

    let ps = import(
        &server.url,
        request("mini_release.h5", "meta.parquet", 0),
        None,
    )
    .await
    .expect("import");
    let end = last(&ps);
    assert!(end.done && !end.stopped_early, "{end:?}");
    assert_eq!(
        (
            end.models_total,
            end.models_done,
            end.models_created,
            end.models_unchanged
        ),
        (4, 4, 4, 0)
    );
    assert_eq!(
        (end.filters_total, end.filters_done),
        (r.n_filters, r.n_filters)
    );
    check_release(&mut c, &r, &want).await;

    // Labels: normalised through the core vocabularies, raw kept.
    let get = |name: &str| {
        let mut c = c.clone();
        let name = name.to_string();
        async move {
            c.get_model(pb::GetModelRequest {
                model: Some(by_name(&name)),
            })
            .await
            .expect("model")
            .into_inner()
        }
    };
    let m = get("unet_lgg_mri_segmentation_11").await;
    let meta = m.meta.expect("meta");
    let task = meta.task.expect("task");
    assert_eq!(
        (task.raw.as_str(), task.canonical.as_str(), task.known),
        ("Semantic Segmentation", "Segmentation", true)
    );
    assert!(meta.tags.contains(&"cnnfdb".to_string()));
    assert_eq!(meta.architecture.expect("arch").canonical, "UNet");
    assert_eq!(m.producer, "pytorch 1.9.0");
    assert_eq!(m.opset, 11);
    let m = get("vgg16_fractaldb_12").await;
    let meta = m.meta.expect("meta");
    let vc = meta.visual_category.expect("vc");
    assert_eq!(
        (vc.raw.as_str(), vc.canonical.as_str()),
        ("formula", "fractals")
    );
    let ds: Vec<(&str, &str)> = meta
        .training_datasets
        .iter()
        .map(|d| (d.raw.as_str(), d.canonical.as_str()))
        .collect();
    assert_eq!(
        ds,
        vec![("FractalDB-1k", "fractaldb"), ("imagenet", "imagenet")]
    );
    assert_eq!(
        meta.pretraining_datasets
            .first()
            .map(|d| d.canonical.as_str()),
        Some("imagenet")
    );
    let m = get("timm_resnet18_imagenet1k_13").await;
    let meta = m.meta.expect("meta");
    let d = &meta.training_datasets[0];
    assert_eq!(
        (d.raw.as_str(), d.canonical.as_str()),
        ("ILSVRC2012", "imagenet")
    );
    assert_eq!(meta.architecture.expect("arch").canonical, "ResNet");
    assert_eq!(m.kernel_shape_counts.get("3x3"), Some(&792));
    assert_eq!(m.kernel_shape_counts.get("7x7"), Some(&24));

    // Census by task: the Segmentation label was folded.
    let census = c
        .census(pb::CensusRequest {
            group_by: vec![pb::Field::Task as i32],
            ..Default::default()
        })
        .await
        .expect("census")
        .into_inner();
    let seg = census
        .groups
        .iter()
        .find(|g| g.key == vec!["Segmentation".to_string()])
        .expect("Segmentation group");
    assert_eq!((seg.models, seg.layers, seg.filters), (1, 8, 420));

    // Again: nothing new.
    let ps = import(
        &server.url,
        request("mini_release.h5", "meta.parquet", 0),
        None,
    )
    .await
    .expect("re-import");
    let end = last(&ps);
    assert_eq!(
        (end.models_done, end.models_created, end.models_unchanged),
        (4, 0, 4),
        "{end:?}"
    );
    check_release(&mut c, &r, &want).await;
    server.stop().await;
}

#[tokio::test]
async fn cnnfdb_import_reads_chunked_float32_n_by_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let (r, want) = release();
    let ps = import(
        &server.url,
        request("mini_release_f32.h5", "meta.parquet", 0),
        None,
    )
    .await
    .expect("import");
    assert!(last(&ps).done);
    check_release(&mut c, &r, &want).await;
    server.stop().await;
}

#[tokio::test]
async fn cnnfdb_interrupted_import_resumes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (r, want) = release();
    {
        let server = TestServer::start(dir.path()).await;
        let ps = import(
            &server.url,
            request("mini_release.h5", "meta.parquet", 1),
            None,
        )
        .await
        .expect("first model");
        let end = last(&ps);
        assert!(end.done && end.stopped_early, "{end:?}");
        assert_eq!(end.models_created, 1);
        // A client that goes away mid-import: the server stops after the model it is storing.
        let _ = import(
            &server.url,
            request("mini_release.h5", "meta.parquet", 0),
            Some(2),
        )
        .await;
        // Restart the server between the runs, as after a crash.
        server.stop().await;
    }
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let (models_before, _, _) = totals(&mut c).await;
    assert!((1..=4).contains(&models_before));
    let ps = import(
        &server.url,
        request("mini_release.h5", "meta.parquet", 0),
        None,
    )
    .await
    .expect("resume");
    let end = last(&ps);
    assert!(end.done && !end.stopped_early, "{end:?}");
    assert_eq!(end.models_unchanged, models_before, "{end:?}");
    assert_eq!(end.models_created, 4 - models_before, "{end:?}");
    check_release(&mut c, &r, &want).await;
    // Model ids stay dense: nothing was stored twice.
    let list = c
        .list_models(pb::ListModelsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<u64> = list.models.iter().map(|m| m.model_id).collect();
    assert_eq!(ids.len(), 4);
    // The job records say what was imported.
    let mut jobs = pb::jobs_client::JobsClient::connect(server.url.clone())
        .await
        .expect("jobs");
    let js = jobs
        .list_jobs(pb::ListJobsRequest {
            source: "cnnfdb:mini_release.h5".into(),
        })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs;
    assert_eq!(js.len(), 4, "{js:?}");
    assert!(
        js.iter()
            .all(|j| j.outcome == "done" && !j.model.is_empty()),
        "{js:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn cnnfdb_bad_inputs_are_invalid_argument_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let bad = |filters: &'static str, meta: &'static str| {
        let url = server.url.clone();
        async move {
            import(&url, request(filters, meta, 0), None)
                .await
                .expect_err("must fail")
        }
    };

    let e = bad("mini_release.h5", "bad_overlap.parquet").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("row 2") && e.message().contains("overlaps row 1"),
        "{}",
        e.message()
    );

    let e = bad("mini_release.h5", "bad_count.parquet").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("row 4") && e.message().contains("in_channels 7"),
        "{}",
        e.message()
    );

    let e = bad("no_filters.h5", "meta.parquet").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("no dataset `filters`") && e.message().contains("weights"),
        "{}",
        e.message()
    );

    let e = bad("nan_release.h5", "nan_meta.parquet").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("dcgan_mnist_11")
            && e.message().contains("filter id 5")
            && e.message().contains("NaN"),
        "{}",
        e.message()
    );

    // The meta of another file: the ranges do not cover the dataset.
    let e = bad("nan_release.h5", "meta.parquet").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("holds 208 rows"), "{}", e.message());

    let e = bad("mini_release.h5", "missing.parquet").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    assert_eq!(totals(&mut c).await, (0, 0, 0));
    server.stop().await;
}

fn cli() -> std::path::PathBuf {
    crate::harness::binary("filterdb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cnnfdb_cli_imports_in_stages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let url = server.url.clone();
    let run = move |extra: &[&str]| {
        let (h5, meta) = (fx("mini_release.h5"), fx("meta.parquet"));
        let out = std::process::Command::new(cli())
            .args(["--server", &url, "--json", "import-cnnfdb"])
            .arg(h5)
            .arg(meta)
            .args(extra)
            .output()
            .expect("run filterdb");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let first = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["--max-models", "3"])
    })
    .await
    .unwrap();
    assert_eq!(first["models_created"], 3, "{first}");
    assert_eq!(first["stopped_early"], true, "{first}");
    let rest = tokio::task::spawn_blocking(move || run(&[])).await.unwrap();
    assert_eq!(
        (
            rest["models_created"].as_u64(),
            rest["models_unchanged"].as_u64()
        ),
        (Some(1), Some(3)),
        "{rest}"
    );
    assert_eq!(rest["filters_done"], 3260, "{rest}");
    assert_eq!(totals(&mut c).await, (4, 22, 3260));
    server.stop().await;
}
