//! `[model]` of a training config: optional overrides of the preset's model fields, each
//! also a `lillm train` flag.

use lillm_model::MoeConfig;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Optional per-field overrides of the preset's model config (`[model]` in TOML; the same
/// names as `lillm train` flags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    #[arg(long)]
    pub vocab_size: Option<usize>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub n_layers: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub q_heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// SwiGLU hidden size (default: derived from d_model as in the original).
    #[arg(long)]
    pub hidden_dim: Option<usize>,
    /// Dropout on attention and FFN outputs.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Mixture-of-Experts fields (`[model.moe]`): change an MoE preset's, or make a dense
    /// preset sparse by setting `experts`.
    #[serde(default, skip_serializing_if = "MoeOverrides::is_empty")]
    #[command(flatten)]
    pub moe: MoeOverrides,
}

/// Optional overrides of the fields of [`MoeConfig`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MoeOverrides {
    /// Mixture of Experts: experts per sparse layer (makes a dense preset sparse).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Mixture of Experts: experts each token is routed to (top-k).
    #[arg(long)]
    pub experts_per_token: Option<usize>,
    /// Mixture of Experts: each expert's hidden size (default: the dense FFN's).
    #[arg(long)]
    pub expert_hidden_dim: Option<usize>,
    /// Mixture of Experts: add a shared expert every token goes through.
    #[arg(long)]
    pub shared_expert: Option<bool>,
    /// Mixture of Experts: weight of the load-balancing loss.
    #[arg(long)]
    pub aux_loss_coef: Option<f64>,
    /// Mixture of Experts: weight of the router z-loss.
    #[arg(long)]
    pub z_loss_coef: Option<f64>,
    /// Mixture of Experts: sparse feed-forward on every n-th layer only.
    #[arg(long = "moe-every")]
    pub every: Option<usize>,
}

impl MoeOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `base` (the preset's MoE section, if any) with these fields set.
    pub(crate) fn apply(&self, base: Option<MoeConfig>) -> Result<MoeConfig> {
        let mut moe = match (base, self.experts) {
            (Some(moe), _) => moe,
            (None, Some(experts)) => MoeConfig::new(experts, 2.min(experts), None),
            (None, None) => {
                return Err(Error::Config(
                    "model.moe sets fields of a dense preset without model.moe.experts; set it (--experts N) or choose an MoE preset (tiny-moe, lillm-moe-8x39m)".into(),
                ))
            }
        };
        moe.experts = self.experts.unwrap_or(moe.experts);
        moe.experts_per_token = self.experts_per_token.unwrap_or(moe.experts_per_token);
        moe.expert_hidden_dim = self.expert_hidden_dim.or(moe.expert_hidden_dim);
        moe.shared_expert = self.shared_expert.unwrap_or(moe.shared_expert);
        moe.aux_loss_coef = self.aux_loss_coef.unwrap_or(moe.aux_loss_coef);
        moe.z_loss_coef = self.z_loss_coef.unwrap_or(moe.z_loss_coef);
        moe.every = self.every.unwrap_or(moe.every);
        Ok(moe)
    }
}
