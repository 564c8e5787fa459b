//! `torch.save` checkpoints: the zip layout (PyTorch >= 1.6), the legacy pickle stream
//! (0.1.10 to 1.5) and the old tar layout, read through `pytorch-reader`.
//!
//! Every pickle in the file is first scanned by [`super::pickle_scan`]: a global outside
//! [`super::pickle_scan::ALLOWED_GLOBALS`] refuses the file even though nothing is ever
//! executed, so a checkpoint FilterDB accepts is one `torch.load(weights_only=True)` would
//! accept too.
//!
//! Layer order is the state dict's own order. `pytorch-reader` returns a `HashMap`, so the
//! order is recovered from the same scan: it models the saved object's dicts and lists in
//! insertion order (an `OrderedDict` is pickled as an empty call plus `SETITEMS` in key
//! order) and walks them depth-first, naming every leaf exactly as `pytorch-reader` names a
//! tensor (keys and list indices joined by `.`). Each tensor is then placed by its name.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use pytorch_reader::{DType, PytorchError, PytorchReader, Tensor};

use super::pickle_scan::{self, LeafPath, ScanError};
use super::{Checkpoint, ConvWeight, DepthDefinition, Format, ReadError};

const FORMAT: &str = "pytorch";

/// Keys a training checkpoint nests its state dict under, most specific first.
const NESTED_KEYS: &[&str] = &[
    "state_dict",
    "model",
    "model_state_dict",
    "net",
    "network",
    "params",
    "ema",
    "model_ema",
    "module",
];

/// Largest pickle entry scanned from a zip or tar checkpoint (as `pytorch-reader` caps
/// `data.pkl`): a deflated entry can claim any size.
const MAX_PICKLE_BYTES: u64 = 100 << 20;

/// Reads a `torch.save` file: every 4-D floating tensor of its state dict, in file order.
pub fn read(path: &Path) -> Result<Checkpoint, ReadError> {
    // The scan must come first and pass: `pytorch-reader` would accept any global. It opens
    // the path again, so callers pass a staged file nobody else can replace in between.
    let order = scan_file(path)?;
    let reader = PytorchReader::new(path).map_err(open_error)?;
    let tensors = reader.into_tensors();

    let is_conv = |t: &Tensor| t.shape().len() == 4 && is_float(t.dtype());

    // Which tensors form the state dict: the root's own, else those under the first
    // well-known nesting key holding any, else every tensor in the file.
    let root_has_convs = tensors
        .iter()
        .any(|(n, t)| is_conv(t) && place_of(&order, n).0 == 1);
    let (prefix, chosen): (Option<&str>, Vec<(&String, &Tensor)>) = if root_has_convs {
        (
            None,
            tensors
                .iter()
                .filter(|(n, _)| place_of(&order, n).0 == 1)
                .collect(),
        )
    } else {
        let nested = NESTED_KEYS.iter().find(|k| {
            tensors.iter().any(|(n, t)| {
                is_conv(t) && matches!(place_of(&order, n), (c, Some(f)) if c >= 2 && f == **k)
            })
        });
        match nested {
            Some(k) => {
                tracing::debug!(
                    key = *k,
                    "pytorch checkpoint: state dict nested under a key"
                );
                let sel = tensors.iter().filter(
                    |(n, _)| matches!(place_of(&order, n), (c, Some(f)) if c >= 2 && f == *k),
                );
                (Some(*k), sel.collect())
            }
            None => (None, tensors.iter().collect()),
        }
    };

    let mut convs: Vec<(Option<usize>, String, &Tensor)> = chosen
        .into_iter()
        .filter(|(_, t)| is_conv(t))
        .map(|(n, t)| {
            let local = match prefix {
                Some(k) => n
                    .strip_prefix(k)
                    .and_then(|r| r.strip_prefix('.'))
                    .unwrap_or(n),
                None => n,
            };
            (order.get(n.as_str()).map(|l| l.order), local.to_string(), t)
        })
        .collect();
    // File order; names the scan did not place (none, in practice) go last, naturally.
    convs.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => super::safetensors::natural_cmp(&a.1, &b.1),
    });

    let convs = convs
        .into_iter()
        .map(|(_, name, t)| conv_weight(name, t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Checkpoint {
        format: Format::Pytorch,
        convs,
        depth_definition: DepthDefinition::WeightOrder,
        producer: None,
        opset: None,
        excluded: Vec::new(),
    })
}

/// Number of path components and the first one (the root dict's key) of a tensor name.
fn place_of<'a>(order: &'a HashMap<String, LeafPath>, name: &'a str) -> (usize, Option<&'a str>) {
    match order.get(name) {
        Some(l) => (l.components, Some(&*l.first)),
        // Not seen by the scan (cannot happen for names built from dict keys); treat a
        // dotted name as nested so it never shadows the root's own weights.
        None => (name.split('.').count(), name.split('.').next()),
    }
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// One conv weight; values are read (strides and offsets resolved by `pytorch-reader`)
/// only for 3x3 kernels, the only ones stored.
fn conv_weight(name: String, t: &Tensor) -> Result<ConvWeight, ReadError> {
    let &[o, i, kh, kw] = t.shape() else {
        return Err(ReadError::Tensor {
            tensor: name,
            detail: format!("shape {:?} is not 4-D", t.shape()),
        });
    };
    let shape = [o, i, kh, kw];
    let values = if shape[2] == 3 && shape[3] == 3 {
        let bytes = t.read().map_err(|e| tensor_read_error(&name, e))?;
        decode(&name, t.dtype(), &bytes, t.num_elements())?
    } else {
        Vec::new()
    };
    Ok(ConvWeight {
        name,
        shape,
        values,
        graph_depth: None,
        groups: None,
    })
}

/// Native-endian element bytes (what `Tensor::read` returns) to f32.
fn decode(name: &str, dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>, ReadError> {
    let size = dtype.size();
    if n.checked_mul(size) != Some(bytes.len()) {
        return Err(ReadError::Tensor {
            tensor: name.to_string(),
            detail: format!(
                "{} bytes read but {n} {dtype:?} elements need {}",
                bytes.len(),
                n.saturating_mul(size)
            ),
        });
    }
    let v = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(ReadError::Tensor {
                tensor: name.to_string(),
                detail: format!("{other:?} is not a floating dtype"),
            });
        }
    };
    Ok(v)
}

fn open_error(e: PytorchError) -> ReadError {
    match e {
        // The operating system could not read the file: not the file's fault.
        PytorchError::Io(io) if io.raw_os_error().is_some() => ReadError::Io(io),
        other => ReadError::Malformed {
            format: FORMAT,
            detail: other.to_string(),
        },
    }
}

fn tensor_read_error(name: &str, e: std::io::Error) -> ReadError {
    if e.raw_os_error().is_some() {
        ReadError::Io(e)
    } else {
        ReadError::Tensor {
            tensor: name.to_string(),
            detail: e.to_string(),
        }
    }
}

fn malformed(detail: impl Into<String>) -> ReadError {
    ReadError::Malformed {
        format: FORMAT,
        detail: detail.into(),
    }
}

fn scan_error(where_: &str, e: ScanError) -> ReadError {
    match e {
        ScanError::Forbidden(g) => ReadError::ForbiddenGlobal(g),
        ScanError::Truncated(d) | ScanError::Malformed(d) => malformed(format!("{where_}: {d}")),
    }
}

// ---------------------------------------------------------------------------------------
// Finding every pickle in the file. The container is detected exactly as `pytorch-reader`
// detects it, so the pickles scanned are the ones it will parse.
// ---------------------------------------------------------------------------------------

/// The legacy magic number 0x1950a86a20f9469cfc6c as `LONG1` bytes (protocol >= 2) and as
/// protocol 0/1 decimal text; `pytorch-reader` looks for either in the first 64 bytes.
const LEGACY_MAGIC_BYTES: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_MAGIC_TEXT: &[u8] = b"119547037146038801333356";

enum Container {
    Zip,
    Tar,
    Legacy,
    Pickle,
}

fn detect(head: &[u8]) -> Result<Container, ReadError> {
    let window = &head[..head.len().min(64)];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(Container::Zip)
    } else if head.get(257..262) == Some(b"ustar") {
        Ok(Container::Tar)
    } else if window.windows(10).any(|w| w == LEGACY_MAGIC_BYTES)
        || window.windows(24).any(|w| w == LEGACY_MAGIC_TEXT)
    {
        Ok(Container::Legacy)
    } else if matches!(head.first(), Some(0x80 | b'(' | b'}' | b']' | b'c')) {
        Ok(Container::Pickle)
    } else {
        Err(malformed(
            "not a torch.save file: no zip, tar, legacy-stream or pickle header",
        ))
    }
}

/// Scans every pickle of the file and returns the saved object's leaf paths in order.
fn scan_file(path: &Path) -> Result<HashMap<String, LeafPath>, ReadError> {
    let mut file = File::open(path)?;
    let mut head = Vec::with_capacity(262);
    (&mut file).take(262).read_to_end(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    let object = match detect(&head)? {
        Container::Zip => scan_zip(file)?,
        Container::Tar => scan_tar(file)?,
        Container::Legacy => scan_stream(
            file,
            &[
                "magic number",
                "protocol version",
                "sys_info",
                "object",
                "storage keys",
            ],
            3,
        )?,
        Container::Pickle => scan_stream(file, &["pickle"], 0)?,
    };
    object
        .leaf_paths()
        .map_err(|e| scan_error("saved object", e))
}

/// Reads a whole archive member, refusing one larger than [`MAX_PICKLE_BYTES`].
fn read_member(r: impl Read, name: &str) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    r.take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| malformed(format!("member `{name}`: {e}")))?;
    if buf.len() as u64 > MAX_PICKLE_BYTES {
        return Err(malformed(format!(
            "member `{name}` exceeds {MAX_PICKLE_BYTES} bytes"
        )));
    }
    Ok(buf)
}

/// Zip layout: every `*.pkl` entry is scanned; the object comes from the `data.pkl`
/// `pytorch-reader` picks (the one under the shortest root directory).
fn scan_zip(file: File) -> Result<pickle_scan::Pickle, ReadError> {
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| malformed(format!("zip archive: {e}")))?;
    let names: Vec<(usize, String)> = zip
        .file_names()
        .enumerate()
        .map(|(i, n)| n.map(|n| (i, n.into_owned())))
        .collect::<Result<_, _>>()
        .map_err(|e| malformed(format!("zip entry name: {e}")))?;
    let root = names
        .iter()
        .filter_map(|(_, n)| n.strip_suffix("data.pkl"))
        .filter(|r| r.is_empty() || r.ends_with('/'))
        .min_by_key(|r| r.len())
        .map(|r| format!("{r}data.pkl"))
        .ok_or_else(|| malformed("zip archive holds no data.pkl"))?;
    let mut object = None;
    for (i, name) in names.iter().filter(|(_, n)| n.ends_with(".pkl")) {
        // torch.save(..., compute_crc32=False) writes CRC 0, which torch.load accepts.
        let crc = zip
            .by_index_raw(*i)
            .map_err(|e| malformed(format!("zip entry `{name}`: {e}")))?
            .crc32();
        let entry = zip
            .by_index_with_options(*i, zip::ZipReadOptions::new().ignore_crc32(crc == 0))
            .map_err(|e| malformed(format!("zip entry `{name}`: {e}")))?;
        let bytes = read_member(entry, name)?;
        let p = scan_all(&bytes, 0, name)?;
        if *name == root {
            object = Some(p);
        }
    }
    object.ok_or_else(|| malformed("zip archive holds no data.pkl"))
}

/// Scans one pickle that must be complete within `bytes`.
fn scan_all(bytes: &[u8], start: usize, what: &str) -> Result<pickle_scan::Pickle, ReadError> {
    pickle_scan::scan(bytes, start).map_err(|e| scan_error(what, e))
}

/// Legacy stream (or a plain pickle): consecutive pickles from the start of the file,
/// followed (legacy) by raw storage bytes. Only the prefix holding the pickles is read:
/// a scan that runs out of bytes retries with twice as many.
fn scan_stream(
    mut file: File,
    parts: &[&str],
    object_at: usize,
) -> Result<pickle_scan::Pickle, ReadError> {
    let file_len = file.metadata()?.len();
    let mut buf = Vec::new();
    let mut want: u64 = 1 << 20;
    loop {
        let target = want.min(file_len);
        let have = buf.len() as u64;
        if target > have {
            (&mut file).take(target - have).read_to_end(&mut buf)?;
        }
        let complete = buf.len() as u64 >= file_len;
        let mut at = 0;
        let mut object = None;
        let mut retry = false;
        for (i, part) in parts.iter().enumerate() {
            match pickle_scan::scan(&buf, at) {
                Ok(p) => {
                    at = p.end;
                    if i == object_at {
                        object = Some(p);
                    }
                }
                Err(ScanError::Truncated(_)) if !complete => {
                    retry = true;
                    break;
                }
                Err(e) => return Err(scan_error(&format!("{part} pickle"), e)),
            }
        }
        if !retry {
            return object.ok_or_else(|| malformed("no saved object in the pickle stream"));
        }
        want = want.saturating_mul(2);
    }
}

/// Tar layout: `sys_info`, `pickle`, and the metadata pickles interleaved with binary
/// tables in `storages` and `tensors`. The object is the (last) `pickle` member, as
/// `pytorch-reader` keeps the last of a repeated name.
fn scan_tar(file: File) -> Result<pickle_scan::Pickle, ReadError> {
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut object = None;
    let entries = archive
        .entries()
        .map_err(|e| malformed(format!("tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| malformed(format!("tar archive: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| malformed(format!("tar member name: {e}")))?;
        let name = name.to_string_lossy().trim_start_matches("./").to_string();
        match name.as_str() {
            "sys_info" | "pickle" => {
                let bytes = read_member(&mut entry, &name)?;
                let p = scan_all(&bytes, 0, &name)?;
                if name == "pickle" {
                    object = Some(p);
                }
            }
            "storages" | "tensors" => {
                // `storages` holds the weights themselves, so it is not size-capped (the
                // file's own length bounds it, and `pytorch-reader` reads it whole too).
                let mut bytes = Vec::new();
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| malformed(format!("tar member `{name}`: {e}")))?;
                if name == "storages" {
                    scan_tar_storages(&bytes)?;
                } else {
                    scan_tar_tensors(&bytes)?;
                }
            }
            _ => {}
        }
    }
    object.ok_or_else(|| malformed("tar archive has no `pickle` member"))
}

fn count_of(p: &pickle_scan::Pickle, what: &str) -> Result<u64, ReadError> {
    match p.root {
        pickle_scan::Val::Int(n) if n >= 0 => Ok(n as u64),
        _ => Err(malformed(format!(
            "tar `{what}` count is not a non-negative int"
        ))),
    }
}

fn le_i64(b: &[u8], at: usize, what: &str) -> Result<i64, ReadError> {
    let s = b
        .get(at..at.saturating_add(8))
        .ok_or_else(|| malformed(format!("tar `{what}` table truncated")))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(i64::from_le_bytes(a))
}

/// `storages`: a count; per storage a `(key, location, storage class)` pickle, an `i64`
/// element count and the bytes; then a pickled list of views.
fn scan_tar_storages(b: &[u8]) -> Result<(), ReadError> {
    const WHAT: &str = "storages";
    let p = scan_all(b, 0, WHAT)?;
    let count = count_of(&p, WHAT)?;
    let mut at = p.end;
    for _ in 0..count {
        let meta = scan_all(b, at, WHAT)?;
        let class = meta.items(&meta.root).and_then(|f| f.get(2));
        let size = match class {
            Some(pickle_scan::Val::Global(_, n)) => storage_element_size(n),
            _ => None,
        }
        .ok_or_else(|| malformed("tar storage metadata does not name a known storage class"))?;
        let numel = le_i64(b, meta.end, WHAT)?;
        let len = u64::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(size))
            .and_then(|n| usize::try_from(n).ok());
        at = len
            .and_then(|len| (meta.end + 8).checked_add(len))
            .filter(|&end| end <= b.len())
            .ok_or_else(|| {
                malformed(format!(
                    "tar storage of {numel} elements extends beyond the `storages` member"
                ))
            })?;
    }
    scan_all(b, at, WHAT).map(|_| ())
}

/// `tensors`: a count; per tensor a `(key, storage key, tensor class)` pickle, an `i32` rank,
/// 4 padding bytes, then `rank` sizes, `rank` strides and the offset as `i64`.
fn scan_tar_tensors(b: &[u8]) -> Result<(), ReadError> {
    const WHAT: &str = "tensors";
    let p = scan_all(b, 0, WHAT)?;
    let count = count_of(&p, WHAT)?;
    let mut at = p.end;
    for _ in 0..count {
        let meta = scan_all(b, at, WHAT)?;
        let rank = b
            .get(meta.end..meta.end + 4)
            .map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            .ok_or_else(|| malformed("tar `tensors` table truncated"))?;
        let rank = usize::try_from(rank)
            .ok()
            .filter(|&r| r <= 64)
            .ok_or_else(|| malformed(format!("tar tensor rank {rank}")))?;
        at = meta.end + 8 + 8 * (2 * rank + 1);
        if at > b.len() {
            return Err(malformed("tar `tensors` table truncated"));
        }
    }
    Ok(())
}

fn storage_element_size(class: &str) -> Option<u64> {
    Some(match class {
        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
        "FloatStorage" | "IntStorage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "CharStorage" | "ByteStorage" | "BoolStorage" => 1,
        "ComplexDoubleStorage" => 16,
        _ => return None,
    })
}

/// Shared by the readers' tests: compares a reader's output on a committed fixture with
/// `tests/fixtures/expected/<file>.json` and, bit for bit, `<file>.f32`.
#[cfg(test)]
pub(crate) mod fixture_check {
    use std::path::PathBuf;

    use crate::readers::{Checkpoint, ReadError, extract};

    /// `tests/fixtures/<rel>`.
    pub(crate) fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(rel)
    }

    /// Reads `file` with `read` and checks every expected conv, layer, depth and filter value.
    pub(crate) fn check(file: &str, read: fn(&std::path::Path) -> Result<Checkpoint, ReadError>) {
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture(&format!("expected/{file}.json"))).unwrap(),
        )
        .unwrap();
        let raw = std::fs::read(fixture(&format!("expected/{file}.f32"))).unwrap();
        let want_values: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let cp = read(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(cp.format.as_str(), json["format"], "{file}: format");
        let got: Vec<(String, Vec<usize>)> = cp
            .convs
            .iter()
            .map(|c| (c.name.clone(), c.shape.to_vec()))
            .collect();
        let want: Vec<(String, Vec<usize>)> = json["convs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let shape = c["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (c["tensor_name"].as_str().unwrap().to_string(), shape)
            })
            .collect();
        assert_eq!(got, want, "{file}: conv weights in layer order");
        assert!(
            cp.convs
                .iter()
                .all(|c| c.graph_depth.is_none() && c.groups.is_none())
        );

        let m = extract(cp).unwrap_or_else(|e| panic!("{file}: extract: {e}"));
        assert_eq!(
            serde_json::to_value(m.depth_definition).unwrap(),
            json["depth_definition"]
        );
        assert_eq!(
            m.n_filters(),
            json["n_filters"].as_u64().unwrap(),
            "{file}: n_filters"
        );
        let counts: serde_json::Value = serde_json::to_value(&m.kernel_shape_counts).unwrap();
        assert_eq!(
            counts, json["kernel_shape_counts"],
            "{file}: kernel shape counts"
        );
        let layers = json["layers"].as_array().unwrap();
        assert_eq!(m.layers.len(), layers.len(), "{file}: number of 3x3 layers");
        for (l, w) in m.layers.iter().zip(layers) {
            let name = &l.tensor_name;
            assert_eq!(name, w["tensor_name"].as_str().unwrap());
            assert_eq!(
                u64::from(l.out_channels),
                w["out_channels"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(
                u64::from(l.in_channels),
                w["in_channels"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(
                u64::from(l.layer_index),
                w["layer_index"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(
                u64::from(l.conv_depth),
                w["conv_depth"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(
                l.conv_depth_norm,
                w["conv_depth_norm"].as_f64().unwrap(),
                "{name}"
            );
            assert_eq!(l.n_filters(), w["n_filters"].as_u64().unwrap(), "{name}");
            let at = w["offset"].as_u64().unwrap() as usize;
            let want = &want_values[at..at + l.filters.len()];
            let got: Vec<u32> = l.filters.iter().map(|v| v.to_bits()).collect();
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                panic!(
                    "{file}: {name} value {i} (filter {}, position {}) is {} but expected {}",
                    i / 9,
                    i % 9,
                    f32::from_bits(got[i]),
                    f32::from_bits(want[i])
                );
            }
        }
        let total: usize = m.layers.iter().map(|l| l.filters.len()).sum();
        assert_eq!(
            total,
            want_values.len(),
            "{file}: every expected value is covered"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::fixture_check::{check, fixture};
    use super::*;

    fn err(rel: &str) -> ReadError {
        match read(&fixture(rel)) {
            Ok(cp) => panic!("{rel}: read {} convs, expected an error", cp.convs.len()),
            Err(e) => e,
        }
    }

    #[test]
    fn pytorch_zip_with_strided_and_offset_views() {
        // conv2.weight is a permuted (non-contiguous) view; conv1/conv3 share one storage at
        // non-zero offsets: bit-exact values prove strides and offsets are honoured.
        check("tinynet_zip.pt", read);
    }

    #[test]
    fn pytorch_legacy_stream() {
        check("tinynet_legacy.pt", read);
    }

    #[test]
    fn pytorch_nested_state_dict() {
        check("tinynet_nested_state_dict.pth", read);
    }

    #[test]
    fn pytorch_nested_model() {
        check("tinynet_nested_model.pth", read);
    }

    #[test]
    fn pytorch_dataparallel_keeps_module_prefix() {
        check("tinynet_dataparallel.pth", read);
    }

    #[test]
    fn pytorch_malicious_globals_are_refused() {
        for (rel, global) in [
            ("bad/malicious_global.pt", "posix.system"),
            ("bad/malicious_builtins_eval.pt", "__builtin__.eval"),
            ("bad/full_module.pt", "__main__.TinyNet"),
        ] {
            match err(rel) {
                ReadError::ForbiddenGlobal(g) => assert_eq!(g, global, "{rel}"),
                other => panic!("{rel}: expected ForbiddenGlobal, got {other:?}"),
            }
        }
        assert!(
            err("bad/full_module.pt")
                .to_string()
                .contains("state_dict()")
        );
    }

    #[test]
    fn pytorch_truncated_and_foreign_files_are_malformed() {
        for rel in ["bad/truncated.pt", "bad/random.bin", "tinynet.safetensors"] {
            match err(rel) {
                ReadError::Malformed {
                    format: "pytorch", ..
                } => {}
                other => panic!("{rel}: expected Malformed pytorch, got {other:?}"),
            }
        }
    }

    /// Protocol 2 `(items..., <module>.<class>)`: how the tar tables name storage and
    /// tensor classes.
    fn meta_tuple(items: &[&str], class: &str) -> Vec<u8> {
        let mut b = b"\x80\x02(".to_vec();
        for it in items {
            b.push(b'U');
            b.push(it.len() as u8);
            b.extend_from_slice(it.as_bytes());
        }
        let (module, name) = class.rsplit_once('.').unwrap();
        b.extend_from_slice(format!("c{module}\n{name}\nt.").as_bytes());
        b
    }

    /// A tar-layout checkpoint (torch < 0.1.10) holding one FloatStorage of 20 values
    /// `i + 0.25`, views of it as `(key, shape, stride, offset)`, and `main` as the saved
    /// object, referring to the views by persistent id.
    fn tar_checkpoint(
        main: &[u8],
        views: &[(&str, [i64; 4], [i64; 4], i64)],
        tensor_class: &str,
    ) -> tempfile::NamedTempFile {
        let mut storages = b"\x80\x02K\x01.".to_vec();
        storages.extend(meta_tuple(&["s0", "cpu"], "torch.FloatStorage"));
        storages.extend(20i64.to_le_bytes());
        for i in 0..20 {
            storages.extend((i as f32 + 0.25).to_le_bytes());
        }
        storages.extend(b"\x80\x02].");
        let mut tensors = vec![0x80, 0x02, b'K', views.len() as u8, b'.'];
        for (key, shape, stride, offset) in views {
            tensors.extend(meta_tuple(&[key, "s0"], tensor_class));
            tensors.extend(4i32.to_le_bytes());
            tensors.extend([0u8; 4]);
            for v in shape.iter().chain(stride).chain([offset]) {
                tensors.extend(v.to_le_bytes());
            }
        }
        let sys_info = b"\x80\x02}(U\x0dlittle_endian\x88u.".to_vec();
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut tar = tar::Builder::new(std::fs::File::create(f.path()).unwrap());
        for (name, data) in [
            ("sys_info", &sys_info[..]),
            ("pickle", main),
            ("tensors", &tensors),
            ("storages", &storages),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data).unwrap();
        }
        tar.finish().unwrap();
        f
    }

    /// `OrderedDict` of `key -> persistent id`, at protocol 2, optionally nested as
    /// `{outer: {...}}`.
    fn main_pickle(entries: &[(&str, &str)], outer: Option<&str>) -> Vec<u8> {
        let mut b = b"\x80\x02".to_vec();
        if let Some(o) = outer {
            b.extend(b"}(U");
            b.push(o.len() as u8);
            b.extend(o.as_bytes());
        }
        b.extend(b"ccollections\nOrderedDict\n)R(");
        for (k, pid) in entries {
            for t in [k, pid] {
                b.push(b'U');
                b.push(t.len() as u8);
                b.extend(t.as_bytes());
            }
            b.push(b'Q');
        }
        b.push(b'u');
        if outer.is_some() {
            b.push(b'u');
        }
        b.push(b'.');
        b
    }

    const TAR_VIEWS: &[(&str, [i64; 4], [i64; 4], i64)] = &[
        // Transposed kernel: element (r, c) is storage[3c + r].
        ("t_head", [1, 1, 3, 3], [9, 9, 1, 3], 0),
        // Contiguous at storage offset 2.
        ("t_conv", [2, 1, 3, 3], [9, 9, 3, 1], 2),
    ];

    #[test]
    fn pytorch_tar_layout_in_file_order_with_strides() {
        // File order (head before conv) is not name order.
        let f = tar_checkpoint(
            &main_pickle(
                &[("head.weight", "t_head"), ("conv.weight", "t_conv")],
                None,
            ),
            TAR_VIEWS,
            "torch.FloatTensor",
        );
        let cp = read(f.path()).unwrap();
        let names: Vec<&str> = cp.convs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["head.weight", "conv.weight"]);
        let head: Vec<f32> = (0..9)
            .map(|k| ((k % 3) * 3 + k / 3) as f32 + 0.25)
            .collect();
        let conv: Vec<f32> = (0..18).map(|k| (k + 2) as f32 + 0.25).collect();
        assert_eq!(cp.convs[0].values, head);
        assert_eq!(cp.convs[1].values, conv);
    }

    #[test]
    fn pytorch_tar_nested_key_and_fallback() {
        let entries = [("head.weight", "t_head"), ("conv.weight", "t_conv")];
        let f = tar_checkpoint(
            &main_pickle(&entries, Some("net")),
            TAR_VIEWS,
            "torch.FloatTensor",
        );
        let names: Vec<String> = read(f.path())
            .unwrap()
            .convs
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["head.weight", "conv.weight"]);
        // No well-known key: every tensor, under its full dotted name.
        let f = tar_checkpoint(
            &main_pickle(&entries, Some("weights")),
            TAR_VIEWS,
            "torch.FloatTensor",
        );
        let names: Vec<String> = read(f.path())
            .unwrap()
            .convs
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["weights.head.weight", "weights.conv.weight"]);
    }

    #[test]
    fn pytorch_tar_tables_are_scanned() {
        let main = main_pickle(&[("conv.weight", "t_conv")], None);
        let f = tar_checkpoint(&main, &TAR_VIEWS[1..], "os.system");
        match read(f.path()) {
            Err(ReadError::ForbiddenGlobal(g)) => assert_eq!(g, "os.system"),
            other => panic!("expected ForbiddenGlobal, got {other:?}"),
        }
    }
}
