//! The operations layer every gRPC call passes through (a tower `Layer` on the tonic server
//! builder, so the FilterDB services, Flight, health and reflection are all covered):
//!
//! - **request id**: the client's `x-request-id` (if sane) or a new one; a tracing span
//!   `rpc{method, request_id}` around the handler, and the id echoed in the response header.
//! - **auth**: `authorization: Bearer <token>`, the SHA-256 of the token looked up in the
//!   configured tokens; the method's required role ([`required_role`]) checked. Missing or
//!   unknown token → UNAUTHENTICATED, too small a role → PERMISSION_DENIED, both naming the role
//!   needed. The caller ([`Caller`]) goes into the request extensions so handlers can check
//!   finer rules (ProfileCheckpoint with `store = true` needs write). `grpc.health.v1` and
//!   reflection stay open: probes need health, and reflection only describes the public
//!   contract. With no tokens configured, auth is off and every caller is admin.
//! - **load shedding**: at most `max_concurrent_requests` calls in their handler at once; more
//!   are refused at once with RESOURCE_EXHAUSTED (clients retry with backoff).
//! - **deadlines**: the client's `grpc-timeout`, capped by the server-wide request timeout,
//!   answered with DEADLINE_EXCEEDED. tonic's own timeout (outside this layer) would answer
//!   CANCELLED "Timeout expired"; this layer fires a little earlier so clients see the spec code.
//! - **metrics**: `filterdb_rpc_requests_total{method,code}` and
//!   `filterdb_rpc_duration_seconds{method}`.
//!
//! Limitation: a layer sees a call until its response headers. For server-streaming calls the
//! permit, deadline and status code cover the handler (planning and the first checks); the
//! stream itself then runs to its end (its errors travel in trailers).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::codegen::http::{self, HeaderValue};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::config::{Role, TokenConfig};

/// Response and request header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Who is calling: the token's name and role (admin with auth off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token name ("anonymous" with auth off).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// The request id of the current call (in request extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Settings of the layer.
#[derive(Debug, Clone, Default)]
pub struct OpsConfig {
    /// Bearer tokens; empty: auth off.
    pub tokens: Vec<TokenConfig>,
    /// Server-wide cap on a call's duration.
    pub request_timeout: Option<Duration>,
    /// Calls in their handler at once (0: no limit).
    pub max_concurrent_requests: usize,
}

struct State {
    tokens: HashMap<String, (String, Role)>,
    request_timeout: Option<Duration>,
    permits: Option<Arc<tokio::sync::Semaphore>>,
    max_concurrent: usize,
    next_id: AtomicU64,
    id_prefix: u32,
}

/// The layer.
#[derive(Clone)]
pub struct OpsLayer {
    state: Arc<State>,
}

impl OpsLayer {
    /// Builds the layer.
    pub fn new(config: &OpsConfig) -> OpsLayer {
        let tokens = config
            .tokens
            .iter()
            .map(|t| (t.sha256.to_ascii_lowercase(), (t.name.clone(), t.role)))
            .collect();
        let id_prefix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d.as_nanos() as u32) ^ std::process::id())
            .unwrap_or(0);
        OpsLayer {
            state: Arc::new(State {
                tokens,
                request_timeout: config.request_timeout,
                permits: (config.max_concurrent_requests > 0)
                    .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests))),
                max_concurrent: config.max_concurrent_requests,
                next_id: AtomicU64::new(1),
                id_prefix,
            }),
        }
    }
}

impl<S> Layer<S> for OpsLayer {
    type Service = OpsService<S>;
    fn layer(&self, inner: S) -> OpsService<S> {
        OpsService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service the layer wraps around the router.
#[derive(Clone)]
pub struct OpsService<S> {
    inner: S,
    state: Arc<State>,
}

/// The role a method needs; `None`: open (health, reflection).
pub fn required_role(path: &str) -> Option<Role> {
    let path = path.trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => None,
        "filterdb.v1.FilterDb" => Some(match method {
            "Ingest" | "UpdateModelMeta" | "DeleteModel" => Role::Write,
            _ => Role::Read,
        }),
        "filterdb.v1.Analytics" => Some(match method {
            "PinBasis" => Role::Write,
            // ProfileCheckpoint with store = true is checked again in its handler (write).
            _ => Role::Read,
        }),
        "filterdb.v1.Search" => Some(Role::Read),
        // Flight serves read-only exports; anything that would change data is admin.
        "arrow.flight.protocol.FlightService" => Some(match method {
            "DoPut" | "DoAction" | "DoExchange" => Role::Admin,
            _ => Role::Read,
        }),
        // Snapshots, Jobs, CnnFdbImport, Admin, and any service added later: admin.
        _ => Some(Role::Admin),
    }
}

/// The caller of a request (admin when the layer is absent or auth is off).
pub fn caller(extensions: &http::Extensions) -> Caller {
    extensions.get::<Caller>().cloned().unwrap_or(Caller {
        name: "anonymous".into(),
        role: Role::Admin,
    })
}

/// PERMISSION_DENIED unless the caller holds `role`; `what` names the operation.
pub fn require(extensions: &http::Extensions, role: Role, what: &str) -> Result<(), Status> {
    let c = caller(extensions);
    if c.role >= role {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{what} needs the {} role; token `{}` has {}",
            role.name(),
            c.name,
            c.role.name()
        )))
    }
}

/// Parses a `grpc-timeout` header value ("100m", "5S", …).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub use filterdb_proto::code_name;

fn sane_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| s.to_string())
}

impl State {
    /// Authenticates and authorizes; the caller, or the status to answer.
    fn authorize(&self, path: &str, headers: &http::HeaderMap) -> Result<Caller, Status> {
        let Some(needed) = required_role(path) else {
            return Ok(Caller {
                name: "anonymous".into(),
                role: Role::Read,
            });
        };
        if self.tokens.is_empty() {
            return Ok(Caller {
                name: "anonymous".into(),
                role: Role::Admin,
            });
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a bearer token with the {} role (header `authorization: Bearer <token>`)",
                needed.name()
            )));
        };
        let Some((name, role)) = self.tokens.get(&crate::config::token_hash(token)) else {
            return Err(Status::unauthenticated(format!(
                "unknown bearer token; {path} needs a token with the {} role",
                needed.name()
            )));
        };
        if *role < needed {
            return Err(Status::permission_denied(format!(
                "{path} needs the {} role; token `{name}` has {}",
                needed.name(),
                role.name()
            )));
        }
        Ok(Caller {
            name: name.clone(),
            role: *role,
        })
    }
}

fn status_response(status: Status, request_id: &str) -> http::Response<tonic::body::Body> {
    let mut r = status.into_http::<tonic::body::Body>();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    r
}

fn record(method: &str, code: &'static str, started: Instant) {
    metrics::counter!("filterdb_rpc_requests_total", "method" => method.to_string(), "code" => code).increment(1);
    metrics::histogram!("filterdb_rpc_duration_seconds", "method" => method.to_string())
        .record(started.elapsed().as_secs_f64());
}

impl<S, B> Service<http::Request<B>> for OpsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is ready only after poll_ready; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let method = path.trim_start_matches('/').to_string();
        let request_id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(sane_request_id)
            .unwrap_or_else(|| {
                format!(
                    "{:08x}-{:06x}",
                    state.id_prefix,
                    state.next_id.fetch_add(1, Ordering::Relaxed)
                )
            });
        let span = tracing::info_span!("rpc", method = %method, request_id = %request_id);
        Box::pin(
            async move {
                let caller = match state.authorize(&path, req.headers()) {
                    Ok(c) => c,
                    Err(s) => {
                        tracing::warn!(code = code_name(s.code()), "refused: {}", s.message());
                        record(&method, code_name(s.code()), started);
                        return Ok(status_response(s, &request_id));
                    }
                };
                let _permit = match &state.permits {
                    Some(sem) if required_role(&path).is_some() => match sem.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            let s = Status::resource_exhausted(format!(
                                "server busy: {} calls already running (limits.max_concurrent_requests); retry with backoff",
                                state.max_concurrent
                            ));
                            tracing::warn!("load shed");
                            record(&method, "RESOURCE_EXHAUSTED", started);
                            return Ok(status_response(s, &request_id));
                        }
                    },
                    _ => None,
                };
                let client = req
                    .headers()
                    .get("grpc-timeout")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_grpc_timeout);
                // Fire before tonic's own timer (same deadline, started earlier, outside us).
                let client = client.map(|d| d.saturating_sub((d / 20).min(Duration::from_millis(20)) + Duration::from_millis(1)));
                let timeout = match (client, state.request_timeout) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                req.extensions_mut().insert(caller.clone());
                req.extensions_mut().insert(RequestId(request_id.clone()));
                tracing::debug!(caller = %caller.name, "call");
                let fut = inner.call(req);
                let result = match timeout {
                    Some(t) => match tokio::time::timeout(t, fut).await {
                        Ok(r) => r,
                        Err(_) => {
                            let s = Status::deadline_exceeded(format!(
                                "{method}: deadline of {} ms exceeded",
                                t.as_millis()
                            ));
                            tracing::warn!("deadline exceeded");
                            record(&method, "DEADLINE_EXCEEDED", started);
                            return Ok(status_response(s, &request_id));
                        }
                    },
                    None => fut.await,
                };
                match result {
                    Ok(mut resp) => {
                        let code = match tonic::Status::from_header_map(resp.headers()) {
                            Some(s) if s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired" => {
                                "DEADLINE_EXCEEDED"
                            }
                            Some(s) => code_name(s.code()),
                            None => "OK",
                        };
                        if code != "OK" {
                            tracing::info!(code, elapsed_ms = started.elapsed().as_millis() as u64, "call failed");
                        } else {
                            tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "call answered");
                        }
                        record(&method, code, started);
                        if let Ok(v) = HeaderValue::from_str(&request_id) {
                            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
                        }
                        Ok(resp)
                    }
                    Err(e) => {
                        record(&method, "INTERNAL", started);
                        Err(e)
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// Installs the Prometheus recorder and its HTTP listener (`GET /metrics`) on `addr`, and
/// describes FilterDB's metrics. Must run inside the tokio runtime.
pub fn install_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0,
            ],
        )?
        .install()
        .map_err(|e| anyhow::anyhow!("metrics_listen {addr}: {e}"))?;
    metrics::describe_counter!(
        "filterdb_rpc_requests_total",
        "gRPC calls by method and status code"
    );
    metrics::describe_histogram!(
        "filterdb_rpc_duration_seconds",
        "gRPC handler latency by method"
    );
    metrics::describe_counter!(
        "filterdb_ingest_bytes_total",
        "checkpoint bytes received by Ingest"
    );
    metrics::describe_counter!(
        "filterdb_ingest_filters_total",
        "3x3 filters stored by Ingest"
    );
    metrics::describe_counter!("filterdb_ingest_models_total", "ingests by outcome");
    metrics::describe_counter!(
        "filterdb_get_filters_rows_total",
        "filters streamed by GetFilters"
    );
    metrics::describe_gauge!(
        "filterdb_rocksdb_property",
        "RocksDB properties by column family"
    );
    Ok(())
}

/// Every `every`, exports a few RocksDB properties per column family as
/// `filterdb_rocksdb_property{cf,property}` gauges.
pub fn spawn_rocksdb_metrics(
    engine: Arc<crate::engine::Engine>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let e = engine.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let db = e.store().db();
                for cf_name in crate::store::keys::ALL_CFS {
                    let Some(cf) = db.cf_handle(cf_name) else { continue };
                    for prop in [
                        "rocksdb.estimate-num-keys",
                        "rocksdb.total-sst-files-size",
                        "rocksdb.live-sst-files-size",
                        "rocksdb.cur-size-all-mem-tables",
                        "rocksdb.block-cache-usage",
                        "rocksdb.estimate-pending-compaction-bytes",
                    ] {
                        if let Ok(Some(v)) = db.property_int_value_cf(&cf, prop) {
                            metrics::gauge!("filterdb_rocksdb_property", "cf" => *cf_name, "property" => prop)
                                .set(v as f64);
                        }
                    }
                }
            })
            .await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_roles_per_method() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/filterdb.v1.FilterDb/ListModels"),
            Some(Role::Read)
        );
        assert_eq!(
            required_role("/filterdb.v1.FilterDb/Ingest"),
            Some(Role::Write)
        );
        assert_eq!(
            required_role("/filterdb.v1.Analytics/PinBasis"),
            Some(Role::Write)
        );
        assert_eq!(
            required_role("/filterdb.v1.Snapshots/Snapshot"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/filterdb.v1.CnnFdbImport/Import"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role("/arrow.flight.protocol.FlightService/DoGet"),
            Some(Role::Read)
        );
    }

    #[test]
    fn ops_grpc_timeout_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12q"), None);
    }
}
