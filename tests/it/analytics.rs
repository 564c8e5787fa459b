//! Analytics end to end: every answer equals a second computation — numpy's values written by
//! tests/fixtures/make_expected_quality.py, or a brute-force recomputation here from the raw
//! filters numpy wrote.

use filterdb_client::quality::{self, QualityLayer};
use filterdb_proto as pb;
use pb::analytics_client::AnalyticsClient;
use prost::Message;
use tonic::transport::Channel;

use crate::harness::*;

const FIXTURES: &[(&str, &str, &str, &str)] = &[
    ("zip", "tinynet_zip.pt", "imagenet", "Classification"),
    ("onnx", "tinynet_initializers.onnx", "mimic-cxr", "Segmentation"),
    ("f64", "tinynet_f64.safetensors", "celeba", "GAN-Generator"),
];

async fn analytics(server: &TestServer) -> AnalyticsClient<Channel> {
    AnalyticsClient::connect(server.url.clone()).await.unwrap().max_decoding_message_size(64 << 20)
}

async fn setup(dir: &std::path::Path) -> TestServer {
    let server = TestServer::start(dir).await;
    let mut c = server.client().await;
    for (name, file, dataset, task) in FIXTURES {
        ingest_fixture(&mut c, meta(name, dataset, task, "resnet"), file).await.unwrap();
    }
    server
}

fn json(name: &str) -> serde_json::Value {
    let p = repo().join("tests/fixtures/expected").join(name);
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol * (1.0 + want.abs()), "{what}: got {got}, numpy {want}");
}

fn scale(f: &[f32]) -> [f64; 9] {
    let m = f.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut out = [0f64; 9];
    for (o, v) in out.iter_mut().zip(f) {
        *o = f64::from(if m > 0.0 { v / m } else { *v });
    }
    out
}

fn project(b: &pb::FilterBasis, f: &[f32]) -> [f64; 9] {
    let s = scale(f);
    let mut c = [0f64; 9];
    for (i, ci) in c.iter_mut().enumerate() {
        *ci = (0..9).map(|k| b.components[9 * i + k] * (s[k] - b.mean[k])).sum();
    }
    c
}

/// numpy.histogram bin of x over [lo, hi] with `bins` equal bins, last bin right-inclusive.
fn bin(x: f64, lo: f64, hi: f64, bins: usize) -> Option<usize> {
    if !(lo..=hi).contains(&x) {
        return None;
    }
    Some((((x - lo) / (hi - lo) * bins as f64) as usize).min(bins - 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basis_and_layer_quality_equal_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let mut a = analytics(&server).await;

    let g = json("global.quality.json");
    let want = &g["basis"];
    let got = a.basis(pb::BasisRequest::default()).await.unwrap().into_inner().basis.unwrap();
    assert_eq!(got.n, want["n"].as_u64().unwrap());
    for (i, (x, y)) in got.mean.iter().zip(f64s(&want["mean"])).enumerate() {
        close(&format!("mean[{i}]"), *x, y, 1e-12);
    }
    let comps: Vec<f64> = want["components"].as_array().unwrap().iter().flat_map(f64s).collect();
    for (i, (x, y)) in got.components.iter().zip(&comps).enumerate() {
        close(&format!("component value {i}"), *x, *y, 1e-9);
    }
    for (i, (x, y)) in got.evr.iter().zip(f64s(&want["evr"])).enumerate() {
        close(&format!("evr[{i}]"), *x, y, 1e-12);
    }

    // Per layer: S, H, H/TH, H_clean, O (paper / torchconvquality defaults), and the
    // robustness-paper variant (scaled filters, non-strict sparsity, sparse removed).
    for (name, file, _, _) in FIXTURES {
        let q = json(&format!("{file}.quality.json"));
        let originals: Vec<&serde_json::Value> =
            q["layers"].as_array().unwrap().iter().filter(|l| l["variant"] == "original").collect();
        let sel = Some(pb::Selection { expr: format!("model = {name}"), ..Default::default() });
        let answer = a
            .layer_quality(pb::LayerQualityRequest { selection: sel.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let rows = quality::layers(&answer).unwrap();
        assert_eq!(rows.len(), originals.len(), "{file}");
        for (r, w) in rows.iter().zip(&originals) {
            let ctx = format!("{file} {}", r.tensor_name);
            assert_eq!(r.tensor_name, w["tensor_name"].as_str().unwrap());
            let sparse = w["sparse"].as_array().unwrap().iter().find(|s| s["eps"].as_f64() == Some(0.01)).unwrap();
            close(&format!("{ctx} S"), r.sparsity, sparse["strict"].as_f64().unwrap() / r.n as f64, 0.0);
            close(&format!("{ctx} H"), r.entropy, w["H"].as_f64().unwrap(), 1e-9);
            close(&format!("{ctx} H/TH"), r.entropy_norm, w["H_norm"].as_f64().unwrap(), 1e-9);
            close(&format!("{ctx} H_clean"), r.entropy_clean, w["H_clean"].as_f64().unwrap(), 1e-9);
            close(&format!("{ctx} O"), r.orthogonality, w["orthogonality"].as_f64().unwrap(), 1e-9);
        }
        let robust = a
            .layer_quality(pb::LayerQualityRequest {
                selection: sel,
                options: Some(pb::QualityOptions { non_strict: true, scaled: true, ..Default::default() }),
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for (r, w) in quality::layers(&robust).unwrap().iter().zip(&originals) {
            let ctx = format!("{file} {} (robustness variant)", r.tensor_name);
            close(&format!("{ctx} H scaled"), r.entropy, w["H_scaled"].as_f64().unwrap(), 1e-9);
            close(&format!("{ctx} H clean"), r.entropy_clean, w["H_robust"].as_f64().unwrap(), 1e-9);
        }
    }
    // An eps without stored counts is refused, naming the stored ones.
    let e = a
        .layer_quality(pb::LayerQualityRequest {
            options: Some(pb::QualityOptions { eps: 0.03, ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("0.03"), "{}", e.message());
    server.stop().await;
}

/// Brute force: every fixture's filters projected with the pinned basis, 70-bin histograms.
/// (task, 9 histograms, filters) per fixture.
type TaskHistograms = Vec<(String, Vec<Vec<u64>>, u64)>;

fn brute_histograms(b: &pb::PinnedBasis) -> (f64, f64, TaskHistograms) {
    let basis = b.basis.as_ref().unwrap();
    let mut coefs = Vec::new();
    for (_, file, _, task) in FIXTURES {
        let (_, vals) = expected(file);
        let cs: Vec<[f64; 9]> = vals.chunks_exact(9).map(|f| project(basis, f)).collect();
        coefs.push((task.to_string(), cs));
    }
    let lo = coefs.iter().flat_map(|(_, c)| c.iter().flatten()).copied().fold(f64::INFINITY, f64::min);
    let hi = coefs.iter().flat_map(|(_, c)| c.iter().flatten()).copied().fold(f64::NEG_INFINITY, f64::max);
    let bins = b.bins as usize;
    let hists = coefs
        .iter()
        .map(|(task, cs)| {
            let mut h = vec![vec![0u64; bins]; 9];
            for c in cs {
                for (hi_, ci) in h.iter_mut().zip(c) {
                    hi_[bin(*ci, lo, hi, bins).unwrap()] += 1;
                }
            }
            (task.clone(), h, cs.len() as u64)
        })
        .collect();
    (lo, hi, hists)
}

fn prob(counts: &[u64], width: f64) -> Vec<f64> {
    let n: u64 = counts.iter().sum();
    let d: Vec<f64> = counts
        .iter()
        .map(|c| if *c == 0 { f64::from(f32::EPSILON) } else { *c as f64 / (n as f64 * width) })
        .collect();
    let s: f64 = d.iter().sum();
    d.iter().map(|x| x / s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_basis_distributions_drift_and_density_equal_brute_force_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let mut a = analytics(&server).await;
    let e = a.distributions(pb::DistributionsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    let mut s = a.pin_basis(pb::PinBasisRequest::default()).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = s.message().await.unwrap() {
        last = Some(p);
    }
    let last = last.unwrap();
    assert_eq!((last.version, last.phase.as_str()), (1, "done"));
    let pinned = a.get_pinned_basis(pb::GetPinnedBasisRequest {}).await.unwrap().into_inner();
    assert_eq!(pinned.bins, 70);
    let (lo, hi, brute) = brute_histograms(&pinned);
    close("range min", pinned.range_min, lo, 1e-12);
    close("range max", pinned.range_max, hi, 1e-12);

    let by_task = Some(pb::GroupSpec { field: pb::Field::Task as i32, selections: vec![] });
    let d = a.distributions(pb::DistributionsRequest { selection: None, group: by_task.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(d.basis_version, 1);
    let mut brute_sorted = brute.clone();
    brute_sorted.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(d.groups.iter().map(|g| g.key.clone()).collect::<Vec<_>>(), brute_sorted.iter().map(|b| b.0.clone()).collect::<Vec<_>>());
    for (g, (task, h, n)) in d.groups.iter().zip(&brute_sorted) {
        assert_eq!(g.n_filters, *n, "{task}");
        for (i, (comp, hi)) in g.components.iter().zip(h).enumerate() {
            assert_eq!(&comp.counts, hi, "{task} component {i}");
            assert_eq!(comp.out_of_range, 0);
        }
    }

    // The same binning computed by a scan equals the stored per-layer histograms; another
    // binning is a scan too.
    let scanned = a
        .distributions(pb::DistributionsRequest {
            selection: None,
            group: by_task.clone(),
            bins: 70,
            range_min: Some(pinned.range_min),
            range_max: Some(pinned.range_max),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scanned.groups, d.groups);
    let coarse = a
        .distributions(pb::DistributionsRequest { selection: None, group: by_task.clone(), bins: 7, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(coarse.bins, 7);
    for (g, fine) in coarse.groups.iter().zip(&d.groups) {
        // 70 bins fold exactly into 7 (same range, edges every 10 bins) up to float edge rounding.
        let folded: Vec<u64> = fine.components[0].counts.chunks(10).map(|c| c.iter().sum()).collect();
        let diff: i64 = g.components[0].counts.iter().zip(&folded).map(|(a, b)| (*a as i64 - *b as i64).abs()).sum();
        assert!(diff <= 2, "{}: {:?} vs {:?}", g.key, g.components[0].counts, folded);
    }

    // Drift: D = Σ evr_i (KL(p‖q) + KL(q‖p)), recomputed here from the brute-force histograms.
    let m = a
        .drift_matrix(pb::DriftMatrixRequest { group: by_task.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let evr = &pinned.basis.as_ref().unwrap().evr;
    let width = (hi - lo) / 70.0;
    let g = brute_sorted.len();
    assert_eq!(m.keys.len(), g);
    for r in 0..g {
        for c in 0..g {
            let mut want = 0.0;
            for (i, w) in evr.iter().enumerate() {
                let p = prob(&brute_sorted[r].1[i], width);
                let q = prob(&brute_sorted[c].1[i], width);
                let s: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln() + q * (q / p).ln()).sum();
                want += w * s;
            }
            close(&format!("D[{r}][{c}]"), m.d[r * g + c], want, 1e-9);
        }
    }
    assert_eq!(m.upper_triangle_summary.len(), 6);
    let sorted = a
        .drift_matrix(pb::DriftMatrixRequest { group: by_task.clone(), sort_by_mean: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let col_mean = |m: &pb::DriftMatrixResponse, j: usize| (0..g).map(|r| m.d[r * g + j]).sum::<f64>() / g as f64;
    assert!((1..g).all(|j| col_mean(&sorted, j - 1) <= col_mean(&sorted, j)), "sorted by column mean");

    // 2-D density of components 0 and 1 over [-3.3, 3.3]², normalised by its max.
    let dens = a.density2_d(pb::Density2DRequest { selection: None, i: 0, j: 1 }).await.unwrap().into_inner();
    let mut grid = vec![0u64; 512 * 512];
    let mut n = 0;
    for (_, file, _, _) in FIXTURES {
        let (_, vals) = expected(file);
        for f in vals.chunks_exact(9) {
            let c = project(pinned.basis.as_ref().unwrap(), f);
            n += 1;
            if let (Some(x), Some(y)) = (bin(c[0], -3.3, 3.3, 512), bin(c[1], -3.3, 3.3, 512)) {
                grid[x * 512 + y] += 1;
            }
        }
    }
    let max = *grid.iter().max().unwrap() as f64;
    assert_eq!(dens.n_filters, n);
    let want: Vec<f32> = grid.iter().map(|x| (*x as f64 / max) as f32).collect();
    assert_bits_eq("density", &dens.density, &want);

    // A model ingested after pinning gets histograms in the same basis; deleting it removes them.
    let mut c = server.client().await;
    ingest_fixture(&mut c, meta("legacy", "imagenet", "Classification", "resnet"), "tinynet_legacy.pt").await.unwrap();
    let d2 = a.distributions(pb::DistributionsRequest { selection: None, group: by_task.clone(), ..Default::default() }).await.unwrap().into_inner();
    let cls = |d: &pb::DistributionsResponse| d.groups.iter().find(|g| g.key == "Classification").unwrap().clone();
    // tinynet_legacy.pt holds the same weights as tinynet_zip.pt: every count doubles.
    for i in 0..9 {
        let doubled: Vec<u64> = cls(&d).components[i].counts.iter().map(|x| 2 * x).collect();
        assert_eq!(cls(&d2).components[i].counts, doubled, "component {i}");
    }
    c.delete_model(pb::DeleteModelRequest { model: Some(by_name("legacy")) }).await.unwrap();
    let d3 = a.distributions(pb::DistributionsRequest { selection: None, group: by_task.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(cls(&d3).components, cls(&d).components);
    drop((a, c));
    server.stop().await;

    // After a restart the pinned basis and every histogram are still there.
    let server = TestServer::start(dir.path()).await;
    let mut a = analytics(&server).await;
    let p2 = a.get_pinned_basis(pb::GetPinnedBasisRequest {}).await.unwrap().into_inner();
    assert_eq!(p2, pinned);
    let d4 = a.distributions(pb::DistributionsRequest { selection: None, group: by_task, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(d4, d);
    // Re-pinning makes version 2.
    let mut s = a.pin_basis(pb::PinBasisRequest { selection: Some(pb::Selection { expr: "task = Classification".into(), ..Default::default() }), bins: 30 }).await.unwrap().into_inner();
    let mut last = None;
    while let Some(p) = s.message().await.unwrap() {
        last = Some(p);
    }
    assert_eq!(last.unwrap().version, 2);
    let p3 = a.get_pinned_basis(pb::GetPinnedBasisRequest {}).await.unwrap().into_inner();
    assert_eq!((p3.version, p3.bins, p3.selection_expr.as_str()), (2, 30, "task = Classification"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranking_profile_and_compare_bases_are_consistent_with_layer_quality() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let mut a = analytics(&server).await;
    let answer = a.layer_quality(pb::LayerQualityRequest::default()).await.unwrap().into_inner();
    let rows = quality::layers(&answer).unwrap();
    // The second call is answered from the per-layer memo: an identical answer, bit for bit.
    let again = a.layer_quality(pb::LayerQualityRequest::default()).await.unwrap().into_inner();
    assert!(again.encode_to_vec() == answer.encode_to_vec(), "the memoised answer differs");
    // Each model and each distinct tensor name is sent once.
    let ids: std::collections::BTreeSet<u64> = rows.iter().map(|r| r.model_id).collect();
    let names: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.tensor_name).collect();
    assert_eq!(answer.models.len(), 3);
    assert_eq!(answer.models.iter().map(|m| m.model_id).collect::<std::collections::BTreeSet<_>>(), ids);
    assert_eq!(answer.tensor_names.len(), names.len());
    assert!(names.len() < rows.len(), "the fixtures share tensor names: {names:?}");
    let ranking = a.degeneration_ranking(pb::DegenerationRankingRequest::default()).await.unwrap().into_inner().models;
    assert_eq!(ranking.len(), 3);
    for m in &ranking {
        let mine: Vec<&QualityLayer> = rows.iter().filter(|r| r.model == m.model).collect();
        let flagged = mine.iter().filter(|r| r.degenerate).count() as u32;
        assert_eq!((m.layers as usize, m.degenerate_layers), (mine.len(), flagged), "{}", m.model);
        let n: f64 = mine.iter().map(|r| r.n as f64).sum();
        let s: f64 = mine.iter().map(|r| r.sparsity * r.n as f64).sum();
        close("mean sparsity", m.mean_sparsity, s / n, 1e-12);
    }
    assert!(ranking.windows(2).all(|w| w[0].degenerate_share >= w[1].degenerate_share));

    let p = a
        .depth_profile(pb::DepthProfileRequest { metric: pb::QualityMetric::Entropy as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // Each cell is the filter-weighted mean H of its layers.
    for cell in &p.cells {
        let mine: Vec<&QualityLayer> = rows
            .iter()
            .filter(|r| {
                r.model == cell.model && {
                    let x = r.conv_depth_norm;
                    let label = if x <= 0.1 { "[0.0, 0.1]".to_string() } else {
                        let i = (1..=10).find(|i| x <= *i as f64 * 0.1).unwrap_or(10);
                        format!("({:.1}, {:.1}]", (i - 1) as f64 / 10.0, i as f64 / 10.0)
                    };
                    label == cell.bin
                }
            })
            .collect();
        let n: f64 = mine.iter().map(|r| r.n as f64).sum();
        let h: f64 = mine.iter().map(|r| r.entropy * r.n as f64).sum();
        close(&format!("{} {}", cell.model, cell.bin), cell.value, h / n, 1e-12);
        assert_eq!(cell.layers as usize, mine.len());
    }

    // CompareBases of a selection with itself: |cos| = 1 on the diagonal, angles 0.
    let sel = Some(pb::Selection { expr: "task = Classification".into(), ..Default::default() });
    let c = a.compare_bases(pb::CompareBasesRequest { a: sel.clone(), b: sel, raw: false }).await.unwrap().into_inner();
    for i in 0..9 {
        close("self |cos|", c.abs_cos[i * 9 + i], 1.0, 1e-9);
    }
    assert!(c.principal_angles_deg.iter().all(|x| x.abs() < 1e-4), "{:?}", c.principal_angles_deg);
    // Against numpy's comparison of the global basis (a) with one fixture's basis (b).
    let g = json("global.quality.json");
    let sub = g["sub_basis_fixture"].as_str().unwrap();
    let (name, _, _, _) = FIXTURES.iter().find(|f| f.1 == sub).unwrap();
    let c = a
        .compare_bases(pb::CompareBasesRequest {
            a: None,
            b: Some(pb::Selection { expr: format!("model = {name}"), ..Default::default() }),
            raw: false,
        })
        .await
        .unwrap()
        .into_inner();
    let want: Vec<f64> = g["comparison"]["abs_cos"].as_array().unwrap().iter().flat_map(f64s).collect();
    for (i, (x, y)) in c.abs_cos.iter().zip(&want).enumerate() {
        close(&format!("abs_cos[{i}]"), *x, *y, 1e-8);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_checkpoint_finds_its_twin_and_matches_layer_quality() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let mut a = analytics(&server).await;
    let mut s = a.pin_basis(pb::PinBasisRequest::default()).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}

    // tinynet_legacy.pt holds exactly the weights of the stored `zip` model (Classification):
    // its distribution equals that group's, so D to Classification is 0 and ranks first.
    let bytes = std::fs::read(fixture("tinynet_legacy.pt")).unwrap();
    let header = pb::ProfileCheckpointHeader { file_name: "tinynet_legacy.pt".into(), ..Default::default() };
    let mut msgs = vec![pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Header(header.clone())) }];
    msgs.push(pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Chunk(bytes.clone())) });
    let p = a.profile_checkpoint(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    let d_of = |k: &str| p.drift.iter().find(|g| g.key == k).unwrap().d;
    assert_eq!(d_of("Classification"), 0.0);
    // The ONNX model (Segmentation) has an extra layer, so its distribution differs.
    assert!(d_of("Segmentation") > 0.0);
    assert!(p.drift.windows(2).all(|w| w[0].d <= w[1].d), "most similar first");
    assert_eq!(p.drift[0].d, 0.0);
    assert!(p.stored.is_none());
    let stored = a
        .layer_quality(pb::LayerQualityRequest {
            selection: Some(pb::Selection { expr: "model = zip".into(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let stored_rows = quality::layers(&stored).unwrap();
    assert_eq!(p.layers.len(), stored_rows.len());
    for (x, y) in p.layers.iter().zip(&stored_rows) {
        assert_eq!((x.tensor_name.as_str(), x.n), (y.tensor_name, y.n));
        assert_eq!(x.sparsity, y.sparsity);
        assert_eq!(x.entropy.to_bits(), y.entropy.to_bits());
        assert_eq!(x.orthogonality.to_bits(), y.orthogonality.to_bits());
    }
    let mut c = server.client().await;
    assert_eq!(totals(&mut c).await.0, 3, "profiling alone stores nothing");

    // With store = true it is ingested too.
    let header = pb::ProfileCheckpointHeader {
        meta: Some(meta("profiled", "imagenet", "Classification", "resnet")),
        store: true,
        ..header
    };
    let msgs = vec![
        pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Header(header)) },
        pb::ProfileCheckpointRequest { part: Some(pb::profile_checkpoint_request::Part::Chunk(bytes)) },
    ];
    let p = a.profile_checkpoint(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    assert_eq!(p.stored.unwrap().outcome, pb::IngestOutcome::Created as i32);
    assert_eq!(totals(&mut c).await.0, 4);
    server.stop().await;
}

/// Runs the `filterdb` CLI against a server: success, stdout, stderr.
async fn filterdb_cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(binary("filterdb"));
    cmd.arg("--server").arg(url).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run filterdb")).await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_and_degenerate_cli_name_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let server = setup(dir.path()).await;
    let mut a = analytics(&server).await;
    let answer = a.layer_quality(pb::LayerQualityRequest::default()).await.unwrap().into_inner();
    let rows = quality::layers(&answer).unwrap();
    let names = ["zip", "onnx", "f64"];

    // The table: a model column with each model's name (the answer sends each name once).
    let (ok, out, err) = filterdb_cli(&server.url, &["quality", "--where", "layer_id >= 0"]).await;
    assert!(ok, "{out}\n{err}");
    let cells = |name: &str| out.lines().filter(|l| l.contains(&format!(" {name} "))).count();
    for name in names {
        let want = rows.iter().filter(|r| r.model == name).count();
        assert!(want > 0 && cells(name) == want, "{name}: {} table lines, {want} layers:\n{out}", cells(name));
    }
    assert!(out.contains(&format!("of {} layers degenerate", rows.len())), "{out}");

    // JSON: one object per layer, with its model's id and name and its tensor name.
    let (ok, out, err) = filterdb_cli(&server.url, &["--json", "quality", "--where", "layer_id >= 0"]).await;
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), rows.len());
    for (j, r) in layers.iter().zip(&rows) {
        assert_eq!(j["layer_id"].as_u64(), Some(r.layer_id));
        assert_eq!((j["model_id"].as_u64(), j["model"].as_str()), (Some(r.model_id), Some(r.model)));
        assert_eq!(j["tensor_name"].as_str(), Some(r.tensor_name));
        assert_eq!(j["n"].as_u64(), Some(r.n));
    }

    // The ranking names every model.
    let (ok, out, err) = filterdb_cli(&server.url, &["degenerate"]).await;
    assert!(ok, "{out}\n{err}");
    for name in names {
        assert!(out.lines().any(|l| l.contains(&format!(" {name} "))), "{name} missing:\n{out}");
    }
    server.stop().await;
}
