//! Ingest real fixtures and read them back bit-exact; lifecycle of a model over a real server.

use filterdb_proto as pb;

use crate::harness::*;

const GOOD: &[&str] = &[
    "tinynet_initializers.onnx",
    "tinynet_constants.onnx",
    "tinynet_f16.onnx",
    "tinynet_f16_typed.onnx",
    "tinynet_bf16.onnx",
    "tinynet_f64.onnx",
    "tinynet_zip.pt",
    "tinynet_legacy.pt",
    "tinynet_nested_state_dict.pth",
    "tinynet_nested_model.pth",
    "tinynet_dataparallel.pth",
    "tinynet.safetensors",
    "tinynet_f16.safetensors",
    "tinynet_bf16.safetensors",
    "tinynet_f64.safetensors",
    "natural_order.safetensors",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_round_trips_bit_exact_with_expected_layers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    for (i, file) in GOOD.iter().enumerate() {
        let name = format!("m{i}_{}", file.replace('.', "_"));
        let r = ingest_fixture(&mut c, meta(&name, "imagenet", "Classification", "tinynet"), file)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(r.outcome, pb::IngestOutcome::Created as i32, "{file}");
        let (want, values) = expected(file);
        let model = r.model.unwrap();
        assert_eq!(model.n_filters, want.n_filters, "{file}: n_filters");
        let counts: std::collections::BTreeMap<String, u64> = model.kernel_shape_counts.clone().into_iter().collect();
        assert_eq!(counts, want.kernel_shape_counts, "{file}: kernel shape counts");
        let expect_format = match want.format.as_str() {
            "onnx" => pb::Format::Onnx,
            "pytorch" => pb::Format::Pytorch,
            _ => pb::Format::Safetensors,
        };
        assert_eq!(model.format, expect_format as i32, "{file}: format");

        let layers = c
            .list_layers(pb::ListLayersRequest { model: Some(by_name(&name)), selection: None })
            .await
            .unwrap()
            .into_inner()
            .layers;
        assert_eq!(layers.len(), want.layers.len(), "{file}: layer count");
        for (got, w) in layers.iter().zip(&want.layers) {
            let ctx = format!("{file} layer {}", w.layer_index);
            assert_eq!(got.tensor_name, w.tensor_name, "{ctx}");
            assert_eq!((got.out_channels, got.in_channels), (w.out_channels, w.in_channels), "{ctx}");
            assert_eq!(got.layer_index, w.layer_index, "{ctx}");
            assert_eq!(got.conv_depth, w.conv_depth, "{ctx}: conv_depth");
            assert!((got.conv_depth_norm - w.conv_depth_norm).abs() < 1e-12, "{ctx}: conv_depth_norm");
            assert_eq!(got.n_filters, w.n_filters, "{ctx}");
            // Filter ids of a layer are consecutive and the layer's slice of the expected values.
            let start = w.offset as usize;
            let (ids, vals) = get_filters(
                &mut c,
                pb::GetFiltersRequest {
                    target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
                        model: Some(by_name(&name)),
                        layer_index: Some(w.layer_index),
                        out_channel: None,
                    })),
                    batch_size: 0,
                },
            )
            .await
            .unwrap();
            assert_eq!(ids.first().copied(), Some(got.first_filter_id), "{ctx}");
            assert_bits_eq(&ctx, &vals, &values[start..start + w.n_filters as usize * 9]);
            // Layer statistics agree with a brute-force recomputation from the expected values.
            let s = got.stats.as_ref().unwrap();
            assert_eq!(s.n, w.n_filters);
            let slice = &values[start..start + w.n_filters as usize * 9];
            let sum0: f64 = slice.chunks_exact(9).map(|f| f64::from(f[0])).sum();
            assert!((s.sum[0] - sum0).abs() < 1e-9, "{ctx}: Σf[0]");
            let absmax = slice.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
            assert_eq!(s.abs_max, absmax, "{ctx}: abs max");
        }
        // All filters of the model, in small odd batches, equal the expected file.
        assert_bits_eq(file, &model_filters(&mut c, &name).await, &values);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_network_in_three_formats_gives_identical_filters() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let mut per_format = Vec::new();
    for file in ["tinynet_zip.pt", "tinynet.safetensors", "tinynet_initializers.onnx"] {
        let name = file.replace('.', "_");
        ingest_fixture(&mut c, meta(&name, "cifar10", "Classification", "tinynet"), file).await.unwrap();
        let layers = c
            .list_layers(pb::ListLayersRequest { model: Some(by_name(&name)), selection: None })
            .await
            .unwrap()
            .into_inner()
            .layers;
        let mut filters = Vec::new();
        let mut names = Vec::new();
        for l in &layers {
            names.push(l.tensor_name.clone());
            let (_, v) = get_filters(
                &mut c,
                pb::GetFiltersRequest {
                    target: Some(pb::get_filters_request::Target::Ids(pb::FilterIdRange {
                        start: l.first_filter_id,
                        end: l.first_filter_id + l.n_filters,
                    })),
                    batch_size: 0,
                },
            )
            .await
            .unwrap();
            filters.push(v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
        }
        per_format.push((names, filters));
    }
    let (pt, st, onnx) = (&per_format[0], &per_format[1], &per_format[2].1);
    // safetensors stores tensors sorted by name, so compare layers by tensor name.
    let by_name = |(n, f): &(Vec<String>, Vec<Vec<u32>>)| -> std::collections::BTreeMap<String, Vec<u32>> {
        n.iter().cloned().zip(f.iter().cloned()).collect()
    };
    assert_eq!(by_name(pt), by_name(st), "torch.save and safetensors hold the same layers");
    let pt = &pt.1;
    // The ONNX graph has one extra parallel 3x3 conv; every state-dict layer is in it, in order.
    let mut it = onnx.iter();
    for layer in pt {
        assert!(it.any(|o| o == layer), "a .pt layer is missing from the ONNX model");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_idempotence_conflicts_census_update_delete_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let a = ingest_fixture(&mut c, meta("a", "ILSVRC2012", "classification", "ResNet-18"), "tinynet_zip.pt").await.unwrap();
    let b = ingest_fixture(&mut c, meta("b", "cifar-10", "Semantic Segmentation", "UNet"), "tinynet.safetensors")
        .await
        .unwrap();
    let ma = a.model.clone().unwrap();
    let meta_a = ma.meta.clone().unwrap();
    assert_eq!(meta_a.training_datasets[0].canonical, "imagenet");
    assert_eq!(meta_a.training_datasets[0].raw, "ILSVRC2012");
    assert_eq!(meta_a.task.as_ref().unwrap().canonical, "Classification");
    assert_eq!(meta_a.architecture.as_ref().unwrap().canonical, "ResNet");
    assert_eq!(meta_a.visual_category.as_ref().unwrap().canonical, "natural");
    // Ids are dense: b follows a.
    let mb = b.model.clone().unwrap();
    assert_eq!(mb.model_id, ma.model_id + 1);
    assert_eq!(mb.first_filter_id, ma.first_filter_id + ma.n_filters);
    assert_eq!(mb.first_layer_id, ma.first_layer_id + u64::from(ma.n_layers));

    // Same bytes, same name: no-op, OK, UNCHANGED, same id.
    let again = ingest_fixture(&mut c, meta("a", "imagenet", "Classification", "resnet18"), "tinynet_zip.pt").await.unwrap();
    assert_eq!(again.outcome, pb::IngestOutcome::Unchanged as i32);
    assert_eq!(again.model.unwrap().model_id, ma.model_id);
    // Same bytes under another name, and another file under a taken name: ALREADY_EXISTS.
    let e = ingest_fixture(&mut c, meta("a2", "imagenet", "Classification", "resnet"), "tinynet_zip.pt").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("already stored as model `a`"), "{}", e.message());
    let e = ingest_fixture(&mut c, meta("a", "imagenet", "Classification", "resnet"), "tinynet_legacy.pt").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert_eq!(totals(&mut c).await, (2, 8, 448));

    // Census grouped by task, with a --where selection in text form.
    let r = c
        .census(pb::CensusRequest {
            selection: Some(pb::Selection { expr: "dataset in (imagenet, cifar10) and conv_depth >= 3".into(), ..Default::default() }),
            group_by: vec![pb::Field::Task as i32],
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<(Vec<String>, u64, u64, u64)> = r.groups.iter().map(|g| (g.key.clone(), g.models, g.layers, g.filters)).collect();
    // Layers at conv_depth >= 3 in tinynet: conv2 (128 filters) and conv3 (64 filters).
    assert_eq!(
        keys,
        // (safetensors has no module order: its layers follow natural name order, so only dw,
        // 8 filters, sits at conv_depth >= 3 there)
        vec![(vec!["Classification".into()], 1, 2, 192), (vec!["Segmentation".into()], 1, 1, 8)]
    );
    // A structured predicate: NOT task = Segmentation.
    let not_seg = pb::Predicate {
        kind: Some(pb::predicate::Kind::Not(Box::new(pb::Predicate {
            kind: Some(pb::predicate::Kind::Match(pb::FieldMatch { field: pb::Field::Task as i32, values: vec!["segmentation".into()] })),
        }))),
    };
    let r = c
        .census(pb::CensusRequest { selection: Some(pb::Selection { predicate: Some(not_seg), expr: String::new() }), group_by: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total.unwrap().models, 1);
    // A bad expression is INVALID_ARGUMENT naming the problem.
    let e = c
        .census(pb::CensusRequest { selection: Some(pb::Selection { expr: "colour = red".into(), ..Default::default() }), group_by: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("unknown field `colour`"), "{}", e.message());

    // One output channel = the in_channels filters of its 3D kernel.
    let (ids, _) = get_filters(
        &mut c,
        pb::GetFiltersRequest {
            target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters {
                model: Some(by_name("a")),
                layer_index: Some(2),
                out_channel: Some(5),
            })),
            batch_size: 0,
        },
    )
    .await
    .unwrap();
    let conv2_first = ma.first_filter_id + 24 + 8;
    assert_eq!(ids, (conv2_first + 5 * 8..conv2_first + 6 * 8).collect::<Vec<_>>());
    // An id range spanning both models returns every filter in between, in order.
    let (ids, _) = get_filters(
        &mut c,
        pb::GetFiltersRequest {
            target: Some(pb::get_filters_request::Target::Ids(pb::FilterIdRange { start: 200, end: 260 })),
            batch_size: 16,
        },
    )
    .await
    .unwrap();
    assert_eq!(ids, (200..260).collect::<Vec<_>>());
    let e = c.get_model(pb::GetModelRequest { model: Some(by_name("nope")) }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Relabel: raw kept, canonical recomputed; census follows.
    let m = c
        .update_model_meta(pb::UpdateModelMetaRequest {
            model: Some(by_name("b")),
            update: Some(pb::MetaUpdate { task: Some("Classification".into()), ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.meta.unwrap().task.unwrap().canonical, "Classification");

    // Replace a's bytes under its name: new ids, old ones gone.
    let bytes = std::fs::read(fixture("tinynet_legacy.pt")).unwrap();
    let r = ingest_bytes(&mut c, meta("a", "imagenet", "Classification", "resnet"), "tinynet_legacy.pt", bytes, pb::NameConflict::Replace)
        .await
        .unwrap();
    assert_eq!(r.outcome, pb::IngestOutcome::Replaced as i32);
    let a2 = r.model.unwrap();
    assert!(a2.model_id > mb.model_id);
    assert_eq!(totals(&mut c).await, (2, 8, 448));

    // Delete b; it is gone from census, listing and filters.
    c.delete_model(pb::DeleteModelRequest { model: Some(by_name("b")) }).await.unwrap();
    assert_eq!(totals(&mut c).await, (1, 4, 224));
    let e = c
        .get_filters(pb::GetFiltersRequest {
            target: Some(pb::get_filters_request::Target::Model(pb::ModelFilters { model: Some(by_name("b")), ..Default::default() })),
            batch_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let before = model_filters(&mut c, "a").await;
    drop(c);
    server.stop().await;

    // Restart on the same directory: everything acknowledged is there, bit-exact.
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    assert_eq!(totals(&mut c).await, (1, 4, 224));
    let listed = c.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].model_id, a2.model_id);
    let (_, want) = expected("tinynet_legacy.pt");
    let after = model_filters(&mut c, "a").await;
    assert_bits_eq("after restart", &after, &before);
    assert_bits_eq("after restart vs numpy", &after, &want);
    // New ids continue after the highest ever allocated (ids are never reused).
    let r = ingest_fixture(&mut c, meta("c", "mnist", "Classification", "LeNet"), "tinynet_f64.safetensors").await.unwrap();
    assert_eq!(r.model.unwrap().model_id, a2.model_id + 1);
    assert_eq!(
        c.get_model(pb::GetModelRequest { model: Some(by_name("c")) }).await.unwrap().into_inner().meta.unwrap().visual_category.unwrap().canonical,
        "handwriting"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_pages_in_stable_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut c = server.client().await;
    let files = ["tinynet_zip.pt", "tinynet.safetensors", "tinynet_f16.safetensors", "tinynet_bf16.safetensors", "tinynet_f64.safetensors"];
    for (i, f) in files.iter().enumerate() {
        ingest_fixture(&mut c, meta(&format!("p{i}"), "imagenet", if i % 2 == 0 { "Classification" } else { "Segmentation" }, "resnet"), f)
            .await
            .unwrap();
    }
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let r = c
            .list_models(pb::ListModelsRequest { page_size: 2, page_token: token.clone(), selection: None })
            .await
            .unwrap()
            .into_inner();
        seen.extend(r.models.iter().map(|m| m.name.clone()));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen, vec!["p0", "p1", "p2", "p3", "p4"]);
    let r = c
        .list_models(pb::ListModelsRequest {
            selection: Some(pb::Selection { expr: "task = segmentation".into(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["p1", "p3"]);
    server.stop().await;
}
