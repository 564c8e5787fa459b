//! End-to-end tests: a real FilterDB server (in-process on loopback, or the real binary for
//! crash tests) over a real RocksDB, fed the committed checkpoint fixtures written by torch,
//! onnx and safetensors (see tests/fixtures/make_fixtures.py).

mod analytics;
mod bad_inputs;
mod cli;
mod cnnfdb;
mod crash;
mod export;
mod harness;
mod ingest;
mod jobs;
mod ops;
mod python;
mod search;
mod search_approx;
mod service;
