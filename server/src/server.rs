//! Wires the engine to tonic: the FilterDb service, gRPC health and reflection, message limits,
//! and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use filterdb_proto as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::{FilterDbService, Limits};
use crate::engine::Engine;

/// Largest gRPC message the server accepts or sends (uploads are chunked far below this).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Server settings.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// API limits.
    pub limits: Limits,
    /// Scheduled-ingestion sources.
    pub sources: Vec<crate::jobs::SourceConfig>,
}

/// Serves FilterDB on `listener` until `shutdown` completes, then reports NOT_SERVING, lets
/// in-flight calls finish, and flushes the database.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::filter_db_server::FilterDbServer<FilterDbService>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let service = pb::filter_db_server::FilterDbServer::new(FilterDbService::new(engine.clone(), config.limits))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let analytics = pb::analytics_server::AnalyticsServer::new(crate::api::analytics::AnalyticsService::new(engine.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    health_reporter.set_serving::<pb::analytics_server::AnalyticsServer<crate::api::analytics::AnalyticsService>>().await;

    let search = pb::search_server::SearchServer::new(crate::api::search::SearchService::new(engine.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    health_reporter.set_serving::<pb::search_server::SearchServer<crate::api::search::SearchService>>().await;

    let snapshots = pb::snapshots_server::SnapshotsServer::new(crate::api::export::SnapshotsService::new(engine.clone(), 0));
    health_reporter.set_serving::<pb::snapshots_server::SnapshotsServer<crate::api::export::SnapshotsService>>().await;
    let flight = arrow_flight::flight_service_server::FlightServiceServer::new(crate::api::flight::FlightExportService::new(engine.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let jobs = crate::jobs::Jobs::new(engine.clone(), config.sources.clone()).map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    jobs.start();
    let jobs_service = pb::jobs_server::JobsServer::new(crate::api::jobs::JobsService::new(jobs));
    health_reporter.set_serving::<pb::jobs_server::JobsServer<crate::api::jobs::JobsService>>().await;

    let reporter = health_reporter.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
        reporter.set_not_serving::<pb::filter_db_server::FilterDbServer<FilterDbService>>().await;
        reporter.set_not_serving::<pb::analytics_server::AnalyticsServer<crate::api::analytics::AnalyticsService>>().await;
        reporter.set_not_serving::<pb::search_server::SearchServer<crate::api::search::SearchService>>().await;
        reporter.set_not_serving::<pb::snapshots_server::SnapshotsServer<crate::api::export::SnapshotsService>>().await;
        reporter.set_not_serving::<pb::jobs_server::JobsServer<crate::api::jobs::JobsService>>().await;
        reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    tracing::info!(%addr, "FilterDB listening");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs_service)
        .add_service(service)
        .add_service(analytics)
        .add_service(search)
        .add_service(snapshots)
        .add_service(flight)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.store().flush()).await??;
    tracing::info!("database flushed; bye");
    Ok(())
}
