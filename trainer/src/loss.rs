//! What a step minimises on a micro-batch: next-token cross-entropy (pretraining, SFT), or
//! DPO's preference loss −log σ(β·((π_c − ref_c) − (π_r − ref_r))) over the summed
//! log-probabilities of each reply's tokens, against a frozen copy of the initial
//! checkpoint (the reference). An MoE model in training adds its router losses
//! ([`lillm_model::Routing::penalty`]) to either.

use lillm_model::{LilLM, ModelConfig, Routing};
use tch::{Kind, Tensor};

use crate::checkpoint::{self, CheckpointState};
use crate::{Error, LoadedModel, Result};

pub enum Loss {
    /// With `chunked`, through the output head a chunk of positions at a time
    /// ([`LilLM::chunked_cross_entropy`]); else from the whole micro-batch's logits.
    NextToken {
        chunked: bool,
    },
    Preference(Box<Reference>),
}

/// DPO's frozen reference, known by the SHA-256 of its weights so that a resumed run can
/// prove it continues against the same one.
pub struct Reference {
    model: LoadedModel,
    pub sha256: String,
    beta: f64,
}

/// A micro-batch's score: what training minimises (with its graph when training), the
/// loss it reports, for DPO its reward accuracy and margin, and for an MoE model in
/// training its routing (all but `objective` only read as figures).
pub struct Scored {
    /// The loss plus the router losses of an MoE model in training.
    pub objective: Tensor,
    loss: Tensor,
    rewards: Option<(Tensor, Tensor)>,
    routing: Option<Routing>,
}

/// Figures of every micro-batch: [loss, reward accuracy, reward margin] (see
/// [`Scored::add_to`]).
pub const FIGURES: i64 = 3;

/// Figures of a training micro-batch of this model: [`FIGURES`], then for an MoE model the
/// aux and z losses and each sparse layer's expert loads, (layers × experts).
pub fn train_figures(cfg: &ModelConfig) -> i64 {
    match &cfg.moe {
        None => FIGURES,
        Some(moe) => FIGURES + 2 + (cfg.moe_layers() * moe.experts) as i64,
    }
}

/// Fills an MoE model's routing figures into a window's record from the window's mean
/// figures (laid out as [`train_figures`] says).
pub fn record_routing(cfg: &ModelConfig, means: &[f64], record: &mut crate::metrics::Record) {
    let Some(moe) = &cfg.moe else { return };
    let f = FIGURES as usize;
    let (layers, experts) = (cfg.moe_layers(), moe.experts);
    let loads = &means[f + 2..f + 2 + layers * experts];
    let fair = |share: f64| share * experts as f64;
    record.aux_loss = Some(means[f]);
    record.z_loss = Some(means[f + 1]);
    record.expert_load = Some(
        (0..experts)
            .map(|e| (0..layers).map(|l| loads[l * experts + e]).sum::<f64>() / layers as f64)
            .collect(),
    );
    record.expert_load_min = loads.iter().copied().map(fair).reduce(f64::min);
    record.expert_load_max = loads.iter().copied().map(fair).reduce(f64::max);
}

impl Scored {
    /// Adds `weight` × this micro-batch's figures to `acc` (shape [`FIGURES`] or
    /// [`train_figures`]) in place, on its device: no host sync and no new tensor per
    /// micro-batch beyond the products.
    pub fn add_to(&self, acc: &Tensor, weight: f64) {
        let add = |i: i64, v: &Tensor| {
            let v = v.detach().to_kind(acc.kind()).view([-1]);
            let mut slot = acc.narrow(0, i, v.size()[0]);
            slot += v * weight;
        };
        add(0, &self.loss);
        if let Some((accuracy, margin)) = &self.rewards {
            add(1, accuracy);
            add(2, margin);
        }
        // Only training scores routing, into a window of `train_figures` slots.
        if let Some(routing) = &self.routing {
            add(FIGURES, &routing.aux_loss);
            add(FIGURES + 1, &routing.z_loss);
            add(FIGURES + 2, &routing.load);
        }
    }
}

impl Reference {
    /// The reference from the initial checkpoint, computing in `kind` as the policy does (so
    /// that both score a batch alike and every reward starts at exactly 0).
    pub fn new(mut model: LoadedModel, beta: f64, kind: Kind) -> Result<Self> {
        let (_, sha256) = checkpoint::sha256_file(&model.dir.join(checkpoint::MODEL_FILE))?;
        model.model.set_compute_kind(kind);
        Ok(Self {
            model,
            sha256,
            beta,
        })
    }

    /// The initial checkpoint the reference is.
    pub fn loaded(&self) -> &LoadedModel {
        &self.model
    }

    /// Refuses to resume a checkpoint that was not trained against this reference.
    pub fn check_resumed(&self, dir: &std::path::Path, state: &CheckpointState) -> Result<()> {
        if state.source != "dpo" || state.reference_sha256.as_deref() != Some(&self.sha256) {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "is not a DPO checkpoint against the reference {} (its weights differ); resume with the --init the run started from",
                    self.model.dir.display()
                ),
            ));
        }
        Ok(())
    }
}

impl Loss {
    pub fn is_preference(&self) -> bool {
        matches!(self, Self::Preference(_))
    }

    /// Scores the batch `x → y` (−1 targets carry no loss). For DPO, `x` holds every
    /// chosen reply, then every rejected one.
    pub fn score(&self, model: &LilLM, x: &Tensor, y: &Tensor, train: bool) -> Scored {
        let (loss, rewards, routing) = match self {
            Self::NextToken { chunked: true } => {
                let (hidden, routing) = model.hidden_routed(x, train);
                (model.chunked_cross_entropy(&hidden, y), None, routing)
            }
            Self::NextToken { chunked: false } => {
                let (logits, routing) = model.forward_routed(x, train);
                (LilLM::mean_cross_entropy(&logits, y), None, routing)
            }
            Self::Preference(r) => {
                let (logits, routing) = model.forward_routed(x, train);
                let policy = sequence_logp(&logits, y);
                let reference = tch::no_grad(|| sequence_logp(&r.model.model.forward(x, false), y));
                let rewards = (policy - reference) * r.beta;
                let pairs = rewards.size()[0] / 2;
                let diff = rewards.narrow(0, 0, pairs) - rewards.narrow(0, pairs, pairs);
                let loss = -diff.log_sigmoid().mean(Kind::Float);
                let diff = diff.detach();
                let accuracy = diff.gt(0.0).to_kind(Kind::Float).mean(Kind::Float);
                (loss, Some((accuracy, diff.mean(Kind::Float))), routing)
            }
        };
        let objective = match &routing {
            Some(routing) => &loss + routing.penalty(model.config()),
            None => loss.shallow_clone(),
        };
        Scored {
            objective,
            loss,
            rewards,
            routing,
        }
    }
}

/// Summed log-probability of each row's target tokens (targets −1 contribute nothing).
fn sequence_logp(logits: &Tensor, y: &Tensor) -> Tensor {
    -LilLM::token_cross_entropy(logits, y).sum_dim_intlist(1, false, Kind::Float)
}
