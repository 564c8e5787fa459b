//! Selections: predicates over layer and model meta, and group keys. Every query (census now,
//! analytics and search later) evaluates the same [`Pred`] on the same [`LayerView`].

use crate::store::records::{LayerRecord, ModelRecord};
use crate::vocab::{Vocabularies, key};

/// Meta fields a predicate or grouping can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// Model name.
    Model,
    /// Any training dataset.
    TrainingDataset,
    /// Any pretraining dataset.
    PretrainingDataset,
    /// Task.
    Task,
    /// Architecture family.
    Architecture,
    /// Architecture variant.
    ArchitectureVariant,
    /// Visual category.
    VisualCategory,
    /// Container format.
    Format,
    /// ONNX producer.
    Producer,
    /// Any tag.
    Tag,
    /// License.
    License,
    /// Depth definition.
    DepthDefinition,
    /// conv_depth.
    ConvDepth,
    /// conv_depth_norm.
    ConvDepthNorm,
    /// layer_index.
    LayerIndex,
    /// in_channels.
    InChannels,
    /// out_channels.
    OutChannels,
    /// Filters in the layer.
    NFilters,
    /// Model id.
    ModelId,
    /// Layer id.
    LayerId,
    /// ONNX opset.
    Opset,
    /// Notebook deciles of conv_depth_norm (group-by only).
    DepthDecile,
    /// First layer + right-closed deciles (group-by only).
    DepthDecileFirst,
}

impl Field {
    /// True for fields compared as numbers.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            Field::ConvDepth
                | Field::ConvDepthNorm
                | Field::LayerIndex
                | Field::InChannels
                | Field::OutChannels
                | Field::NFilters
                | Field::ModelId
                | Field::LayerId
                | Field::Opset
        )
    }

    /// True for fields that only make sense as a grouping.
    pub fn is_group_only(self) -> bool {
        matches!(self, Field::DepthDecile | Field::DepthDecileFirst)
    }
}

/// A compiled predicate. String values are stored as matching keys (see [`key`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Pred {
    /// Everything.
    True,
    /// Field value in a set.
    Match(Field, Vec<MatchValue>),
    /// Numeric range.
    Range {
        /// Field.
        field: Field,
        /// Lower bound.
        min: Option<f64>,
        /// Upper bound.
        max: Option<f64>,
        /// Exclude `min`.
        min_exclusive: bool,
        /// Exclude `max`.
        max_exclusive: bool,
    },
    /// AND.
    All(Vec<Pred>),
    /// OR.
    Any(Vec<Pred>),
    /// NOT.
    Not(Box<Pred>),
}

/// One value of a [`Pred::Match`].
#[derive(Debug, Clone, PartialEq)]
pub enum MatchValue {
    /// A matching key of a text field.
    Text(String),
    /// A number.
    Number(f64),
}

/// A layer with its model: what predicates and groupings look at.
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    /// Owning model.
    pub model: &'a ModelRecord,
    /// The layer.
    pub layer: &'a LayerRecord,
}

/// Builds a text match: values are normalised through the field's vocabulary so that
/// `dataset = ILSVRC2012` matches models labelled imagenet.
pub fn text_match(vocab: &Vocabularies, field: Field, values: &[String]) -> Result<Pred, String> {
    if field.is_group_only() {
        return Err(format!("{field:?} can only be used to group, not in a predicate"));
    }
    if field.is_numeric() {
        let mut nums = Vec::new();
        for v in values {
            let x: f64 = v.trim().parse().map_err(|_| format!("{field:?} compares numbers, `{v}` is not one"))?;
            nums.push(MatchValue::Number(x));
        }
        return Ok(Pred::Match(field, nums));
    }
    let canon = |v: &str| -> String {
        let c = match field {
            Field::TrainingDataset | Field::PretrainingDataset => vocab.datasets.normalize(v).canonical,
            Field::Task => vocab.tasks.normalize(v).canonical,
            Field::Architecture => vocab.architectures.normalize(v).canonical,
            Field::VisualCategory => vocab.visual_categories.normalize(v).canonical,
            _ => v.to_string(),
        };
        match field {
            Field::Model => c.trim().to_lowercase(),
            _ => key(&c),
        }
    };
    Ok(Pred::Match(field, values.iter().map(|v| MatchValue::Text(canon(v))).collect()))
}

/// Text values of a field for one layer (several for multi-valued fields; matching keys).
fn text_values(field: Field, v: LayerView<'_>) -> Vec<String> {
    let m = &v.model.meta;
    match field {
        Field::Model => vec![v.model.name.to_lowercase()],
        Field::TrainingDataset => m.training_datasets.iter().map(|l| key(&l.canonical)).collect(),
        Field::PretrainingDataset => m.pretraining_datasets.iter().map(|l| key(&l.canonical)).collect(),
        Field::Task => vec![key(&m.task.canonical)],
        Field::Architecture => vec![key(&m.architecture.canonical)],
        Field::ArchitectureVariant => vec![key(&m.architecture_variant)],
        Field::VisualCategory => vec![key(&m.visual_category.canonical)],
        Field::Format => vec![v.model.format.as_str().to_string()],
        Field::Producer => vec![key(v.model.producer.as_deref().unwrap_or(""))],
        Field::Tag => m.tags.iter().map(|t| key(t)).collect(),
        Field::License => vec![key(&m.license)],
        Field::DepthDefinition => vec![key(match v.model.depth_definition {
            crate::readers::DepthDefinition::GraphLongestPath => "graph_longest_path",
            crate::readers::DepthDefinition::WeightOrder => "weight_order",
        })],
        _ => Vec::new(),
    }
}

/// Numeric value of a field for one layer.
pub fn number(field: Field, v: LayerView<'_>) -> Option<f64> {
    let l = v.layer;
    Some(match field {
        Field::ConvDepth => f64::from(l.conv_depth),
        Field::ConvDepthNorm => l.conv_depth_norm,
        Field::LayerIndex => f64::from(l.layer_index),
        Field::InChannels => f64::from(l.in_channels),
        Field::OutChannels => f64::from(l.out_channels),
        Field::NFilters => l.n_filters as f64,
        Field::ModelId => v.model.model_id as f64,
        Field::LayerId => l.layer_id as f64,
        Field::Opset => v.model.opset? as f64,
        _ => return None,
    })
}

impl Pred {
    /// Whether the predicate reads model fields only (then every layer of a model matches
    /// alike).
    pub fn model_level(&self) -> bool {
        let layer_field = |f: &Field| {
            matches!(
                f,
                Field::ConvDepth
                    | Field::ConvDepthNorm
                    | Field::LayerIndex
                    | Field::InChannels
                    | Field::OutChannels
                    | Field::NFilters
                    | Field::LayerId
                    | Field::DepthDecile
                    | Field::DepthDecileFirst
            )
        };
        match self {
            Pred::True => true,
            Pred::Match(f, _) => !layer_field(f),
            Pred::Range { field, .. } => !layer_field(field),
            Pred::All(items) | Pred::Any(items) => items.iter().all(Pred::model_level),
            Pred::Not(p) => p.model_level(),
        }
    }

    /// Evaluates the predicate on one layer.
    pub fn matches(&self, v: LayerView<'_>) -> bool {
        match self {
            Pred::True => true,
            Pred::Match(field, values) => {
                if field.is_numeric() {
                    let Some(x) = number(*field, v) else { return false };
                    values.iter().any(|m| matches!(m, MatchValue::Number(y) if *y == x))
                } else {
                    let have = text_values(*field, v);
                    values.iter().any(|m| matches!(m, MatchValue::Text(t) if have.contains(t)))
                }
            }
            Pred::Range { field, min, max, min_exclusive, max_exclusive } => {
                let Some(x) = number(*field, v) else { return false };
                let lo = match min {
                    None => true,
                    Some(m) if *min_exclusive => x > *m,
                    Some(m) => x >= *m,
                };
                let hi = match max {
                    None => true,
                    Some(m) if *max_exclusive => x < *m,
                    Some(m) => x <= *m,
                };
                lo && hi
            }
            Pred::All(items) => items.iter().all(|p| p.matches(v)),
            Pred::Any(items) => items.iter().any(|p| p.matches(v)),
            Pred::Not(p) => !p.matches(v),
        }
    }

    /// AND of two predicates.
    pub fn and(self, other: Pred) -> Pred {
        match (self, other) {
            (Pred::True, p) | (p, Pred::True) => p,
            (a, b) => Pred::All(vec![a, b]),
        }
    }
}

/// Upper edges of the notebook's deciles, as `numpy.linspace(0, 1, 11)` computes them.
fn decile_edges() -> [f64; 11] {
    let mut e = [0f64; 11];
    for (i, x) in e.iter_mut().enumerate() {
        *x = i as f64 * 0.1;
    }
    e[10] = 1.0;
    e
}

/// Decile label of a normalised depth: `pandas.cut(x, linspace(0,1,11), include_lowest=True)`,
/// labels "[0.0, 0.1]", "(0.1, 0.2]", ..., "(0.9, 1.0]".
pub fn depth_decile(x: f64) -> String {
    let e = decile_edges();
    let i = (1..=10).find(|i| x <= e[*i]).unwrap_or(10);
    if i == 1 { "[0.0, 0.1]".to_string() } else { format!("({:.1}, {:.1}]", (i - 1) as f64 / 10.0, i as f64 / 10.0) }
}

/// The robustness paper's depth bins: "first" for conv_depth 0, then right-closed deciles.
pub fn depth_decile_first(conv_depth: u32, x: f64) -> String {
    if conv_depth == 0 {
        return "first".to_string();
    }
    let e = decile_edges();
    let i = (1..=10).find(|i| x <= e[*i]).unwrap_or(10);
    format!("({:.1}, {:.1}]", (i - 1) as f64 / 10.0, i as f64 / 10.0)
}

/// Display values of a field for grouping (several for multi-valued fields; "(none)" when a
/// multi-valued field is empty).
pub fn group_values(field: Field, v: LayerView<'_>) -> Vec<String> {
    let m = &v.model.meta;
    let list = |xs: Vec<String>| if xs.is_empty() { vec!["(none)".to_string()] } else { xs };
    match field {
        Field::Model => vec![v.model.name.clone()],
        Field::TrainingDataset => list(m.training_datasets.iter().map(|l| l.canonical.clone()).collect()),
        Field::PretrainingDataset => list(m.pretraining_datasets.iter().map(|l| l.canonical.clone()).collect()),
        Field::Task => vec![m.task.canonical.clone()],
        Field::Architecture => vec![m.architecture.canonical.clone()],
        Field::ArchitectureVariant => vec![m.architecture_variant.clone()],
        Field::VisualCategory => vec![if m.visual_category.canonical.is_empty() {
            "(none)".to_string()
        } else {
            m.visual_category.canonical.clone()
        }],
        Field::Format => vec![v.model.format.as_str().to_string()],
        Field::Producer => vec![v.model.producer.clone().unwrap_or_else(|| "(none)".into())],
        Field::Tag => list(m.tags.clone()),
        Field::License => vec![if m.license.is_empty() { "(none)".into() } else { m.license.clone() }],
        Field::DepthDefinition => text_values(field, v),
        Field::DepthDecile => vec![depth_decile(v.layer.conv_depth_norm)],
        Field::DepthDecileFirst => vec![depth_decile_first(v.layer.conv_depth, v.layer.conv_depth_norm)],
        Field::ConvDepthNorm => vec![format!("{}", v.layer.conv_depth_norm)],
        _ => vec![number(field, v).map(|x| format!("{x}")).unwrap_or_else(|| "(none)".into())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_match_pandas_cut() {
        // pandas.cut([0, .05, .1, .1000001, .3, 3/10, .95, 1], np.linspace(0,1,11), include_lowest=True)
        assert_eq!(depth_decile(0.0), "[0.0, 0.1]");
        assert_eq!(depth_decile(0.1), "[0.0, 0.1]");
        assert_eq!(depth_decile(0.1000001), "(0.1, 0.2]");
        assert_eq!(depth_decile(3.0 / 10.0), "(0.2, 0.3]");
        assert_eq!(depth_decile(0.95), "(0.9, 1.0]");
        assert_eq!(depth_decile(1.0), "(0.9, 1.0]");
        assert_eq!(depth_decile_first(0, 0.0), "first");
        assert_eq!(depth_decile_first(1, 0.05), "(0.0, 0.1]");
    }
}
