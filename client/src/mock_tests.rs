//! Client tests against an in-process mock of the service: streaming uploads, paging, status
//! propagation and filter collection, without the real server crate.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use filterdb_proto::filter_db_server::{FilterDb, FilterDbServer};
use filterdb_proto::*;
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{Client, ClientError, batches_kernels, encode_kernels, filter_ids, model_ref};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const N_MODELS: u64 = 2345;

#[derive(Default)]
struct Seen {
    header: Option<IngestHeader>,
    bytes: Vec<u8>,
    chunk_sizes: Vec<usize>,
    page_sizes: Vec<u32>,
}

#[derive(Clone, Default)]
struct Mock {
    seen: Arc<Mutex<Seen>>,
}

fn kernel(id: u64) -> [f32; 9] {
    std::array::from_fn(|k| id as f32 + k as f32 / 16.0)
}

#[tonic::async_trait]
impl FilterDb for Mock {
    type IngestStream = BoxStream<IngestResponse>;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStream>, Status> {
        let mut inbound = request.into_inner();
        let header = match inbound.message().await? {
            Some(IngestRequest {
                part: Some(ingest_request::Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("first message must be the header")),
        };
        let name = header
            .meta
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        if name == "rejected-early" {
            return Err(Status::already_exists(format!(
                "{}: model name taken",
                header.file_name
            )));
        }
        let mut bytes = Vec::new();
        let mut sizes = Vec::new();
        while let Some(m) = inbound.message().await? {
            if let Some(ingest_request::Part::Chunk(c)) = m.part {
                sizes.push(c.len());
                bytes.extend_from_slice(&c);
            }
        }
        let received = bytes.len() as u64;
        let sha = hex::encode(Sha256::digest(&bytes));
        let file_name = header.file_name.clone();
        {
            let mut seen = self.seen.lock().unwrap();
            seen.header = Some(header);
            seen.bytes = bytes;
            seen.chunk_sizes = sizes;
        }
        let progress = |phase: IngestPhase, done, total| {
            Ok(IngestResponse {
                part: Some(ingest_response::Part::Progress(IngestProgress {
                    phase: phase as i32,
                    bytes_received: received,
                    total_bytes: received,
                    layers_done: done,
                    layers_total: total,
                })),
            })
        };
        let last = if name == "bad" {
            Err(Status::invalid_argument(format!(
                "{file_name}: malformed safetensors file: header too short"
            )))
        } else {
            Ok(IngestResponse {
                part: Some(ingest_response::Part::Result(IngestResult {
                    outcome: IngestOutcome::Created as i32,
                    model: Some(Model {
                        model_id: 7,
                        name,
                        content_sha256: sha,
                        size_bytes: received,
                        n_layers: 2,
                        n_filters: 10,
                        ..Default::default()
                    }),
                })),
            })
        };
        let msgs = vec![
            progress(IngestPhase::Parsing, 0, 0),
            progress(IngestPhase::Statistics, 1, 2),
            progress(IngestPhase::Writing, 2, 2),
            last,
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(msgs))))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let r = request.into_inner();
        self.seen.lock().unwrap().page_sizes.push(r.page_size);
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<u64>()
                .map_err(|_| Status::invalid_argument("token"))?
        };
        let size = r.page_size.clamp(1, 1000) as u64;
        let models: Vec<Model> = (after + 1..=N_MODELS)
            .take(size as usize)
            .map(|id| Model {
                model_id: id,
                name: format!("m{id}"),
                ..Default::default()
            })
            .collect();
        let next_page_token = match models.last() {
            Some(m) if m.model_id < N_MODELS => m.model_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(ListModelsResponse {
            models,
            next_page_token,
        }))
    }

    async fn get_model(
        &self,
        request: Request<GetModelRequest>,
    ) -> Result<Response<Model>, Status> {
        match request.into_inner().model.and_then(|m| m.r#ref) {
            Some(model_ref::Ref::Id(id)) => Ok(Response::new(Model {
                model_id: id,
                ..Default::default()
            })),
            Some(model_ref::Ref::Name(n)) => {
                Err(Status::not_found(format!("no model named `{n}`")))
            }
            None => Err(Status::invalid_argument("model is required")),
        }
    }

    async fn list_layers(
        &self,
        _: Request<ListLayersRequest>,
    ) -> Result<Response<ListLayersResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    type GetFiltersStream = BoxStream<FilterBatch>;

    async fn get_filters(
        &self,
        request: Request<GetFiltersRequest>,
    ) -> Result<Response<Self::GetFiltersStream>, Status> {
        let Some(get_filters_request::Target::Ids(FilterIdRange { start, end })) =
            request.into_inner().target
        else {
            return Err(Status::invalid_argument("mock only serves id ranges"));
        };
        // Batches of at most 3 filters, to check the client keeps them in order.
        let mut batches = Vec::new();
        let mut s = start;
        while s < end {
            let e = (s + 3).min(end);
            let ks: Vec<[f32; 9]> = (s..e).map(kernel).collect();
            batches.push(Ok(FilterBatch {
                model_id: 1,
                layer_id: 1,
                layer_index: 0,
                first_filter_id: s,
                count: (e - s) as u32,
                kernels: encode_kernels(&ks),
                first_index_in_layer: s,
            }));
            s = e;
        }
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn census(&self, _: Request<CensusRequest>) -> Result<Response<CensusResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn update_model_meta(
        &self,
        _: Request<UpdateModelMetaRequest>,
    ) -> Result<Response<Model>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn delete_model(
        &self,
        _: Request<DeleteModelRequest>,
    ) -> Result<Response<DeleteModelResponse>, Status> {
        // A server breaking the contract: the client must report it, not panic.
        Ok(Response::new(DeleteModelResponse { deleted: None }))
    }

    async fn get_vocabularies(
        &self,
        _: Request<GetVocabulariesRequest>,
    ) -> Result<Response<Vocabularies>, Status> {
        Ok(Response::new(Vocabularies {
            version: 3,
            vocabularies: vec![],
        }))
    }
}

async fn start() -> (Client, Mock) {
    let mock = Mock::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = FilterDbServer::new(mock.clone()).max_decoding_message_size(crate::MAX_MESSAGE_BYTES);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    // A bare host:port, as users type it.
    let client = Client::connect(&addr.to_string()).await.unwrap();
    (client, mock)
}

fn header(name: &str) -> IngestHeader {
    IngestHeader {
        meta: Some(ModelMeta {
            name: name.into(),
            training_datasets: vec!["imagenet".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn ingest_file_streams_chunks_and_reports_progress() {
    let (mut client, mock) = start().await;
    let dir = std::env::temp_dir().join(format!("filterdb-client-mock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.safetensors");
    let bytes: Vec<u8> = (0..(crate::CHUNK_BYTES * 2 + 1234))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();

    let mut events = Vec::new();
    let r = client
        .ingest_file(&path, header("tiny"), |p| {
            events.push((p.phase, p.bytes_received))
        })
        .await
        .unwrap();
    let model = r.model.unwrap();
    assert_eq!(r.outcome, IngestOutcome::Created as i32);
    assert_eq!(model.size_bytes, bytes.len() as u64);
    assert_eq!(model.content_sha256, hex::encode(Sha256::digest(&bytes)));

    let seen = mock.seen.lock().unwrap();
    let h = seen.header.as_ref().unwrap();
    assert_eq!(
        h.file_name, "tiny.safetensors",
        "file name filled from the path"
    );
    assert_eq!(
        h.total_bytes,
        bytes.len() as u64,
        "total from the file size"
    );
    assert_eq!(
        seen.chunk_sizes,
        vec![crate::CHUNK_BYTES, crate::CHUNK_BYTES, 1234]
    );
    assert_eq!(seen.bytes, bytes);

    let receiving = IngestPhase::Receiving as i32;
    let upload: Vec<u64> = events
        .iter()
        .filter(|(p, _)| *p == receiving)
        .map(|(_, b)| *b)
        .collect();
    assert_eq!(
        upload.last(),
        Some(&(bytes.len() as u64)),
        "upload progress reaches the total: {events:?}"
    );
    assert!(upload.windows(2).all(|w| w[0] <= w[1]));
    let phases: Vec<i32> = events
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| *p != receiving)
        .collect();
    assert_eq!(
        phases,
        vec![
            IngestPhase::Parsing as i32,
            IngestPhase::Statistics as i32,
            IngestPhase::Writing as i32
        ]
    );
    drop(seen);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn ingest_errors_keep_the_status() {
    let (mut client, _mock) = start().await;
    let mut h = header("bad");
    h.file_name = "bad.safetensors".into();
    let e = client
        .ingest_bytes(vec![1, 2, 3], h, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert_eq!(
        e.to_string(),
        "INVALID_ARGUMENT: bad.safetensors: malformed safetensors file: header too short"
    );

    // Rejected before the response starts, while the upload may still be going.
    let mut h = header("rejected-early");
    h.file_name = "big.pt".into();
    let e = client
        .ingest_bytes(vec![0u8; 5 * crate::CHUNK_BYTES], h, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::AlreadyExists), "{e}");

    let e = client
        .ingest_file(
            std::path::Path::new("/nonexistent/x.pt"),
            header("x"),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Io { .. }), "{e}");
}

#[tokio::test]
async fn ingest_bytes_sets_total() {
    let (mut client, mock) = start().await;
    let r = client
        .ingest_bytes(vec![9u8; 100], header("mem"), |_| {})
        .await
        .unwrap();
    assert_eq!(r.model.unwrap().size_bytes, 100);
    assert_eq!(
        mock.seen
            .lock()
            .unwrap()
            .header
            .as_ref()
            .unwrap()
            .total_bytes,
        100
    );
}

#[tokio::test]
async fn list_models_follows_pages() {
    let (mut client, mock) = start().await;
    let models = client.list_models(None).await.unwrap();
    assert_eq!(models.len() as u64, N_MODELS);
    assert!(
        models
            .iter()
            .enumerate()
            .all(|(i, m)| m.model_id == i as u64 + 1)
    );
    assert_eq!(mock.seen.lock().unwrap().page_sizes.len(), 3);
}

#[tokio::test]
async fn filters_and_refs() {
    let (mut client, _mock) = start().await;
    let batches = client.get_filters(filter_ids(10, 18)).await.unwrap();
    assert_eq!(batches.len(), 3);
    let ks = batches_kernels(&batches).unwrap();
    assert_eq!(
        ks.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        (10..18).collect::<Vec<_>>()
    );
    assert_eq!(ks[5].1, kernel(15));

    assert_eq!(
        client.get_model(model_ref("12")).await.unwrap().model_id,
        12
    );
    let e = client.get_model(model_ref("resnet")).await.unwrap_err();
    assert_eq!(e.to_string(), "NOT_FOUND: no model named `resnet`");
    assert!(matches!(
        client.delete_model(model_ref("1")).await,
        Err(ClientError::Protocol(_))
    ));
    assert_eq!(client.get_vocabularies().await.unwrap().version, 3);
}

#[tokio::test]
async fn connect_failure_names_the_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let e = Client::connect(&format!("http://{addr}"))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ClientError::Connect { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("cannot reach FilterDB at http://{addr}: ")),
        "{msg}"
    );
    assert!(msg.ends_with("(is filterdb-server running?)"), "{msg}");
}
