//! The ingest manifest: a TOML file with one `[[model]]` table per checkpoint.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use filterdb_client::proto::Format;
use serde::{Deserialize, Deserializer};

/// The whole manifest file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default, rename = "model")]
    models: Vec<ManifestModel>,
}

/// One `[[model]]` table. Keys left out fall back to the command-line flags.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestModel {
    /// Checkpoint path, relative to the manifest's folder.
    pub file: PathBuf,
    /// Model name.
    pub name: String,
    /// Training datasets: an array, or one string (a comma list is split).
    #[serde(
        default,
        alias = "dataset",
        alias = "training_datasets",
        deserialize_with = "string_list"
    )]
    pub datasets: Vec<String>,
    /// Task.
    pub task: Option<String>,
    /// Architecture.
    pub architecture: Option<String>,
    /// Visual category.
    pub visual_category: Option<String>,
    /// Pre-training datasets: an array or one string.
    #[serde(
        default,
        alias = "pretraining_dataset",
        deserialize_with = "string_list"
    )]
    pub pretraining_datasets: Vec<String>,
    /// Source URI.
    pub source_uri: Option<String>,
    /// License.
    pub license: Option<String>,
    /// Tags: an array or one string.
    #[serde(default, alias = "tag", deserialize_with = "string_list")]
    pub tags: Vec<String>,
    /// Container format: onnx, pytorch, safetensors or auto.
    pub format: Option<String>,
    /// Replace an existing model of the same name.
    pub replace: Option<bool>,
}

/// Accepts `"a"`, `"a, b"` or `["a", "b"]`.
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => split_list(&[s]),
        OneOrMany::Many(v) => v
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    })
}

/// Splits comma lists and drops blanks.
pub fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Parses a format name (case-insensitive).
pub fn parse_format(s: &str) -> anyhow::Result<Format> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Format::Unspecified,
        "onnx" => Format::Onnx,
        "pytorch" | "torch" | "pt" => Format::Pytorch,
        "safetensors" => Format::Safetensors,
        other => bail!("unknown format `{other}` (onnx, pytorch, safetensors or auto)"),
    })
}

/// Parses manifest text; `base` is the folder relative file paths are resolved against.
pub fn parse_manifest(text: &str, base: &Path) -> anyhow::Result<Vec<ManifestModel>> {
    let file: ManifestFile = toml::from_str(text)?;
    if file.models.is_empty() {
        bail!("no [[model]] tables");
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(file.models.len());
    for (i, mut m) in file.models.into_iter().enumerate() {
        let n = i + 1;
        if m.file.as_os_str().is_empty() {
            bail!("model #{n}: `file` is empty");
        }
        if m.name.trim().is_empty() {
            bail!("model #{n} ({}): `name` is empty", m.file.display());
        }
        // Two entries with one name would make the second fail or silently replace the first.
        if !names.insert(m.name.clone()) {
            bail!("model #{n}: the name `{}` appears more than once", m.name);
        }
        if let Some(f) = &m.format {
            parse_format(f).with_context(|| format!("model #{n} ({})", m.name))?;
        }
        if m.file.is_relative() {
            m.file = base.join(&m.file);
        }
        out.push(m);
    }
    Ok(out)
}

/// Reads and parses a manifest file.
pub fn read_manifest(path: &Path) -> anyhow::Result<Vec<ManifestModel>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read manifest {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    parse_manifest(&text, base).with_context(|| format!("manifest {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[model]]
file = "resnet50.onnx"
name = "resnet50_imagenet"
datasets = ["imagenet", "places365"]
task = "Classification"
architecture = "ResNet-50"
tags = "a, b"
format = "ONNX"

[[model]]
file = "/abs/unet.pt"
name = "unet_xray"
datasets = "chestxray14, padchest"
task = "Segmentation"
architecture = "UNet"
visual_category = "medical xray"
pretraining_datasets = "imagenet"
source_uri = "https://example.org/unet.pt"
license = "MIT"
replace = true
"#;

    #[test]
    fn parses_both_list_forms_and_resolves_paths() {
        let ms = parse_manifest(SAMPLE, Path::new("/data/ckpts")).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].file, PathBuf::from("/data/ckpts/resnet50.onnx"));
        assert_eq!(ms[0].datasets, vec!["imagenet", "places365"]);
        assert_eq!(ms[0].tags, vec!["a", "b"]);
        assert_eq!(
            ms[0].format.as_deref().map(parse_format).unwrap().unwrap(),
            Format::Onnx
        );
        assert_eq!(ms[0].replace, None);
        assert_eq!(ms[1].file, PathBuf::from("/abs/unet.pt"));
        assert_eq!(ms[1].datasets, vec!["chestxray14", "padchest"]);
        assert_eq!(ms[1].pretraining_datasets, vec!["imagenet"]);
        assert_eq!(ms[1].visual_category.as_deref(), Some("medical xray"));
        assert_eq!(ms[1].license.as_deref(), Some("MIT"));
        assert_eq!(ms[1].replace, Some(true));
    }

    #[test]
    fn rejects_mistakes() {
        let base = Path::new(".");
        assert!(
            parse_manifest("", base)
                .unwrap_err()
                .to_string()
                .contains("no [[model]]")
        );
        let typo = "[[model]]\nfile = \"a\"\nname = \"x\"\ndatsets = [\"imagenet\"]\n";
        assert!(format!("{:#}", parse_manifest(typo, base).unwrap_err()).contains("datsets"));
        let dup = "[[model]]\nfile = \"a\"\nname = \"x\"\n[[model]]\nfile = \"b\"\nname = \"x\"\n";
        assert!(
            parse_manifest(dup, base)
                .unwrap_err()
                .to_string()
                .contains("more than once")
        );
        let no_name = "[[model]]\nfile = \"a\"\n";
        assert!(parse_manifest(no_name, base).is_err());
        let bad_format = "[[model]]\nfile = \"a\"\nname = \"x\"\nformat = \"tflite\"\n";
        assert!(
            format!("{:#}", parse_manifest(bad_format, base).unwrap_err())
                .contains("unknown format")
        );
        let bad_list = "[[model]]\nfile = \"a\"\nname = \"x\"\ndatasets = 3\n";
        assert!(parse_manifest(bad_list, base).is_err());
    }

    #[test]
    fn lists_split_commas() {
        assert_eq!(
            split_list(&["a, b".into(), "".into(), "c".into()]),
            vec!["a", "b", "c"]
        );
    }
}
