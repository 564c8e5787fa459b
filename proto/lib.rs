//! Generated Rust types for FilterDB's gRPC contract, `filterdb.v1`.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("filterdb.v1");

pub mod expr;

/// Encoded `FileDescriptorSet` of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/filterdb_descriptor.bin"));
