//! Rust client for FilterDB, the database of trained CNN 3x3 convolution filters.
//!
//! [`Client`] wraps the generated gRPC stub with the conveniences every caller needs: chunked
//! checkpoint uploads with progress, paging, filter-batch collection and kernel decoding.
//! [`Client::analytics`] is the `Analytics` service's stub on the same connection (with
//! [`Client::pin_basis`] following its progress stream), and [`plot`] draws analytics results
//! into PNG or SVG files.
//!
//! ```no_run
//! # async fn demo() -> Result<(), filterdb_client::ClientError> {
//! use filterdb_client::{Client, model_ref, selection};
//! let mut c = Client::connect("127.0.0.1:50051").await?;
//! let models = c.list_models(selection(Some("task = Classification"))?).await?;
//! let batches = c.get_filters(filterdb_client::model_filters(model_ref("1"), Some(0), None)).await?;
//! # Ok(()) }
//! ```

pub mod error;
pub mod json;
pub mod kernels;
pub mod plot;
pub mod quality;

use std::path::Path;
use std::time::Duration;

pub use error::{ClientError, chain, code_name};
pub use filterdb_proto as proto;
pub use kernels::{KERNEL_BYTES, batch_kernels, batches_kernels, decode_kernels, encode_kernels};

use filterdb_proto::analytics_client::AnalyticsClient;
use filterdb_proto::filter_db_client::FilterDbClient;
use filterdb_proto::{
    CensusRequest, CensusResponse, DeleteModelRequest, Field, FilterBatch, FilterIdRange,
    GetFiltersRequest, GetModelRequest, GetVocabulariesRequest, IngestHeader, IngestPhase,
    IngestProgress, IngestRequest, IngestResponse, IngestResult, ListLayersRequest,
    ListLayersResponse, ListModelsRequest, MetaUpdate, Model, ModelFilters, ModelRef,
    PinBasisProgress, PinBasisRequest, Selection, UpdateModelMetaRequest, Vocabularies,
    get_filters_request, ingest_request, ingest_response, model_ref,
};
use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// A token interceptor; `None` or an empty token sends no header.
    pub fn new(token: Option<&str>) -> Result<BearerToken, ClientError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| ClientError::Status(tonic::Status::invalid_argument("the token holds characters not allowed in a header"))),
        }
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<set>)" } else { "BearerToken(none)" })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The channel every stub of a [`Client`] uses: the connection plus the bearer token.
pub type Transport = tonic::service::interceptor::InterceptedService<Channel, BearerToken>;

/// The server address used when none is given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Largest gRPC message either side accepts; matches the server's limit.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Size of the upload chunks [`Client::ingest_file`] sends.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Models per `ListModels` page requested while collecting all pages (the server's maximum).
const LIST_PAGE_SIZE: u32 = 1000;

/// A connection to a FilterDB server.
#[derive(Debug, Clone)]
pub struct Client {
    inner: FilterDbClient<Transport>,
    analytics: AnalyticsClient<Transport>,
    transport: Transport,
    url: String,
}

/// Adds `http://` to a bare `host:port` so both spellings work.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

impl Client {
    /// Connects to `url` ("http://127.0.0.1:50051" or "127.0.0.1:50051"), failing fast when the
    /// server cannot be reached.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Client::connect_with(url, None, None).await
    }

    /// Connects with a bearer token (sent on every call) and, for `https://` URLs or when
    /// given, TLS settings (server CA, client identity for mTLS, domain name).
    pub async fn connect_with(
        url: &str,
        token: Option<&str>,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Client, ClientError> {
        let url = normalize_url(url);
        let auth = BearerToken::new(token)?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| ClientError::InvalidUrl {
                url: url.clone(),
                error,
            })?
            .connect_timeout(Duration::from_secs(10))
            // Large answers (filter batches, per-layer quality) would otherwise stall on the
            // default 64 KiB HTTP/2 flow-control window.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(16 << 20));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|error| ClientError::InvalidUrl {
                url: url.clone(),
                error,
            })?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| ClientError::Connect {
                url: url.clone(),
                error,
            })?;
        Ok(Client::from_channel_with(channel, auth, url))
    }

    /// Wraps an existing channel (e.g. one built with custom TLS or timeouts).
    pub fn from_channel(channel: Channel, url: impl Into<String>) -> Client {
        Client::from_channel_with(channel, BearerToken::default(), url)
    }

    /// Wraps an existing channel, sending `auth` on every call.
    pub fn from_channel_with(channel: Channel, auth: BearerToken, url: impl Into<String>) -> Client {
        let transport = Transport::new(channel, auth);
        let analytics = AnalyticsClient::new(transport.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let inner = FilterDbClient::new(transport.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Client {
            inner,
            analytics,
            transport,
            url: url.into(),
        }
    }

    /// The authenticated channel, for stubs of other services (`AdminClient::new(c.transport())`).
    pub fn transport(&self) -> Transport {
        self.transport.clone()
    }

    /// The URL this client was connected with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The generated stub, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut FilterDbClient<Transport> {
        &mut self.inner
    }

    /// The generated stub of the `Analytics` service (bases, distributions, drift, quality) on
    /// the same connection; its unary calls need no wrapping.
    pub fn analytics(&mut self) -> &mut AnalyticsClient<Transport> {
        &mut self.analytics
    }

    /// Pins a new reference basis and waits until it is complete, passing every progress
    /// message (phases `fit`, `range`, `histograms`) to `on_progress`; returns the final
    /// message (phase `done`, carrying the new version).
    pub async fn pin_basis(
        &mut self,
        request: PinBasisRequest,
        mut on_progress: impl FnMut(&PinBasisProgress),
    ) -> Result<PinBasisProgress, ClientError> {
        let mut stream = self.analytics.pin_basis(request).await?.into_inner();
        let mut last: Option<PinBasisProgress> = None;
        while let Some(p) = stream.message().await? {
            on_progress(&p);
            if p.phase == "done" {
                return Ok(p);
            }
            last = Some(p);
        }
        Err(ClientError::Protocol(match last {
            Some(p) => format!(
                "the server ended the pin-basis stream in phase `{}` without `done`",
                p.phase
            ),
            None => "the server ended the pin-basis stream without any message".into(),
        }))
    }

    /// Uploads a checkpoint file and waits for the stored model.
    ///
    /// `header.file_name` defaults to the path's file name and `header.total_bytes` is set from
    /// the file size. `on_progress` sees upload progress (phase RECEIVING, bytes handed to the
    /// transport) interleaved with the server's own progress messages.
    pub async fn ingest_file(
        &mut self,
        path: &Path,
        mut header: IngestHeader,
        on_progress: impl FnMut(&IngestProgress),
    ) -> Result<IngestResult, ClientError> {
        let io_err = |error| ClientError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = tokio::fs::File::open(path).await.map_err(io_err)?;
        let meta = file.metadata().await.map_err(io_err)?;
        if !meta.is_file() {
            return Err(io_err(std::io::Error::other("not a regular file")));
        }
        if header.file_name.is_empty() {
            header.file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        header.total_bytes = meta.len();
        self.ingest_source(header, Source::File(file), path, on_progress)
            .await
    }

    /// Uploads a checkpoint held in memory; `header.total_bytes` is set from its length.
    pub async fn ingest_bytes(
        &mut self,
        bytes: Vec<u8>,
        mut header: IngestHeader,
        on_progress: impl FnMut(&IngestProgress),
    ) -> Result<IngestResult, ClientError> {
        header.total_bytes = bytes.len() as u64;
        let name = if header.file_name.is_empty() {
            "<bytes>".to_string()
        } else {
            header.file_name.clone()
        };
        self.ingest_source(
            header,
            Source::Bytes { bytes, offset: 0 },
            Path::new(&name),
            on_progress,
        )
        .await
    }

    async fn ingest_source(
        &mut self,
        header: IngestHeader,
        source: Source,
        path: &Path,
        mut on_progress: impl FnMut(&IngestProgress),
    ) -> Result<IngestResult, ClientError> {
        let total = header.total_bytes;
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let requests = upload_stream(header, source, ptx);
        let mut upload_open = true;
        let sent_progress = |sent: u64| IngestProgress {
            phase: IngestPhase::Receiving as i32,
            bytes_received: sent,
            total_bytes: total,
            layers_done: 0,
            layers_total: 0,
        };

        // The server answers with headers right after validating the header message, but a
        // rejection can also arrive mid-upload; either way the upload progress keeps flowing.
        let call = self.inner.ingest(requests);
        tokio::pin!(call);
        let response = loop {
            tokio::select! {
                biased;
                msg = prx.recv(), if upload_open => match msg {
                    Some(Ok(sent)) => on_progress(&sent_progress(sent)),
                    Some(Err(error)) => return Err(ClientError::Io { path: path.to_path_buf(), error }),
                    None => upload_open = false,
                },
                r = &mut call => break r?,
            }
        };
        let mut inbound = response.into_inner();
        loop {
            tokio::select! {
                biased;
                msg = prx.recv(), if upload_open => match msg {
                    Some(Ok(sent)) => on_progress(&sent_progress(sent)),
                    // Returning drops the call, which resets the stream, so the server never
                    // stores a partial upload (it would also reject it: total_bytes is set).
                    Some(Err(error)) => return Err(ClientError::Io { path: path.to_path_buf(), error }),
                    None => upload_open = false,
                },
                m = inbound.message() => match m? {
                    Some(IngestResponse { part: Some(ingest_response::Part::Progress(p)) }) => on_progress(&p),
                    Some(IngestResponse { part: Some(ingest_response::Part::Result(r)) }) => return Ok(r),
                    Some(IngestResponse { part: None }) => {}
                    None => {
                        return Err(ClientError::Protocol("the server ended the ingest stream without a result".into()));
                    }
                },
            }
        }
    }

    /// All models under a selection, following `next_page_token` through every page.
    pub async fn list_models(
        &mut self,
        selection: Option<Selection>,
    ) -> Result<Vec<Model>, ClientError> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = ListModelsRequest {
                selection: selection.clone(),
                page_size: LIST_PAGE_SIZE,
                page_token,
            };
            let page = self.inner.list_models(req).await?.into_inner();
            out.extend(page.models);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    /// One model by id or name.
    pub async fn get_model(&mut self, model: ModelRef) -> Result<Model, ClientError> {
        Ok(self
            .inner
            .get_model(GetModelRequest { model: Some(model) })
            .await?
            .into_inner())
    }

    /// A model's 3x3 layers in layer order, optionally restricted by a selection.
    pub async fn list_layers(
        &mut self,
        model: ModelRef,
        selection: Option<Selection>,
    ) -> Result<ListLayersResponse, ClientError> {
        Ok(self
            .inner
            .list_layers(ListLayersRequest {
                model: Some(model),
                selection,
            })
            .await?
            .into_inner())
    }

    /// The filter batches of a request as a stream, for exports too large to collect.
    pub async fn filters_stream(
        &mut self,
        request: GetFiltersRequest,
    ) -> Result<tonic::Streaming<FilterBatch>, ClientError> {
        Ok(self.inner.get_filters(request).await?.into_inner())
    }

    /// Collects every [`FilterBatch`] of a request, in filter-id order.
    pub async fn get_filters(
        &mut self,
        request: GetFiltersRequest,
    ) -> Result<Vec<FilterBatch>, ClientError> {
        let mut stream = self.filters_stream(request).await?;
        let mut out = Vec::new();
        while let Some(b) = stream.message().await? {
            out.push(b);
        }
        Ok(out)
    }

    /// Counts models, layers and filters under a selection, grouped by fields.
    pub async fn census(
        &mut self,
        selection: Option<Selection>,
        group_by: &[Field],
    ) -> Result<CensusResponse, ClientError> {
        let req = CensusRequest {
            selection,
            group_by: group_by.iter().map(|f| *f as i32).collect(),
        };
        Ok(self.inner.census(req).await?.into_inner())
    }

    /// Changes a model's labels; returns the updated model.
    pub async fn update_model_meta(
        &mut self,
        model: ModelRef,
        update: MetaUpdate,
    ) -> Result<Model, ClientError> {
        let req = UpdateModelMetaRequest {
            model: Some(model),
            update: Some(update),
        };
        Ok(self.inner.update_model_meta(req).await?.into_inner())
    }

    /// Deletes a model with its layers and filters; returns the model as it was.
    pub async fn delete_model(&mut self, model: ModelRef) -> Result<Model, ClientError> {
        let resp = self
            .inner
            .delete_model(DeleteModelRequest { model: Some(model) })
            .await?
            .into_inner();
        resp.deleted.ok_or_else(|| {
            ClientError::Protocol("DeleteModel answered without the deleted model".into())
        })
    }

    /// The alias vocabularies the server normalises labels with.
    pub async fn get_vocabularies(&mut self) -> Result<Vocabularies, ClientError> {
        Ok(self
            .inner
            .get_vocabularies(GetVocabulariesRequest {})
            .await?
            .into_inner())
    }
}

/// A model reference from user text: all digits means an id, anything else a name.
pub fn model_ref(s: &str) -> ModelRef {
    let s = s.trim();
    let r = match s.parse::<u64>() {
        Ok(id) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => model_ref::Ref::Id(id),
        _ => model_ref::Ref::Name(s.to_string()),
    };
    ModelRef { r#ref: Some(r) }
}

/// A selection from `--where` text, checked locally so syntax errors never reach the server;
/// `None` or blank text selects everything. The text travels as `Selection.expr`.
pub fn selection(where_: Option<&str>) -> Result<Option<Selection>, ClientError> {
    let Some(text) = where_ else { return Ok(None) };
    match filterdb_proto::expr::parse(text) {
        Ok(None) => Ok(None),
        Ok(Some(_)) => Ok(Some(Selection {
            predicate: None,
            expr: text.to_string(),
        })),
        Err(error) => Err(ClientError::Expr {
            expr: text.to_string(),
            error,
        }),
    }
}

/// A `GetFilters` request for a model, optionally one layer and one output channel of it.
pub fn model_filters(
    model: ModelRef,
    layer_index: Option<u32>,
    out_channel: Option<u32>,
) -> GetFiltersRequest {
    GetFiltersRequest {
        target: Some(get_filters_request::Target::Model(ModelFilters {
            model: Some(model),
            layer_index,
            out_channel,
        })),
        batch_size: 0,
    }
}

/// A `GetFilters` request for the filter ids `[start, end)`.
pub fn filter_ids(start: u64, end: u64) -> GetFiltersRequest {
    GetFiltersRequest {
        target: Some(get_filters_request::Target::Ids(FilterIdRange {
            start,
            end,
        })),
        batch_size: 0,
    }
}

/// Where upload bytes come from.
enum Source {
    File(tokio::fs::File),
    Bytes { bytes: Vec<u8>, offset: usize },
}

impl Source {
    /// The next chunk of at most [`CHUNK_BYTES`], `None` at the end.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            Source::File(f) => {
                let mut buf = vec![0u8; CHUNK_BYTES];
                let mut n = 0;
                // Fill whole chunks: short reads would otherwise mean many tiny messages.
                while n < buf.len() {
                    let r = f.read(&mut buf[n..]).await?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                buf.truncate(n);
                Ok((n > 0).then_some(buf))
            }
            Source::Bytes { bytes, offset } => {
                if *offset >= bytes.len() {
                    return Ok(None);
                }
                let end = (*offset + CHUNK_BYTES).min(bytes.len());
                let chunk = bytes[*offset..end].to_vec();
                *offset = end;
                Ok(Some(chunk))
            }
        }
    }
}

/// Upload progress reported by the request stream: bytes taken by the transport, or the read
/// error that ended the upload.
type UploadEvent = std::io::Result<u64>;

struct Upload {
    header: Option<IngestHeader>,
    source: Source,
    sent: u64,
    progress: mpsc::UnboundedSender<UploadEvent>,
}

/// The request stream: the header, then the source in chunks. It is polled by the transport,
/// so a chunk is only read once the previous one was taken; each poll reports the bytes taken
/// so far. A read error is reported and ends the stream.
fn upload_stream(
    header: IngestHeader,
    source: Source,
    progress: mpsc::UnboundedSender<UploadEvent>,
) -> impl Stream<Item = IngestRequest> + Send + 'static {
    let state = Upload {
        header: Some(header),
        source,
        sent: 0,
        progress,
    };
    futures::stream::unfold(state, |mut up| async move {
        if let Some(h) = up.header.take() {
            return Some((
                IngestRequest {
                    part: Some(ingest_request::Part::Header(h)),
                },
                up,
            ));
        }
        if up.sent > 0 {
            let _ = up.progress.send(Ok(up.sent));
        }
        match up.source.next_chunk().await {
            Ok(Some(chunk)) => {
                up.sent += chunk.len() as u64;
                Some((
                    IngestRequest {
                        part: Some(ingest_request::Part::Chunk(chunk)),
                    },
                    up,
                ))
            }
            Ok(None) => None,
            Err(e) => {
                let _ = up.progress.send(Err(e));
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn model_refs() {
        assert_eq!(model_ref("42").r#ref, Some(model_ref::Ref::Id(42)));
        assert_eq!(model_ref(" 7 ").r#ref, Some(model_ref::Ref::Id(7)));
        assert_eq!(
            model_ref("resnet50").r#ref,
            Some(model_ref::Ref::Name("resnet50".into()))
        );
        assert_eq!(
            model_ref("+5").r#ref,
            Some(model_ref::Ref::Name("+5".into()))
        );
        assert_eq!(
            model_ref("1e3").r#ref,
            Some(model_ref::Ref::Name("1e3".into()))
        );
        // Too large for u64: cannot be an id, so it is a name.
        assert_eq!(
            model_ref("99999999999999999999999").r#ref,
            Some(model_ref::Ref::Name("99999999999999999999999".into()))
        );
    }

    #[test]
    fn selections() {
        assert_eq!(selection(None).unwrap(), None);
        assert_eq!(selection(Some("  ")).unwrap(), None);
        let s = selection(Some("task = Classification and conv_depth_norm <= 0.5"))
            .unwrap()
            .unwrap();
        assert_eq!(s.expr, "task = Classification and conv_depth_norm <= 0.5");
        assert!(s.predicate.is_none());
        let e = selection(Some("colour = red")).unwrap_err();
        assert!(matches!(e, ClientError::Expr { .. }));
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn urls() {
        assert_eq!(normalize_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(
            normalize_url("http://127.0.0.1:50051"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            normalize_url(" https://db.example:443 "),
            "https://db.example:443"
        );
    }

    #[test]
    fn filter_requests() {
        let r = model_filters(model_ref("3"), Some(1), Some(2));
        match r.target {
            Some(get_filters_request::Target::Model(m)) => {
                assert_eq!(m.layer_index, Some(1));
                assert_eq!(m.out_channel, Some(2));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            filter_ids(5, 9).target,
            Some(get_filters_request::Target::Ids(FilterIdRange {
                start: 5,
                end: 9
            }))
        ));
    }

    #[tokio::test]
    async fn upload_stream_sends_header_then_chunks() {
        let bytes: Vec<u8> = (0..(2 * CHUNK_BYTES + 10)).map(|i| i as u8).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let header = IngestHeader {
            file_name: "x".into(),
            total_bytes: bytes.len() as u64,
            ..Default::default()
        };
        let msgs: Vec<IngestRequest> = upload_stream(
            header,
            Source::Bytes {
                bytes: bytes.clone(),
                offset: 0,
            },
            tx,
        )
        .collect()
        .await;
        assert!(
            matches!(&msgs[0].part, Some(ingest_request::Part::Header(h)) if h.file_name == "x")
        );
        let chunks: Vec<&Vec<u8>> = msgs[1..]
            .iter()
            .map(|m| match &m.part {
                Some(ingest_request::Part::Chunk(c)) => c,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![CHUNK_BYTES, CHUNK_BYTES, 10]
        );
        assert_eq!(
            chunks
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect::<Vec<u8>>(),
            bytes
        );
        let mut reported = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            reported.push(ev.unwrap());
        }
        assert_eq!(
            reported,
            vec![
                CHUNK_BYTES as u64,
                2 * CHUNK_BYTES as u64,
                bytes.len() as u64
            ]
        );
    }

    #[tokio::test]
    async fn upload_stream_reads_files_in_full_chunks() {
        let dir = std::env::temp_dir().join(format!("filterdb-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let bytes: Vec<u8> = (0..(CHUNK_BYTES + 3)).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let msgs: Vec<IngestRequest> =
            upload_stream(IngestHeader::default(), Source::File(file), tx)
                .collect()
                .await;
        let data: Vec<u8> = msgs[1..]
            .iter()
            .flat_map(|m| match &m.part {
                Some(ingest_request::Part::Chunk(c)) => c.clone(),
                _ => vec![],
            })
            .collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(data, bytes);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
