//! Nearest-neighbour search end to end: every exact answer equals a brute-force loop written
//! here from the documented formulas (ids and distance bits, ties by lower id), over the real
//! fixtures (numpy's values) and over generated data full of exact ties, in every space, with
//! selections, filter conditions and sign invariance; and equals numpy's ranking.

use filterdb_proto as pb;
use pb::analytics_client::AnalyticsClient;
use pb::search_client::SearchClient;
use tonic::transport::Channel;

use crate::harness::*;

/// (model name, fixture file, dataset, task).
const FIXTURES: &[(&str, &str, &str, &str)] = &[
    ("zip", "tinynet_zip.pt", "imagenet", "Classification"),
    // Same values as tinynet_zip.pt: every filter has an exact twin with a higher id.
    ("legacy", "tinynet_legacy.pt", "imagenet", "Classification"),
    (
        "onnx",
        "tinynet_initializers.onnx",
        "mimic-cxr",
        "Segmentation",
    ),
    ("f64", "tinynet_f64.safetensors", "celeba", "GAN-Generator"),
    (
        "f16",
        "tinynet_f16.safetensors",
        "cifar10",
        "Classification",
    ),
    (
        "natural",
        "natural_order.safetensors",
        "imagenet",
        "Classification",
    ),
];

/// One stored filter as the brute force sees it.
#[derive(Debug, Clone)]
struct Row {
    id: u64,
    f: [f32; 9],
    model: String,
    layer_index: u32,
    in_channels: u32,
    first_filter_id: u64,
    abs_max: f64,
}

/// The brute force's view of a space.
#[derive(Debug, Clone)]
enum Sp {
    Raw,
    Scaled,
    Cosine,
    Basis {
        mean: Vec<f64>,
        comps: Vec<f64>,
        m: usize,
    },
}

impl Sp {
    fn proto(&self) -> (pb::SearchSpace, u32) {
        match self {
            Sp::Raw => (pb::SearchSpace::Raw, 0),
            Sp::Scaled => (pb::SearchSpace::Scaled, 0),
            Sp::Cosine => (pb::SearchSpace::Cosine, 0),
            Sp::Basis { m, .. } => (pb::SearchSpace::Basis, *m as u32),
        }
    }

    /// T(f), written out from search.proto's definitions.
    fn t(&self, f: &[f32; 9]) -> Vec<f64> {
        match self {
            Sp::Raw => f.iter().map(|v| f64::from(*v)).collect(),
            Sp::Scaled => {
                let x: Vec<f64> = f.iter().map(|v| f64::from(*v)).collect();
                let mut m = 0f64;
                for v in &x {
                    m = m.max(v.abs());
                }
                if m > 0.0 {
                    x.iter().map(|v| v / m).collect()
                } else {
                    x
                }
            }
            Sp::Cosine => {
                let x: Vec<f64> = f.iter().map(|v| f64::from(*v)).collect();
                let mut s = 0f64;
                for v in &x {
                    s += v * v;
                }
                let n = s.sqrt();
                if n > 0.0 {
                    x.iter().map(|v| v / n).collect()
                } else {
                    x
                }
            }
            Sp::Basis { mean, comps, m } => {
                // L∞ scaling in float32 (as the Analytics histograms), then c = V (s − μ).
                let mut mx = 0f32;
                for v in f {
                    mx = mx.max(v.abs());
                }
                let s: Vec<f64> = f
                    .iter()
                    .map(|v| f64::from(if mx > 0.0 { v / mx } else { *v }))
                    .collect();
                (0..*m)
                    .map(|i| {
                        let mut c = 0f64;
                        for k in 0..9 {
                            c += comps[9 * i + k] * (s[k] - mean[k]);
                        }
                        c
                    })
                    .collect()
            }
        }
    }
}

fn sq(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = 0f64;
    for (x, y) in a.iter().zip(b) {
        let t = x - y;
        acc += t * t;
    }
    acc
}

#[derive(Debug, Clone, Copy, Default)]
struct Cond {
    exclude_zero: bool,
    exclude_sparse: bool,
}

fn max_abs(f: &[f32; 9]) -> f64 {
    let mut m = 0f64;
    for v in f {
        m = m.max(f64::from(*v).abs());
    }
    m
}

/// The naive answer: every row, sorted by (distance, id).
#[allow(clippy::too_many_arguments)]
fn brute(
    db: &[Row],
    q: &[f32; 9],
    sp: &Sp,
    sign: bool,
    k: usize,
    keep: &dyn Fn(&Row) -> bool,
    cond: Cond,
    skip: Option<u64>,
) -> Vec<(u64, f64, bool)> {
    let tq = sp.t(q);
    let tn = sp.t(&q.map(|v| -v));
    let mut all: Vec<(u64, f64, bool)> = Vec::new();
    for r in db {
        if !keep(r) || Some(r.id) == skip {
            continue;
        }
        let m = max_abs(&r.f);
        let t = if r.abs_max == 0.0 {
            1.0
        } else {
            0.01 * r.abs_max
        };
        if (cond.exclude_zero && m == 0.0) || (cond.exclude_sparse && m < t) {
            continue;
        }
        let tf = sp.t(&r.f);
        let d = sq(&tf, &tq);
        let (d, flipped) = if sign {
            let d2 = sq(&tf, &tn);
            if d2 < d { (d2, true) } else { (d, false) }
        } else {
            (d, false)
        };
        all.push((r.id, d, flipped));
    }
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn kernel_bytes(k: &[f32; 9]) -> Vec<u8> {
    k.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn kernel_of(b: &[u8]) -> [f32; 9] {
    let mut k = [0f32; 9];
    for (v, c) in k.iter_mut().zip(b.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    k
}

/// A safetensors file of three conv layers: one of values from {−1, −½, 0, ½, 1} (many exact
/// duplicates and equal distances), one of continuous values with all-zero and tiny filters.
fn random_safetensors(seed: u32) -> (Vec<u8>, Vec<Vec<f32>>) {
    // The third layer (73,728 filters, 18 blocks) is larger than one scan work item.
    let shapes = [[32usize, 16, 3, 3], [64, 32, 3, 3], [288, 256, 3, 3]];
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut layers = Vec::new();
    for (l, s) in shapes.iter().enumerate() {
        let n = s.iter().product::<usize>();
        let mut v = Vec::with_capacity(n);
        for i in 0..n / 9 {
            let r = next();
            for _ in 0..9 {
                let u = next();
                let val = if l == 0 {
                    (u % 5) as f32 * 0.5 - 1.0
                } else if r % 17 == 0 {
                    0.0
                } else if r % 13 == 0 {
                    (u as f32 / u32::MAX as f32 - 0.5) * 1e-3
                } else {
                    u as f32 / u32::MAX as f32 - 0.5
                };
                v.push(val);
            }
            let _ = i;
        }
        layers.push(v);
    }
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (l, (s, v)) in shapes.iter().zip(&layers).enumerate() {
        header.insert(
            format!("features.{l}.weight"),
            serde_json::json!({"dtype": "F32", "shape": s, "data_offsets": [off, off + v.len() * 4]}),
        );
        off += v.len() * 4;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for v in &layers {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    (out, layers)
}

/// Appends a stored model's rows (values from `vals`, layers from ListLayers).
async fn add_rows(
    c: &mut pb::filter_db_client::FilterDbClient<Channel>,
    db: &mut Vec<Row>,
    name: &str,
    vals: &[f32],
) {
    let layers = c
        .list_layers(pb::ListLayersRequest {
            model: Some(by_name(name)),
            selection: None,
        })
        .await
        .unwrap()
        .into_inner()
        .layers;
    let mut off = 0usize;
    for l in layers {
        for i in 0..l.n_filters as usize {
            let mut f = [0f32; 9];
            f.copy_from_slice(&vals[(off + i) * 9..(off + i) * 9 + 9]);
            db.push(Row {
                id: l.first_filter_id + i as u64,
                f,
                model: name.to_string(),
                layer_index: l.layer_index,
                in_channels: l.in_channels,
                first_filter_id: l.first_filter_id,
                abs_max: l.stats.as_ref().unwrap().abs_max,
            });
        }
        off += l.n_filters as usize;
    }
    assert_eq!(off * 9, vals.len(), "{name}: stored filters vs values");
}

struct Setup {
    server: TestServer,
    db: Vec<Row>,
}

async fn setup(dir: &std::path::Path) -> Setup {
    // No automatic index: the store passes the builder's threshold, and a build finishing
    // mid-test raced the assertions that a store without an index answers exactly (the index
    // paths are tested in `search_approx`).
    let server = TestServer::start_with(dir, |e| e.set_search_index_auto(false)).await;
    let mut c = server.client().await;
    let mut db = Vec::new();
    for (name, file, dataset, task) in FIXTURES {
        ingest_fixture(&mut c, meta(name, dataset, task, "resnet"), file)
            .await
            .unwrap();
        let (_, vals) = expected(file);
        add_rows(&mut c, &mut db, name, &vals).await;
    }
    let (bytes, layers) = random_safetensors(11);
    ingest_bytes(
        &mut c,
        meta("rnd", "cifar100", "Classification", "vgg"),
        "rnd.safetensors",
        bytes,
        pb::NameConflict::Error,
    )
    .await
    .unwrap();
    let vals: Vec<f32> = layers.concat();
    add_rows(&mut c, &mut db, "rnd", &vals).await;
    db.sort_by_key(|r| r.id);
    Setup { server, db }
}

async fn search(server: &TestServer) -> SearchClient<Channel> {
    SearchClient::connect(server.url.clone())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

async fn pin(server: &TestServer) -> Sp {
    let mut a = AnalyticsClient::connect(server.url.clone()).await.unwrap();
    let mut s = a
        .pin_basis(pb::PinBasisRequest::default())
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    let p = a
        .get_pinned_basis(pb::GetPinnedBasisRequest {})
        .await
        .unwrap()
        .into_inner();
    let b = p.basis.unwrap();
    Sp::Basis {
        mean: b.mean,
        comps: b.components,
        m: 9,
    }
}

/// Query kernels: stored ones (fixture and generated), their negations, random, discrete, zero.
fn query_kernels(db: &[Row]) -> Vec<[f32; 9]> {
    let mut qs = Vec::new();
    for i in [0usize, 5, 100, 300, 1000, db.len() - 1] {
        qs.push(db[i % db.len()].f);
    }
    qs.push(db[17].f.map(|v| -v));
    let mut x = 12345u32;
    for _ in 0..3 {
        let mut k = [0f32; 9];
        for v in k.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *v = x as f32 / u32::MAX as f32 - 0.5;
        }
        qs.push(k);
    }
    qs.push([0.5, -1.0, 0.0, 0.5, 1.0, -0.5, 0.0, 0.0, 1.0]);
    qs.push([0.0; 9]);
    qs
}

fn check(ctx: &str, got: &pb::NearestResponse, want: &[(u64, f64, bool)], db: &[Row]) {
    let g: Vec<(u64, u64, bool)> = got
        .neighbors
        .iter()
        .map(|n| (n.filter_id, n.distance.to_bits(), n.sign_flipped))
        .collect();
    let w: Vec<(u64, u64, bool)> = want
        .iter()
        .map(|(id, d, f)| (*id, d.to_bits(), *f))
        .collect();
    if g != w {
        let show = |v: &[(u64, u64, bool)]| {
            v.iter()
                .map(|(i, d, f)| format!("{i}:{}{}", f64::from_bits(*d), if *f { "-" } else { "" }))
                .collect::<Vec<_>>()
                .join(" ")
        };
        panic!("{ctx}\n got  {}\n want {}", show(&g), show(&w));
    }
    for n in &got.neighbors {
        let r = db
            .binary_search_by_key(&n.filter_id, |r| r.id)
            .map(|i| &db[i])
            .unwrap();
        assert_eq!(
            kernel_of(&n.kernel).map(f32::to_bits),
            r.f.map(f32::to_bits),
            "{ctx}: kernel of {}",
            n.filter_id
        );
        assert_eq!(
            (n.model_name.as_str(), n.layer_index),
            (r.model.as_str(), r.layer_index),
            "{ctx}: owner of {}",
            n.filter_id
        );
        let idx = n.filter_id - r.first_filter_id;
        assert_eq!(n.index_in_layer, idx);
        assert_eq!(
            (n.out_channel, n.in_channel),
            (
                (idx / u64::from(r.in_channels)) as u32,
                (idx % u64::from(r.in_channels)) as u32
            )
        );
    }
    let mut owners: Vec<u64> = got.neighbors.iter().map(|n| n.model_id).collect();
    owners.sort();
    owners.dedup();
    assert_eq!(
        got.models.iter().map(|m| m.model_id).collect::<Vec<_>>(),
        owners,
        "{ctx}: owning models"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_exact_equals_brute_force_in_every_space() {
    let dir = tempfile::tempdir().unwrap();
    let Setup { server, db } = setup(dir.path()).await;
    let mut s = search(&server).await;

    // The basis space needs a pinned basis.
    let e = s
        .nearest(pb::NearestRequest {
            query: Some(pb::nearest_request::Query::FilterId(0)),
            space: pb::SearchSpace::Basis as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    let basis = pin(&server).await;
    let Sp::Basis { mean, comps, .. } = &basis else {
        unreachable!()
    };
    let basis3 = Sp::Basis {
        mean: mean.clone(),
        comps: comps.clone(),
        m: 3,
    };
    let spaces = [Sp::Raw, Sp::Scaled, Sp::Cosine, basis.clone(), basis3];

    type Keep = Box<dyn Fn(&Row) -> bool>;
    let selections: Vec<(&str, Keep)> = vec![
        ("", Box::new(|_| true)),
        (
            "model in (onnx, rnd)",
            Box::new(|r| r.model == "onnx" || r.model == "rnd"),
        ),
        (
            "layer_index >= 1 and model != rnd",
            Box::new(|r| r.layer_index >= 1 && r.model != "rnd"),
        ),
        ("model = nothing_here", Box::new(|_| false)),
    ];
    let conds = [
        Cond::default(),
        Cond {
            exclude_zero: true,
            exclude_sparse: false,
        },
        Cond {
            exclude_zero: false,
            exclude_sparse: true,
        },
    ];
    let queries = query_kernels(&db);
    let ks = [1usize, 7, 50, 1000];
    let mut n_checked = 0;
    let mut n_flipped = 0;
    let mut n_ties = 0;
    for (si, sp) in spaces.iter().enumerate() {
        let (space, components) = sp.proto();
        for sign in [false, true] {
            for (expr, keep) in &selections {
                for (ci, cond) in conds.iter().enumerate() {
                    for (qi, q) in queries.iter().enumerate() {
                        // Keep the grid affordable: every query in the unselective case, a
                        // rotating subset otherwise.
                        if !(expr.is_empty() && ci == 0) && (qi + si + ci) % 3 != 0 {
                            continue;
                        }
                        let k = ks[(qi + ci + si) % ks.len()];
                        let req = pb::NearestRequest {
                            query: Some(pb::nearest_request::Query::Kernel(kernel_bytes(q))),
                            k: k as u32,
                            space: space as i32,
                            components,
                            sign_invariant: sign,
                            selection: (!expr.is_empty()).then(|| pb::Selection {
                                expr: expr.to_string(),
                                ..Default::default()
                            }),
                            conditions: Some(pb::FilterConditions {
                                exclude_zero: cond.exclude_zero,
                                exclude_sparse: cond.exclude_sparse,
                                ..Default::default()
                            }),
                            ..Default::default()
                        };
                        let got = s.nearest(req).await.unwrap().into_inner();
                        let want = brute(&db, q, sp, sign, k, keep.as_ref(), *cond, None);
                        let ctx = format!(
                            "space {sp:?} m={components} sign={sign} where `{expr}` cond {cond:?} query {qi} k={k}"
                        );
                        check(&ctx.chars().take(300).collect::<String>(), &got, &want, &db);
                        assert_eq!(got.mode, pb::SearchMode::Exact as i32);
                        assert_eq!(
                            (got.space, got.k, got.sign_invariant),
                            (space as i32, k as u32, sign)
                        );
                        assert_eq!(got.query_kernel, kernel_bytes(q));
                        n_checked += 1;
                        n_flipped += want.iter().filter(|w| w.2).count();
                        n_ties += want.windows(2).filter(|w| w[0].1 == w[1].1).count();
                    }
                }
            }
        }
    }
    assert!(n_checked > 150, "{n_checked} queries checked");
    assert!(n_flipped > 0, "sign invariance never flipped a match");
    assert!(n_ties > 100, "only {n_ties} exact ties exercised");

    // Filter-id queries: the stored kernel is the query; the twin in `legacy` ties at 0.
    let zip0 = db.iter().find(|r| r.model == "zip").unwrap().clone();
    for exclude in [false, true] {
        let got = s
            .nearest(pb::NearestRequest {
                query: Some(pb::nearest_request::Query::FilterId(zip0.id + 3)),
                k: 5,
                exclude_query_filter: exclude,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let q = db[db.binary_search_by_key(&(zip0.id + 3), |r| r.id).unwrap()].f;
        let want = brute(
            &db,
            &q,
            &Sp::Raw,
            false,
            5,
            &|_| true,
            Cond::default(),
            exclude.then_some(zip0.id + 3),
        );
        check(
            &format!("filter-id query exclude={exclude}"),
            &got,
            &want,
            &db,
        );
        assert_eq!(got.query_kernel, kernel_bytes(&q));
        assert_eq!(got.neighbors[0].distance, 0.0);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_batch_errors_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let Setup { server, db } = setup(dir.path()).await;
    let mut s = search(&server).await;

    // Batch: one answer per request, in order, equal to the single answers.
    let reqs: Vec<pb::NearestRequest> = query_kernels(&db)
        .iter()
        .enumerate()
        .map(|(i, q)| pb::NearestRequest {
            query: Some(pb::nearest_request::Query::Kernel(kernel_bytes(q))),
            k: 3 + i as u32,
            space: [
                pb::SearchSpace::Raw,
                pb::SearchSpace::Scaled,
                pb::SearchSpace::Cosine,
            ][i % 3] as i32,
            sign_invariant: i % 2 == 0,
            ..Default::default()
        })
        .collect();
    let mut stream = s
        .nearest_batch(tokio_stream::iter(reqs.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    while let Some(a) = stream.message().await.unwrap() {
        answers.push(a);
    }
    assert_eq!(answers.len(), reqs.len());
    for (i, (a, r)) in answers.iter().zip(&reqs).enumerate() {
        assert_eq!(a.query_index, i as u64);
        let single = s.nearest(r.clone()).await.unwrap().into_inner();
        assert_eq!(a.neighbors, single.neighbors, "batch answer {i}");
    }

    // A bad request ends the batch with its status, naming its position.
    let mut bad = reqs[..2].to_vec();
    bad.push(pb::NearestRequest {
        query: Some(pb::nearest_request::Query::Kernel(vec![0; 35])),
        ..Default::default()
    });
    let mut stream = s
        .nearest_batch(tokio_stream::iter(bad))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert!(stream.message().await.unwrap().is_some());
    let e = stream.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("query 2") && e.message().contains("36 bytes"),
        "{}",
        e.message()
    );

    // Invalid requests.
    let kernel = |v: [f32; 9]| Some(pb::nearest_request::Query::Kernel(kernel_bytes(&v)));
    let cases: Vec<(pb::NearestRequest, tonic::Code, &str)> = vec![
        (
            pb::NearestRequest {
                query: kernel([0.0; 9]),
                k: 1001,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "maximum of 1000",
        ),
        (
            pb::NearestRequest {
                query: kernel([0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "finite",
        ),
        (
            pb::NearestRequest {
                query: kernel([f32::INFINITY; 9]),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "finite",
        ),
        (
            pb::NearestRequest {
                query: None,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "kernel or a filter_id",
        ),
        (
            pb::NearestRequest {
                query: Some(pb::nearest_request::Query::FilterId(u64::MAX)),
                ..Default::default()
            },
            tonic::Code::NotFound,
            "not stored",
        ),
        (
            pb::NearestRequest {
                query: kernel([0.0; 9]),
                space: 99,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "space",
        ),
        (
            pb::NearestRequest {
                query: kernel([0.0; 9]),
                components: 3,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "components",
        ),
        (
            pb::NearestRequest {
                query: kernel([0.0; 9]),
                selection: Some(pb::Selection {
                    expr: "colour = red".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "colour",
        ),
        (
            pb::NearestRequest {
                query: kernel([0.0; 9]),
                conditions: Some(pb::FilterConditions {
                    exclude_sparse: true,
                    sparse_eps: 2.0,
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "sparse_eps",
        ),
    ];
    for (req, code, text) in cases {
        let e = s.nearest(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
        assert!(e.message().contains(text), "{req:?}: {}", e.message());
    }
    // k = 0 means 10; an approximate request is answered (and labelled) exact.
    let r = s
        .nearest(pb::NearestRequest {
            query: kernel([0.1; 9]),
            mode: pb::SearchMode::Approximate as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.k, r.neighbors.len(), r.mode),
        (10, 10, pb::SearchMode::Exact as i32)
    );
    assert_eq!(r.filters_scanned, db.len() as u64);

    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "filterdb.v1.Search".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

/// numpy's ranking (float64, `((X - q) ** 2).sum(1)`, stable argsort by distance then id)
/// equals the server's, up to distances numpy rounds differently (pairwise summation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_exact_equals_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let Setup { server, db } = setup(dir.path()).await;
    let mut s = search(&server).await;
    let tmp = tempfile::tempdir().unwrap();
    let vals: Vec<u8> = db
        .iter()
        .flat_map(|r| r.f.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    let ids: Vec<u8> = db.iter().flat_map(|r| r.id.to_le_bytes()).collect();
    let queries = query_kernels(&db);
    let qbytes: Vec<u8> = queries.iter().flat_map(kernel_bytes).collect();
    std::fs::write(tmp.path().join("x.f32"), vals).unwrap();
    std::fs::write(tmp.path().join("ids.u64"), ids).unwrap();
    std::fs::write(tmp.path().join("q.f32"), qbytes).unwrap();
    const K: usize = 25;
    let script = r#"
import json, sys, numpy as np
d = sys.argv[1]; k = int(sys.argv[2])
X = np.fromfile(d + "/x.f32", "<f4").reshape(-1, 9).astype(np.float64)
ids = np.fromfile(d + "/ids.u64", "<u8")
Q = np.fromfile(d + "/q.f32", "<f4").reshape(-1, 9).astype(np.float64)
out = {}
for space in ("raw", "cosine"):
    if space == "cosine":
        n = np.sqrt((X ** 2).sum(1)); Xs = X / np.where(n > 0, n, 1)[:, None]
        m = np.sqrt((Q ** 2).sum(1)); Qs = Q / np.where(m > 0, m, 1)[:, None]
    else:
        Xs, Qs = X, Q
    res = []
    for q in Qs:
        dist = ((Xs - q) ** 2).sum(1)
        order = np.lexsort((ids, dist))[:k]
        res.append([[int(ids[i]), float(dist[i])] for i in order])
    out[space] = res
print(json.dumps(out))
"#;
    let python = std::env::var("FILTERDB_PYTHON").unwrap_or_else(|_| {
        let venv = "/var/cache/filterdb/venv/bin/python";
        if std::path::Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    });
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(tmp.path())
        .arg(K.to_string())
        .output()
        .expect(
            "run python with numpy (set FILTERDB_PYTHON or run .ci/run, which creates the venv)",
        );
    assert!(
        out.status.success(),
        "numpy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let np: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (space, pspace) in [
        ("raw", pb::SearchSpace::Raw),
        ("cosine", pb::SearchSpace::Cosine),
    ] {
        for (qi, q) in queries.iter().enumerate() {
            let got = s
                .nearest(pb::NearestRequest {
                    query: Some(pb::nearest_request::Query::Kernel(kernel_bytes(q))),
                    k: K as u32,
                    space: pspace as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let want = np[space][qi].as_array().unwrap();
            assert_eq!(got.neighbors.len(), want.len());
            for (r, (n, w)) in got.neighbors.iter().zip(want).enumerate() {
                let (wid, wd) = (w[0].as_u64().unwrap(), w[1].as_f64().unwrap());
                let tol = 1e-12 * (1.0 + wd.abs());
                assert!(
                    (n.distance - wd).abs() <= tol,
                    "{space} query {qi} rank {r}: {} vs numpy {wd}",
                    n.distance
                );
                if n.filter_id != wid {
                    // Only a (near-)tie may order differently under numpy's rounding.
                    let other = got
                        .neighbors
                        .iter()
                        .find(|m| m.filter_id == wid)
                        .map(|m| m.distance);
                    let last = got.neighbors.last().map_or(f64::NAN, |m| m.distance);
                    assert!(
                        other.map_or((wd - last).abs() <= tol, |o| (o - n.distance).abs() <= tol),
                        "{space} query {qi} rank {r}: id {} vs numpy {wid}",
                        n.filter_id
                    );
                }
            }
        }
    }
    server.stop().await;
}

fn cli() -> std::path::PathBuf {
    crate::harness::binary("filterdb")
}

/// `filterdb nearest` prints 3x3 grids and, with --json, the brute-force answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_cli_nearest_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let Setup { server, db } = setup(dir.path()).await;
    let q = db[40].f;
    let text: Vec<String> = q.iter().map(|v| format!("{v:e}")).collect();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(cli())
            .arg("--server")
            .arg(&server.url)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let kernel = text.join(",");
    let json_out = run(&[
        "--json",
        "nearest",
        "--kernel",
        &kernel,
        "-k",
        "12",
        "--space",
        "cosine",
        "--where",
        "model != rnd",
        "--exact",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    let want = brute(
        &db,
        &q,
        &Sp::Cosine,
        false,
        12,
        &|r| r.model != "rnd",
        Cond::default(),
        None,
    );
    let got: Vec<(u64, f64)> = v["neighbors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["filter_id"].as_u64().unwrap(),
                n["distance"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>());
    assert_eq!(
        (v["mode"].as_str(), v["space"].as_str()),
        (Some("exact"), Some("cosine"))
    );

    let out = run(&[
        "nearest",
        "--filter-id",
        &db[40].id.to_string(),
        "-k",
        "3",
        "--sign-invariant",
    ]);
    assert!(out.contains("3 nearest to filter"), "{out}");
    assert!(out.contains("exact mode"), "{out}");
    // The query's own row shows its kernel as a 3x3 grid.
    let row0: String = q[..3]
        .iter()
        .map(|v| {
            if v.is_sign_negative() {
                format!("{v:.4}")
            } else {
                format!(" {v:.4}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        out.lines().any(
            |l| l.split_whitespace().collect::<Vec<_>>().join(" ").contains(
                row0.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .as_str()
            )
        ),
        "{out}"
    );

    // Bad input fails with the server's message.
    let out = std::process::Command::new(cli())
        .arg("--server")
        .arg(&server.url)
        .args(["nearest", "--kernel", "1,2,3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("9 comma-separated"));
    let out = std::process::Command::new(cli())
        .arg("--server")
        .arg(&server.url)
        .args(["nearest", "--kernel", &kernel, "-k", "5000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}
