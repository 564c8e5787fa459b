//! The operations layer every gRPC call passes through (a tower `Layer` on the tonic server
//! builder, so the FilterDB services, Flight, health and reflection are all covered):
//!
//! - **request id**: the client's `x-request-id` (if sane) or a new one; a tracing span
//!   `rpc{method, request_id}` around the handler, and the id echoed in the response header.
//!   Handlers enter the same span on their blocking workers (`api::blocking`, `api::worker`), so
//!   engine log lines carry the id too.
//! - **auth**: `authorization: Bearer <token>`, the SHA-256 of the token looked up in the
//!   configured tokens; the method's required role ([`required_role`]) checked. Missing or
//!   unknown token → UNAUTHENTICATED, too small a role → PERMISSION_DENIED, both naming the role
//!   needed. The caller ([`Caller`]) goes into the request extensions so handlers can check
//!   finer rules (ProfileCheckpoint with `store = true` needs write). `grpc.health.v1` and
//!   reflection stay open: probes need health, and reflection only describes the public
//!   contract. With no tokens configured, auth is off and every caller is admin.
//! - **load shedding**: at most `max_concurrent_requests` calls at once; more are refused at once
//!   with RESOURCE_EXHAUSTED (clients retry with backoff). A call holds its slot until its
//!   response body ends or is dropped, so an open server stream counts as a running call.
//! - **deadlines**: the client's `grpc-timeout`, capped by the server-wide request timeout (which
//!   spares `grpc.health.v1.Health/Watch`, a stream meant to stay open), covers the whole call:
//!   the handler is answered with DEADLINE_EXCEEDED, and a response stream still running at the
//!   deadline is cut: its body (and with it the handler's producer) is dropped at once, and the
//!   stream ends with a DEADLINE_EXCEEDED trailer. tonic's own timeout (outside this layer)
//!   would answer CANCELLED "Timeout expired" and only before the headers; this layer fires a
//!   little earlier so clients see the spec code.
//! - **metrics**: recorded when the response ends, with the status of its trailers (CANCELLED
//!   when the client goes away first): `filterdb_rpc_requests_total{method,code}`,
//!   `filterdb_rpc_duration_seconds{method}` (to the end of the stream) and
//!   `filterdb_rpc_sent_bytes_total{method}` (gRPC message bytes sent, e.g. Flight exports).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;
use tonic::codegen::Bytes;
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
    /// Calls running at once, streams until their end (0: no limit).
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

/// The grpc-status a header map (response headers of a trailers-only answer, or trailers)
/// carries; tonic's own timeout (CANCELLED "Timeout expired") counts as DEADLINE_EXCEEDED.
fn status_code(headers: &http::HeaderMap) -> Option<&'static str> {
    let s = tonic::Status::from_header_map(headers)?;
    Some(if s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired" {
        "DEADLINE_EXCEEDED"
    } else {
        code_name(s.code())
    })
}

/// One call whose response is streaming: what the end of the body must settle.
struct Call {
    method: String,
    started: Instant,
    span: tracing::Span,
    /// The task polling the body, woken when the deadline cuts it.
    waker: AtomicWaker,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The handler's body; dropped at the end, on a deadline, or with the wrapper.
    inner: Option<tonic::body::Body>,
    /// The load-shedding slot, released when the call is settled.
    permit: Option<OwnedSemaphorePermit>,
    /// The deadline timer, if any.
    reaper: Option<tokio::task::JoinHandle<()>>,
    /// The recorded outcome; `Some` once settled.
    outcome: Option<&'static str>,
    /// Trailers still to send in place of the rest of the stream (set by the deadline).
    cut: Option<http::HeaderMap>,
    /// Message bytes sent so far.
    sent: u64,
}

impl Call {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the outcome once, and frees the call's slot and timer.
    fn settle(&self, slot: &mut Slot, code: &'static str, why: &str) {
        if slot.outcome.is_some() {
            return;
        }
        slot.outcome = Some(code);
        record(&self.method, code, self.started);
        metrics::counter!("filterdb_rpc_sent_bytes_total", "method" => self.method.clone()).increment(slot.sent);
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        let _e = self.span.enter();
        if code == "OK" {
            tracing::debug!(elapsed_ms, sent_bytes = slot.sent, "call answered");
        } else {
            tracing::info!(code, elapsed_ms, sent_bytes = slot.sent, "call failed{why}");
        }
        slot.permit = None;
        if let Some(r) = slot.reaper.take() {
            r.abort();
        }
    }

    /// The deadline passed with the stream still running: drop the handler's body (its producer
    /// sees a closed channel and stops), settle the call, and queue the DEADLINE_EXCEEDED trailer.
    fn expire(&self, limit: Duration) {
        let mut slot = self.lock();
        slot.reaper = None; // this is the timer's own task
        if slot.outcome.is_some() {
            return;
        }
        slot.inner = None;
        let status = Status::deadline_exceeded(format!(
            "{}: deadline of {} ms exceeded while streaming the response",
            self.method,
            limit.as_millis()
        ));
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert("grpc-status", HeaderValue::from(tonic::Code::DeadlineExceeded as i32));
        }
        slot.cut = Some(trailers);
        self.settle(&mut slot, "DEADLINE_EXCEEDED", ": deadline exceeded mid-stream");
        drop(slot);
        self.waker.wake();
    }
}

/// A response body that holds the call's load-shedding slot until it ends, records the call's
/// metrics from its trailers, and ends the stream at the call's deadline.
pub struct CallBody {
    call: Arc<Call>,
}

impl CallBody {
    fn new(
        inner: tonic::body::Body,
        method: String,
        started: Instant,
        permit: Option<OwnedSemaphorePermit>,
        deadline: Option<Duration>,
    ) -> CallBody {
        let call = Arc::new(Call {
            method,
            started,
            span: tracing::Span::current(),
            waker: AtomicWaker::new(),
            slot: Mutex::new(Slot { inner: Some(inner), permit, ..Default::default() }),
        });
        if let Some(limit) = deadline {
            // A timer task rather than a timer polled by the body: a client that stops reading
            // fills the flow-control window, and hyper then stops polling the body at all.
            let weak = Arc::downgrade(&call);
            let at = tokio::time::Instant::from_std(started + limit);
            let reaper = tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(call) = weak.upgrade() {
                    call.expire(limit);
                }
            });
            call.lock().reaper = Some(reaper);
        }
        CallBody { call }
    }
}

impl http_body::Body for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let call = &self.call;
        call.waker.register(cx.waker());
        let mut slot = call.lock();
        if let Some(trailers) = slot.cut.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let Some(inner) = slot.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    slot.sent += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    // A stream missing grpc-status is reported by clients as an error.
                    let code = status_code(trailers).unwrap_or("UNKNOWN");
                    call.settle(&mut slot, code, "");
                    slot.inner = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => {
                call.settle(&mut slot, code_name(status.code()), ": response body failed");
                slot.inner = None;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                // Ended without trailers: clients see no status, an error on their side.
                call.settle(&mut slot, "UNKNOWN", ": response ended without a status");
                slot.inner = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.call.lock();
        match &slot.inner {
            Some(b) => b.is_end_stream(),
            None => slot.cut.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.call.lock();
        match &slot.inner {
            Some(b) if slot.cut.is_none() => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for CallBody {
    fn drop(&mut self) {
        let mut slot = self.call.lock();
        // Not settled yet: hyper dropped the body before its end (the client reset the stream
        // or the connection went away). Settling frees the slot and stops the timer.
        self.call.settle(&mut slot, "CANCELLED", ": client went away before the end of the response");
        // Drop the handler's body now: its producer sees a closed channel and stops.
        slot.inner = None;
    }
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
                let permit = match &state.permits {
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
                // Health watches are long-lived by design: only a client deadline ends them.
                let server_cap = state.request_timeout.filter(|_| path != "/grpc.health.v1.Health/Watch");
                let timeout = match (client, server_cap) {
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
                let mut resp = match result {
                    Ok(resp) => resp,
                    Err(e) => {
                        record(&method, "INTERNAL", started);
                        return Err(e);
                    }
                };
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    resp.headers_mut().insert(REQUEST_ID_HEADER, v);
                }
                // A trailers-only answer (the handler failed) or an empty body: settled now.
                if let Some(code) = status_code(resp.headers()).or(resp.body().is_end_stream().then_some("OK")) {
                    if code != "OK" {
                        tracing::info!(code, elapsed_ms = started.elapsed().as_millis() as u64, "call failed");
                    }
                    record(&method, code, started);
                    return Ok(resp);
                }
                // Otherwise the call lasts as long as its body (a stream, or one message).
                let (parts, body) = resp.into_parts();
                let body = CallBody::new(body, method, started, permit, timeout);
                Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
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
        "gRPC call latency by method, to the end of the response stream"
    );
    metrics::describe_counter!(
        "filterdb_rpc_sent_bytes_total",
        "gRPC message bytes sent by method (Flight exports, GetFilters, progress streams)"
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
    metrics::describe_counter!(
        "filterdb_flight_rows_total",
        "filter rows sent by Arrow Flight DoGet (its bytes: filterdb_rpc_sent_bytes_total)"
    );
    metrics::describe_counter!(
        "filterdb_dataset_bytes_total",
        "bytes of snapshot/export datasets written (Parquet files + manifest), by kind"
    );
    metrics::describe_counter!(
        "filterdb_dataset_filters_total",
        "filters written into snapshot/export datasets, by kind"
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
