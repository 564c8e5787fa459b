//! Alias vocabularies: map the labels publishers use ("ILSVRC2012", "ImageNet-1k") to one
//! canonical value. The vocabularies are data files in `server/vocab/`, versioned; the raw value
//! is always kept beside the canonical one, and unknown values are accepted and flagged.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A label after normalisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// As supplied.
    pub raw: String,
    /// Canonical value, or the trimmed raw value when unknown.
    pub canonical: String,
    /// Whether the vocabulary knew the value.
    pub known: bool,
}

#[derive(Debug, Deserialize)]
struct File {
    version: u32,
    entry: Vec<Entry>,
}

/// One vocabulary entry as written in the data file.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    /// Canonical value.
    pub canonical: String,
    /// Exact aliases (compared after [`key`]).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Any value containing one of these (after [`key`]) maps here.
    #[serde(default)]
    pub contains: Vec<String>,
    /// Any value starting with one of these (after [`key`]) maps here; longest prefix wins.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Datasets: the default visual category.
    #[serde(default)]
    pub visual_category: Option<String>,
}

/// One vocabulary (tasks, datasets, ...).
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// Name, e.g. "datasets".
    pub kind: &'static str,
    /// Data-file version.
    pub version: u32,
    /// Entries in file order.
    pub entries: Vec<Entry>,
    exact: HashMap<String, usize>,
}

/// Matching key: lower-case, alphanumerics only ("ImageNet-1k" and "imagenet1k" are one key).
pub fn key(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

impl Vocabulary {
    fn parse(kind: &'static str, text: &str) -> Result<Self, String> {
        let f: File = toml::from_str(text).map_err(|e| format!("vocabulary {kind}: {e}"))?;
        let mut exact = HashMap::new();
        for (i, e) in f.entry.iter().enumerate() {
            for a in std::iter::once(&e.canonical).chain(e.aliases.iter()) {
                if let Some(prev) = exact.insert(key(a), i)
                    && prev != i
                {
                    return Err(format!("vocabulary {kind}: alias `{a}` maps to two entries"));
                }
            }
        }
        Ok(Vocabulary { kind, version: f.version, entries: f.entry, exact })
    }

    /// Index of the entry a value maps to, if any.
    pub fn lookup(&self, raw: &str) -> Option<usize> {
        let k = key(raw);
        if k.is_empty() {
            return None;
        }
        if let Some(i) = self.exact.get(&k) {
            return Some(*i);
        }
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            for p in &e.prefixes {
                let pk = key(p);
                if !pk.is_empty() && k.starts_with(&pk) && best.is_none_or(|(len, _)| pk.len() > len) {
                    best = Some((pk.len(), i));
                }
            }
        }
        if let Some((_, i)) = best {
            return Some(i);
        }
        self.entries.iter().position(|e| e.contains.iter().any(|c| k.contains(&key(c))))
    }

    /// Normalises one value.
    pub fn normalize(&self, raw: &str) -> Label {
        match self.lookup(raw) {
            Some(i) => Label { raw: raw.to_string(), canonical: self.entries[i].canonical.clone(), known: true },
            None => Label { raw: raw.to_string(), canonical: raw.trim().to_string(), known: false },
        }
    }
}

/// All vocabularies, loaded from the files compiled into the binary.
#[derive(Debug, Clone)]
pub struct Vocabularies {
    /// Combined version: the sum of the file versions (bumps whenever any file changes).
    pub version: u32,
    /// Training / pretraining datasets.
    pub datasets: Vocabulary,
    /// Tasks.
    pub tasks: Vocabulary,
    /// Visual categories.
    pub visual_categories: Vocabulary,
    /// Architecture families.
    pub architectures: Vocabulary,
}

impl Vocabularies {
    /// The vocabularies shipped in `server/vocab/`.
    pub fn builtin() -> Self {
        // The files are part of the source tree and covered by tests, so a parse failure is a
        // build defect, not an input error.
        Self::from_texts(
            include_str!("../vocab/datasets.toml"),
            include_str!("../vocab/tasks.toml"),
            include_str!("../vocab/visual_categories.toml"),
            include_str!("../vocab/architectures.toml"),
        )
        .unwrap_or_else(|e| panic!("built-in vocabulary is invalid: {e}"))
    }

    /// Parses the four vocabulary files.
    pub fn from_texts(datasets: &str, tasks: &str, visual: &str, arch: &str) -> Result<Self, String> {
        let datasets = Vocabulary::parse("datasets", datasets)?;
        let tasks = Vocabulary::parse("tasks", tasks)?;
        let visual_categories = Vocabulary::parse("visual_categories", visual)?;
        let architectures = Vocabulary::parse("architectures", arch)?;
        let version = datasets.version + tasks.version + visual_categories.version + architectures.version - 3;
        Ok(Vocabularies { version, datasets, tasks, visual_categories, architectures })
    }

    /// The four vocabularies in a fixed order.
    pub fn all(&self) -> [&Vocabulary; 4] {
        [&self.datasets, &self.tasks, &self.visual_categories, &self.architectures]
    }

    /// Default visual category of a dataset label, if the vocabulary has one.
    pub fn dataset_visual_category(&self, dataset: &Label) -> Option<String> {
        if !dataset.known {
            return None;
        }
        self.datasets.entries.iter().find(|e| e.canonical == dataset.canonical).and_then(|e| e.visual_category.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_prefixes_and_unknowns() {
        let v = Vocabularies::builtin();
        for raw in ["ILSVRC2012", "imagenet", "ImageNet-1k", " imagenet_1k "] {
            let l = v.datasets.normalize(raw);
            assert_eq!((l.canonical.as_str(), l.known), ("imagenet", true), "{raw}");
            assert_eq!(l.raw, raw);
        }
        assert_eq!(v.tasks.normalize("Semantic Segmentation").canonical, "Segmentation");
        assert_eq!(v.tasks.normalize("Retinal vessel segmentation").canonical, "Segmentation");
        assert_eq!(v.architectures.normalize("ResNet-50").canonical, "ResNet");
        assert_eq!(v.architectures.normalize("WideResNet-28-10").canonical, "WideResNet");
        assert_eq!(v.architectures.normalize("wrn_28_10").canonical, "WideResNet");
        assert_eq!(v.architectures.normalize("PreActResNet-18").canonical, "PreActResNet");
        assert_eq!(v.visual_categories.normalize("formula").canonical, "fractals");
        let u = v.tasks.normalize("Pose Estimation");
        assert_eq!((u.canonical.as_str(), u.known), ("Pose Estimation", false));
        assert_eq!(v.tasks.entries.len(), 11);
        assert_eq!(v.visual_categories.entries.len(), 16);
        let d = v.datasets.normalize("cifar-10");
        assert_eq!(v.dataset_visual_category(&d).as_deref(), Some("natural"));
    }
}
