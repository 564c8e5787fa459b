//! Hugging Face safetensors files.
//!
//! The `safetensors` crate validates the header and every tensor's byte range; this module
//! keeps the 4-D floating tensors. Layer order is the tensors' NATURAL name order
//! (`layer2` before `layer10`): the format stores tensors sorted by name, not in module
//! order, so the names are the only ordering signal and natural order matches how
//! modules are numbered.

use std::cmp::Ordering;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, SafeTensorError, TensorView};

use super::{Checkpoint, ConvWeight, DepthDefinition, Format, ReadError};

const FORMAT: &str = "safetensors";

/// Reads a safetensors file: every 4-D F32/F16/BF16/F64 tensor, in natural name order.
pub fn read(path: &Path) -> Result<Checkpoint, ReadError> {
    // One read into memory; tensors are views into it and only 3x3 values are copied out.
    let bytes = std::fs::read(path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| deserialize_error(&e, &bytes))?;

    let mut convs: Vec<(&str, TensorView<'_>)> = st
        .iter()
        .filter(|(_, t)| t.shape().len() == 4 && is_float(t.dtype()))
        .collect();
    convs.sort_by(|a, b| natural_cmp(a.0, b.0));

    let convs = convs
        .into_iter()
        .map(|(name, t)| {
            let &[o, i, kh, kw] = t.shape() else {
                return Err(ReadError::Tensor {
                    tensor: name.to_string(),
                    detail: format!("shape {:?} is not 4-D", t.shape()),
                });
            };
            let shape = [o, i, kh, kw];
            let values = if shape[2] == 3 && shape[3] == 3 {
                decode(name, t.dtype(), t.data())?
            } else {
                Vec::new()
            };
            Ok(ConvWeight {
                name: name.to_string(),
                shape,
                values,
                graph_depth: None,
                groups: None,
            })
        })
        .collect::<Result<Vec<_>, ReadError>>()?;

    Ok(Checkpoint {
        format: Format::Safetensors,
        convs,
        depth_definition: DepthDefinition::WeightOrder,
        producer: None,
        opset: None,
        excluded: Vec::new(),
    })
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Little-endian element bytes to f32 (F64 is rounded to nearest).
fn decode(name: &str, dtype: Dtype, b: &[u8]) -> Result<Vec<f32>, ReadError> {
    // The crate has checked that the byte range matches shape x dtype; a remainder here
    // would mean it did not, so it is reported rather than silently dropped.
    let size = dtype.bitsize() / 8;
    if size == 0 || !b.len().is_multiple_of(size) {
        return Err(ReadError::Tensor {
            tensor: name.to_string(),
            detail: format!(
                "{} data bytes are not a whole number of {dtype:?} elements",
                b.len()
            ),
        });
    }
    Ok(match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(ReadError::Tensor {
                tensor: name.to_string(),
                detail: format!("{other:?} is not a floating dtype"),
            });
        }
    })
}

/// Natural order: runs of ASCII digits compare as numbers (`layer2` < `layer10`), other
/// text bytewise; names equal under that order (`01` vs `1`) fall back to bytewise.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < x.len() && j < y.len() {
        if x[i].is_ascii_digit() && y[j].is_ascii_digit() {
            let (si, sj) = (i, j);
            while i < x.len() && x[i].is_ascii_digit() {
                i += 1;
            }
            while j < y.len() && y[j].is_ascii_digit() {
                j += 1;
            }
            // Compare without parsing, so any number of digits works: strip leading
            // zeros, then the longer number is larger, then digit by digit.
            let na = trim_zeros(&x[si..i]);
            let nb = trim_zeros(&y[sj..j]);
            let o = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
            if o != Ordering::Equal {
                return o;
            }
        } else {
            if x[i] != y[j] {
                return x[i].cmp(&y[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (x.len() - i).cmp(&(y.len() - j)).then_with(|| x.cmp(y))
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let k = d.iter().position(|&c| c != b'0').unwrap_or(d.len());
    &d[k..]
}

fn malformed(detail: String) -> ReadError {
    ReadError::Malformed {
        format: FORMAT,
        detail,
    }
}

/// A readable error for a file the `safetensors` crate refused. A byte range that
/// disagrees with its tensor's shape and dtype is that tensor's error; the rest are the
/// container's.
fn deserialize_error(e: &SafeTensorError, bytes: &[u8]) -> ReadError {
    let header_len = bytes
        .get(..8)
        .map(|h| u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]));
    let detail = match e {
        SafeTensorError::HeaderTooSmall => {
            format!(
                "file is {} bytes, too short for the 8-byte header length",
                bytes.len()
            )
        }
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            let n = header_len.unwrap_or(0);
            if n > bytes.len() as u64 {
                format!(
                    "header length {n} exceeds the file ({} bytes): not a safetensors file, or a damaged one",
                    bytes.len()
                )
            } else {
                format!("header length {n} exceeds the 100 MB safetensors header limit")
            }
        }
        SafeTensorError::InvalidHeader(u) => format!("header is not valid UTF-8: {u}"),
        SafeTensorError::InvalidHeaderDeserialization(j) => {
            format!(
                "header is not a valid safetensors JSON object ({{name: {{dtype, shape, data_offsets}}}}): {j}"
            )
        }
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor `{name}`: data_offsets do not start where the previous tensor ends (tensors must tile the data section)"
        ),
        SafeTensorError::TensorInvalidInfo => match mismatched_tensor(bytes) {
            Some((tensor, detail)) => return ReadError::Tensor { tensor, detail },
            None => "a tensor's byte range does not match its shape and dtype".into(),
        },
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors' data_offsets do not end exactly at the end of the data section (file is {} bytes; truncated?)",
            bytes.len()
        ),
        SafeTensorError::ValidationOverflow => "a tensor's shape x dtype size overflows".into(),
        SafeTensorError::MisalignedSlice => {
            "a sub-byte dtype tensor does not end on a byte boundary".into()
        }
        other => other.to_string(),
    };
    malformed(detail)
}

/// Finds the tensor whose `data_offsets` span disagrees with `shape x dtype`, by re-reading
/// the (already validated as JSON) header; only called on the error path.
fn mismatched_tensor(bytes: &[u8]) -> Option<(String, String)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype: Dtype = serde_json::from_value(info.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(info.get("shape")?.clone()).ok()?;
        let (start, end): (usize, usize) =
            serde_json::from_value(info.get("data_offsets")?.clone()).ok()?;
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let need = numel.checked_mul(dtype.bitsize())? / 8;
        let have = end.checked_sub(start);
        if have != Some(need) {
            let have = have.map_or_else(|| "negative".to_string(), |h| h.to_string());
            let detail = format!(
                "byte length {have} (data_offsets [{start}, {end}]) does not match shape {shape:?} of {dtype:?} ({need} bytes)"
            );
            return Some((name.clone(), detail));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn write(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> tempfile::NamedTempFile {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    fn raw(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    fn header_file(header: &str, data_len: usize) -> tempfile::NamedTempFile {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data_len));
        raw(&b)
    }

    fn malformed_detail(f: &tempfile::NamedTempFile) -> String {
        match read(f.path()) {
            Err(ReadError::Malformed {
                format: "safetensors",
                detail,
            }) => detail,
            other => panic!("expected a malformed safetensors error, got {other:?}"),
        }
    }

    #[test]
    fn safetensors_natural_order_dtypes_and_skips() {
        let w: Vec<f32> = (0..2 * 9).map(|i| i as f32 * 0.5 - 3.25).collect();
        let h: Vec<u8> = w
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let bf: Vec<u8> = w
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let d: Vec<u8> = w.iter().flat_map(|x| f64::from(*x).to_le_bytes()).collect();
        let f = write(&[
            (
                "layer10.conv.weight",
                Dtype::F32,
                vec![2, 1, 3, 3],
                f32_bytes(&w),
            ),
            ("layer2.conv.weight", Dtype::F16, vec![2, 1, 3, 3], h),
            (
                "layer2.bn.weight",
                Dtype::F32,
                vec![2],
                f32_bytes(&[1.0, 2.0]),
            ),
            ("layer1.conv.weight", Dtype::BF16, vec![2, 1, 3, 3], bf),
            (
                "layer3.proj.weight",
                Dtype::F32,
                vec![4, 2, 1, 1],
                f32_bytes(&[0.0; 8]),
            ),
            ("layer9.conv.weight", Dtype::F64, vec![2, 1, 3, 3], d),
            ("layer4.q.weight", Dtype::I8, vec![1, 1, 3, 3], vec![1; 9]),
        ]);
        let cp = read(f.path()).unwrap();
        let names: Vec<&str> = cp.convs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layer1.conv.weight",
                "layer2.conv.weight",
                "layer3.proj.weight",
                "layer9.conv.weight",
                "layer10.conv.weight"
            ]
        );
        assert_eq!(cp.depth_definition, DepthDefinition::WeightOrder);
        assert!(cp.convs[2].values.is_empty());
        assert_eq!(cp.convs[2].shape, [4, 2, 1, 1]);
        // All test values are exact in f16/bf16/f64.
        for c in [&cp.convs[0], &cp.convs[1], &cp.convs[3], &cp.convs[4]] {
            let bits: Vec<u32> = c.values.iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits, want, "{}", c.name);
        }
    }

    #[test]
    fn safetensors_natural_cmp() {
        let mut v = [
            "b10",
            "b2",
            "a",
            "b02",
            "b1x",
            "b1",
            "layer10.0",
            "layer1.10",
            "layer1.9",
            "99999999999999999999999",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "99999999999999999999999",
                "a",
                "b1",
                "b1x",
                "b02",
                "b2",
                "b10",
                "layer1.9",
                "layer1.10",
                "layer10.0"
            ]
        );
    }

    #[test]
    fn safetensors_errors_are_clear() {
        assert!(malformed_detail(&raw(b"\x01\x02")).contains("too short"));
        let mut huge = (200_000_000u64).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(malformed_detail(&raw(&huge)).contains("exceeds the file"));
        assert!(
            malformed_detail(&raw(&[0x40, 0, 0, 0, 0, 0, 0, 0, b'{', b'}']))
                .contains("exceeds the file")
        );
        assert!(
            malformed_detail(&header_file("{not json", 0)).contains("not a valid safetensors JSON")
        );
        // Offsets past the data section.
        let d = malformed_detail(&header_file(
            r#"{"w":{"dtype":"F32","shape":[1,1,3,3],"data_offsets":[0,36]}}"#,
            8,
        ));
        assert!(d.contains("end of the data section"), "{d}");
        // Span not matching shape x dtype: that tensor's error.
        let f = header_file(
            r#"{"w":{"dtype":"F32","shape":[1,1,3,3],"data_offsets":[0,32]}}"#,
            32,
        );
        match read(f.path()) {
            Err(ReadError::Tensor { tensor, detail }) => {
                assert_eq!(tensor, "w");
                assert!(
                    detail.contains("byte length 32") && detail.contains("(36 bytes)"),
                    "{detail}"
                );
            }
            other => panic!("expected a tensor error, got {other:?}"),
        }
        // A gap between tensors.
        let d = malformed_detail(&header_file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
        ));
        assert!(d.contains("`b`"), "{d}");
    }

    #[test]
    fn safetensors_empty_file_has_no_convs() {
        let f = header_file("{}", 0);
        assert!(read(f.path()).unwrap().convs.is_empty());
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::read;
    use crate::readers::pytorch::fixture_check::{check, fixture};
    use crate::readers::{ReadError, extract};

    #[test]
    fn safetensors_fixtures_match_expected_bits() {
        for f in [
            "tinynet.safetensors",
            "tinynet_f16.safetensors",
            "tinynet_bf16.safetensors",
            "tinynet_f64.safetensors",
            "natural_order.safetensors",
        ] {
            check(f, read);
        }
    }

    #[test]
    fn safetensors_bad_fixtures() {
        for rel in [
            "bad/truncated.safetensors",
            "bad/wrong_magic.safetensors",
            "bad/oversized_header.safetensors",
            "bad/random.bin",
        ] {
            match read(&fixture(rel)) {
                Err(ReadError::Malformed {
                    format: "safetensors",
                    detail,
                }) => {
                    assert!(!detail.is_empty(), "{rel}")
                }
                other => panic!("{rel}: expected Malformed safetensors, got {other:?}"),
            }
        }
        match read(&fixture("bad/shape_mismatch.safetensors")) {
            Err(ReadError::Tensor { tensor, detail }) => {
                assert_eq!(tensor, "conv.weight");
                assert!(detail.contains("400") && detail.contains("864"), "{detail}");
            }
            other => panic!("shape_mismatch: expected a Tensor error, got {other:?}"),
        }
        let nan = extract(read(&fixture("bad/nan.safetensors")).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            nan.contains("`conv2.weight`")
                && nan.contains("output channel 5, input channel 3, kernel position (1, 2)"),
            "{nan}"
        );
        let none = extract(read(&fixture("bad/no_3x3.safetensors")).unwrap()).unwrap_err();
        assert!(none.to_string().contains("16 kernels of 1x1"), "{none}");
    }
}
