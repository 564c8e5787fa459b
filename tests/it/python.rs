//! A Python client, with grpcio stubs generated from proto/ at test time, calls Census and
//! GetFilters against a real server and checks the kernels with numpy.

use crate::harness::*;

fn python() -> String {
    std::env::var("FILTERDB_PYTHON").unwrap_or_else(|_| {
        let venv = "/var/cache/filterdb/venv/bin/python";
        if std::path::Path::new(venv).exists() { venv.to_string() } else { "python3".to_string() }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_reads_census_and_filters_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    ingest_fixture(&mut c, meta("py_tinynet", "imagenet", "Classification", "resnet"), "tinynet_zip.pt").await.unwrap();
    ingest_fixture(&mut c, meta("py_onnx", "cifar10", "Segmentation", "unet"), "tinynet_initializers.onnx").await.unwrap();
    let url = server.url.trim_start_matches("http://").to_string();
    let out = tokio::process::Command::new(python())
        .arg(repo().join("tests/python/client_test.py"))
        .args(["--server", &url, "--model", "py_tinynet"])
        .arg("--expected")
        .arg(repo().join("tests/fixtures/expected/tinynet_zip.pt.f32"))
        .arg("--proto-root")
        .arg(repo().join("proto"))
        .output()
        .await
        .expect("run python (set FILTERDB_PYTHON or run .ci/run, which creates the venv)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("OK census models=2 layers=9 filters=704"), "{stdout}");
    assert!(stdout.contains("OK filters 224 bit-exact"), "{stdout}");
    server.stop().await;
}
