//! Bad inputs: each gets a clear status naming what is wrong, and nothing is stored.

use filterdb_proto as pb;

use crate::harness::*;

/// (fixture, expected code, text the message must contain)
const CASES: &[(&str, tonic::Code, &str)] = &[
    ("bad/truncated.pt", tonic::Code::InvalidArgument, "bad/truncated.pt: malformed pytorch file"),
    ("bad/truncated.onnx", tonic::Code::InvalidArgument, "malformed onnx file"),
    ("bad/truncated.safetensors", tonic::Code::InvalidArgument, "malformed safetensors file"),
    ("bad/random.bin", tonic::Code::InvalidArgument, "unrecognised checkpoint format"),
    ("bad/wrong_magic.safetensors", tonic::Code::InvalidArgument, "unrecognised checkpoint format"),
    ("bad/oversized_header.safetensors", tonic::Code::InvalidArgument, "unrecognised checkpoint format"),
    ("bad/nan.safetensors", tonic::Code::InvalidArgument, "tensor `conv2.weight`: non-finite value NaN at output channel 5, input channel 3, kernel position (1, 2)"),
    ("bad/nan.onnx", tonic::Code::InvalidArgument, "tensor `160`: non-finite value NaN at output channel 2, input channel 1, kernel position (0, 2)"),
    ("bad/inf.onnx", tonic::Code::InvalidArgument, "tensor `366`: non-finite value inf at output channel 5"),
    ("bad/shape_mismatch.safetensors", tonic::Code::InvalidArgument, "safetensors"),
    ("bad/shape_mismatch.onnx", tonic::Code::InvalidArgument, "tensor `55`"),
    ("bad/malicious_global.pt", tonic::Code::InvalidArgument, "refusing pickle global `posix.system`"),
    ("bad/malicious_builtins_eval.pt", tonic::Code::InvalidArgument, "refusing pickle global `__builtin__.eval`"),
    ("bad/full_module.pt", tonic::Code::InvalidArgument, "state_dict()"),
    ("bad/no_3x3.safetensors", tonic::Code::InvalidArgument, "no 3x3 convolution weights found (conv weights present: 16 kernels of 1x1)"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_rejected_clearly_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    ingest_fixture(&mut c, meta("good", "imagenet", "Classification", "resnet"), "tinynet_zip.pt").await.unwrap();
    let before = totals(&mut c).await;
    for (i, (file, code, text)) in CASES.iter().enumerate() {
        let e = ingest_fixture(&mut c, meta(&format!("bad{i}"), "imagenet", "Classification", "resnet"), file)
            .await
            .expect_err(file);
        assert_eq!(e.code(), *code, "{file}: {}", e.message());
        assert!(e.message().contains(text), "{file}: message `{}` lacks `{text}`", e.message());
        assert_eq!(totals(&mut c).await, before, "{file}: census changed");
    }
    // The same bytes given as an explicit (wrong) format still fail cleanly.
    let bytes = std::fs::read(fixture("bad/oversized_header.safetensors")).unwrap();
    let mut msgs = vec![pb::IngestRequest {
        part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
            meta: Some(meta("x", "imagenet", "Classification", "resnet")),
            file_name: "oversized.safetensors".into(),
            format: pb::Format::Safetensors as i32,
            ..Default::default()
        })),
    }];
    msgs.push(pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(bytes)) });
    let e = ingest_stream(&mut c, msgs).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("malformed safetensors file"), "{}", e.message());
    assert_eq!(totals(&mut c).await, before);
    server.stop().await;
}

async fn ingest_stream(
    c: &mut pb::filter_db_client::FilterDbClient<tonic::transport::Channel>,
    msgs: Vec<pb::IngestRequest>,
) -> Result<pb::IngestResult, tonic::Status> {
    let mut s = c.ingest(tokio_stream::iter(msgs)).await?.into_inner();
    let mut result = None;
    while let Some(m) = s.message().await? {
        if let Some(pb::ingest_response::Part::Result(r)) = m.part {
            result = Some(r);
        }
    }
    result.ok_or_else(|| tonic::Status::internal("no result"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let bytes = std::fs::read(fixture("tinynet_zip.pt")).unwrap();
    // Missing required meta, named.
    let mut m = meta("m", "", "Classification", "resnet");
    m.training_datasets.clear();
    let e = ingest_bytes(&mut c, m, "x.pt", bytes.clone(), pb::NameConflict::Error).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("missing required meta: training dataset"), "{}", e.message());
    let e = ingest_bytes(&mut c, meta("", "imagenet", "Classification", "resnet"), "x.pt", bytes.clone(), pb::NameConflict::Error)
        .await
        .unwrap_err();
    assert!(e.message().contains("model name"), "{}", e.message());
    let e = ingest_bytes(&mut c, meta("bad name!", "imagenet", "Classification", "resnet"), "x.pt", bytes.clone(), pb::NameConflict::Error)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // First message not a header.
    let e = ingest_stream(&mut c, vec![pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(vec![1, 2, 3])) }])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Announced size differs from what arrived (an interrupted upload).
    let msgs = vec![
        pb::IngestRequest {
            part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
                meta: Some(meta("m", "imagenet", "Classification", "resnet")),
                total_bytes: bytes.len() as u64 + 10,
                ..Default::default()
            })),
        },
        pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(bytes.clone())) },
    ];
    let e = ingest_stream(&mut c, msgs).await.unwrap_err();
    assert!(e.message().contains("interrupted upload"), "{}", e.message());
    // Wrong expected checksum.
    let msgs = vec![
        pb::IngestRequest {
            part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
                meta: Some(meta("m", "imagenet", "Classification", "resnet")),
                expected_sha256: "00".repeat(32),
                ..Default::default()
            })),
        },
        pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(bytes.clone())) },
    ];
    let e = ingest_stream(&mut c, msgs).await.unwrap_err();
    assert!(e.message().contains("sha256 of the received bytes"), "{}", e.message());
    // Filter requests out of range / inconsistent.
    let e = c
        .get_filters(pb::GetFiltersRequest {
            target: Some(pb::get_filters_request::Target::Ids(pb::FilterIdRange { start: 5, end: 5 })),
            batch_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .get_filters(pb::GetFiltersRequest {
            target: Some(pb::get_filters_request::Target::Ids(pb::FilterIdRange { start: 1_000_000, end: 1_000_010 })),
            batch_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange);
    let e = c.census(pb::CensusRequest { selection: None, group_by: vec![0] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(totals(&mut c).await, (0, 0, 0));
    server.stop().await;
}
