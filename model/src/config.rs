//! Model hyper-parameters: presets, validation and derived sizes.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of a lilLM model. Field names follow the original `model/config.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub max_seq_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    /// FFN hidden size; `None` derives it from `d_model` as the original does.
    #[serde(default)]
    pub hidden_dim: Option<usize>,
    #[serde(default = "default_multiple_of")]
    pub multiple_of: usize,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Dropout on attention probabilities and the FFN output (0 = off).
    #[serde(default)]
    pub dropout: f64,
}

fn default_multiple_of() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &["lillm-39m", "lillm-300m", "tiny"];

impl ModelConfig {
    /// A named preset: `lillm-39m`, `lillm-300m` (the released models) or `tiny` (tests, CPU demo).
    pub fn preset(name: &str) -> Result<Self> {
        let (d_model, n_layers, max_seq_len, q_heads, kv_heads) = match name {
            "lillm-39m" => (512, 12, 512, 16, 8),
            "lillm-300m" => (1024, 24, 512, 16, 8),
            "tiny" => (128, 4, 256, 4, 2),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset `{other}`; choose one of {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(Self {
            vocab_size: 8192,
            d_model,
            n_layers,
            max_seq_len,
            q_heads,
            kv_heads,
            hidden_dim: None,
            multiple_of: default_multiple_of(),
            eps: default_eps(),
            rope_theta: default_rope_theta(),
            dropout: 0.0,
        })
    }

    /// Checks the invariants the forward pass relies on; the error names the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("max_seq_len", self.max_seq_len),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("multiple_of", self.multiple_of),
        ] {
            if value == 0 {
                return bad(format!("{field} must be positive, got 0"));
            }
        }
        if !self.d_model.is_multiple_of(self.q_heads) {
            return bad(format!(
                "d_model ({}) must be divisible by q_heads ({}); pick q_heads among the divisors of d_model",
                self.d_model, self.q_heads
            ));
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "q_heads ({}) must be divisible by kv_heads ({}); each kv head serves q_heads/kv_heads query heads",
                self.q_heads, self.kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim = d_model/q_heads = {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if self.eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return bad(format!("eps must be positive, got {}", self.eps));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.q_heads
    }

    /// SwiGLU hidden size: 4·d, then ⌊2/3·(4·d)⌋, rounded up to `multiple_of` (512 → 1408).
    pub fn ffn_hidden_dim(&self) -> usize {
        if let Some(h) = self.hidden_dim {
            return h;
        }
        let hidden = (2 * 4 * self.d_model) / 3;
        hidden.div_ceil(self.multiple_of) * self.multiple_of
    }

    /// Number of trainable parameters (the embedding is tied to the output head, counted once).
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let hd = self.head_dim();
        let attn = d * self.q_heads * hd * 2 + d * self.kv_heads * hd * 2;
        let ffn = 3 * d * self.ffn_hidden_dim();
        let per_layer = attn + ffn + 2 * d;
        self.vocab_size * d + self.n_layers * per_layer + d
    }

    /// Training FLOPs per token (forward + backward), the Chinchilla appendix-F count applied
    /// to this architecture's real shapes (grouped K/V, three SwiGLU matrices, tied head).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, s) = (self.d_model as f64, seq_len as f64);
        let hd = self.head_dim() as f64;
        let (qh, kvh) = (self.q_heads as f64, self.kv_heads as f64);
        let projections = 2.0 * d * hd * (2.0 * qh + 2.0 * kvh);
        let scores_and_mix = 2.0 * 2.0 * s * hd * qh;
        let softmax = 3.0 * qh * s;
        let ffn = 2.0 * 3.0 * d * self.ffn_hidden_dim() as f64;
        let per_layer = projections + scores_and_mix + softmax + ffn;
        let logits = 2.0 * d * self.vocab_size as f64;
        3.0 * (self.n_layers as f64 * per_layer + logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lillm_39m_has_the_released_shape_and_parameter_count() {
        let cfg = ModelConfig::preset("lillm-39m").unwrap();
        assert_eq!(cfg.ffn_hidden_dim(), 1408);
        assert_eq!(cfg.num_params(), 39_596_544);
        let big = ModelConfig::preset("lillm-300m").unwrap();
        assert_eq!(big.ffn_hidden_dim(), 2816);
    }

    #[test]
    fn invalid_head_counts_are_rejected_with_the_field_named() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.kv_heads = 3;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("q_heads (4) must be divisible by kv_heads (3)"),
            "{err}"
        );
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.q_heads = 5;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("d_model (128) must be divisible by q_heads (5)"),
            "{err}"
        );
        assert!(ModelConfig::preset("huge").is_err());
    }
}
