//! Data for lilLM: tokenizer, corpora, token shards and deterministic batches.
//!
//! Layout:
//! - `tokenizer`: byte-level BPE training, loading, fingerprint, `tokenizer_config.json`.
//! - `corpus`: text / JSONL / Parquet readers yielding documents, with file:line errors.
//! - `manifest`: the dataset manifest (dtype, shards, counts, checksums).
//! - `prepare`: parallel tokenization into shards, written atomically.
//! - `shards`: memory-mapped reading and the seeded batch sampler.
//! - `service`: the dataloader actor's gRPC batch stream (bounded prefetch).
//! - `actor`: the dataloader process (register, heartbeat, serve).
//! - `remote`: the trainer's side of that stream, reconnecting without losing its place.
//! - `sft`: chat-template rendering, assistant-only loss masks, SFT batches.
//! - `dpo`: preference pairs (prompt, chosen, rejected) with reply masks.

pub mod actor;
pub mod chat_template;
pub mod corpus;
pub mod dpo;
mod error;
pub mod manifest;
pub mod prepare;
pub mod remote;
pub mod service;
pub mod sft;
pub mod shards;
pub mod tokenizer;

pub use error::{Error, Result};
