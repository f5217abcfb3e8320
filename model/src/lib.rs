//! The lilLM model in libtorch.
//!
//! Layout:
//! - `config`: [`ModelConfig`], presets, validation, parameter and FLOP counts.
//! - `lillm`: [`LilLM`], the transformer itself (RMSNorm, RoPE, GQA attention, SwiGLU).
//! - `kv_cache`: [`KvCache`] for incremental decoding.
//! - `sampling`: temperature / top-k / top-p [`Sampler`] and the [`generate`] loop.
//! - `weights`: safetensors IO with named, checked errors.
//! - `hf`: Hugging Face Llama naming, RoPE permutation and `config.json`.

mod config;
mod error;
pub mod hf;
mod kv_cache;
mod lillm;
mod sampling;
pub mod weights;

pub use config::{ModelConfig, PRESETS};
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use lillm::LilLM;
pub use sampling::{generate, Sampler, SamplingParams, StopReason};
