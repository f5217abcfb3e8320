//! LoRA adapters (Hu et al. 2021, PEFT's conventions): a frozen projection W gains
//! `scale · B·A`, A (rank, in) random, B (out, rank) zero at the start, scale = alpha/rank,
//! so training starts from the base model exactly and updates only A and B.
//!
//! A projection computes with W + scale·B·A, formed once per forward pass: the same
//! product as PEFT's W·x + scale·B·(A·x), at the cost of one rank-r matmul per target
//! weight rather than two per token.

use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use crate::{Error, Result};

/// Projections an adapter can target: attention's and the dense feed-forward's.
pub const LORA_TARGETS: &[&str] = &["wq", "wk", "wv", "wo", "w1", "w2", "w3"];

/// Which projections get adapters, and their rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Names from [`LORA_TARGETS`].
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// The original's choice: rank 8 on the square projections (wq, wo), alpha 16.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: 16.0,
            targets: vec!["wq".into(), "wo".into()],
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Config("lora rank must be positive, got 0".into()));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Error::Config(format!(
                "lora alpha must be positive, got {}",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Config(format!(
                "lora targets are empty; name some of {}",
                LORA_TARGETS.join(", ")
            )));
        }
        if let Some(bad) = self
            .targets
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err(Error::Config(format!(
                "unknown lora target `{bad}`; choose among {}",
                LORA_TARGETS.join(", ")
            )));
        }
        Ok(())
    }
}

/// A projection weight (out, in) and, while fine-tuning with LoRA, its adapter.
#[derive(Debug)]
pub(crate) struct Weight {
    pub(crate) base: Tensor,
    adapter: Option<Adapter>,
}

#[derive(Debug)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Weight {
    pub(crate) fn new(base: Tensor) -> Self {
        Self {
            base,
            adapter: None,
        }
    }

    /// The weight to compute with: W, or W + scale·B·A.
    pub(crate) fn get(&self) -> Tensor {
        match &self.adapter {
            None => self.base.shallow_clone(),
            Some(ad) => &self.base + ad.b.matmul(&ad.a) * ad.scale,
        }
    }

    /// Adds a trainable adapter under `path` (`lora_A`, `lora_B`), PEFT's initialisation:
    /// A uniform in ±1/√in (Kaiming-uniform with a = √5), B zero.
    pub(crate) fn attach(&mut self, path: &nn::Path, cfg: &LoraConfig) {
        let (out_dim, in_dim) = self.base.size2().expect("a projection is 2-d");
        let bound = 1.0 / (in_dim as f64).sqrt();
        let rank = cfg.rank as i64;
        let a = path.var(
            "lora_A",
            &[rank, in_dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = path.var("lora_B", &[out_dim, rank], nn::Init::Const(0.0));
        self.adapter = Some(Adapter {
            a,
            b,
            scale: cfg.scale(),
        });
    }

    /// Whether it is its base weight alone, with no adapter.
    pub(crate) fn is_plain(&self) -> bool {
        self.adapter.is_none()
    }

    /// Folds the adapter into the base weight (W ← W + scale·B·A) and drops it.
    pub(crate) fn merge(&mut self) {
        if let Some(ad) = self.adapter.take() {
            let _guard = tch::no_grad_guard();
            let delta = ad.b.matmul(&ad.a) * ad.scale;
            let _ = self.base.g_add_(&delta.to_kind(self.base.kind()));
        }
    }
}
