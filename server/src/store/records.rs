//! Records stored as JSON values (self-describing, so migrations can read old versions).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::readers::{DepthDefinition, Format};
use crate::stats::LayerStats;
use crate::vocab::Label;

/// Id counters: the next id of each kind. Advanced only by a committed ingest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextIds {
    /// Next model id.
    pub model: u64,
    /// Next layer id.
    pub layer: u64,
    /// Next filter id.
    pub filter: u64,
}

/// Normalised labels of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalizedMeta {
    /// Training datasets.
    pub training_datasets: Vec<Label>,
    /// Pretraining datasets.
    pub pretraining_datasets: Vec<Label>,
    /// Task.
    pub task: Label,
    /// Architecture family.
    pub architecture: Label,
    /// Normalised architecture as given, e.g. "resnet50".
    pub architecture_variant: String,
    /// Visual category (canonical empty when unknown and not derivable).
    pub visual_category: Label,
    /// Source URI.
    pub source_uri: String,
    /// License.
    pub license: String,
    /// Free tags.
    pub tags: Vec<String>,
    /// Vocabulary version used.
    pub vocabulary_version: u32,
}

/// A stored model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Dense id.
    pub model_id: u64,
    /// Unique name.
    pub name: String,
    /// Labels.
    pub meta: NormalizedMeta,
    /// Container format.
    pub format: Format,
    /// Depth definition.
    pub depth_definition: DepthDefinition,
    /// SHA-256 of the checkpoint bytes, hex.
    pub content_sha256: String,
    /// Checkpoint size.
    pub size_bytes: u64,
    /// File name as uploaded.
    pub file_name: String,
    /// Number of 3x3 layers.
    pub n_layers: u32,
    /// Number of 3x3 filters.
    pub n_filters: u64,
    /// First layer id (layers are consecutive).
    pub first_layer_id: u64,
    /// First filter id (filters are consecutive).
    pub first_filter_id: u64,
    /// 2-D kernels per kernel shape.
    pub kernel_shape_counts: BTreeMap<String, u64>,
    /// ONNX producer.
    pub producer: Option<String>,
    /// ONNX opset.
    pub opset: Option<i64>,
    /// Ingest time (Unix ms).
    pub ingested_at_unix_ms: i64,
    /// Weights deliberately not stored.
    pub excluded_tensors: Vec<String>,
}

/// What reading a layer's stored blocks needs of its record: its id and filter count. Kept
/// apart where many layers are read in turn (a scan's slots), so that a read does not touch
/// the whole record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpan {
    /// Dense id.
    pub layer_id: u64,
    /// Filters in the layer.
    pub n_filters: u64,
}

impl From<&LayerRecord> for LayerSpan {
    fn from(l: &LayerRecord) -> Self {
        LayerSpan { layer_id: l.layer_id, n_filters: l.n_filters }
    }
}

/// A stored 3x3 layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Dense id.
    pub layer_id: u64,
    /// Owning model.
    pub model_id: u64,
    /// Position among the model's 3x3 layers.
    pub layer_index: u32,
    /// Tensor name.
    pub tensor_name: String,
    /// Output channels.
    pub out_channels: u32,
    /// Input channels per group.
    pub in_channels: u32,
    /// Conv groups when known.
    pub groups: Option<u32>,
    /// Depth rank.
    pub conv_depth: u32,
    /// Normalised depth.
    pub conv_depth_norm: f64,
    /// First filter id.
    pub first_filter_id: u64,
    /// Number of filters.
    pub n_filters: u64,
}

/// A pending ingest: blocks written ahead of the commit, deleted at startup if never committed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingIngest {
    /// Layer ids whose blocks may exist.
    pub first_layer_id: u64,
    /// One past the last layer id.
    pub end_layer_id: u64,
}

/// What the store keeps per layer (the record and its statistics).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLayer {
    /// Record.
    pub record: LayerRecord,
    /// Statistics.
    pub stats: LayerStats,
}

/// A pinned reference basis: the PCA of the scaled filters of a selection, with the global
/// coefficient range and bin count its histograms use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BasisRecord {
    /// Version (1, 2, ...).
    pub version: u32,
    /// Selection text it was fitted on ("" = all filters).
    pub selection_expr: String,
    /// Filters it was fitted on.
    pub n: u64,
    /// Mean scaled filter.
    pub mean: Vec<f64>,
    /// 9 eigenfilters, row-major (component k = values 9k..9k+9).
    pub components: Vec<f64>,
    /// Eigenvalues, descending.
    pub eigenvalues: Vec<f64>,
    /// Explained-variance ratios.
    pub evr: Vec<f64>,
    /// Global coefficient range at pinning time.
    pub range_min: f64,
    /// Upper end of the range.
    pub range_max: f64,
    /// Bins per component.
    pub bins: u32,
    /// Creation time (Unix ms).
    pub created_at_unix_ms: i64,
    /// True once every layer's histogram is written.
    pub ready: bool,
}

/// Coefficient histograms of one layer's scaled filters in a pinned basis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerHistogram {
    /// 9 × bins counts, component-major.
    pub counts: Vec<u32>,
    /// Per component: coefficients outside the basis range.
    pub out_of_range: Vec<u64>,
}
