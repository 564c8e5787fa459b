//! Standard gRPC services: health (for probes) and reflection v1 and v1alpha (for grpcurl).

use filterdb_proto as pb;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_v1_and_v1alpha_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone()).unwrap().connect().await.unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "filterdb.v1.FilterDb"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "health of `{service}`");
    }

    use tonic_reflection::pb::v1 as r1;
    let mut refl = r1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"filterdb.v1.FilterDb".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");

    use tonic_reflection::pb::v1alpha as ra;
    let mut refl = ra::server_reflection_client::ServerReflectionClient::new(channel);
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(ra::server_reflection_request::MessageRequest::FileContainingSymbol(
            "filterdb.v1.FilterDb".into(),
        )),
    };
    let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    assert!(
        matches!(msg.message_response, Some(ra::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{msg:?}"
    );

    let v = c.get_vocabularies(pb::GetVocabulariesRequest {}).await.unwrap().into_inner();
    let tasks = v.vocabularies.iter().find(|v| v.kind == "tasks").unwrap();
    assert_eq!(tasks.entries.len(), 11);
    server.stop().await;
}
