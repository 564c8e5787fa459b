//! Checkpoint readers. Each format module turns a file into the same [`Checkpoint`]: the
//! 4-D convolution weights it holds, in the order that defines layer order, with a graph depth
//! when the format has a graph. [`extract`] then cuts every 3x3 weight into filters.
//!
//! Readers never execute anything from the file and never trust a declared size: every length
//! is checked against the bytes present, and every error names the file part at fault.

pub mod extract;
pub mod onnx;
mod pickle_scan;
pub mod pytorch;
pub mod safetensors;

use std::path::Path;

pub use extract::{ExtractedLayer, ExtractedModel, extract};

/// Checkpoint container formats FilterDB reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// ONNX `ModelProto` (protobuf).
    Onnx,
    /// `torch.save` output: zip (PyTorch >= 1.6), legacy pickle stream, or the old tar layout.
    Pytorch,
    /// Hugging Face safetensors.
    Safetensors,
}

impl Format {
    /// Lower-case name used in records, the CLI and the proto's string forms.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Onnx => "onnx",
            Format::Pytorch => "pytorch",
            Format::Safetensors => "safetensors",
        }
    }
}

/// How `conv_depth` was defined for a model's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepthDefinition {
    /// The CNN Filter DB definition: rank of the Conv node's longest-path depth from the graph
    /// inputs among the distinct depths holding any 4-D Conv (any kernel size).
    GraphLongestPath,
    /// No graph available (state dicts): rank of the weight among the model's 4-D conv weights
    /// in file order.
    WeightOrder,
}

/// One 4-D convolution weight as found in a checkpoint, decoded to f32, C-contiguous.
#[derive(Debug, Clone)]
pub struct ConvWeight {
    /// Tensor name in the file (ONNX initializer/Constant output name, state-dict key).
    pub name: String,
    /// `[out_channels, in_channels / groups, kh, kw]`.
    pub shape: [usize; 4],
    /// `shape.iter().product()` values in C order. Empty for weights whose kernel is not 3x3
    /// (they are only counted, so readers may skip decoding them).
    pub values: Vec<f32>,
    /// For graph formats: the longest-path depth of the consuming Conv node from the inputs.
    pub graph_depth: Option<usize>,
    /// `group` attribute of the Conv node, when the format records it.
    pub groups: Option<u32>,
}

/// Everything a reader learned from one checkpoint file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Container format.
    pub format: Format,
    /// 4-D conv weights in layer order (ONNX: node order in the graph; state dicts: file order).
    pub convs: Vec<ConvWeight>,
    /// Depth definition that applies to `convs[*].graph_depth`.
    pub depth_definition: DepthDefinition,
    /// ONNX `producer_name producer_version`, or a format-specific producer note.
    pub producer: Option<String>,
    /// ONNX default-domain opset version.
    pub opset: Option<i64>,
    /// Conv-like weights left out on purpose (e.g. ConvTranspose), by name, for the record.
    pub excluded: Vec<String>,
}

/// Reader errors. Each names the file part at fault; the API maps them to INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not any format FilterDB reads.
    #[error("unrecognised checkpoint format: {0}")]
    UnknownFormat(String),
    /// The container is damaged or inconsistent (truncated, bad lengths, bad protobuf ...).
    #[error("malformed {format} file: {detail}")]
    Malformed {
        /// Format being read.
        format: &'static str,
        /// What is wrong and where.
        detail: String,
    },
    /// A tensor is unusable: wrong byte count, unsupported dtype, NaN/Inf values ...
    #[error("tensor `{tensor}`: {detail}")]
    Tensor {
        /// Tensor name in the file.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// A pickle referenced a global that is not one of the data-only globals torch writes.
    #[error("refusing pickle global `{0}`: only the tensor-rebuild and data-only globals written by torch.save are accepted (save `model.state_dict()` instead of the module)")]
    ForbiddenGlobal(String),
    /// Nothing to store.
    #[error("no 3x3 convolution weights found ({0})")]
    NoFilters(String),
    /// Reading the staged file failed.
    #[error("i/o error reading checkpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Detects the format from the file's leading bytes (never from its name).
pub fn detect_format(head: &[u8]) -> Option<Format> {
    // zip (torch >= 1.6) or legacy torch pickle stream (magic number pickled as a long)
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19") {
        return Some(Format::Pytorch);
    }
    // tar (torch < 0.1.10): "ustar" at offset 257
    if head.len() > 262 && &head[257..262] == b"ustar" {
        return Some(Format::Pytorch);
    }
    // safetensors: u64 LE header length then '{'
    if head.len() >= 9 && head[8] == b'{' {
        let n = u64::from_le_bytes([head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7]]);
        if n > 1 && n < (100 << 20) {
            return Some(Format::Safetensors);
        }
    }
    // ONNX ModelProto: starts with field 1 (ir_version, varint) = 0x08, or another low field tag.
    if matches!(head.first(), Some(0x08) | Some(0x12) | Some(0x1a) | Some(0x3a) | Some(0x42)) {
        return Some(Format::Onnx);
    }
    None
}

/// Reads a checkpoint file of the given (or detected) format.
pub fn read_checkpoint(path: &Path, format: Option<Format>) -> Result<Checkpoint, ReadError> {
    let format = match format {
        Some(f) => f,
        None => {
            use std::io::Read;
            let mut head = vec![0u8; 512];
            let mut f = std::fs::File::open(path)?;
            let mut n = 0;
            while n < head.len() {
                let k = f.read(&mut head[n..])?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            head.truncate(n);
            detect_format(&head).ok_or_else(|| {
                ReadError::UnknownFormat(
                    "the leading bytes match neither ONNX, a torch.save zip/legacy/tar file, nor safetensors".into(),
                )
            })?
        }
    };
    match format {
        Format::Onnx => onnx::read(path),
        Format::Pytorch => pytorch::read(path),
        Format::Safetensors => safetensors::read(path),
    }
}
