//! proto ↔ domain conversions and engine errors → `Status`. No logic beyond translation.

use filterdb_proto as pb;
use tonic::Status;

use crate::engine::{CensusRow, EngineError, FilterTarget, MetaInput, MetaUpdate, ModelRef};
use crate::readers::{DepthDefinition, Format};
use crate::selection::{self, Field, Pred};
use crate::store::records::{LayerRecord, ModelRecord};
use crate::stats::LayerStats;
use crate::vocab::{Label, Vocabularies};

/// Deepest predicate tree accepted (protects the evaluator's stack).
const MAX_PREDICATE_DEPTH: usize = 64;

/// Maps an engine error to the gRPC status a client should see.
pub fn status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument(m) => Status::invalid_argument(m),
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::AlreadyExists(m) => Status::already_exists(m),
        EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
        EngineError::OutOfRange(m) => Status::out_of_range(m),
        EngineError::Store(s) => {
            tracing::error!(error = %s, "storage failure");
            Status::internal(format!("storage failure: {s}"))
        }
    }
}

/// proto Field → domain field.
pub fn field(f: i32, ctx: &str) -> Result<Field, Status> {
    use pb::Field as P;
    let p = P::try_from(f).map_err(|_| Status::invalid_argument(format!("{ctx}: unknown field number {f}")))?;
    Ok(match p {
        P::Unspecified => return Err(Status::invalid_argument(format!("{ctx}: field is unspecified"))),
        P::Model => Field::Model,
        P::TrainingDataset => Field::TrainingDataset,
        P::PretrainingDataset => Field::PretrainingDataset,
        P::Task => Field::Task,
        P::Architecture => Field::Architecture,
        P::ArchitectureVariant => Field::ArchitectureVariant,
        P::VisualCategory => Field::VisualCategory,
        P::Format => Field::Format,
        P::Producer => Field::Producer,
        P::Tag => Field::Tag,
        P::License => Field::License,
        P::DepthDefinition => Field::DepthDefinition,
        P::ConvDepth => Field::ConvDepth,
        P::ConvDepthNorm => Field::ConvDepthNorm,
        P::LayerIndex => Field::LayerIndex,
        P::InChannels => Field::InChannels,
        P::OutChannels => Field::OutChannels,
        P::NFilters => Field::NFilters,
        P::ModelId => Field::ModelId,
        P::LayerId => Field::LayerId,
        P::Opset => Field::Opset,
        P::DepthDecile => Field::DepthDecile,
        P::DepthDecileFirst => Field::DepthDecileFirst,
    })
}

fn predicate(vocab: &Vocabularies, p: &pb::Predicate, depth: usize) -> Result<Pred, Status> {
    use pb::predicate::Kind;
    if depth > MAX_PREDICATE_DEPTH {
        return Err(Status::invalid_argument(format!("selection: predicate nested deeper than {MAX_PREDICATE_DEPTH}")));
    }
    match &p.kind {
        None => Ok(Pred::True),
        Some(Kind::Match(m)) => {
            let f = field(m.field, "selection match")?;
            if m.values.is_empty() {
                return Err(Status::invalid_argument("selection: a match needs at least one value"));
            }
            selection::text_match(vocab, f, &m.values).map_err(|e| Status::invalid_argument(format!("selection: {e}")))
        }
        Some(Kind::Range(r)) => {
            let f = field(r.field, "selection range")?;
            if !f.is_numeric() {
                return Err(Status::invalid_argument(format!("selection: range on {f:?}, which is not numeric")));
            }
            if r.min.is_some_and(|x| x.is_nan()) || r.max.is_some_and(|x| x.is_nan()) {
                return Err(Status::invalid_argument("selection: range bound is NaN"));
            }
            Ok(Pred::Range { field: f, min: r.min, max: r.max, min_exclusive: r.min_exclusive, max_exclusive: r.max_exclusive })
        }
        Some(Kind::All(l)) => {
            Ok(Pred::All(l.items.iter().map(|i| predicate(vocab, i, depth + 1)).collect::<Result<_, _>>()?))
        }
        Some(Kind::Any(l)) => {
            Ok(Pred::Any(l.items.iter().map(|i| predicate(vocab, i, depth + 1)).collect::<Result<_, _>>()?))
        }
        Some(Kind::Not(inner)) => Ok(Pred::Not(Box::new(predicate(vocab, inner, depth + 1)?))),
    }
}

/// proto Selection → compiled predicate (structured and text forms ANDed).
pub fn selection(vocab: &Vocabularies, s: Option<&pb::Selection>) -> Result<Pred, Status> {
    let Some(s) = s else { return Ok(Pred::True) };
    let mut p = match &s.predicate {
        Some(p) => predicate(vocab, p, 0)?,
        None => Pred::True,
    };
    if !s.expr.trim().is_empty() {
        let parsed = pb::expr::parse(&s.expr)
            .map_err(|e| Status::invalid_argument(format!("selection expr `{}`: {e}", s.expr)))?;
        if let Some(e) = parsed {
            p = p.and(predicate(vocab, &e, 0)?);
        }
    }
    Ok(p)
}

/// proto ModelRef → domain.
pub fn model_ref(r: Option<&pb::ModelRef>) -> Result<ModelRef, Status> {
    match r.and_then(|r| r.r#ref.as_ref()) {
        Some(pb::model_ref::Ref::Id(id)) => Ok(ModelRef::Id(*id)),
        Some(pb::model_ref::Ref::Name(n)) if !n.is_empty() => Ok(ModelRef::Name(n.clone())),
        _ => Err(Status::invalid_argument("model: give a model id or a model name")),
    }
}

/// proto Format → domain (None = detect).
pub fn format_in(f: i32) -> Result<Option<Format>, Status> {
    match pb::Format::try_from(f) {
        Ok(pb::Format::Unspecified) => Ok(None),
        Ok(pb::Format::Onnx) => Ok(Some(Format::Onnx)),
        Ok(pb::Format::Pytorch) => Ok(Some(Format::Pytorch)),
        Ok(pb::Format::Safetensors) => Ok(Some(Format::Safetensors)),
        Err(_) => Err(Status::invalid_argument(format!("header.format: unknown value {f}"))),
    }
}

fn format_out(f: Format) -> pb::Format {
    match f {
        Format::Onnx => pb::Format::Onnx,
        Format::Pytorch => pb::Format::Pytorch,
        Format::Safetensors => pb::Format::Safetensors,
    }
}

/// proto ModelMeta → domain.
pub fn meta_in(m: Option<&pb::ModelMeta>) -> MetaInput {
    let Some(m) = m else { return MetaInput::default() };
    MetaInput {
        name: m.name.trim().to_string(),
        training_datasets: m.training_datasets.clone(),
        pretraining_datasets: m.pretraining_datasets.clone(),
        task: m.task.clone(),
        architecture: m.architecture.clone(),
        visual_category: m.visual_category.clone(),
        source_uri: m.source_uri.clone(),
        license: m.license.clone(),
        tags: m.tags.clone(),
    }
}

/// proto MetaUpdate → domain.
pub fn update_in(u: Option<&pb::MetaUpdate>) -> MetaUpdate {
    let Some(u) = u else { return MetaUpdate::default() };
    MetaUpdate {
        name: u.name.clone(),
        training_datasets: u.set_training_datasets.then(|| u.training_datasets.clone()),
        pretraining_datasets: u.set_pretraining_datasets.then(|| u.pretraining_datasets.clone()),
        task: u.task.clone(),
        architecture: u.architecture.clone(),
        visual_category: u.visual_category.clone(),
        source_uri: u.source_uri.clone(),
        license: u.license.clone(),
        tags: u.set_tags.then(|| u.tags.clone()),
    }
}

fn label(l: &Label) -> pb::Label {
    pb::Label { raw: l.raw.clone(), canonical: l.canonical.clone(), known: l.known }
}

/// Model record → proto.
pub fn model_out(m: &ModelRecord) -> pb::Model {
    let meta = &m.meta;
    pb::Model {
        model_id: m.model_id,
        name: m.name.clone(),
        meta: Some(pb::NormalizedMeta {
            training_datasets: meta.training_datasets.iter().map(label).collect(),
            pretraining_datasets: meta.pretraining_datasets.iter().map(label).collect(),
            task: Some(label(&meta.task)),
            architecture: Some(label(&meta.architecture)),
            architecture_variant: meta.architecture_variant.clone(),
            visual_category: Some(label(&meta.visual_category)),
            source_uri: meta.source_uri.clone(),
            license: meta.license.clone(),
            tags: meta.tags.clone(),
            vocabulary_version: meta.vocabulary_version,
        }),
        format: format_out(m.format) as i32,
        depth_definition: match m.depth_definition {
            DepthDefinition::GraphLongestPath => pb::DepthDefinition::GraphLongestPath,
            DepthDefinition::WeightOrder => pb::DepthDefinition::WeightOrder,
        } as i32,
        content_sha256: m.content_sha256.clone(),
        size_bytes: m.size_bytes,
        n_layers: m.n_layers,
        n_filters: m.n_filters,
        first_filter_id: m.first_filter_id,
        first_layer_id: m.first_layer_id,
        kernel_shape_counts: m.kernel_shape_counts.clone().into_iter().collect(),
        producer: m.producer.clone().unwrap_or_default(),
        opset: m.opset.unwrap_or(0),
        ingested_at_unix_ms: m.ingested_at_unix_ms,
        excluded_tensors: m.excluded_tensors.clone(),
    }
}

/// Layer record → proto.
pub fn layer_out(l: &LayerRecord, s: &LayerStats) -> pb::Layer {
    pb::Layer {
        layer_id: l.layer_id,
        model_id: l.model_id,
        layer_index: l.layer_index,
        tensor_name: l.tensor_name.clone(),
        out_channels: l.out_channels,
        in_channels: l.in_channels,
        groups: l.groups.unwrap_or(0),
        conv_depth: l.conv_depth,
        conv_depth_norm: l.conv_depth_norm,
        first_filter_id: l.first_filter_id,
        n_filters: l.n_filters,
        stats: Some(pb::LayerStats { n: s.n, sum: s.sum.clone(), sum_outer: s.sum_outer.clone(), abs_max: s.abs_max }),
    }
}

/// Census row → proto.
pub fn census_out(r: &CensusRow) -> pb::CensusGroup {
    pb::CensusGroup { key: r.key.clone(), models: r.models, layers: r.layers, filters: r.filters }
}

/// GetFilters target → domain.
pub fn filter_target(t: Option<&pb::get_filters_request::Target>) -> Result<FilterTarget, Status> {
    match t {
        Some(pb::get_filters_request::Target::Model(m)) => Ok(FilterTarget::Model {
            model: model_ref(m.model.as_ref())?,
            layer_index: m.layer_index,
            out_channel: m.out_channel,
        }),
        Some(pb::get_filters_request::Target::Ids(r)) => Ok(FilterTarget::Ids { start: r.start, end: r.end }),
        None => Err(Status::invalid_argument("GetFilters: set `model` or `ids`")),
    }
}

/// Vocabularies → proto.
pub fn vocabularies_out(v: &Vocabularies) -> pb::Vocabularies {
    pb::Vocabularies {
        version: v.version,
        vocabularies: v
            .all()
            .iter()
            .map(|voc| pb::Vocabulary {
                kind: voc.kind.to_string(),
                entries: voc
                    .entries
                    .iter()
                    .map(|e| pb::VocabularyEntry {
                        canonical: e.canonical.clone(),
                        aliases: e.aliases.iter().chain(e.prefixes.iter()).cloned().collect(),
                        visual_category: e.visual_category.clone().unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
