//! FilterDB engine and gRPC server.
//!
//! Layers: `api` (tonic services: proto ↔ domain, errors → Status) over `engine` (ingest,
//! queries) over `store` (RocksDB layout) and `catalog` (in-memory index). `readers` turn
//! checkpoint files into layers of 3x3 filters; `stats`, `selection` and `vocab` hold the
//! formulas, predicates and label vocabularies every layer shares.

pub mod analytics;
pub mod ann;
pub mod api;
pub mod catalog;
pub mod config;
pub mod cnnfdb;
pub mod engine;
pub mod jobs;
pub mod ops;
pub mod export;
pub mod quality;
pub mod readers;
pub mod search;
pub mod search_index;
pub mod selection;
pub mod server;
pub mod stats;
pub mod store;
pub mod vocab;

/// Prost types of the vendored ONNX subset (`server/onnx/onnx.proto`).
pub mod onnx_pb {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
