//! Operations: auth matrix, TLS and mTLS, deadlines and limits, metrics over HTTP, SIGTERM
//! during a stream, --print-config precedence, online checkpoints, and the shipped deploy
//! config started for real.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filterdb::config::{Role, TokenConfig, token_hash};
use filterdb::engine::Engine;
use filterdb::ops::OpsConfig;
use filterdb::server::{ServerConfig, serve};
use filterdb_proto as pb;
use pb::admin_client::AdminClient;
use pb::analytics_client::AnalyticsClient;
use pb::filter_db_client::FilterDbClient;
use pb::jobs_client::JobsClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::*;

fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo nextest run --workspace`",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An in-process server with a given configuration.
struct OpsServer {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl OpsServer {
    async fn start(dir: &Path, config: ServerConfig) -> OpsServer {
        let engine = Arc::new(Engine::open(dir).expect("open engine"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve(engine, listener, config, async move {
            let _ = rx.await;
        }));
        OpsServer {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn channel(&self) -> Channel {
        for _ in 0..100 {
            if let Ok(c) = Endpoint::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {} did not come up", self.addr)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .expect("server task")
            .expect("server result");
    }
}

fn tokens() -> Vec<TokenConfig> {
    [
        ("reader", Role::Read),
        ("writer", Role::Write),
        ("admin", Role::Admin),
    ]
    .into_iter()
    .map(|(name, role)| TokenConfig {
        name: name.into(),
        role,
        sha256: token_hash(&format!("{}-token", role.name())),
    })
    .collect()
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn code_of<T>(r: &Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_auth_matrix_roles_against_rpc_classes() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        ops: OpsConfig {
            tokens: tokens(),
            ..Default::default()
        },
        ..Default::default()
    };
    let server = OpsServer::start(dir.path(), config).await;
    let ch = server.channel().await;
    let mut fdb = FilterDbClient::new(ch.clone());
    let mut jobs = JobsClient::new(ch.clone());
    let mut admin = AdminClient::new(ch.clone());
    let mut health = HealthClient::new(ch.clone());
    let mut analytics = AnalyticsClient::new(ch.clone());

    use Code::*;
    // token → (read: ListModels, write: DeleteModel of an unknown model, admin: Jobs.ListSources,
    // admin: Admin.Checkpoint with an empty path)
    let cases: [(&str, Option<&str>, [Code; 4]); 5] = [
        ("no token", None, [Unauthenticated; 4]),
        ("bad token", Some("not-a-token"), [Unauthenticated; 4]),
        (
            "read",
            Some("read-token"),
            [Ok, PermissionDenied, PermissionDenied, PermissionDenied],
        ),
        (
            "write",
            Some("write-token"),
            [Ok, NotFound, PermissionDenied, PermissionDenied],
        ),
        (
            "admin",
            Some("admin-token"),
            [Ok, NotFound, Ok, InvalidArgument],
        ),
    ];
    let mut table = String::from(
        "token      | read(ListModels) | write(DeleteModel) | admin(ListSources) | admin(Checkpoint) | health\n",
    );
    for (who, token, want) in cases {
        let r = fdb
            .list_models(with_token(pb::ListModelsRequest::default(), token))
            .await;
        let read = code_of(&r);
        if let std::result::Result::Ok(resp) = &r {
            assert!(
                resp.metadata().get("x-request-id").is_some(),
                "response carries x-request-id"
            );
        }
        let write = code_of(
            &fdb.delete_model(with_token(
                pb::DeleteModelRequest {
                    model: Some(by_name("nope")),
                },
                token,
            ))
            .await,
        );
        let jobs_code = code_of(
            &jobs
                .list_sources(with_token(pb::ListSourcesRequest::default(), token))
                .await,
        );
        let cp = code_of(
            &admin
                .checkpoint(with_token(
                    pb::CheckpointRequest {
                        path: String::new(),
                    },
                    token,
                ))
                .await,
        );
        let h = code_of(
            &health
                .check(with_token(
                    HealthCheckRequest {
                        service: String::new(),
                    },
                    token,
                ))
                .await,
        );
        table.push_str(&format!(
            "{who:10} | {read:?} | {write:?} | {jobs_code:?} | {cp:?} | {h:?}\n"
        ));
        assert_eq!([read, write, jobs_code, cp], want, "{who}");
        assert_eq!(h, Ok, "{who}: health stays open");
    }
    eprintln!("{table}");

    // Messages name the role needed.
    let e = fdb
        .delete_model(with_token(
            pb::DeleteModelRequest {
                model: Some(by_name("nope")),
            },
            Some("read-token"),
        ))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("write role") && e.message().contains("reader"),
        "{}",
        e.message()
    );
    let e = fdb
        .list_models(with_token(pb::ListModelsRequest::default(), None))
        .await
        .unwrap_err();
    assert!(e.message().contains("read role"), "{}", e.message());
    assert!(
        e.metadata().get("x-request-id").is_some(),
        "refusals carry x-request-id too"
    );

    // ProfileCheckpoint with store = true needs write (checked in the handler).
    for (token, denied) in [("read-token", true), ("write-token", false)] {
        let header = pb::ProfileCheckpointRequest {
            part: Some(pb::profile_checkpoint_request::Part::Header(
                pb::ProfileCheckpointHeader {
                    store: true,
                    file_name: "x.safetensors".into(),
                    meta: Some(meta("p", "imagenet", "Classification", "vgg")),
                    ..Default::default()
                },
            )),
        };
        let r = analytics
            .profile_checkpoint(with_token(tokio_stream::iter(vec![header]), Some(token)))
            .await;
        let code = code_of(&r);
        assert_eq!(code == PermissionDenied, denied, "{token}: {r:?}");
        assert_ne!(code, Unauthenticated);
    }
    server.stop().await;
}

/// Test certificates made with the openssl CLI: a CA, a server certificate for localhost and
/// 127.0.0.1, and a client certificate.
fn make_certs(dir: &Path) -> bool {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl CLI not found: skipping TLS checks");
        return false;
    }
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=filterdb-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n").unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{who}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
    true
}

async fn tls_health(addr: &str, tls: ClientTlsConfig) -> Result<(), String> {
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(ch)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_tls_and_mtls_handshakes() {
    let certs = tempfile::tempdir().unwrap();
    if !make_certs(certs.path()) {
        return;
    }
    let p = |n: &str| certs.path().join(n);
    let read = |n: &str| std::fs::read(p(n)).unwrap();
    let ca = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt")))
            .domain_name("localhost")
    };

    // TLS: a client trusting the CA gets through; plain text and an untrusting client do not.
    let dir = tempfile::tempdir().unwrap();
    let tls = filterdb::config::TlsConfig {
        cert: Some(p("server.crt")),
        key: Some(p("server.key")),
        client_ca: None,
    };
    let server = OpsServer::start(
        dir.path(),
        ServerConfig {
            tls,
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls_health(&server.addr, ca()).await.expect("TLS health");
    let plain = async {
        let ch = Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        plain.await.is_err(),
        "plain text must not reach a TLS server"
    );
    let untrusting = ClientTlsConfig::new().domain_name("localhost");
    assert!(
        tls_health(&server.addr, untrusting).await.is_err(),
        "a client not trusting the CA fails"
    );
    server.stop().await;

    // mTLS: without a client certificate the call fails; with one signed by the CA it succeeds.
    let dir = tempfile::tempdir().unwrap();
    let tls = filterdb::config::TlsConfig {
        cert: Some(p("server.crt")),
        key: Some(p("server.key")),
        client_ca: Some(p("ca.crt")),
    };
    let server = OpsServer::start(
        dir.path(),
        ServerConfig {
            tls,
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = tls_health(&server.addr, ca()).await;
    assert!(e.is_err(), "mTLS without a client certificate must fail");
    tls_health(
        &server.addr,
        ca().identity(Identity::from_pem(read("client.crt"), read("client.key"))),
    )
    .await
    .expect("mTLS with a client certificate");
    server.stop().await;
}

/// A ProfileCheckpoint call whose upload never ends: a slow request on demand.
fn stuck_profile(
    token: Option<&str>,
) -> (
    tokio::sync::mpsc::Sender<pb::ProfileCheckpointRequest>,
    tonic::Request<tokio_stream::wrappers::ReceiverStream<pb::ProfileCheckpointRequest>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = pb::ProfileCheckpointRequest {
        part: Some(pb::profile_checkpoint_request::Part::Header(
            pb::ProfileCheckpointHeader {
                file_name: "slow.safetensors".into(),
                ..Default::default()
            },
        )),
    };
    tx.try_send(header).unwrap();
    (
        tx,
        with_token(tokio_stream::wrappers::ReceiverStream::new(rx), token),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_deadline_max_rows_and_load_shedding() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig {
        ops: OpsConfig {
            max_concurrent_requests: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    config.limits.max_stream_rows = 10;
    let server = OpsServer::start(dir.path(), config).await;
    let ch = server.channel().await;
    let mut fdb = FilterDbClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    ingest_fixture(
        &mut fdb,
        meta("tiny", "imagenet", "Classification", "vgg"),
        "tinynet.safetensors",
    )
    .await
    .expect("ingest");

    // Max rows per GetFilters stream.
    let req = pb::GetFiltersRequest {
        target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
            model: Some(by_name("tiny")),
            ..Default::default()
        })),
        batch_size: 0,
    };
    let e = fdb
        .get_filters(req)
        .await
        .expect_err("above max_stream_rows");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_stream_rows"), "{}", e.message());

    // A tiny deadline on a slow request: DEADLINE_EXCEEDED (not tonic's CANCELLED).
    let mut analytics = AnalyticsClient::new(ch.clone());
    let (_keep, mut req) = stuck_profile(None);
    req.set_timeout(Duration::from_millis(300));
    let t = Instant::now();
    let e = analytics
        .profile_checkpoint(req)
        .await
        .expect_err("deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(_keep);

    // Load shedding: one slow call holds the only slot; the next call is refused at once.
    let mut slow_client = AnalyticsClient::new(ch.clone());
    let (keep, req) = stuck_profile(None);
    let slow = tokio::spawn(async move { slow_client.profile_checkpoint(req).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = fdb
        .list_models(pb::ListModelsRequest::default())
        .await
        .expect_err("shed");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("max_concurrent_requests"),
        "{}",
        e.message()
    );
    // Health is never shed.
    HealthClient::new(ch.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health while busy");
    // The slot frees when the slow call ends.
    drop(keep);
    let _ = slow.await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fdb.list_models(pb::ListModelsRequest::default()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && e.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("after the slow call: {e:?}"),
        }
    }
    server.stop().await;
}

/// The real server binary.
struct Bin {
    child: Child,
    port: u16,
}

impl Bin {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Bin {
        Bin::spawn(args, env, "warn", Stdio::null())
    }

    /// Started with `RUST_LOG=info`, its log (plain text, on stdout) written to `log`.
    fn start_logging(args: &[&str], log: &Path) -> Bin {
        let file = std::fs::File::create(log).expect("create log file");
        Bin::spawn(args, &[("NO_COLOR", "1")], "info", Stdio::from(file))
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], rust_log: &str, stdout: Stdio) -> Bin {
        let port = free_port();
        let child = Command::new(target_bin("filterdb-server"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        Bin { child, port }
    }

    async fn channel(&mut self) -> Channel {
        for _ in 0..300 {
            if let Ok(c) = Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))
                .unwrap()
                .connect()
                .await
            {
                return c;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("server exited early: {s}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server binary did not come up on port {}", self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for exit at most `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("server did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// GET http://127.0.0.1:port/path over a raw socket; the body.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out))
}

/// Parses Prometheus text lines `name{labels} value`.
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), rest.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            Some((name, labels, value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_metrics_scraped_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let mut bin = Bin::start(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ],
        &[],
    );
    let ch = bin.channel().await;
    let mut fdb = FilterDbClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    ingest_fixture(
        &mut fdb,
        meta("m", "imagenet", "Classification", "vgg"),
        "tinynet.safetensors",
    )
    .await
    .expect("ingest");
    for _ in 0..3 {
        fdb.list_models(pb::ListModelsRequest::default())
            .await
            .expect("list");
    }
    let _ = fdb
        .get_model(pb::GetModelRequest {
            model: Some(by_name("absent")),
        })
        .await;
    let text = http_get(mport, "/metrics").expect("scrape");
    let s = samples(&text);
    let find = |name: &str, needles: &[&str]| {
        s.iter()
            .find(|(n, l, _)| n == name && needles.iter().all(|x| l.contains(x)))
            .map(|x| x.2)
    };
    let ok = find(
        "filterdb_rpc_requests_total",
        &["method=\"filterdb.v1.FilterDb/ListModels\"", "code=\"OK\""],
    );
    assert_eq!(ok, Some(3.0), "ListModels OK counter in:\n{text}");
    let nf = find(
        "filterdb_rpc_requests_total",
        &[
            "method=\"filterdb.v1.FilterDb/GetModel\"",
            "code=\"NOT_FOUND\"",
        ],
    );
    assert_eq!(nf, Some(1.0), "GetModel NOT_FOUND counter");
    assert!(
        find(
            "filterdb_rpc_duration_seconds_count",
            &["method=\"filterdb.v1.FilterDb/ListModels\""]
        )
        .is_some_and(|v| v >= 3.0)
    );
    assert!(
        find(
            "filterdb_rpc_duration_seconds_bucket",
            &["filterdb.v1.FilterDb/ListModels", "le="]
        )
        .is_some()
    );
    let bytes = std::fs::metadata(fixture("tinynet.safetensors"))
        .unwrap()
        .len() as f64;
    assert_eq!(find("filterdb_ingest_bytes_total", &[]), Some(bytes));
    assert!(find("filterdb_ingest_filters_total", &[]).is_some_and(|v| v > 0.0));
    // RocksDB properties are exported within their first period (at start, then every 10 s).
    assert!(
        find("filterdb_rocksdb_property", &["estimate-num-keys"]).is_some(),
        "rocksdb gauges in:\n{text}"
    );
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.contains("ListModels")
                || l.starts_with("filterdb_ingest")
                || l.contains("filter_blocks"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    bin.signal("-TERM");
    assert!(bin.wait(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_sigterm_during_a_stream_finishes_it_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let mut bin = Bin::start(&["--data-dir", &data, "--shutdown-grace-secs", "30"], &[]);
    let ch = bin.channel().await;
    let mut fdb = FilterDbClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let big = crate::crash::big_safetensors(8, 3);
    ingest_bytes(
        &mut fdb,
        meta("big", "imagenet", "Classification", "vgg"),
        "big.safetensors",
        big,
        pb::NameConflict::Error,
    )
    .await
    .expect("ingest");
    let total = 8 * 65_536u64;
    let req = pb::GetFiltersRequest {
        target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
            model: Some(by_name("big")),
            ..Default::default()
        })),
        batch_size: 512,
    };
    let mut stream = fdb.get_filters(req).await.expect("stream").into_inner();
    let first = stream.message().await.expect("first").expect("a batch");
    let mut got = u64::from(first.count);
    bin.signal("-TERM");
    let t = Instant::now();
    // Read slowly at first so the stream is surely in flight while the server drains.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(b) = stream
        .message()
        .await
        .expect("stream continues through shutdown")
    {
        got += u64::from(b.count);
    }
    assert_eq!(got, total, "the in-flight stream finished");
    let status = bin.wait(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "within the grace period"
    );
    // New connections were refused after shutdown began; a restart reads everything.
    let mut bin = Bin::start(&["--data-dir", &data], &[]);
    let ch = bin.channel().await;
    let mut fdb = FilterDbClient::new(ch).max_decoding_message_size(64 << 20);
    assert_eq!(totals(&mut fdb).await, (1, 8, total));
    let req = pb::GetFiltersRequest {
        target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
            model: Some(by_name("big")),
            ..Default::default()
        })),
        batch_size: 0,
    };
    let (ids, _) = get_filters(&mut fdb, req)
        .await
        .expect("read after restart");
    assert_eq!(ids.len() as u64, total);
    bin.signal("-INT");
    assert!(
        bin.wait(Duration::from_secs(30)).success(),
        "SIGINT exits 0 too"
    );
}

#[test]
fn ops_print_config_masks_secrets_and_shows_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("server.toml");
    let h = token_hash("admin-token");
    std::fs::write(
        &f,
        format!(
            "listen = \"127.0.0.1:1111\"\nsnapshot_retain = 3\n[limits]\nmax_k = 10\n[[auth.token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{h}\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(target_bin("filterdb-server"))
        .args([
            "--config",
            f.to_str().unwrap(),
            "--set",
            "limits.max_k=30",
            "--print-config",
        ])
        .env("FILTERDB_LISTEN", "127.0.0.1:2222")
        .env("FILTERDB_LIMITS_MAX_K", "20")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let has = |line: &str| text.lines().any(|l| l.trim() == line);
    assert!(
        has("listen = \"127.0.0.1:2222\""),
        "env beats file:\n{text}"
    );
    assert!(has("max_k = 30"), "flag beats env:\n{text}");
    assert!(has("snapshot_retain = 3"), "file beats default:\n{text}");
    assert!(has("shutdown_grace_secs = 30"), "default:\n{text}");
    assert!(
        has("#   limits.max_k = flag --limits-max-k"),
        "origins:\n{text}"
    );
    assert!(!text.contains(&h), "token hash masked:\n{text}");
    assert!(text.contains("<masked>"));
    assert!(
        text.contains("listen = env FILTERDB_LISTEN"),
        "origins listed:\n{text}"
    );

    // Errors name the key and the file.
    std::fs::write(&f, "log_format = \"xml\"\n").unwrap();
    let out = Command::new(target_bin("filterdb-server"))
        .args(["--config", f.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("log_format") && err.contains("server.toml"),
        "{err}"
    );
    // Tokens without TLS on a public address are refused.
    std::fs::write(&f, format!("listen = \"0.0.0.0:0\"\n[[auth.token]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"{h}\"\n")).unwrap();
    let out = Command::new(target_bin("filterdb-server"))
        .args(["--config", f.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("allow_insecure_tokens"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_online_checkpoint_rpc_and_backup_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        ops: OpsConfig {
            tokens: tokens(),
            ..Default::default()
        },
        ..Default::default()
    };
    let server = OpsServer::start(dir.path(), config).await;
    let ch = server.channel().await;
    let mut fdb_client =
        FilterDbClient::with_interceptor(ch.clone(), |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Bearer write-token".parse().unwrap());
            Ok(r)
        });
    let bytes = std::fs::read(fixture("tinynet.safetensors")).unwrap();
    let mut msgs = vec![pb::IngestRequest {
        part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
            meta: Some(meta("b", "imagenet", "Classification", "vgg")),
            file_name: "tinynet.safetensors".into(),
            total_bytes: bytes.len() as u64,
            ..Default::default()
        })),
    }];
    msgs.push(pb::IngestRequest {
        part: Some(pb::ingest_request::Part::Chunk(bytes)),
    });
    let mut s = fdb_client
        .ingest(tokio_stream::iter(msgs))
        .await
        .expect("ingest")
        .into_inner();
    while s.message().await.expect("ingest stream").is_some() {}

    let backups = tempfile::tempdir().unwrap();
    let out = backups.path().join("b1");
    let mut admin = AdminClient::new(ch.clone());
    let e = admin
        .checkpoint(with_token(
            pb::CheckpointRequest {
                path: "relative/dir".into(),
            },
            Some("admin-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Refused before anything was written: no folder, relative to the server or anywhere else.
    assert!(!Path::new("relative").exists() && !dir.path().join("relative").exists());
    assert_eq!(std::fs::read_dir(backups.path()).unwrap().count(), 0);
    let r = admin
        .checkpoint(with_token(
            pb::CheckpointRequest {
                path: out.display().to_string(),
            },
            Some("admin-token"),
        ))
        .await
        .expect("checkpoint")
        .into_inner();
    assert!(r.files > 0 && r.bytes > 0, "{r:?}");
    let listing = |p: &Path| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().to_string(), e.metadata().unwrap().len())
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&out);
    let e = admin
        .checkpoint(with_token(
            pb::CheckpointRequest {
                path: out.display().to_string(),
            },
            Some("admin-token"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // The existing checkpoint is left exactly as it was.
    assert_eq!(listing(&out), before);

    // The CLI: `filterdb backup --out DIR` with a token.
    let out2 = backups.path().join("b2");
    let cli = Command::new(target_bin("filterdb"))
        .args([
            "--server",
            &server.addr,
            "backup",
            "--out",
            out2.to_str().unwrap(),
        ])
        .env("FILTERDB_TOKEN", "admin-token")
        .output()
        .expect("run filterdb");
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli = Command::new(target_bin("filterdb"))
        .args([
            "--server",
            &server.addr,
            "--token",
            "read-token",
            "backup",
            "--out",
            backups.path().join("b3").to_str().unwrap(),
        ])
        .output()
        .expect("run filterdb");
    assert!(!cli.status.success() && String::from_utf8_lossy(&cli.stderr).contains("admin"));
    server.stop().await;

    // Each backup is a data directory holding the model.
    for b in [out, out2] {
        let s = TestServer::start(&b).await;
        let mut c = s.client().await;
        assert_eq!(totals(&mut c).await.0, 1, "{}", b.display());
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_shipped_deploy_config_starts_and_serves_health() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("deploy/filterdb.toml");
    let mport = free_port();
    // As the systemd unit starts it, with the data dir (flag), metrics address (env) and token
    // file (flag: none here) overridden.
    let mut bin = Bin::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--set",
            "auth.tokens_file=",
        ],
        &[("FILTERDB_METRICS_LISTEN", &format!("127.0.0.1:{mport}"))],
    );
    let ch = bin.channel().await;
    let r = HealthClient::new(ch.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let r = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: "filterdb.v1.FilterDb".into(),
        })
        .await
        .expect("health of FilterDb")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(
        http_get(mport, "/metrics")
            .expect("metrics")
            .contains("filterdb_")
    );
    assert!(dir.path().join("db").exists(), "data dir overridden");
    bin.signal("-TERM");
    assert!(bin.wait(Duration::from_secs(40)).success());
}

// ---------------------------------------------------------------------------------------------
// Server streams under the ops layer: slots, deadlines and metrics last until the stream ends.

/// Filters of the model `big_model` ingests: 8 layers of 256 × 256.
const BIG_FILTERS: u64 = 8 * 65_536;

/// Ingests "big" (8 × 65,536 filters, 18.9 MB as f32): a GetFilters stream of it in batches of
/// 512 is 1,024 messages, far more than the HTTP/2 windows hold, so a client that stops reading
/// holds the stream open.
async fn big_model(ch: &Channel) {
    let mut fdb = FilterDbClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    ingest_bytes(
        &mut fdb,
        meta("big", "imagenet", "Classification", "vgg"),
        "big.safetensors",
        crate::crash::big_safetensors(8, 3),
        pb::NameConflict::Error,
    )
    .await
    .expect("ingest big");
}

fn big_filters_request(timeout: Option<Duration>) -> tonic::Request<pb::GetFiltersRequest> {
    let mut r = tonic::Request::new(pb::GetFiltersRequest {
        target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
            model: Some(by_name("big")),
            ..Default::default()
        })),
        batch_size: 512,
    });
    if let Some(t) = timeout {
        r.set_timeout(t);
    }
    r
}

/// Reads a stream to its end: filters received, and the status it ended with.
async fn drain(s: &mut tonic::Streaming<pb::FilterBatch>, mut got: u64) -> (u64, Code, String) {
    loop {
        match s.message().await {
            Ok(Some(b)) => got += u64::from(b.count),
            Ok(None) => return (got, Code::Ok, String::new()),
            Err(e) => return (got, e.code(), e.message().to_string()),
        }
    }
}

/// ListModels until it is answered (the slot of a dropped stream frees asynchronously).
async fn list_models_within(fdb: &mut FilterDbClient<Channel>, limit: Duration) -> Result<(), tonic::Status> {
    let until = Instant::now() + limit;
    loop {
        match fdb.list_models(pb::ListModelsRequest::default()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_concurrency_slot_held_until_a_stream_ends_or_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        ops: OpsConfig { max_concurrent_requests: 1, ..Default::default() },
        ..Default::default()
    };
    let server = OpsServer::start(dir.path(), config).await;
    let ch = server.channel().await;
    big_model(&ch).await;
    let mut fdb = FilterDbClient::new(ch.clone()).max_decoding_message_size(64 << 20);

    // An open stream holds the only slot: another call is shed.
    let mut s = fdb.clone().get_filters(big_filters_request(None)).await.expect("stream").into_inner();
    let first = s.message().await.expect("first batch").expect("a batch");
    let e = fdb.list_models(pb::ListModelsRequest::default()).await.expect_err("shed while streaming");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_concurrent_requests"), "{}", e.message());
    // Read to the end: the slot is free once the trailers are out (no retry needed).
    let (got, code, msg) = drain(&mut s, u64::from(first.count)).await;
    assert_eq!((got, code), (BIG_FILTERS, Code::Ok), "{msg}");
    fdb.list_models(pb::ListModelsRequest::default()).await.expect("slot free after the stream ended");

    // A stream the client drops (RST_STREAM) frees the slot too.
    let mut s = fdb.clone().get_filters(big_filters_request(None)).await.expect("stream").into_inner();
    s.message().await.expect("first batch").expect("a batch");
    let e = fdb.list_models(pb::ListModelsRequest::default()).await.expect_err("shed while streaming");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    drop(s);
    list_models_within(&mut fdb, Duration::from_secs(5)).await.expect("slot free after the client dropped the stream");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_deadline_cuts_a_server_stream_mid_way() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        ops: OpsConfig { max_concurrent_requests: 1, ..Default::default() },
        ..Default::default()
    };
    let server = OpsServer::start(dir.path(), config).await;
    let ch = server.channel().await;
    big_model(&ch).await;
    let mut fdb = FilterDbClient::new(ch.clone()).max_decoding_message_size(64 << 20);

    // A 1 s deadline on a stream the client then stops reading for 2.5 s (it would take
    // minutes at this pace). Once the client drains what was buffered, the stream ends with
    // DEADLINE_EXCEEDED, well short of all filters.
    let t = Instant::now();
    let mut s = fdb
        .clone()
        .get_filters(big_filters_request(Some(Duration::from_secs(1))))
        .await
        .expect("stream")
        .into_inner();
    let first = s.message().await.expect("first batch").expect("a batch");
    let e = fdb.list_models(pb::ListModelsRequest::default()).await.expect_err("shed before the deadline");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(t.elapsed())).await;
    // The deadline dropped the stream's body and slot although the client never read on.
    fdb.list_models(pb::ListModelsRequest::default()).await.expect("slot freed by the deadline");
    let (got, code, msg) = drain(&mut s, u64::from(first.count)).await;
    eprintln!("deadline: {got} of {BIG_FILTERS} filters, then {code:?} `{msg}` after {:?}", t.elapsed());
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");
    assert!(msg.contains("deadline") && msg.contains("GetFilters"), "{msg}");
    assert!(got >= u64::from(first.count) && got < BIG_FILTERS / 2, "cut mid-stream: {got} filters");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // A deadline the stream meets changes nothing.
    let (got, code, msg) = {
        let mut s = fdb
            .clone()
            .get_filters(big_filters_request(Some(Duration::from_secs(60))))
            .await
            .expect("stream")
            .into_inner();
        drain(&mut s, 0).await
    };
    assert_eq!((got, code), (BIG_FILTERS, Code::Ok), "{msg}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_metrics_count_streams_with_their_final_status() {
    let dir = tempfile::tempdir().unwrap();
    let mport = free_port();
    let mut bin = Bin::start(
        &["--data-dir", dir.path().to_str().unwrap(), "--metrics-listen", &format!("127.0.0.1:{mport}")],
        &[],
    );
    let ch = bin.channel().await;
    big_model(&ch).await;
    let mut fdb = FilterDbClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    // Ingest answers with a stream: a wrong checksum ends it with an INVALID_ARGUMENT trailer
    // after the response headers (and a progress message) went out.
    let bytes = std::fs::read(fixture("tinynet.safetensors")).unwrap();
    let msgs = vec![
        pb::IngestRequest {
            part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
                meta: Some(meta("bad", "imagenet", "Classification", "vgg")),
                file_name: "tinynet.safetensors".into(),
                total_bytes: bytes.len() as u64,
                expected_sha256: "00".repeat(32),
                ..Default::default()
            })),
        },
        pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(bytes)) },
    ];
    let mut s = fdb.ingest(tokio_stream::iter(msgs)).await.expect("headers of the ingest stream").into_inner();
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the ingest stream ended without the checksum error"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Nothing of the refused file was stored.
    let e = fdb.get_model(pb::GetModelRequest { model: Some(by_name("bad")) }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A stream read slowly: its latency runs to its end (> 1.2 s), not to its headers.
    let mut s = fdb.clone().get_filters(big_filters_request(None)).await.expect("stream").into_inner();
    let first = s.message().await.expect("first").expect("a batch");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (got, code, _) = drain(&mut s, u64::from(first.count)).await;
    assert_eq!((got, code), (BIG_FILTERS, Code::Ok));
    // A stream the client drops: CANCELLED.
    let mut s = fdb.clone().get_filters(big_filters_request(None)).await.expect("stream").into_inner();
    s.message().await.expect("first").expect("a batch");
    drop(s);
    // A stream cut by its deadline: DEADLINE_EXCEEDED.
    let mut s = fdb
        .clone()
        .get_filters(big_filters_request(Some(Duration::from_millis(500))))
        .await
        .expect("stream")
        .into_inner();
    s.message().await.expect("first").expect("a batch");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(drain(&mut s, 0).await.1, Code::DeadlineExceeded);

    let ingest = "method=\"filterdb.v1.FilterDb/Ingest\"";
    let get = "method=\"filterdb.v1.FilterDb/GetFilters\"";
    // The dropped stream is settled when the server sees the reset: scrape until it shows.
    let until = Instant::now() + Duration::from_secs(10);
    let (text, s) = loop {
        let text = http_get(mport, "/metrics").expect("scrape");
        let s = samples(&text);
        let cancelled = s.iter().any(|(n, l, _)| n == "filterdb_rpc_requests_total" && l.contains(get) && l.contains("code=\"CANCELLED\""));
        if cancelled || Instant::now() > until {
            break (text, s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |name: &str, needles: &[&str]| {
        s.iter()
            .find(|(n, l, _)| n == name && needles.iter().all(|x| l.contains(x)))
            .map(|x| x.2)
    };
    let count = |method: &str, code: &str| find("filterdb_rpc_requests_total", &[method, &format!("code=\"{code}\"")]);
    eprintln!(
        "{}",
        text.lines().filter(|l| l.contains("Ingest") || l.contains("GetFilters")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(count(ingest, "OK"), Some(1.0), "the good ingest");
    assert_eq!(count(ingest, "INVALID_ARGUMENT"), Some(1.0), "the ingest that failed mid-stream");
    assert_eq!(count(get, "OK"), Some(1.0), "the stream read to its end");
    assert_eq!(count(get, "CANCELLED"), Some(1.0), "the stream the client dropped");
    assert_eq!(count(get, "DEADLINE_EXCEEDED"), Some(1.0), "the stream cut by its deadline");
    let sum = find("filterdb_rpc_duration_seconds_sum", &[get]).expect("GetFilters latency");
    assert!(sum >= 1.2 + 0.5, "latency measured to the end of the streams: {sum} s");
    // Bytes sent: at least the 36-byte filters of the full stream.
    let sent = find("filterdb_rpc_sent_bytes_total", &[get]).expect("GetFilters bytes");
    assert!(sent >= (BIG_FILTERS * 36) as f64, "{sent}");
    bin.signal("-TERM");
    assert!(bin.wait(Duration::from_secs(30)).success());
}

fn with_id<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-request-id", id.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_worker_log_lines_carry_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let data = dir.path().join("data");
    let mut bin = Bin::start_logging(&["--data-dir", data.to_str().unwrap()], &log);
    let ch = bin.channel().await;
    let mut fdb = FilterDbClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    // "ingested" is logged by the engine on the ingest's blocking worker.
    let bytes = std::fs::read(fixture("tinynet.safetensors")).unwrap();
    let msgs = vec![
        pb::IngestRequest {
            part: Some(pb::ingest_request::Part::Header(pb::IngestHeader {
                meta: Some(meta("logged", "imagenet", "Classification", "vgg")),
                file_name: "tinynet.safetensors".into(),
                total_bytes: bytes.len() as u64,
                ..Default::default()
            })),
        },
        pb::IngestRequest { part: Some(pb::ingest_request::Part::Chunk(bytes)) },
    ];
    let mut s = fdb.ingest(with_id(tokio_stream::iter(msgs), "it-ingest-0042")).await.expect("ingest").into_inner();
    while s.message().await.expect("ingest stream").is_some() {}
    // "deleted" is logged by the engine inside `api::blocking`.
    fdb.delete_model(with_id(pb::DeleteModelRequest { model: Some(by_name("logged")) }, "it-delete-0043"))
        .await
        .expect("delete");
    bin.signal("-TERM");
    assert!(bin.wait(Duration::from_secs(30)).success());
    let text = std::fs::read_to_string(&log).expect("log");
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` line in:\n{text}"))
    };
    let ingested = line(" ingested ");
    assert!(ingested.contains("it-ingest-0042"), "{ingested}");
    let deleted = line(" deleted ");
    assert!(deleted.contains("it-delete-0043"), "{deleted}");
}
