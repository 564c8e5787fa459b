//! Wires the engine to tonic: the services, gRPC health and reflection, the operations layer
//! (auth, request ids, deadlines, load shedding, metrics: `crate::ops`), TLS, message limits,
//! and graceful shutdown with a grace period.
//!
//! Limits, documented: gRPC messages are at most [`MAX_MESSAGE_BYTES`] (64 MiB) each way
//! (uploads stream in 1 MiB chunks, large results stream in batches, so no single message
//! approaches it); uploads at most `limits.max_upload_bytes`; `limits.max_k` for nearest
//! search; `limits.max_groups` per analytics answer; `limits.max_stream_rows` filters per
//! GetFilters stream (RESOURCE_EXHAUSTED above; Flight `DoGet` exports are exempt);
//! `limits.request_timeout_secs` and the client's deadline (DEADLINE_EXCEEDED);
//! `limits.max_concurrent_requests` calls at once (RESOURCE_EXHAUSTED beyond).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use filterdb_proto as pb;
use tokio::net::TcpListener;

use std::time::Duration;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::{FilterDbService, Limits};
use crate::engine::Engine;

/// Largest gRPC message the server accepts or sends (uploads are chunked far below this).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// API limits.
    pub limits: Limits,
    /// Scheduled-ingestion sources.
    pub sources: Vec<crate::jobs::SourceConfig>,
    /// Largest k of a nearest-neighbour search.
    pub max_k: usize,
    /// Most groups per analytics answer.
    pub max_groups: usize,
    /// Auth, deadlines, load shedding.
    pub ops: crate::ops::OpsConfig,
    /// TLS (off unless cert and key are set).
    pub tls: crate::config::TlsConfig,
    /// Prometheus `/metrics` address; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// How long in-flight calls may run after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    /// No auth, no TLS, no metrics listener, default limits, 30 s grace.
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            sources: Vec::new(),
            max_k: crate::search::DEFAULT_MAX_K,
            max_groups: crate::api::analytics::DEFAULT_MAX_GROUPS,
            ops: crate::ops::OpsConfig::default(),
            tls: crate::config::TlsConfig::default(),
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    /// The server settings of a loaded configuration.
    pub fn from_config(c: &crate::config::Config) -> anyhow::Result<ServerConfig> {
        let metrics_listen = if c.metrics_listen.is_empty() {
            None
        } else {
            let addrs = crate::config::resolve(&c.metrics_listen).map_err(|e| anyhow::anyhow!("metrics_listen: {e}"))?;
            addrs.first().copied()
        };
        Ok(ServerConfig {
            limits: Limits {
                max_upload_bytes: c.limits.max_upload_bytes,
                max_page_size: c.limits.max_page_size,
                max_filter_batch: c.limits.max_filter_batch,
                max_stream_rows: c.limits.max_stream_rows,
            },
            sources: c.source.clone(),
            max_k: c.limits.max_k,
            max_groups: c.limits.max_groups,
            ops: crate::ops::OpsConfig {
                tokens: c.auth.tokens.clone(),
                request_timeout: (c.limits.request_timeout_secs > 0)
                    .then(|| Duration::from_secs(c.limits.request_timeout_secs)),
                max_concurrent_requests: c.limits.max_concurrent_requests,
            },
            tls: c.tls.clone(),
            metrics_listen,
            shutdown_grace: Duration::from_secs(c.shutdown_grace_secs),
        })
    }
}

/// The rustls settings of `[tls]`, reading the PEM files.
fn tls_config(tls: &crate::config::TlsConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else { return Ok(None) };
    let read = |key: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("configuration: {key} = {}: {e}", p.display()))
    };
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(read("tls.cert", cert)?, read("tls.key", key)?));
    if let Some(ca) = &tls.client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read("tls.client_ca", ca)?));
    }
    Ok(Some(cfg))
}

/// Serves FilterDB on `listener` until `shutdown` completes, then reports NOT_SERVING, lets
/// in-flight calls finish (at most `config.shutdown_grace`), and flushes the database.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let tls = tls_config(&config.tls)?;
    crate::search_index::start(&engine);
    if let Some(m) = config.metrics_listen {
        crate::ops::install_metrics(m)?;
        crate::ops::spawn_rocksdb_metrics(engine.clone(), Duration::from_secs(10));
        tracing::info!(addr = %m, "Prometheus metrics at http://{m}/metrics");
    }
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

    let analytics = pb::analytics_server::AnalyticsServer::new(crate::api::analytics::AnalyticsService::new(engine.clone()).with_max_groups(config.max_groups))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    health_reporter.set_serving::<pb::analytics_server::AnalyticsServer<crate::api::analytics::AnalyticsService>>().await;

    let search = pb::search_server::SearchServer::new(crate::api::search::SearchService::new(engine.clone()).with_max_k(config.max_k))
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

    let cnnfdb = pb::cnn_fdb_import_server::CnnFdbImportServer::new(crate::api::cnnfdb::CnnFdbImportService::new(engine.clone()));
    health_reporter.set_serving::<pb::cnn_fdb_import_server::CnnFdbImportServer<crate::api::cnnfdb::CnnFdbImportService>>().await;

    let admin = pb::admin_server::AdminServer::new(crate::api::admin::AdminService::new(engine.clone()));
    health_reporter.set_serving::<pb::admin_server::AdminServer<crate::api::admin::AdminService>>().await;

    let reporter = health_reporter.clone();
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
        reporter.set_not_serving::<pb::filter_db_server::FilterDbServer<FilterDbService>>().await;
        reporter.set_not_serving::<pb::analytics_server::AnalyticsServer<crate::api::analytics::AnalyticsService>>().await;
        reporter.set_not_serving::<pb::search_server::SearchServer<crate::api::search::SearchService>>().await;
        reporter.set_not_serving::<pb::snapshots_server::SnapshotsServer<crate::api::export::SnapshotsService>>().await;
        reporter.set_not_serving::<pb::jobs_server::JobsServer<crate::api::jobs::JobsService>>().await;
        reporter.set_not_serving::<pb::cnn_fdb_import_server::CnnFdbImportServer<crate::api::cnnfdb::CnnFdbImportService>>().await;
        reporter.set_not_serving::<pb::admin_server::AdminServer<crate::api::admin::AdminService>>().await;
        reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    tracing::info!(%addr, tls = tls.is_some(), auth = !config.ops.tokens.is_empty(), "FilterDB listening");
    // Uploads (Ingest chunks) stream faster with windows larger than HTTP/2's 64 KiB.
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(crate::ops::OpsLayer::new(&config.ops))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs_service)
        .add_service(cnnfdb)
        .add_service(service)
        .add_service(analytics)
        .add_service(search)
        .add_service(snapshots)
        .add_service(flight)
        .add_service(admin)
        // TCP_NODELAY: small unary answers otherwise wait ~40 ms on Nagle + delayed ACK (measured
        // in the analytics benchmark: Census p50 52 ms without, 4 ms with).
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown);
    let grace = config.shutdown_grace;
    let grace_over = async move {
        if stopping.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r?,
        _ = grace_over => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over: stopping with calls still running");
        }
    }
    let e = engine.clone();
    e.stop_search_index();
    tokio::task::spawn_blocking(move || e.store().flush()).await??;
    tracing::info!("database flushed; bye");
    Ok(())
}
