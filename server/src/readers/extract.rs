//! From conv weights to layers of 3x3 filters, with the CNN Filter DB's depth definitions.

use std::collections::{BTreeMap, BTreeSet};

use super::{Checkpoint, DepthDefinition, Format, ReadError};

/// One stored layer: every 3x3 slice of one 4-D conv weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedLayer {
    /// Tensor name in the checkpoint.
    pub tensor_name: String,
    /// Output channels `O`.
    pub out_channels: u32,
    /// Input channels per group `I/groups` (1 for depthwise).
    pub in_channels: u32,
    /// Conv `group` attribute when the format records it.
    pub groups: Option<u32>,
    /// Depth rank, see [`DepthDefinition`].
    pub conv_depth: u32,
    /// `conv_depth / max conv_depth` of the model (0 when the model has a single level).
    pub conv_depth_norm: f64,
    /// Position among the model's 3x3 layers (0-based).
    pub layer_index: u32,
    /// `O * I/groups` filters of 9 values, output-channel major, each row-major.
    pub filters: Vec<f32>,
}

impl ExtractedLayer {
    /// Number of 3x3 filters in the layer.
    pub fn n_filters(&self) -> u64 {
        (self.filters.len() / 9) as u64
    }
}

/// A checkpoint reduced to what FilterDB stores.
#[derive(Debug, Clone)]
pub struct ExtractedModel {
    /// Container format.
    pub format: Format,
    /// 3x3 layers in layer order.
    pub layers: Vec<ExtractedLayer>,
    /// Number of 2-D kernels per kernel shape `"KHxKW"` over all 4-D conv weights (3x3 included),
    /// like the CNN Filter DB's `(X, Y) filters` columns.
    pub kernel_shape_counts: BTreeMap<String, u64>,
    /// How `conv_depth` is defined for this model.
    pub depth_definition: DepthDefinition,
    /// Producer note (ONNX producer name and version).
    pub producer: Option<String>,
    /// ONNX opset.
    pub opset: Option<i64>,
    /// Weights deliberately left out (e.g. ConvTranspose).
    pub excluded: Vec<String>,
}

impl ExtractedModel {
    /// Total number of 3x3 filters.
    pub fn n_filters(&self) -> u64 {
        self.layers.iter().map(ExtractedLayer::n_filters).sum()
    }
}

/// Cuts a checkpoint's 3x3 conv weights into filters and assigns depths.
///
/// A filter is one `[3, 3]` slice of a weight `[O, I/groups, 3, 3]`, flattened row-major; slice
/// `(o, i)` is filter `o * I/groups + i` of the layer. Other kernel shapes are only counted.
/// Non-finite values in a 3x3 weight are an error naming the tensor and the element.
pub fn extract(cp: Checkpoint) -> Result<ExtractedModel, ReadError> {
    let mut kernel_shape_counts: BTreeMap<String, u64> = BTreeMap::new();
    for c in &cp.convs {
        let [o, i, kh, kw] = c.shape;
        *kernel_shape_counts.entry(format!("{kh}x{kw}")).or_default() += (o * i) as u64;
    }

    // Depth levels: over ALL 4-D convs of any kernel size, as the paper does.
    let level_of: Vec<usize> = match cp.depth_definition {
        DepthDefinition::GraphLongestPath => {
            let mut missing = cp.convs.iter().filter(|c| c.graph_depth.is_none());
            if let Some(c) = missing.next() {
                return Err(ReadError::Tensor {
                    tensor: c.name.clone(),
                    detail: "conv weight has no graph depth although the format has a graph".into(),
                });
            }
            let levels: BTreeSet<usize> = cp.convs.iter().filter_map(|c| c.graph_depth).collect();
            let rank: BTreeMap<usize, usize> = levels.iter().enumerate().map(|(r, d)| (*d, r)).collect();
            cp.convs.iter().map(|c| c.graph_depth.and_then(|d| rank.get(&d).copied()).unwrap_or(0)).collect()
        }
        DepthDefinition::WeightOrder => (0..cp.convs.len()).collect(),
    };
    let max_level = level_of.iter().copied().max().unwrap_or(0);

    let mut layers = Vec::new();
    for (c, level) in cp.convs.into_iter().zip(level_of) {
        let [o, i, kh, kw] = c.shape;
        if kh != 3 || kw != 3 || o == 0 || i == 0 {
            continue;
        }
        let n = o * i;
        if c.values.len() != n * 9 {
            return Err(ReadError::Tensor {
                tensor: c.name,
                detail: format!("holds {} values but its shape [{o}, {i}, 3, 3] needs {}", c.values.len(), n * 9),
            });
        }
        if let Some(bad) = c.values.iter().position(|v| !v.is_finite()) {
            let (f, k) = (bad / 9, bad % 9);
            return Err(ReadError::Tensor {
                tensor: c.name,
                detail: format!(
                    "non-finite value {} at output channel {}, input channel {}, kernel position ({}, {})",
                    c.values[bad],
                    f / i,
                    f % i,
                    k / 3,
                    k % 3
                ),
            });
        }
        let out_channels = u32::try_from(o).map_err(|_| too_big(&c.name))?;
        let in_channels = u32::try_from(i).map_err(|_| too_big(&c.name))?;
        let layer_index = u32::try_from(layers.len()).map_err(|_| too_big(&c.name))?;
        layers.push(ExtractedLayer {
            tensor_name: c.name,
            out_channels,
            in_channels,
            groups: c.groups,
            conv_depth: level as u32,
            conv_depth_norm: if max_level == 0 { 0.0 } else { level as f64 / max_level as f64 },
            layer_index,
            filters: c.values,
        });
    }
    if layers.is_empty() {
        let shapes: Vec<String> = kernel_shape_counts.iter().map(|(s, n)| format!("{n} kernels of {s}")).collect();
        return Err(ReadError::NoFilters(if shapes.is_empty() {
            "the checkpoint holds no 4-D convolution weights".into()
        } else {
            format!("conv weights present: {}", shapes.join(", "))
        }));
    }
    Ok(ExtractedModel {
        format: cp.format,
        layers,
        kernel_shape_counts,
        depth_definition: cp.depth_definition,
        producer: cp.producer,
        opset: cp.opset,
        excluded: cp.excluded,
    })
}

fn too_big(name: &str) -> ReadError {
    ReadError::Tensor { tensor: name.to_string(), detail: "dimension exceeds 2^32".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::ConvWeight;

    fn conv(name: &str, shape: [usize; 4], depth: Option<usize>) -> ConvWeight {
        let n: usize = shape.iter().product();
        ConvWeight { name: name.into(), shape, values: (0..n).map(|x| x as f32).collect(), graph_depth: depth, groups: None }
    }

    #[test]
    fn depth_ranks_count_every_kernel_shape_and_share_parallel_levels() {
        let cp = Checkpoint {
            format: Format::Onnx,
            convs: vec![
                conv("stem7x7", [4, 3, 7, 7], Some(1)),
                conv("a", [2, 4, 3, 3], Some(3)),
                conv("b_parallel", [2, 4, 3, 3], Some(3)),
                conv("proj1x1", [8, 4, 1, 1], Some(5)),
                conv("c", [2, 2, 3, 3], Some(9)),
            ],
            depth_definition: DepthDefinition::GraphLongestPath,
            producer: None,
            opset: Some(13),
            excluded: vec![],
        };
        let m = extract(cp).unwrap();
        let got: Vec<(&str, u32, f64, u32)> =
            m.layers.iter().map(|l| (l.tensor_name.as_str(), l.conv_depth, l.conv_depth_norm, l.layer_index)).collect();
        assert_eq!(got, vec![("a", 1, 1.0 / 3.0, 0), ("b_parallel", 1, 1.0 / 3.0, 1), ("c", 3, 1.0, 2)]);
        assert_eq!(m.kernel_shape_counts["7x7"], 12);
        assert_eq!(m.kernel_shape_counts["1x1"], 32);
        assert_eq!(m.kernel_shape_counts["3x3"], 8 + 8 + 4);
        // filter (o=1, i=2) of layer a is values 9*(1*4+2) .. +9
        assert_eq!(m.layers[0].filters[9 * 6..9 * 7], (54..63).map(|x| x as f32).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn nan_is_reported_with_its_position() {
        let mut c = conv("w", [2, 2, 3, 3], None);
        c.values[9 * 3 + 4] = f32::NAN;
        let cp = Checkpoint {
            format: Format::Safetensors,
            convs: vec![c],
            depth_definition: DepthDefinition::WeightOrder,
            producer: None,
            opset: None,
            excluded: vec![],
        };
        let e = extract(cp).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("output channel 1, input channel 1, kernel position (1, 1)"), "{e}");
    }

    #[test]
    fn no_3x3_is_an_error_listing_shapes() {
        let cp = Checkpoint {
            format: Format::Safetensors,
            convs: vec![conv("p", [4, 4, 1, 1], None)],
            depth_definition: DepthDefinition::WeightOrder,
            producer: None,
            opset: None,
            excluded: vec![],
        };
        assert!(extract(cp).unwrap_err().to_string().contains("16 kernels of 1x1"));
    }
}
