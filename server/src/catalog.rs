//! The in-memory catalogue: every model, layer and layer statistic, rebuilt from RocksDB at
//! startup and updated after each committed write. Queries read it under a shared lock; the
//! filters themselves stay in RocksDB.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::selection::{LayerView, Pred};
use crate::stats::LayerStats;
use crate::store::Loaded;
use crate::store::records::{LayerRecord, ModelRecord, NextIds};

/// A layer with its statistics.
#[derive(Debug, Clone)]
pub struct CatalogLayer {
    /// Record.
    pub record: LayerRecord,
    /// Statistics.
    pub stats: LayerStats,
}

/// Models, layers and indexes.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    models: BTreeMap<u64, Arc<ModelRecord>>,
    by_name: HashMap<String, u64>,
    by_hash: HashMap<String, u64>,
    layers: BTreeMap<u64, Arc<CatalogLayer>>,
    by_first_filter: BTreeMap<u64, u64>,
    /// Id counters.
    pub next_ids: NextIds,
    /// Changes with every insert, remove and update (keys caches of selections).
    generation: u64,
}

impl Catalog {
    /// Builds the catalogue from what the store loaded.
    pub fn from_loaded(l: Loaded) -> Self {
        let mut c = Catalog { next_ids: l.next_ids, ..Default::default() };
        for m in l.models {
            c.by_name.insert(m.name.clone(), m.model_id);
            c.by_hash.insert(m.content_sha256.clone(), m.model_id);
            c.models.insert(m.model_id, Arc::new(m));
        }
        for s in l.layers {
            c.by_first_filter.insert(s.record.first_filter_id, s.record.layer_id);
            c.layers.insert(s.record.layer_id, Arc::new(CatalogLayer { record: s.record, stats: s.stats }));
        }
        c
    }

    /// Adds a committed model.
    pub fn insert(&mut self, m: ModelRecord, layers: Vec<CatalogLayer>, next_ids: NextIds) {
        self.by_name.insert(m.name.clone(), m.model_id);
        self.by_hash.insert(m.content_sha256.clone(), m.model_id);
        self.models.insert(m.model_id, Arc::new(m));
        for l in layers {
            self.by_first_filter.insert(l.record.first_filter_id, l.record.layer_id);
            self.layers.insert(l.record.layer_id, Arc::new(l));
        }
        self.next_ids = next_ids;
        self.generation += 1;
    }

    /// Changes whenever the catalogue does.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Removes a deleted model.
    pub fn remove(&mut self, model_id: u64) {
        self.generation += 1;
        if let Some(m) = self.models.remove(&model_id) {
            self.by_name.remove(&m.name);
            self.by_hash.remove(&m.content_sha256);
            for lid in m.first_layer_id..m.first_layer_id + u64::from(m.n_layers) {
                if let Some(l) = self.layers.remove(&lid) {
                    self.by_first_filter.remove(&l.record.first_filter_id);
                }
            }
        }
    }

    /// Replaces a model record whose labels or name changed.
    pub fn update(&mut self, m: ModelRecord) {
        self.generation += 1;
        if let Some(old) = self.models.get(&m.model_id) {
            self.by_name.remove(&old.name);
        }
        self.by_name.insert(m.name.clone(), m.model_id);
        self.models.insert(m.model_id, Arc::new(m));
    }

    /// Model by id.
    pub fn model(&self, id: u64) -> Option<&Arc<ModelRecord>> {
        self.models.get(&id)
    }

    /// Model by exact name.
    pub fn model_by_name(&self, name: &str) -> Option<&Arc<ModelRecord>> {
        self.by_name.get(name).and_then(|id| self.models.get(id))
    }

    /// Model holding the checkpoint with this SHA-256 (hex).
    pub fn model_by_hash(&self, sha256: &str) -> Option<&Arc<ModelRecord>> {
        self.by_hash.get(sha256).and_then(|id| self.models.get(id))
    }

    /// Models in id order starting after `after`.
    pub fn models_after(&self, after: Option<u64>) -> impl Iterator<Item = &Arc<ModelRecord>> {
        let start = after.map(|a| a.saturating_add(1)).unwrap_or(0);
        self.models.range(start..).map(|(_, m)| m)
    }

    /// Number of models.
    pub fn n_models(&self) -> usize {
        self.models.len()
    }

    /// The layers of a model, in layer order.
    pub fn model_layers(&self, m: &ModelRecord) -> Vec<Arc<CatalogLayer>> {
        self.layers
            .range(m.first_layer_id..m.first_layer_id + u64::from(m.n_layers))
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Layer by id.
    pub fn layer(&self, id: u64) -> Option<&Arc<CatalogLayer>> {
        self.layers.get(&id)
    }

    /// The layer holding a filter id, if stored.
    pub fn layer_of_filter(&self, filter_id: u64) -> Option<&Arc<CatalogLayer>> {
        let (_, lid) = self.by_first_filter.range(..=filter_id).next_back()?;
        let l = self.layers.get(lid)?;
        (filter_id < l.record.first_filter_id + l.record.n_filters).then_some(l)
    }

    /// Layers whose filters intersect `[start, end)`, in filter-id order.
    pub fn layers_in_filter_range(&self, start: u64, end: u64) -> Vec<Arc<CatalogLayer>> {
        let mut out = Vec::new();
        if let Some(l) = self.layer_of_filter(start) {
            out.push(l.clone());
        }
        for (_, lid) in self.by_first_filter.range(start.saturating_add(1)..end) {
            if let Some(l) = self.layers.get(lid) {
                out.push(l.clone());
            }
        }
        out
    }

    /// Visits every selected layer with its model (shared handles), in layer-id order.
    pub fn for_each_selected_arc(&self, pred: &Pred, mut f: impl FnMut(&Arc<ModelRecord>, &Arc<CatalogLayer>)) {
        // A predicate on model fields only is evaluated once per model, not once per layer.
        let per_model = pred.model_level();
        let mut current: Option<(&Arc<ModelRecord>, bool)> = None;
        for l in self.layers.values() {
            if current.is_none_or(|(m, _)| m.model_id != l.record.model_id) {
                current = self.models.get(&l.record.model_id).map(|m| {
                    (m, per_model && pred.matches(LayerView { model: m, layer: &l.record }))
                });
            }
            let Some((m, model_ok)) = current else { continue };
            if per_model {
                if model_ok {
                    f(m, l);
                }
            } else if pred.matches(LayerView { model: m, layer: &l.record }) {
                f(m, l);
            }
        }
    }

    /// Visits every selected layer with its model, in layer-id order.
    pub fn for_each_selected(&self, pred: &Pred, mut f: impl FnMut(&ModelRecord, &CatalogLayer)) {
        self.for_each_selected_arc(pred, |m, l| f(m, l));
    }
}
