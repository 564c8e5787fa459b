//! ONNX reader: finds the Conv nodes of a `ModelProto` graph, resolves their constant weights and
//! assigns each the CNN Filter DB's graph depth (longest path from the graph inputs).
//!
//! Only the top-level graph is walked (Conv nodes inside `If`/`Loop` bodies are not layers of the
//! exported network). Nothing from the file is trusted: every dimension, element count and byte
//! count is checked before use, and errors name the tensor or node at fault.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use prost::Message;

use super::{Checkpoint, ConvWeight, DepthDefinition, Format, ReadError};
use crate::onnx_pb::tensor_proto::{DataLocation, DataType};
use crate::onnx_pb::{GraphProto, ModelProto, NodeProto, TensorProto};

const FORMAT: &str = "onnx";

/// Reads an ONNX model file into its 4-D Conv weights, in graph node order, with graph depths.
pub fn read(path: &Path) -> Result<Checkpoint, ReadError> {
    let bytes = std::fs::read(path)?;
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| {
        malformed(format!(
            "the file does not decode as an ONNX ModelProto protobuf: {e}"
        ))
    })?;
    // The decoded model owns copies of every payload; release the file image before decoding
    // tensors so the peak stays near one copy of the weights.
    drop(bytes);
    from_model(model)
}

/// Depth state of a node during the longest-path sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeDepth {
    /// Not yet computed (its producers are not all done).
    Pending,
    /// Every input is a constant (or unknown): the node is folded away and has no depth.
    Constant,
    /// Longest path from the graph inputs.
    Depth(usize),
}

/// A Conv node whose weight will be decoded once the graph walk is over.
struct PlannedConv {
    /// Index into the constant-tensor table.
    tensor: usize,
    /// Name of the resolved constant tensor.
    name: String,
    depth: usize,
    groups: u32,
}

fn from_model(model: ModelProto) -> Result<Checkpoint, ReadError> {
    let ModelProto {
        producer_name,
        producer_version,
        graph,
        opset_import,
        ..
    } = model;
    let producer = format!(
        "{} {}",
        producer_name.unwrap_or_default(),
        producer_version.unwrap_or_default()
    )
    .trim()
    .to_string();
    let producer = (!producer.is_empty()).then_some(producer);
    let opset = opset_import
        .iter()
        .find(|o| is_onnx_domain(o.domain()))
        .and_then(|o| o.version);

    // A random byte string often decodes as a protobuf of unknown fields; requiring a graph with
    // nodes is what tells an ONNX model apart from noise.
    let Some(graph) = graph else {
        return Err(malformed(
            "the ModelProto has no graph (field 7); this is not an ONNX model".into(),
        ));
    };
    let GraphProto {
        node: mut nodes,
        initializer,
        input,
        ..
    } = graph;
    if nodes.is_empty() {
        return Err(malformed("the graph has no nodes".into()));
    }

    // Constant tensors, in one table: initializers, then the `value` tensors of Constant nodes
    // (moved out of the nodes, not copied). `names[i]` is the name consumers use for tensor i.
    let n_init = initializer.len();
    let mut tensors: Vec<TensorProto> = initializer;
    let mut names: Vec<String> = tensors.iter().map(|t| t.name().to_string()).collect();
    for node in nodes.iter_mut() {
        if !(is_onnx_domain(node.domain()) && node.op_type() == "Constant") {
            continue;
        }
        let Some(out) = node.output.first().filter(|o| !o.is_empty()).cloned() else {
            continue;
        };
        if let Some(t) = node
            .attribute
            .iter_mut()
            .find(|a| a.name() == "value")
            .and_then(|a| a.t.take())
        {
            tensors.push(t);
            names.push(out);
        }
    }

    let plan;
    let mut excluded = Vec::new();
    {
        let nodes = &nodes;
        let mut constant_by_name: HashMap<&str, usize> = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if i < n_init {
                constant_by_name.entry(name.as_str()).or_insert(i);
            } else {
                // A node output is what its consumers see, even if an initializer shares the name.
                constant_by_name.insert(name.as_str(), i);
            }
        }
        let initializer_names: HashSet<&str> =
            names.iter().take(n_init).map(String::as_str).collect();
        // Before IR version 4 initializers were also listed as graph inputs; those are weights,
        // not data inputs.
        let graph_inputs: HashSet<&str> = input
            .iter()
            .map(|v| v.name())
            .filter(|n| !n.is_empty() && !initializer_names.contains(n))
            .collect();

        let mut producer_of: HashMap<&str, usize> = HashMap::new();
        for (i, node) in nodes.iter().enumerate() {
            for out in node.output.iter().filter(|o| !o.is_empty()) {
                if let Some(&other) = producer_of.get(out.as_str()) {
                    return Err(malformed(format!(
                        "value `{out}` is produced by two nodes ({} and {})",
                        node_label(nodes, other),
                        node_label(nodes, i)
                    )));
                }
                producer_of.insert(out.as_str(), i);
            }
        }

        let depths = node_depths(nodes, &producer_of, &graph_inputs)?;

        let mut p = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if !is_onnx_domain(node.domain()) {
                continue;
            }
            let op = node.op_type();
            if op != "Conv" && op != "ConvTranspose" {
                continue;
            }
            let Some(weight) = node.input.get(1).filter(|w| !w.is_empty()) else {
                tracing::warn!(node = %node_label(nodes, i), "{op} node has no weight input; skipped");
                continue;
            };
            let resolved = resolve_constant(weight, nodes, &producer_of, &constant_by_name);
            if op == "ConvTranspose" {
                let name = resolved.and_then(|t| names.get(t)).unwrap_or(weight);
                excluded.push(name.clone());
                continue;
            }
            let Some(tensor) = resolved else {
                tracing::warn!(
                    node = %node_label(nodes, i),
                    weight = %weight,
                    "Conv weight is not a constant tensor (computed at runtime); skipped"
                );
                continue;
            };
            let (Some(t), Some(name)) = (tensors.get(tensor), names.get(tensor)) else {
                continue;
            };
            if t.dims.len() != 4 {
                // 1-D and 3-D convolutions: not 2-D filters, the paper leaves them out too.
                tracing::debug!(weight = %name, rank = t.dims.len(), "Conv weight is not 4-D; skipped");
                continue;
            }
            let depth = match depths.get(i) {
                Some(NodeDepth::Depth(d)) => *d,
                _ => {
                    tracing::warn!(
                        node = %node_label(nodes, i),
                        weight = %name,
                        "Conv node is not reachable from any graph input (all its inputs are constant); skipped"
                    );
                    continue;
                }
            };
            let group = node
                .attribute
                .iter()
                .find(|a| a.name() == "group")
                .map(|a| a.i())
                .unwrap_or(1);
            let groups = u32::try_from(group)
                .ok()
                .filter(|g| *g > 0)
                .ok_or_else(|| {
                    malformed(format!(
                        "Conv node {} has group = {group}; expected a positive integer",
                        node_label(nodes, i)
                    ))
                })?;
            p.push(PlannedConv {
                tensor,
                name: name.clone(),
                depth,
                groups,
            });
        }
        plan = p;
    }
    drop(nodes);

    // Free every constant no Conv uses (BatchNorm statistics, biases, classifier weights ...)
    // before decoding, and each Conv weight's payload after its last use.
    let mut uses = vec![0usize; tensors.len()];
    for p in &plan {
        if let Some(u) = uses.get_mut(p.tensor) {
            *u += 1;
        }
    }
    for (t, u) in tensors.iter_mut().zip(&uses) {
        if *u == 0 {
            *t = TensorProto::default();
        }
    }

    let mut convs = Vec::with_capacity(plan.len());
    for p in plan {
        let (Some(t), Some(u)) = (tensors.get_mut(p.tensor), uses.get_mut(p.tensor)) else {
            continue;
        };
        *u -= 1;
        let last_use = *u == 0;
        let dims = dims_usize(&p.name, &t.dims)?;
        let shape = match dims.as_slice() {
            [o, i, kh, kw] => [*o, *i, *kh, *kw],
            _ => continue,
        };
        let decode = shape[2] == 3 && shape[3] == 3;
        let values = tensor_values(&p.name, t, decode, last_use)?;
        if last_use {
            *t = TensorProto::default();
        }
        convs.push(ConvWeight {
            name: p.name,
            shape,
            values,
            graph_depth: Some(p.depth),
            groups: Some(p.groups),
        });
    }

    Ok(Checkpoint {
        format: Format::Onnx,
        convs,
        depth_definition: DepthDefinition::GraphLongestPath,
        producer,
        opset,
        excluded,
    })
}

/// Longest-path depth of every node from the graph inputs, whatever the node order.
///
/// Graph inputs are depth 0; a node is 1 + the max depth of its inputs that come from graph
/// inputs or from nodes with a depth. Initializers, Constant outputs, outputs of constant-only
/// nodes and names nobody produces do not count; a node with no counting input has no depth.
/// Kahn's algorithm (no recursion, so deep graphs cannot overflow the stack); nodes left over
/// lie on a cycle.
fn node_depths(
    nodes: &[NodeProto],
    producer_of: &HashMap<&str, usize>,
    graph_inputs: &HashSet<&str>,
) -> Result<Vec<NodeDepth>, ReadError> {
    let n = nodes.len();
    let mut waiting_on = vec![0usize; n];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in nodes.iter().enumerate() {
        for inp in node.input.iter().filter(|s| !s.is_empty()) {
            if let Some(&p) = producer_of.get(inp.as_str())
                && let (Some(w), Some(c)) = (waiting_on.get_mut(i), consumers.get_mut(p))
            {
                *w += 1;
                c.push(i);
            }
        }
    }

    let mut depth = vec![NodeDepth::Pending; n];
    let mut ready: VecDeque<usize> = waiting_on
        .iter()
        .enumerate()
        .filter(|(_, w)| **w == 0)
        .map(|(i, _)| i)
        .collect();
    let mut done = 0usize;
    while let Some(i) = ready.pop_front() {
        let Some(node) = nodes.get(i) else { continue };
        let mut deepest: Option<usize> = None;
        for inp in node.input.iter().filter(|s| !s.is_empty()) {
            let d = match producer_of.get(inp.as_str()) {
                Some(&p) => match depth.get(p) {
                    Some(NodeDepth::Depth(d)) => Some(*d),
                    _ => None,
                },
                None => graph_inputs.contains(inp.as_str()).then_some(0),
            };
            if let Some(d) = d {
                deepest = Some(deepest.map_or(d, |b| b.max(d)));
            }
        }
        if let Some(slot) = depth.get_mut(i) {
            *slot = deepest.map_or(NodeDepth::Constant, |d| {
                NodeDepth::Depth(d.saturating_add(1))
            });
        }
        done += 1;
        for &c in consumers.get(i).map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(w) = waiting_on.get_mut(c) {
                *w -= 1;
                if *w == 0 {
                    ready.push_back(c);
                }
            }
        }
    }
    if done < n {
        let stuck = waiting_on.iter().position(|w| *w > 0).unwrap_or(0);
        return Err(malformed(format!(
            "the graph has a cycle: {} nodes lie on or after one, e.g. node {}",
            n - done,
            node_label(nodes, stuck)
        )));
    }
    Ok(depth)
}

/// Follows `Identity` nodes back from `name` to a constant tensor, if it is one.
fn resolve_constant(
    name: &str,
    nodes: &[NodeProto],
    producer_of: &HashMap<&str, usize>,
    constant_by_name: &HashMap<&str, usize>,
) -> Option<usize> {
    let mut name = name;
    // Each step moves to another node; more steps than nodes means an Identity cycle.
    for _ in 0..=nodes.len() {
        let Some(&p) = producer_of.get(name) else {
            return constant_by_name.get(name).copied();
        };
        let node = nodes.get(p)?;
        if !is_onnx_domain(node.domain()) {
            return None;
        }
        match node.op_type() {
            "Identity" => name = node.input.first()?.as_str(),
            "Constant" => return constant_by_name.get(name).copied(),
            _ => return None,
        }
    }
    None
}

/// Checks a tensor's dims, dtype and payload size, and decodes it to f32 when `decode` is set.
///
/// With `last_use`, a `float_data` payload is moved out instead of copied.
fn tensor_values(
    name: &str,
    t: &mut TensorProto,
    decode: bool,
    last_use: bool,
) -> Result<Vec<f32>, ReadError> {
    let err = |detail: String| ReadError::Tensor {
        tensor: name.to_string(),
        detail,
    };
    if t.data_location == Some(DataLocation::External as i32) || !t.external_data.is_empty() {
        return Err(err(
            "the weights are stored in an external data file, which FilterDB does not read; \
             convert the model to embed them, e.g. `onnx.save_model(onnx.load(path), out_path, \
             save_as_external_data=False)` (models over 2 GB cannot be embedded)"
                .into(),
        ));
    }
    let dtype = t.data_type();
    let type_name = DataType::try_from(dtype)
        .map(|d| d.as_str_name())
        .unwrap_or("UNKNOWN");
    let elem_size = match DataType::try_from(dtype) {
        Ok(DataType::Float) => 4,
        Ok(DataType::Float16 | DataType::Bfloat16) => 2,
        Ok(DataType::Double) => 8,
        _ => {
            return Err(err(format!(
                "unsupported data type {type_name} ({dtype}); expected FLOAT, FLOAT16, BFLOAT16 or DOUBLE"
            )));
        }
    };
    let count = dims_usize(name, &t.dims)?
        .into_iter()
        .try_fold(1usize, usize::checked_mul)
        .ok_or_else(|| err(format!("dims {:?} overflow the element count", t.dims)))?;

    if let Some(raw) = t.raw_data.as_deref().filter(|r| !r.is_empty()) {
        let need = count.checked_mul(elem_size).ok_or_else(|| {
            err(format!(
                "dims {:?} of {type_name} overflow the byte count",
                t.dims
            ))
        })?;
        if raw.len() != need {
            return Err(err(format!(
                "raw_data holds {} bytes but dims {:?} of {type_name} need {need}",
                raw.len(),
                t.dims
            )));
        }
        if !decode {
            return Ok(Vec::new());
        }
        // ONNX raw_data is little-endian whatever the host.
        return Ok(match DataType::try_from(dtype) {
            Ok(DataType::Float) => raw
                .as_chunks::<4>()
                .0
                .iter()
                .map(|b| f32::from_le_bytes(*b))
                .collect(),
            Ok(DataType::Float16) => raw
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| half::f16::from_bits(u16::from_le_bytes(*b)).to_f32())
                .collect(),
            Ok(DataType::Bfloat16) => raw
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| half::bf16::from_bits(u16::from_le_bytes(*b)).to_f32())
                .collect(),
            _ => raw
                .as_chunks::<8>()
                .0
                .iter()
                .map(|b| f64::from_le_bytes(*b) as f32)
                .collect(),
        });
    }

    let (field, have) = match DataType::try_from(dtype) {
        Ok(DataType::Float) => ("float_data", t.float_data.len()),
        Ok(DataType::Double) => ("double_data", t.double_data.len()),
        _ => ("int32_data", t.int32_data.len()),
    };
    if have != count {
        return Err(err(if have == 0 {
            format!(
                "neither raw_data nor {field} holds any data, but dims {:?} of {type_name} need {count} values",
                t.dims
            )
        } else {
            format!(
                "{field} holds {have} values but dims {:?} of {type_name} need {count}",
                t.dims
            )
        }));
    }
    if !decode {
        return Ok(Vec::new());
    }
    Ok(match DataType::try_from(dtype) {
        Ok(DataType::Float) if last_use => std::mem::take(&mut t.float_data),
        Ok(DataType::Float) => t.float_data.clone(),
        Ok(DataType::Double) => t.double_data.iter().map(|v| *v as f32).collect(),
        Ok(DataType::Bfloat16) => {
            let bits = half_bits(name, &t.int32_data)?;
            bits.map(|b| half::bf16::from_bits(b).to_f32()).collect()
        }
        _ => {
            let bits = half_bits(name, &t.int32_data)?;
            bits.map(|b| half::f16::from_bits(b).to_f32()).collect()
        }
    })
}

/// The 16-bit patterns of FLOAT16/BFLOAT16 values stored one per `int32_data` element.
fn half_bits<'a>(name: &str, data: &'a [i32]) -> Result<impl Iterator<Item = u16> + 'a, ReadError> {
    // Writers store the pattern zero-extended; accept sign-extension too, reject anything wider.
    if let Some((k, v)) = data
        .iter()
        .enumerate()
        .find(|(_, v)| !(-0x8000..=0xFFFF).contains(*v))
    {
        return Err(ReadError::Tensor {
            tensor: name.to_string(),
            detail: format!("int32_data element {k} is {v}, not a 16-bit pattern"),
        });
    }
    Ok(data.iter().map(|v| *v as u16))
}

/// Dims as `usize`, rejecting negative ones.
fn dims_usize(name: &str, dims: &[i64]) -> Result<Vec<usize>, ReadError> {
    dims.iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| ReadError::Tensor {
                tensor: name.to_string(),
                detail: format!("negative dimension {d} in dims {dims:?}"),
            })
        })
        .collect()
}

fn is_onnx_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// A node's name for messages, falling back to its op type and first output.
fn node_label(nodes: &[NodeProto], i: usize) -> String {
    match nodes.get(i) {
        Some(n) if !n.name().is_empty() => format!("`{}` ({})", n.name(), n.op_type()),
        Some(n) => format!(
            "#{i} ({} producing `{}`)",
            n.op_type(),
            n.output.first().map_or("", String::as_str)
        ),
        None => format!("#{i}"),
    }
}

fn malformed(detail: String) -> ReadError {
    ReadError::Malformed {
        format: FORMAT,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx_pb::{
        AttributeProto, OperatorSetIdProto, StringStringEntryProto, ValueInfoProto,
    };
    use crate::readers::extract;

    const FLOAT: i32 = DataType::Float as i32;
    const FLOAT16: i32 = DataType::Float16 as i32;
    const BFLOAT16: i32 = DataType::Bfloat16 as i32;
    const DOUBLE: i32 = DataType::Double as i32;

    fn seq(n: usize) -> Vec<f32> {
        (0..n).map(|x| x as f32 * 0.5 - 3.0).collect()
    }

    fn raw_f32(name: &str, dims: &[i64], vals: &[f32]) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(FLOAT),
            raw_data: Some(vals.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        }
    }

    /// A 4-D float weight `[o, i, kh, kw]` holding `seq`.
    fn weight(name: &str, shape: [i64; 4]) -> TensorProto {
        raw_f32(name, &shape, &seq(shape.iter().product::<i64>() as usize))
    }

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn conv(name: &str, x: &str, w: &str, y: &str) -> NodeProto {
        node("Conv", name, &[x, w], &[y])
    }

    fn constant(out: &str, t: TensorProto) -> NodeProto {
        let mut n = node("Constant", &format!("const_{out}"), &[], &[out]);
        n.attribute.push(AttributeProto {
            name: Some("value".into()),
            t: Some(t),
            r#type: Some(4),
            ..Default::default()
        });
        n
    }

    fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, inputs: &[&str]) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            producer_name: Some("pytorch".into()),
            producer_version: Some("2.1.0".into()),
            opset_import: vec![
                OperatorSetIdProto {
                    domain: Some("com.microsoft".into()),
                    version: Some(1),
                },
                OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(17),
                },
            ],
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: inputs
                    .iter()
                    .map(|n| ValueInfoProto {
                        name: Some(n.to_string()),
                    })
                    .collect(),
                output: vec![],
                name: Some("g".into()),
            }),
            ..Default::default()
        }
    }

    fn read_bytes(bytes: &[u8]) -> Result<Checkpoint, ReadError> {
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(f.path(), bytes).expect("write");
        read(f.path())
    }

    fn read_model(m: &ModelProto) -> Result<Checkpoint, ReadError> {
        read_bytes(&m.encode_to_vec())
    }

    /// Single Conv on the graph input with the given weight tensor as initializer.
    fn one_conv(w: TensorProto) -> Result<Checkpoint, ReadError> {
        let name = w.name().to_string();
        read_model(&model(vec![conv("c", "x", &name, "y")], vec![w], &["x"]))
    }

    fn summary(cp: &Checkpoint) -> Vec<(&str, [usize; 4], Option<usize>)> {
        cp.convs
            .iter()
            .map(|c| (c.name.as_str(), c.shape, c.graph_depth))
            .collect()
    }

    #[test]
    fn onnx_raw_initializers_follow_node_order_not_initializer_order() {
        // x -> conv1(w1) -> Relu -> conv2(w2); initializers listed w2 first.
        let m = model(
            vec![
                conv("conv1", "x", "w1", "a"),
                node("Relu", "r", &["a"], &["b"]),
                conv("conv2", "b", "w2", "y"),
            ],
            vec![weight("w2", [3, 2, 3, 3]), weight("w1", [2, 1, 3, 3])],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        assert_eq!(
            summary(&cp),
            vec![("w1", [2, 1, 3, 3], Some(1)), ("w2", [3, 2, 3, 3], Some(3))]
        );
        assert_eq!(cp.convs[0].values, seq(18));
        assert_eq!(cp.convs[1].values, seq(54));
        assert_eq!(cp.convs[0].groups, Some(1));
        assert_eq!(cp.format, Format::Onnx);
        assert_eq!(cp.depth_definition, DepthDefinition::GraphLongestPath);
        assert_eq!(cp.producer.as_deref(), Some("pytorch 2.1.0"));
        assert_eq!(cp.opset, Some(17));
        assert!(cp.excluded.is_empty());
    }

    #[test]
    fn onnx_producer_and_opset_fallbacks() {
        let mut m = model(
            vec![conv("c", "x", "w", "y")],
            vec![weight("w", [1, 1, 3, 3])],
            &["x"],
        );
        m.producer_name = None;
        m.producer_version = Some(String::new());
        m.opset_import = vec![OperatorSetIdProto {
            domain: Some("ai.onnx".into()),
            version: Some(11),
        }];
        let cp = read_model(&m).unwrap();
        assert_eq!(cp.producer, None);
        assert_eq!(cp.opset, Some(11));
        m.producer_name = Some("tf2onnx".into());
        m.opset_import.clear();
        let cp = read_model(&m).unwrap();
        assert_eq!(cp.producer.as_deref(), Some("tf2onnx"));
        assert_eq!(cp.opset, None);
    }

    #[test]
    fn onnx_constant_node_with_float_data_and_numeric_name() {
        let t = TensorProto {
            dims: vec![2, 1, 3, 3],
            data_type: Some(FLOAT),
            float_data: seq(18),
            name: Some("ignored".into()),
            ..Default::default()
        };
        let m = model(
            vec![constant("123", t), conv("c", "x", "123", "y")],
            vec![],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        assert_eq!(summary(&cp), vec![("123", [2, 1, 3, 3], Some(1))]);
        assert_eq!(cp.convs[0].values, seq(18));
    }

    #[test]
    fn onnx_float16_from_raw_data_and_int32_data() {
        let vals: Vec<f32> = seq(9)
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect();
        let bits: Vec<u16> = vals
            .iter()
            .map(|v| half::f16::from_f32(*v).to_bits())
            .collect();
        let raw = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(FLOAT16),
            raw_data: Some(bits.iter().flat_map(|b| b.to_le_bytes()).collect()),
            ..Default::default()
        };
        assert_eq!(one_conv(raw).unwrap().convs[0].values, vals);
        let typed = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(FLOAT16),
            int32_data: bits.iter().map(|b| i32::from(*b)).collect(),
            ..Default::default()
        };
        assert_eq!(one_conv(typed).unwrap().convs[0].values, vals);
    }

    #[test]
    fn onnx_float16_int32_data_out_of_range_is_an_error() {
        let t = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(FLOAT16),
            int32_data: vec![0, 0, 0, 0, 0x1_0000, 0, 0, 0, 0],
            ..Default::default()
        };
        let e = one_conv(t).unwrap_err().to_string();
        assert!(
            e.contains("`w`") && e.contains("int32_data element 4 is 65536"),
            "{e}"
        );
    }

    #[test]
    fn onnx_bfloat16_raw_and_int32_data() {
        let vals: Vec<f32> = seq(9)
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        let bits: Vec<u16> = vals
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let raw = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(BFLOAT16),
            raw_data: Some(bits.iter().flat_map(|b| b.to_le_bytes()).collect()),
            ..Default::default()
        };
        assert_eq!(one_conv(raw).unwrap().convs[0].values, vals);
        let typed = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(BFLOAT16),
            int32_data: bits.iter().map(|b| i32::from(*b)).collect(),
            ..Default::default()
        };
        assert_eq!(one_conv(typed).unwrap().convs[0].values, vals);
    }

    #[test]
    fn onnx_double_data_and_double_raw() {
        let vals: Vec<f64> = (0..9).map(|x| f64::from(x) * 0.25).collect();
        let typed = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(DOUBLE),
            double_data: vals.clone(),
            ..Default::default()
        };
        let want: Vec<f32> = vals.iter().map(|v| *v as f32).collect();
        assert_eq!(one_conv(typed).unwrap().convs[0].values, want);
        let raw = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(DOUBLE),
            raw_data: Some(vals.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        };
        assert_eq!(one_conv(raw).unwrap().convs[0].values, want);
    }

    #[test]
    fn onnx_identity_chain_resolves_to_the_constant() {
        let m = model(
            vec![
                node("Identity", "id1", &["conv.weight"], &["onnx::Conv_7"]),
                node("Identity", "id2", &["onnx::Conv_7"], &["onnx::Conv_8"]),
                conv("c", "x", "onnx::Conv_8", "y"),
            ],
            vec![weight("conv.weight", [2, 2, 3, 3])],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        // The Identity nodes only see constants, so they take no depth level.
        assert_eq!(summary(&cp), vec![("conv.weight", [2, 2, 3, 3], Some(1))]);
        assert_eq!(cp.convs[0].values, seq(36));
    }

    #[test]
    fn onnx_runtime_computed_weight_is_skipped() {
        let m = model(
            vec![
                node("Mul", "scale", &["x", "w"], &["w_rt"]),
                conv("dyn", "x", "w_rt", "y1"),
                conv("ok", "x", "w", "y2"),
            ],
            vec![weight("w", [1, 1, 3, 3])],
            &["x"],
        );
        assert_eq!(
            summary(&read_model(&m).unwrap()),
            vec![("w", [1, 1, 3, 3], Some(1))]
        );
    }

    #[test]
    fn onnx_conv_transpose_is_excluded() {
        let m = model(
            vec![
                conv("c", "x", "w", "a"),
                node("ConvTranspose", "up", &["a", "wt"], &["y"]),
            ],
            vec![weight("w", [2, 1, 3, 3]), weight("wt", [2, 2, 3, 3])],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        assert_eq!(summary(&cp), vec![("w", [2, 1, 3, 3], Some(1))]);
        assert_eq!(cp.excluded, vec!["wt".to_string()]);
    }

    #[test]
    fn onnx_non_3x3_kernels_are_counted_not_decoded_and_other_ranks_skipped() {
        let m = model(
            vec![
                conv("k13", "x", "w13", "a"),
                conv("k55", "a", "w55", "b"),
                conv("k33", "b", "w33", "c"),
                node("Conv", "conv1d", &["c", "w1d"], &["d"]),
                node("Conv", "conv3d", &["c", "w3d"], &["e"]),
            ],
            vec![
                weight("w13", [4, 1, 1, 3]),
                weight("w55", [2, 4, 5, 5]),
                weight("w33", [2, 2, 3, 3]),
                raw_f32("w1d", &[2, 2, 3], &seq(12)),
                raw_f32("w3d", &[1, 2, 3, 3, 3], &seq(54)),
            ],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        assert_eq!(
            summary(&cp),
            vec![
                ("w13", [4, 1, 1, 3], Some(1)),
                ("w55", [2, 4, 5, 5], Some(2)),
                ("w33", [2, 2, 3, 3], Some(3))
            ]
        );
        assert!(cp.convs[0].values.is_empty() && cp.convs[1].values.is_empty());
        assert_eq!(cp.convs[2].values.len(), 36);
        let em = extract(cp).unwrap();
        assert_eq!(em.kernel_shape_counts.get("1x3"), Some(&4));
        assert_eq!(em.kernel_shape_counts.get("5x5"), Some(&8));
        assert_eq!(em.kernel_shape_counts.get("3x3"), Some(&4));
        assert_eq!(em.layers.len(), 1);
        assert_eq!(em.layers[0].conv_depth, 2);
    }

    #[test]
    fn onnx_non_3x3_weights_are_still_size_checked() {
        let mut w = weight("w55", [1, 1, 5, 5]);
        w.raw_data.as_mut().unwrap().pop();
        let e = one_conv(w).unwrap_err().to_string();
        assert!(
            e.contains("raw_data holds 99 bytes but dims [1, 1, 5, 5] of FLOAT need 100"),
            "{e}"
        );
    }

    #[test]
    fn onnx_depthwise_group_attribute() {
        let mut dw = conv("dw", "x", "w", "y");
        dw.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(32),
            r#type: Some(2),
            ..Default::default()
        });
        let cp = read_model(&model(vec![dw], vec![weight("w", [32, 1, 3, 3])], &["x"])).unwrap();
        assert_eq!(cp.convs[0].groups, Some(32));
        assert_eq!(cp.convs[0].shape, [32, 1, 3, 3]);

        let mut bad = conv("bad", "x", "w", "y");
        bad.attribute.push(AttributeProto {
            name: Some("group".into()),
            i: Some(0),
            ..Default::default()
        });
        let e = read_model(&model(vec![bad], vec![weight("w", [1, 1, 3, 3])], &["x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bad`") && e.contains("group = 0"), "{e}");
    }

    /// Two branches from x: a long one (conv a -> relu) and a short one (conv b), joined by Add,
    /// then conv c. a and b share depth 1; c is at the longest path, 1 + Add(3) = 4.
    fn branchy_nodes() -> Vec<NodeProto> {
        vec![
            conv("a", "x", "wa", "ya"),
            node("Relu", "relu", &["ya"], &["ra"]),
            conv("b", "x", "wb", "yb"),
            node("Add", "add", &["ra", "yb"], &["s"]),
            conv("c", "s", "wc", "yc"),
        ]
    }

    fn branchy_inits() -> Vec<TensorProto> {
        vec![
            weight("wc", [1, 2, 3, 3]),
            weight("wb", [2, 1, 1, 1]),
            weight("wa", [2, 1, 3, 3]),
        ]
    }

    #[test]
    fn onnx_parallel_branches_share_depth_and_joins_take_the_longest_path() {
        let cp = read_model(&model(branchy_nodes(), branchy_inits(), &["x"])).unwrap();
        assert_eq!(
            summary(&cp),
            vec![
                ("wa", [2, 1, 3, 3], Some(1)),
                ("wb", [2, 1, 1, 1], Some(1)),
                ("wc", [1, 2, 3, 3], Some(4))
            ]
        );
    }

    #[test]
    fn onnx_unsorted_node_list_gives_the_same_depths() {
        let sorted = read_model(&model(branchy_nodes(), branchy_inits(), &["x"])).unwrap();
        let mut nodes = branchy_nodes();
        nodes.reverse();
        let unsorted = read_model(&model(nodes, branchy_inits(), &["x"])).unwrap();
        let depth_of = |cp: &Checkpoint| {
            let mut v: Vec<(String, Option<usize>)> = cp
                .convs
                .iter()
                .map(|c| (c.name.clone(), c.graph_depth))
                .collect();
            v.sort();
            v
        };
        assert_eq!(depth_of(&sorted), depth_of(&unsorted));
        // Layer order is still the node order of the file.
        let names: Vec<&str> = unsorted.convs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["wc", "wb", "wa"]);
    }

    #[test]
    fn onnx_constant_subgraphs_and_initializers_listed_as_inputs_take_no_depth() {
        // IR < 4 style: the initializers w and s are also listed as graph inputs. The Constant
        // and Mul(s, k0) only see constants, so they take no depth: Add(x, k) is depth 1 and
        // conv c depth 2. Conv `folded` reads only constants, so it has no depth and is
        // skipped; had s counted as a graph input it would be recorded at depth 2.
        let m = model(
            vec![
                constant("k0", raw_f32("", &[1], &[1.0])),
                node("Mul", "fold", &["s", "k0"], &["k"]),
                node("Add", "add", &["x", "k", ""], &["xa"]),
                conv("c", "xa", "w", "y"),
                conv("folded", "k", "w", "z"),
            ],
            vec![raw_f32("s", &[1], &[2.0]), weight("w", [1, 1, 3, 3])],
            &["x", "s", "w"],
        );
        let cp = read_model(&m).unwrap();
        assert_eq!(summary(&cp), vec![("w", [1, 1, 3, 3], Some(2))]);
    }

    #[test]
    fn onnx_extract_ranks_depths_over_all_kernel_shapes() {
        // stem 7x7 (1) -> relu (2) -> maxpool (3) -> [3x3 a (4) | 1x1 proj (4)] -> add (5) -> 3x3 c (6)
        let m = model(
            vec![
                conv("stem", "x", "w7", "s"),
                node("Relu", "r", &["s"], &["sr"]),
                node("MaxPool", "p", &["sr"], &["sp"]),
                conv("a", "sp", "wa", "ya"),
                conv("proj", "sp", "wp", "yp"),
                node("Add", "add", &["ya", "yp"], &["sum"]),
                conv("c", "sum", "wc", "yc"),
            ],
            vec![
                weight("w7", [2, 1, 7, 7]),
                weight("wa", [2, 2, 3, 3]),
                weight("wp", [2, 2, 1, 1]),
                weight("wc", [1, 2, 3, 3]),
            ],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        let depths: Vec<Option<usize>> = cp.convs.iter().map(|c| c.graph_depth).collect();
        assert_eq!(depths, vec![Some(1), Some(4), Some(4), Some(6)]);
        let em = extract(cp).unwrap();
        let got: Vec<(&str, u32, f64, u32)> = em
            .layers
            .iter()
            .map(|l| {
                (
                    l.tensor_name.as_str(),
                    l.conv_depth,
                    l.conv_depth_norm,
                    l.layer_index,
                )
            })
            .collect();
        assert_eq!(got, vec![("wa", 1, 0.5, 0), ("wc", 2, 1.0, 1)]);
        assert_eq!(em.kernel_shape_counts.get("7x7"), Some(&2));
        assert_eq!(em.layers[0].filters, seq(36));
    }

    #[test]
    fn onnx_shared_weight_is_recorded_per_conv_node() {
        let m = model(
            vec![conv("c1", "x", "w", "a"), conv("c2", "a", "w", "b")],
            vec![weight("w", [1, 1, 3, 3])],
            &["x"],
        );
        let cp = read_model(&m).unwrap();
        assert_eq!(
            summary(&cp),
            vec![("w", [1, 1, 3, 3], Some(1)), ("w", [1, 1, 3, 3], Some(2))]
        );
        assert_eq!(cp.convs[0].values, cp.convs[1].values);
    }

    #[test]
    fn onnx_shape_and_byte_count_mismatches_name_the_tensor() {
        let mut w = weight("conv1.weight", [2, 1, 3, 3]);
        w.raw_data.as_mut().unwrap().truncate(70);
        let e = one_conv(w).unwrap_err();
        assert!(
            matches!(&e, ReadError::Tensor { tensor, .. } if tensor == "conv1.weight"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("raw_data holds 70 bytes but dims [2, 1, 3, 3] of FLOAT need 72"),
            "{e}"
        );

        let typed = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(FLOAT),
            float_data: seq(8),
            ..Default::default()
        };
        let e = one_conv(typed).unwrap_err().to_string();
        assert!(
            e.contains("float_data holds 8 values but dims [1, 1, 3, 3] of FLOAT need 9"),
            "{e}"
        );

        let empty = TensorProto {
            name: Some("w".into()),
            dims: vec![1, 1, 3, 3],
            data_type: Some(FLOAT),
            ..Default::default()
        };
        let e = one_conv(empty).unwrap_err().to_string();
        assert!(e.contains("neither raw_data nor float_data"), "{e}");
    }

    #[test]
    fn onnx_bad_dims_and_dtypes_are_errors() {
        let mut w = weight("w", [1, 1, 3, 3]);
        w.dims = vec![-1, 1, 3, 3];
        let e = one_conv(w).unwrap_err().to_string();
        assert!(e.contains("negative dimension -1"), "{e}");

        let mut w = weight("w", [1, 1, 3, 3]);
        w.dims = vec![i64::MAX, i64::MAX, 3, 3];
        let e = one_conv(w).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");

        let mut w = weight("w", [1, 1, 3, 3]);
        w.data_type = Some(DataType::Int8 as i32);
        let e = one_conv(w).unwrap_err().to_string();
        assert!(e.contains("unsupported data type INT8 (3)"), "{e}");

        let mut w = weight("w", [1, 1, 3, 3]);
        w.data_type = Some(999);
        let e = one_conv(w).unwrap_err().to_string();
        assert!(e.contains("unsupported data type UNKNOWN (999)"), "{e}");
    }

    #[test]
    fn onnx_external_data_is_an_error_explaining_the_conversion() {
        let mut w = weight("w", [1, 1, 3, 3]);
        w.raw_data = None;
        w.data_location = Some(DataLocation::External as i32);
        w.external_data = vec![StringStringEntryProto {
            key: Some("location".into()),
            value: Some("weights.bin".into()),
        }];
        let e = one_conv(w).unwrap_err();
        assert!(
            matches!(&e, ReadError::Tensor { tensor, .. } if tensor == "w"),
            "{e:?}"
        );
        assert!(e.to_string().contains("save_as_external_data=False"), "{e}");

        let mut w = weight("w", [1, 1, 3, 3]);
        w.external_data = vec![StringStringEntryProto {
            key: Some("location".into()),
            value: Some("x".into()),
        }];
        assert!(
            one_conv(w)
                .unwrap_err()
                .to_string()
                .contains("external data")
        );
    }

    #[test]
    fn onnx_cycle_and_duplicate_producers_are_malformed() {
        let m = model(
            vec![
                node("Add", "loop_a", &["x", "b"], &["a"]),
                node("Relu", "loop_b", &["a"], &["b"]),
                conv("c", "a", "w", "y"),
            ],
            vec![weight("w", [1, 1, 3, 3])],
            &["x"],
        );
        let e = read_model(&m).unwrap_err();
        assert!(
            matches!(&e, ReadError::Malformed { format: "onnx", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("cycle"), "{e}");

        let m = model(
            vec![
                node("Relu", "r1", &["x"], &["a"]),
                node("Relu", "r2", &["x"], &["a"]),
                conv("c", "a", "w", "y"),
            ],
            vec![weight("w", [1, 1, 3, 3])],
            &["x"],
        );
        let e = read_model(&m).unwrap_err().to_string();
        assert!(e.contains("produced by two nodes"), "{e}");
    }

    #[test]
    fn onnx_missing_graph_or_nodes_is_malformed() {
        let e = read_bytes(&[]).unwrap_err();
        assert!(
            matches!(&e, ReadError::Malformed { format: "onnx", .. })
                && e.to_string().contains("no graph"),
            "{e:?}"
        );
        let mut m = model(vec![], vec![], &["x"]);
        let e = read_model(&m).unwrap_err().to_string();
        assert!(e.contains("no nodes"), "{e}");
        m.graph = None;
        assert!(read_model(&m).unwrap_err().to_string().contains("no graph"));
    }

    #[test]
    fn onnx_random_and_truncated_bytes_are_errors_not_panics() {
        let e = read_bytes(b"\x08\x07this is not an onnx file at all, just text \xff\xfe\x00")
            .unwrap_err();
        assert!(
            matches!(e, ReadError::Malformed { format: "onnx", .. }),
            "{e:?}"
        );
        let good = model(branchy_nodes(), branchy_inits(), &["x"]).encode_to_vec();
        for cut in [1, 2, 10, good.len() / 3, good.len() / 2, good.len() - 1] {
            assert!(read_bytes(&good[..cut]).is_err(), "truncated at {cut}");
        }
        // Deterministic pseudo-random inputs (xorshift) of varied lengths, some with a valid prefix.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for case in 0..300 {
            let len = (case * 7) % 400;
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            if case % 3 == 0 {
                let keep = good.len().min(case * 3);
                buf.splice(0..0, good[..keep].iter().copied());
            }
            // Ok is acceptable if the bytes happen to form a model; a panic is not.
            let _ = read_bytes(&buf);
        }
    }
}
