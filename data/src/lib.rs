//! lilLM's data formats, shared by offline preparation, the online dataloader and training:
//! the tokenizer, the dataset manifest, token shards and the seeded batch sampler, the chat
//! template, SFT conversations and DPO pairs. Pure functions over files: no network, no
//! libtorch.
//!
//! Layout:
//! - `tokenizer`: loading, encoding, fingerprint, `tokenizer_config.json`.
//! - `manifest`: the dataset manifest (dtype, shards, counts, checksums).
//! - `shards`: memory-mapped reading and the seeded batch sampler.
//! - `epochs`: the exactly-once order (every sequence once per epoch, seeded per epoch).
//! - `split`: which documents are held out, and the seeded hash behind every data choice.
//! - `chat_template`: the Jinja chat template rendered as `transformers` renders it.
//! - `sft`: assistant-only loss masks and SFT batches.
//! - `dpo`: preference pairs (prompt, chosen, rejected) with reply masks.

pub mod chat_template;
pub mod dpo;
pub mod epochs;
mod error;
pub mod manifest;
pub mod sft;
pub mod shards;
pub mod split;
pub mod tokenizer;

pub use error::{Error, Result};
