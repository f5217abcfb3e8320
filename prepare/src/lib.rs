//! Offline data preparation: corpus readers (text, JSONL, Parquet), tokenizer training and
//! parallel tokenization into token shards with their manifest, written atomically. Runs
//! once before training; nothing here is used while a job runs.
//!
//! Layout:
//! - `corpus`: text / JSONL / Parquet readers yielding documents, with file:line errors.
//! - `tokenizer_training`: byte-level BPE training on a corpus.
//! - `shards`: parallel tokenization into shards and the manifest.

pub mod corpus;
pub mod shards;
pub mod tokenizer_training;
