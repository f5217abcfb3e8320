//! The lilLM model in libtorch.
//!
//! Layout:
//! - `config`: [`ModelConfig`], presets, validation, parameter and FLOP counts.
//! - `lillm`: [`LilLM`], the transformer itself (RMSNorm, RoPE, GQA attention, SwiGLU).
//! - `lora`: LoRA adapters ([`LoraConfig`]) on the projections, attached for fine-tuning
//!   and merged for inference.
//! - `fused`: which implementation of the layers that have two runs ([`Kernels`]), and the
//!   SwiGLU product with its fused CUDA kernel.
//! - `rms_norm`: RMSNorm, in its reference and its fused form.
//! - `rope`: rotary position embedding, in its reference and its fused form.
//! - `moe`: the sparse Mixture-of-Experts feed-forward and its [`Routing`] statistics.
//! - `kv_cache`: [`KvCache`] for incremental decoding.
//! - `slot_cache`: [`SlotCache`], the KV cache of sequences decoded together (continuous
//!   batching, [`LilLM::decode_slots`]).
//! - `sampling`: temperature / top-k / top-p [`Sampler`] and the [`generate`] loop.
//! - `weights`: safetensors IO with named, checked errors.
//! - `eval`: perplexity of a token sequence in context windows.
//! - `device`: device names (`auto`, `cpu`, `cuda:N`) and [`upload`], a host-to-device copy
//!   that does not wait for the device.
//! - `hf`: Hugging Face Llama naming, RoPE permutation and `config.json`.

pub mod chunked_loss;
mod config;
mod device;
mod error;
pub mod eval;
mod fused;
pub mod hf;
mod joined;
mod kv_cache;
mod lillm;
mod lora;
mod moe;
mod rms_norm;
mod rope;
mod sampling;
mod slot_cache;
pub mod weights;

pub use config::{ModelConfig, MoeConfig, PRESETS};
pub use device::{cpu_has_native_bf16, parse_device, parse_dtype, upload};
pub use error::{Error, Result};
pub use fused::{fused_swiglu_in_use, Kernels};
pub use kv_cache::{kv_cache_bytes, KvCache};
pub use lillm::LilLM;
pub use lillm_cuda::kernels::relative_diff;
pub use lora::{LoraConfig, LORA_TARGETS};
pub use moe::Routing;
pub use rope::fused_rope_in_use;
pub use sampling::{generate, sample_rows, Sampler, SamplingParams, StopReason};
pub use slot_cache::SlotCache;
