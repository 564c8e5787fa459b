//! Hand-made JSON mapping of the proto messages (prost types do not derive serde).
//!
//! Field names follow the proto; enums become lower-case words (`"onnx"`, `"created"`); maps are
//! objects with sorted keys so output is stable; 64-bit ids stay exact JSON integers.

use filterdb_proto::{
    BasisResponse, CensusGroup, CensusResponse, CompareBasesResponse, DegenerationRankingResponse,
    Density2DResponse, DepthDefinition, DepthProfileResponse, DistributionsResponse,
    DriftMatrixResponse, DriftWeights, FilterBasis, FilterBatch, Format, IngestOutcome,
    IngestPhase, IngestProgress, IngestResult, Label, Layer, LayerQualityResponse, LayerQualityRow,
    LayerStats, Model, ModelDegeneration, NormalizedMeta, PinBasisProgress, PinnedBasis,
    QualityMetric, Vocabularies,
};
use serde_json::{Map, Value, json};

use crate::quality::QualityLayer;
use crate::{ClientError, code_name, kernels::batch_kernels};

/// The lower-case name of a [`Format`] value, as the `format` field of the `--where` syntax uses.
pub fn format_name(v: i32) -> &'static str {
    match Format::try_from(v) {
        Ok(Format::Onnx) => "onnx",
        Ok(Format::Pytorch) => "pytorch",
        Ok(Format::Safetensors) => "safetensors",
        Ok(Format::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// The lower-case name of a [`DepthDefinition`] value.
pub fn depth_definition_name(v: i32) -> &'static str {
    match DepthDefinition::try_from(v) {
        Ok(DepthDefinition::GraphLongestPath) => "graph_longest_path",
        Ok(DepthDefinition::WeightOrder) => "weight_order",
        Ok(DepthDefinition::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// The lower-case name of an [`IngestOutcome`] value.
pub fn outcome_name(v: i32) -> &'static str {
    match IngestOutcome::try_from(v) {
        Ok(IngestOutcome::Created) => "created",
        Ok(IngestOutcome::Unchanged) => "unchanged",
        Ok(IngestOutcome::Replaced) => "replaced",
        Ok(IngestOutcome::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// The lower-case name of an [`IngestPhase`] value.
pub fn phase_name(v: i32) -> &'static str {
    match IngestPhase::try_from(v) {
        Ok(IngestPhase::Receiving) => "receiving",
        Ok(IngestPhase::Parsing) => "parsing",
        Ok(IngestPhase::Statistics) => "statistics",
        Ok(IngestPhase::Writing) => "writing",
        Ok(IngestPhase::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

/// An f32 as the shortest decimal that reads back to the same f32 (`0.1`, not
/// `0.10000000149011612`); non-finite values become `null` since JSON has no NaN.
pub fn f32_to_json(x: f32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    // Rust's f32 Display is the shortest round-trip representation.
    x.to_string()
        .parse::<f64>()
        .map(Value::from)
        .unwrap_or(Value::Null)
}

/// A label as `{raw, canonical, known}`; a missing label is `null`.
pub fn label_to_json(l: Option<&Label>) -> Value {
    match l {
        Some(l) => json!({ "raw": l.raw, "canonical": l.canonical, "known": l.known }),
        None => Value::Null,
    }
}

fn labels_to_json(ls: &[Label]) -> Value {
    Value::Array(ls.iter().map(|l| label_to_json(Some(l))).collect())
}

/// A model's normalised labels.
pub fn meta_to_json(m: &NormalizedMeta) -> Value {
    json!({
        "training_datasets": labels_to_json(&m.training_datasets),
        "pretraining_datasets": labels_to_json(&m.pretraining_datasets),
        "task": label_to_json(m.task.as_ref()),
        "architecture": label_to_json(m.architecture.as_ref()),
        "architecture_variant": m.architecture_variant,
        "visual_category": label_to_json(m.visual_category.as_ref()),
        "source_uri": m.source_uri,
        "license": m.license,
        "tags": m.tags,
        "vocabulary_version": m.vocabulary_version,
    })
}

/// A stored model.
pub fn model_to_json(m: &Model) -> Value {
    let mut shapes: Vec<(&String, &u64)> = m.kernel_shape_counts.iter().collect();
    shapes.sort();
    let shapes: Map<String, Value> = shapes
        .into_iter()
        .map(|(k, v)| (k.clone(), Value::from(*v)))
        .collect();
    json!({
        "model_id": m.model_id,
        "name": m.name,
        "meta": m.meta.as_ref().map(meta_to_json).unwrap_or(Value::Null),
        "format": format_name(m.format),
        "depth_definition": depth_definition_name(m.depth_definition),
        "content_sha256": m.content_sha256,
        "size_bytes": m.size_bytes,
        "n_layers": m.n_layers,
        "n_filters": m.n_filters,
        "first_filter_id": m.first_filter_id,
        "first_layer_id": m.first_layer_id,
        "kernel_shape_counts": shapes,
        "producer": m.producer,
        "opset": m.opset,
        "ingested_at_unix_ms": m.ingested_at_unix_ms,
        "excluded_tensors": m.excluded_tensors,
    })
}

/// Per-layer statistics.
pub fn stats_to_json(s: &LayerStats) -> Value {
    json!({ "n": s.n, "sum": s.sum, "sum_outer": s.sum_outer, "abs_max": s.abs_max })
}

/// A stored 3x3 layer.
pub fn layer_to_json(l: &Layer) -> Value {
    json!({
        "layer_id": l.layer_id,
        "model_id": l.model_id,
        "layer_index": l.layer_index,
        "tensor_name": l.tensor_name,
        "out_channels": l.out_channels,
        "in_channels": l.in_channels,
        "groups": l.groups,
        "conv_depth": l.conv_depth,
        "conv_depth_norm": l.conv_depth_norm,
        "first_filter_id": l.first_filter_id,
        "n_filters": l.n_filters,
        "stats": l.stats.as_ref().map(stats_to_json).unwrap_or(Value::Null),
    })
}

/// An ingest progress message.
pub fn progress_to_json(p: &IngestProgress) -> Value {
    json!({
        "phase": phase_name(p.phase),
        "bytes_received": p.bytes_received,
        "total_bytes": p.total_bytes,
        "layers_done": p.layers_done,
        "layers_total": p.layers_total,
    })
}

/// The result of one ingest.
pub fn ingest_result_to_json(r: &IngestResult) -> Value {
    json!({
        "outcome": outcome_name(r.outcome),
        "model": r.model.as_ref().map(model_to_json).unwrap_or(Value::Null),
    })
}

/// One census group; `group_by` names its key values (missing names fall back to positions).
pub fn census_group_to_json(g: &CensusGroup, group_by: &[&str]) -> Value {
    let key: Map<String, Value> = g
        .key
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (
                group_by
                    .get(i)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| i.to_string()),
                Value::from(v.clone()),
            )
        })
        .collect();
    json!({ "key": key, "models": g.models, "layers": g.layers, "filters": g.filters })
}

/// A census answer with the field names the groups were keyed by.
pub fn census_to_json(c: &CensusResponse, group_by: &[&str]) -> Value {
    json!({
        "group_by": group_by,
        "groups": c.groups.iter().map(|g| census_group_to_json(g, group_by)).collect::<Vec<_>>(),
        "total": c.total.as_ref().map(|t| census_group_to_json(t, &[])).unwrap_or(Value::Null),
    })
}

/// The label vocabularies.
pub fn vocabularies_to_json(v: &Vocabularies) -> Value {
    json!({
        "version": v.version,
        "vocabularies": v.vocabularies.iter().map(|voc| json!({
            "kind": voc.kind,
            "entries": voc.entries.iter().map(|e| {
                let mut o = json!({ "canonical": e.canonical, "aliases": e.aliases });
                if !e.visual_category.is_empty() {
                    o["visual_category"] = Value::from(e.visual_category.clone());
                }
                o
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Filters as `{filter_id, model_id, layer_id, layer_index, index_in_layer, values: [9]}`.
pub fn filters_to_json(batches: &[FilterBatch]) -> Result<Value, ClientError> {
    let mut out = Vec::new();
    for b in batches {
        for (i, k) in batch_kernels(b)?.iter().enumerate() {
            out.push(json!({
                "filter_id": b.first_filter_id + i as u64,
                "model_id": b.model_id,
                "layer_id": b.layer_id,
                "layer_index": b.layer_index,
                "index_in_layer": b.first_index_in_layer + i as u64,
                "values": k.iter().map(|v| f32_to_json(*v)).collect::<Vec<_>>(),
            }));
        }
    }
    Ok(Value::Array(out))
}

/// An f64, `null` when not finite (JSON has no NaN; quality metrics use NaN for "undefined").
pub fn f64_to_json(x: f64) -> Value {
    if x.is_finite() {
        Value::from(x)
    } else {
        Value::Null
    }
}

fn f64s(xs: &[f64]) -> Value {
    Value::Array(xs.iter().map(|x| f64_to_json(*x)).collect())
}

/// The lower-case name of a [`DriftWeights`] value.
pub fn drift_weights_name(v: i32) -> &'static str {
    match DriftWeights::try_from(v) {
        Ok(DriftWeights::Evr) | Ok(DriftWeights::Unspecified) => "evr",
        Ok(DriftWeights::Uniform) => "uniform",
        Ok(DriftWeights::Custom) => "custom",
        Err(_) => "unknown",
    }
}

/// The lower-case name of a [`QualityMetric`] value, as `filterdb depth-profile --metric` takes it.
pub fn quality_metric_name(v: i32) -> &'static str {
    match QualityMetric::try_from(v) {
        Ok(QualityMetric::Sparsity) | Ok(QualityMetric::Unspecified) => "sparsity",
        Ok(QualityMetric::Entropy) => "entropy",
        Ok(QualityMetric::EntropyNorm) => "entropy-norm",
        Ok(QualityMetric::Orthogonality) => "orthogonality",
        Err(_) => "unknown",
    }
}

/// A PCA basis; `components` stays flat (81 values, component k at `[9k, 9k + 9)`) as in the proto.
pub fn filter_basis_to_json(b: &FilterBasis) -> Value {
    json!({
        "n": b.n,
        "mean": f64s(&b.mean),
        "components": f64s(&b.components),
        "eigenvalues": f64s(&b.eigenvalues),
        "evr": f64s(&b.evr),
        "cumulative_evr": f64s(&b.cumulative_evr),
    })
}

fn opt_basis(b: Option<&FilterBasis>) -> Value {
    b.map(filter_basis_to_json).unwrap_or(Value::Null)
}

/// A `Basis` answer: the whole selection's basis and one per group.
pub fn basis_response_to_json(r: &BasisResponse) -> Value {
    json!({
        "basis": opt_basis(r.basis.as_ref()),
        "groups": r.groups.iter().map(|g| json!({
            "key": g.key,
            "basis": opt_basis(g.basis.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

/// One `PinBasis` progress message.
pub fn pin_progress_to_json(p: &PinBasisProgress) -> Value {
    json!({
        "version": p.version,
        "phase": p.phase,
        "layers_done": p.layers_done,
        "layers_total": p.layers_total,
    })
}

/// The pinned reference basis.
pub fn pinned_basis_to_json(p: &PinnedBasis) -> Value {
    json!({
        "version": p.version,
        "basis": opt_basis(p.basis.as_ref()),
        "selection_expr": p.selection_expr,
        "range_min": f64_to_json(p.range_min),
        "range_max": f64_to_json(p.range_max),
        "bins": p.bins,
        "created_at_unix_ms": p.created_at_unix_ms,
    })
}

/// A `CompareBases` answer; `abs_cos` stays flat (81 values, row = component of a).
pub fn compare_bases_to_json(r: &CompareBasesResponse) -> Value {
    json!({
        "a": opt_basis(r.a.as_ref()),
        "b": opt_basis(r.b.as_ref()),
        "abs_cos": f64s(&r.abs_cos),
        "matching": r.matching.iter().map(|m| json!({
            "a": m.a, "b": m.b, "abs_cos": f64_to_json(m.abs_cos),
        })).collect::<Vec<_>>(),
        "principal_angles_deg": f64s(&r.principal_angles_deg),
        "evr_diff": f64s(&r.evr_diff),
    })
}

/// A `Distributions` answer: per group, 9 histograms over `[range_min, range_max]`.
pub fn distributions_to_json(r: &DistributionsResponse) -> Value {
    json!({
        "basis_version": r.basis_version,
        "range_min": f64_to_json(r.range_min),
        "range_max": f64_to_json(r.range_max),
        "bins": r.bins,
        "groups": r.groups.iter().map(|g| json!({
            "key": g.key,
            "n_filters": g.n_filters,
            "components": g.components.iter().map(|c| json!({
                "counts": c.counts,
                "out_of_range": c.out_of_range,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Names of the `upper_triangle_summary` values, in order.
pub const SUMMARY_NAMES: [&str; 6] = ["min", "q1", "median", "q3", "max", "mean"];

/// A `DriftMatrix` answer; `d` and `per_component` stay flat as in the proto, the upper-triangle
/// summary becomes an object `{min, q1, median, q3, max, mean}`.
pub fn drift_matrix_to_json(r: &DriftMatrixResponse) -> Value {
    let summary: Map<String, Value> = SUMMARY_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = r.upper_triangle_summary.get(i).copied().unwrap_or(f64::NAN);
            (n.to_string(), f64_to_json(v))
        })
        .collect();
    json!({
        "basis_version": r.basis_version,
        "keys": r.keys,
        "n_filters": r.n_filters,
        "d": f64s(&r.d),
        "per_component": f64s(&r.per_component),
        "weights": f64s(&r.weights),
        "upper_triangle_summary": summary,
    })
}

/// One profiled layer's quality metrics (ProfileCheckpoint); undefined (NaN) metrics are `null`.
pub fn layer_quality_row_to_json(r: &LayerQualityRow) -> Value {
    json!({
        "layer_id": r.layer_id,
        "model_id": r.model_id,
        "layer_index": r.layer_index,
        "tensor_name": r.tensor_name,
        "conv_depth": r.conv_depth,
        "conv_depth_norm": f64_to_json(r.conv_depth_norm),
        "n": r.n,
        "sparsity": f64_to_json(r.sparsity),
        "entropy": f64_to_json(r.entropy),
        "entropy_norm": f64_to_json(r.entropy_norm),
        "entropy_clean": f64_to_json(r.entropy_clean),
        "entropy_clean_norm": f64_to_json(r.entropy_clean_norm),
        "orthogonality": f64_to_json(r.orthogonality),
        "random_like": r.random_like,
        "low_diversity": r.low_diversity,
        "sparse_heavy": r.sparse_heavy,
        "degenerate": r.degenerate,
    })
}

/// One layer of a `LayerQuality` answer; undefined (NaN) metrics are `null`.
pub fn quality_layer_to_json(r: &QualityLayer<'_>) -> Value {
    json!({
        "layer_id": r.layer_id,
        "model_id": r.model_id,
        "model": r.model,
        "layer_index": r.layer_index,
        "tensor_name": r.tensor_name,
        "conv_depth": r.conv_depth,
        "conv_depth_norm": f64_to_json(r.conv_depth_norm),
        "n": r.n,
        "sparsity": f64_to_json(r.sparsity),
        "entropy": f64_to_json(r.entropy),
        "entropy_norm": f64_to_json(r.entropy_norm),
        "entropy_clean": f64_to_json(r.entropy_clean),
        "entropy_clean_norm": f64_to_json(r.entropy_clean_norm),
        "orthogonality": f64_to_json(r.orthogonality),
        "random_like": r.random_like,
        "low_diversity": r.low_diversity,
        "sparse_heavy": r.sparse_heavy,
        "degenerate": r.degenerate,
    })
}

/// A `LayerQuality` answer as one object per layer (its columns read back as rows; fails on a
/// malformed answer, see [`crate::quality::layers`]).
pub fn layer_quality_to_json(r: &LayerQualityResponse) -> Result<Value, ClientError> {
    let layers = crate::quality::layers(r)?;
    Ok(json!({ "layers": layers.iter().map(quality_layer_to_json).collect::<Vec<_>>() }))
}

/// One model of a degeneration ranking.
pub fn model_degeneration_to_json(m: &ModelDegeneration) -> Value {
    json!({
        "model_id": m.model_id,
        "model": m.model,
        "layers": m.layers,
        "degenerate_layers": m.degenerate_layers,
        "degenerate_share": f64_to_json(m.degenerate_share),
        "mean_sparsity": f64_to_json(m.mean_sparsity),
        "mean_entropy": f64_to_json(m.mean_entropy),
        "degenerate_depths": m.degenerate_depths,
    })
}

/// A `DegenerationRanking` answer, best-ranked (most degenerate) first.
pub fn degeneration_ranking_to_json(r: &DegenerationRankingResponse) -> Value {
    json!({ "models": r.models.iter().map(model_degeneration_to_json).collect::<Vec<_>>() })
}

/// A `DepthProfile` answer: the bins and one cell per (model, bin) with data.
pub fn depth_profile_to_json(r: &DepthProfileResponse) -> Value {
    json!({
        "bins": r.bins,
        "cells": r.cells.iter().map(|c| json!({
            "model": c.model,
            "bin": c.bin,
            "value": f64_to_json(c.value),
            "layers": c.layers,
        })).collect::<Vec<_>>(),
    })
}

/// A `Density2D` answer with the density as `side` rows of `side` values (row = component i
/// bin, column = component j bin); a length that is not a square stays one flat row.
pub fn density_2d_to_json(r: &Density2DResponse) -> Value {
    let side = (r.density.len() as f64).sqrt().round() as usize;
    let density = if side > 0 && side * side == r.density.len() {
        Value::Array(
            r.density
                .chunks_exact(side)
                .map(|row| Value::Array(row.iter().map(|v| f32_to_json(*v)).collect()))
                .collect(),
        )
    } else {
        Value::Array(vec![Value::Array(
            r.density.iter().map(|v| f32_to_json(*v)).collect(),
        )])
    };
    json!({
        "basis_version": r.basis_version,
        "n_filters": r.n_filters,
        "side": side,
        "density": density,
    })
}

/// A gRPC error as `{code, message}` with the upper-case code name.
pub fn status_to_json(s: &tonic::Status) -> Value {
    json!({ "code": code_name(s.code()), "message": s.message() })
}

/// Any client error as `{code, message}`; non-gRPC failures use code `CLIENT`.
pub fn error_to_json(e: &ClientError) -> Value {
    match e {
        ClientError::Status(s) => status_to_json(s),
        other => json!({ "code": "CLIENT", "message": other.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn label(raw: &str, canonical: &str, known: bool) -> Label {
        Label {
            raw: raw.into(),
            canonical: canonical.into(),
            known,
        }
    }

    fn sample_model() -> Model {
        Model {
            model_id: u64::MAX - 1,
            name: "tinynet".into(),
            meta: Some(NormalizedMeta {
                training_datasets: vec![
                    label("ILSVRC2012", "imagenet", true),
                    label("mystery", "mystery", false),
                ],
                task: Some(label("classification", "Classification", true)),
                architecture: Some(label("ResNet-50", "ResNet", true)),
                architecture_variant: "resnet50".into(),
                tags: vec!["a".into()],
                vocabulary_version: 3,
                ..Default::default()
            }),
            format: Format::Safetensors as i32,
            depth_definition: DepthDefinition::WeightOrder as i32,
            n_layers: 4,
            n_filters: 1234,
            kernel_shape_counts: HashMap::from([
                ("3x3".to_string(), 1234u64),
                ("1x1".to_string(), 64),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn model_mapping() {
        let v = model_to_json(&sample_model());
        assert_eq!(v["model_id"], json!(u64::MAX - 1), "64-bit ids stay exact");
        assert_eq!(v["format"], "safetensors");
        assert_eq!(v["depth_definition"], "weight_order");
        assert_eq!(v["meta"]["training_datasets"][0]["canonical"], "imagenet");
        assert_eq!(v["meta"]["training_datasets"][1]["known"], false);
        assert_eq!(v["meta"]["task"]["raw"], "classification");
        assert_eq!(v["meta"]["visual_category"], Value::Null);
        assert_eq!(v["kernel_shape_counts"]["3x3"], 1234);
        let keys: Vec<_> = v["kernel_shape_counts"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, vec!["1x1", "3x3"]);
        let r = ingest_result_to_json(&IngestResult {
            outcome: IngestOutcome::Replaced as i32,
            model: None,
        });
        assert_eq!(r, json!({ "outcome": "replaced", "model": null }));
    }

    #[test]
    fn enum_names() {
        assert_eq!(format_name(Format::Onnx as i32), "onnx");
        assert_eq!(format_name(99), "unknown");
        assert_eq!(outcome_name(IngestOutcome::Unchanged as i32), "unchanged");
        assert_eq!(phase_name(IngestPhase::Statistics as i32), "statistics");
        assert_eq!(
            depth_definition_name(DepthDefinition::GraphLongestPath as i32),
            "graph_longest_path"
        );
    }

    #[test]
    fn floats_are_shortest_and_exact() {
        assert_eq!(serde_json::to_string(&f32_to_json(0.1)).unwrap(), "0.1");
        assert_eq!(f32_to_json(f32::NAN), Value::Null);
        for x in [0.1f32, -3.4028235e38, 1e-45, 0.33333334, -0.0] {
            let back = f32_to_json(x).as_f64().unwrap() as f32;
            assert_eq!(back.to_bits(), x.to_bits());
        }
    }

    #[test]
    fn analytics_mappings() {
        let basis = FilterBasis {
            n: 10,
            mean: vec![0.0; 9],
            components: (0..81).map(|i| i as f64).collect(),
            eigenvalues: vec![1.0; 9],
            evr: vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            cumulative_evr: vec![0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        };
        let v = basis_response_to_json(&BasisResponse {
            basis: Some(basis.clone()),
            groups: vec![filterdb_proto::GroupBasis {
                key: "Classification".into(),
                basis: None,
            }],
        });
        assert_eq!(v["basis"]["components"][80], 80.0);
        assert_eq!(v["groups"][0]["key"], "Classification");
        assert_eq!(v["groups"][0]["basis"], Value::Null);

        let d = drift_matrix_to_json(&DriftMatrixResponse {
            basis_version: 2,
            keys: vec!["a".into(), "b".into()],
            n_filters: vec![5, 6],
            d: vec![0.0, 1.5, 1.5, 0.0],
            per_component: vec![],
            weights: vec![1.0 / 9.0; 9],
            upper_triangle_summary: vec![1.5, 1.5, 1.5, 1.5, 1.5, 1.5],
        });
        assert_eq!(d["upper_triangle_summary"]["median"], 1.5);
        assert_eq!(d["keys"][1], "b");

        let q = layer_quality_to_json(&LayerQualityResponse {
            models: vec![filterdb_proto::LayerQualityModel { model_id: 3, name: "m".into() }],
            tensor_names: vec!["conv.weight".into()],
            layer_id: vec![30],
            model_id: vec![3],
            layer_index: vec![0],
            tensor_name_index: vec![0],
            conv_depth: vec![1],
            conv_depth_norm: vec![1.0],
            n: vec![4],
            sparsity: vec![0.25],
            entropy: vec![0.5],
            entropy_norm: vec![0.4],
            entropy_clean: vec![f64::NAN],
            entropy_clean_norm: vec![f64::NAN],
            orthogonality: vec![f64::NAN],
            random_like: vec![false],
            low_diversity: vec![true],
            sparse_heavy: vec![false],
            degenerate: vec![true],
        })
        .unwrap();
        assert_eq!(q["layers"][0]["entropy_clean"], Value::Null);
        assert_eq!(q["layers"][0]["sparsity"], 0.25);
        assert_eq!(q["layers"][0]["degenerate"], true);
        assert_eq!((q["layers"][0]["model"].as_str(), q["layers"][0]["tensor_name"].as_str()), (Some("m"), Some("conv.weight")));

        let dens = density_2d_to_json(&Density2DResponse {
            basis_version: 1,
            density: vec![0.0, 0.5, 1.0, 0.25],
            n_filters: 3,
        });
        assert_eq!(dens["side"], 2);
        assert_eq!(dens["density"][1][0], 1.0);

        assert_eq!(drift_weights_name(DriftWeights::Unspecified as i32), "evr");
        assert_eq!(drift_weights_name(DriftWeights::Uniform as i32), "uniform");
        assert_eq!(
            quality_metric_name(QualityMetric::EntropyNorm as i32),
            "entropy-norm"
        );
        assert_eq!(f64_to_json(f64::INFINITY), Value::Null);
        let p = pin_progress_to_json(&PinBasisProgress {
            version: 3,
            phase: "histograms".into(),
            layers_done: 1,
            layers_total: 4,
        });
        assert_eq!(
            p,
            json!({"version": 3, "phase": "histograms", "layers_done": 1, "layers_total": 4})
        );
    }

    #[test]
    fn census_and_filters() {
        let c = CensusResponse {
            groups: vec![CensusGroup {
                key: vec!["Classification".into(), "ResNet".into()],
                models: 2,
                layers: 5,
                filters: 9,
            }],
            total: Some(CensusGroup {
                key: vec![],
                models: 2,
                layers: 5,
                filters: 9,
            }),
        };
        let v = census_to_json(&c, &["task", "architecture"]);
        assert_eq!(v["groups"][0]["key"]["architecture"], "ResNet");
        assert_eq!(v["total"]["filters"], 9);
        let b = FilterBatch {
            model_id: 1,
            layer_id: 7,
            layer_index: 2,
            first_filter_id: 100,
            count: 1,
            kernels: crate::kernels::encode_kernels(&[[
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.5,
            ]]),
            first_index_in_layer: 3,
        };
        let f = filters_to_json(&[b]).unwrap();
        assert_eq!(f[0]["filter_id"], 100);
        assert_eq!(f[0]["index_in_layer"], 3);
        assert_eq!(f[0]["values"][8], 0.5);
        assert_eq!(
            status_to_json(&tonic::Status::not_found("x")),
            json!({"code": "NOT_FOUND", "message": "x"})
        );
    }
}
