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
    /// Mixture of Experts in place of the dense SwiGLU (`None`: dense, the original).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
}

/// Mixtral-style sparse feed-forward: a linear router picks `experts_per_token` of
/// `experts` SwiGLU experts per token, weighted by its renormalised softmax.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub experts: usize,
    /// Top-k: experts each token is sent to.
    pub experts_per_token: usize,
    /// Each expert's SwiGLU hidden size; `None`: the dense model's (`ffn_hidden_dim`).
    #[serde(default)]
    pub expert_hidden_dim: Option<usize>,
    /// One more expert that every token goes through, ungated (DeepSeek-MoE style).
    #[serde(default)]
    pub shared_expert: bool,
    /// Weight of the Switch/Mixtral load-balancing loss E·Σ f_e·P_e (k when balanced).
    #[serde(default = "default_aux_loss_coef")]
    pub aux_loss_coef: f64,
    /// Weight of the router z-loss mean(logsumexp(router logits)²) (ST-MoE).
    #[serde(default)]
    pub z_loss_coef: f64,
    /// Every n-th layer is sparse (layers n−1, 2n−1, …); 1: all of them.
    #[serde(default = "default_moe_every")]
    pub every: usize,
}

fn default_aux_loss_coef() -> f64 {
    0.01
}
fn default_moe_every() -> usize {
    1
}

impl MoeConfig {
    /// `experts` experts, `top_k` per token, each of hidden size `expert_hidden_dim`, on
    /// every layer, with the Switch Transformer's aux-loss weight and no z-loss.
    pub fn new(experts: usize, top_k: usize, expert_hidden_dim: Option<usize>) -> Self {
        Self {
            experts,
            experts_per_token: top_k,
            expert_hidden_dim,
            shared_expert: false,
            aux_loss_coef: default_aux_loss_coef(),
            z_loss_coef: 0.0,
            every: default_moe_every(),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.experts == 0 || self.every == 0 {
            return bad("moe.experts and moe.every must be positive".into());
        }
        if self.experts_per_token == 0 || self.experts_per_token > self.experts {
            return bad(format!(
                "moe.experts_per_token must be in 1..={} (moe.experts), got {}",
                self.experts, self.experts_per_token
            ));
        }
        if self.expert_hidden_dim == Some(0) {
            return bad("moe.expert_hidden_dim must be positive, got 0".into());
        }
        for (field, v) in [
            ("aux_loss_coef", self.aux_loss_coef),
            ("z_loss_coef", self.z_loss_coef),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("moe.{field} must be a finite number ≥ 0, got {v}"));
            }
        }
        Ok(())
    }
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
pub const PRESETS: &[&str] = &[
    "lillm-39m",
    "lillm-300m",
    "tiny",
    "lillm-moe-8x39m",
    "tiny-moe",
];

impl ModelConfig {
    /// A named preset: `lillm-39m`, `lillm-300m` (the released models), `tiny` (tests, CPU
    /// demo), and their Mixture-of-Experts variants: `lillm-moe-8x39m` (the 39M attention
    /// stack, 8 experts of the dense FFN's size, top-2) and `tiny-moe` (8 experts of half
    /// the dense FFN, top-2: exactly `tiny`'s active parameters plus the router).
    pub fn preset(name: &str) -> Result<Self> {
        let (base, moe) = match name {
            "lillm-moe-8x39m" => ("lillm-39m", Some(MoeConfig::new(8, 2, None))),
            "tiny-moe" => ("tiny", Some(MoeConfig::new(8, 2, Some(192)))),
            dense => (dense, None),
        };
        let (d_model, n_layers, max_seq_len, q_heads, kv_heads) = match base {
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
            moe,
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
        match &self.moe {
            Some(moe) => moe.validate(),
            None => Ok(()),
        }
    }

    /// Whether layer `layer` has the sparse (MoE) feed-forward.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| (layer + 1).is_multiple_of(m.every))
    }

    /// Layers with the sparse feed-forward.
    pub fn moe_layers(&self) -> usize {
        (0..self.n_layers).filter(|&i| self.is_moe_layer(i)).count()
    }

    /// Each expert's hidden size (the dense FFN's unless set).
    pub fn expert_hidden_dim(&self) -> usize {
        self.moe
            .as_ref()
            .and_then(|m| m.expert_hidden_dim)
            .unwrap_or_else(|| self.ffn_hidden_dim())
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
        self.params(|moe, expert| moe.experts * expert)
    }

    /// Parameters a token's forward pass uses: for MoE layers the router and its
    /// `experts_per_token` experts (and the shared one), not all of them.
    pub fn active_params(&self) -> usize {
        self.params(|moe, expert| moe.experts_per_token * expert)
    }

    /// "N parameters", and for MoE how many a token uses and how they are routed.
    pub fn size_summary(&self) -> String {
        match &self.moe {
            None => format!("{} parameters", self.num_params()),
            Some(moe) => format!(
                "{} parameters, {} active per token ({} experts of hidden size {}, top-{}{} on {} of {} layers)",
                self.num_params(),
                self.active_params(),
                moe.experts,
                self.expert_hidden_dim(),
                moe.experts_per_token,
                if moe.shared_expert { " + a shared expert" } else { "" },
                self.moe_layers(),
                self.n_layers
            ),
        }
    }

    /// Parameter count, with `routed(moe, one_expert)` the routed experts' share per layer.
    fn params(&self, routed: impl Fn(&MoeConfig, usize) -> usize) -> usize {
        let d = self.d_model;
        let hd = self.head_dim();
        let attn = d * self.q_heads * hd * 2 + d * self.kv_heads * hd * 2;
        let ffn: usize = (0..self.n_layers)
            .map(|layer| match &self.moe {
                Some(moe) if self.is_moe_layer(layer) => {
                    let expert = 3 * d * self.expert_hidden_dim();
                    let shared = if moe.shared_expert { expert } else { 0 };
                    d * moe.experts + routed(moe, expert) + shared
                }
                _ => 3 * d * self.ffn_hidden_dim(),
            })
            .sum();
        self.vocab_size * d + self.n_layers * (attn + 2 * d) + ffn + d
    }

    /// Training FLOPs per token (forward + backward), the Chinchilla appendix-F count applied
    /// to this architecture's real shapes (grouped K/V, three SwiGLU matrices, tied head;
    /// for MoE layers the router and the experts a token goes through: active parameters).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, s) = (self.d_model as f64, seq_len as f64);
        let hd = self.head_dim() as f64;
        let (qh, kvh) = (self.q_heads as f64, self.kv_heads as f64);
        let projections = 2.0 * d * hd * (2.0 * qh + 2.0 * kvh);
        let scores_and_mix = 2.0 * 2.0 * s * hd * qh;
        let softmax = 3.0 * qh * s;
        let ffn: f64 = (0..self.n_layers)
            .map(|layer| match &self.moe {
                Some(moe) if self.is_moe_layer(layer) => {
                    let expert = 2.0 * 3.0 * d * self.expert_hidden_dim() as f64;
                    let experts = moe.experts_per_token + usize::from(moe.shared_expert);
                    2.0 * d * moe.experts as f64 + experts as f64 * expert
                }
                _ => 2.0 * 3.0 * d * self.ffn_hidden_dim() as f64,
            })
            .sum();
        let per_layer = projections + scores_and_mix + softmax;
        let logits = 2.0 * d * self.vocab_size as f64;
        3.0 * (self.n_layers as f64 * per_layer + ffn + logits)
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
        assert_eq!(cfg.active_params(), cfg.num_params());
    }

    #[test]
    fn moe_presets_count_total_and_active_parameters() {
        let dense = ModelConfig::preset("lillm-39m").unwrap();
        let moe = ModelConfig::preset("lillm-moe-8x39m").unwrap();
        let expert = 3 * 512 * 1408;
        let router = 512 * 8;
        let per_layer_extra_total = router + 7 * expert;
        assert_eq!(
            moe.num_params(),
            dense.num_params() + 12 * per_layer_extra_total
        );
        assert_eq!(
            moe.active_params(),
            dense.num_params() + 12 * (router + expert)
        );
        assert_eq!(moe.num_params(), 221_311_488);
        assert_eq!(moe.active_params(), 65_597_952);
        // tiny-moe: two half-size experts per token, so tiny's FLOPs plus the router's.
        let tiny = ModelConfig::preset("tiny").unwrap();
        let tiny_moe = ModelConfig::preset("tiny-moe").unwrap();
        assert_eq!(tiny_moe.active_params(), tiny.num_params() + 4 * 128 * 8);
        let flops = |c: &ModelConfig| c.train_flops_per_token(256);
        assert_eq!(
            flops(&tiny_moe) - flops(&tiny),
            3.0 * 4.0 * 2.0 * 128.0 * 8.0
        );
        // Every other layer sparse: half the routers, half the extra experts.
        let mut alternating = moe.clone();
        alternating.moe.as_mut().unwrap().every = 2;
        assert_eq!(alternating.moe_layers(), 6);
        assert!(!alternating.is_moe_layer(0) && alternating.is_moe_layer(1));
        assert_eq!(
            alternating.num_params(),
            dense.num_params() + 6 * per_layer_extra_total
        );
    }

    #[test]
    fn moe_config_errors_name_the_field() {
        let mut cfg = ModelConfig::preset("tiny-moe").unwrap();
        cfg.moe.as_mut().unwrap().experts_per_token = 9;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("moe.experts_per_token must be in 1..=8"),
            "{err}"
        );
        // A dense config serialises exactly as before (no `moe` key).
        let dense = serde_json::to_value(ModelConfig::preset("tiny").unwrap()).unwrap();
        assert!(dense.get("moe").is_none());
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
