//! Hand-made JSON mapping of the proto messages (prost types do not derive serde).
//!
//! Field names follow the proto; enums become lower-case words (`"onnx"`, `"created"`); maps are
//! objects with sorted keys so output is stable; 64-bit ids stay exact JSON integers.

use filterdb_proto::{
    CensusGroup, CensusResponse, DepthDefinition, FilterBatch, Format, IngestOutcome, IngestPhase,
    IngestProgress, IngestResult, Label, Layer, LayerStats, Model, NormalizedMeta, Vocabularies,
};
use serde_json::{Map, Value, json};

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
