//! What a step minimises on a micro-batch: next-token cross-entropy (pretraining, SFT), or
//! DPO's preference loss −log σ(β·((π_c − ref_c) − (π_r − ref_r))) over the summed
//! log-probabilities of each reply's tokens, against a frozen copy of the initial
//! checkpoint (the reference).

use lillm_model::LilLM;
use tch::{Kind, Tensor};

use crate::checkpoint::{self, CheckpointState};
use crate::{Error, LoadedModel, Result};

pub enum Loss {
    NextToken,
    Preference(Box<Reference>),
}

/// DPO's frozen reference, known by the SHA-256 of its weights so that a resumed run can
/// prove it continues against the same one.
pub struct Reference {
    model: LoadedModel,
    pub sha256: String,
    beta: f64,
}

/// A micro-batch's loss (with its graph when training) and, for DPO, its reward accuracy
/// and margin (detached).
pub struct Scored {
    pub loss: Tensor,
    rewards: Option<(Tensor, Tensor)>,
}

/// Figures per micro-batch: [loss, reward accuracy, reward margin] (see [`Scored::add_to`]).
pub const FIGURES: i64 = 3;

impl Scored {
    /// Adds `weight` × this micro-batch's figures to `acc` (shape [`FIGURES`]) in place, on
    /// its device: no host sync and no new tensor per micro-batch beyond the products.
    pub fn add_to(&self, acc: &Tensor, weight: f64) {
        let add = |i: i64, v: &Tensor| {
            let mut slot = acc.narrow(0, i, 1);
            slot += (v.detach().to_kind(acc.kind()) * weight).view([1]);
        };
        add(0, &self.loss);
        if let Some((accuracy, margin)) = &self.rewards {
            add(1, accuracy);
            add(2, margin);
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
        match self {
            Self::NextToken => {
                let loss = model.loss(x, y, train);
                Scored {
                    loss,
                    rewards: None,
                }
            }
            Self::Preference(r) => {
                let policy = sequence_logp(model, x, y, train);
                let reference = tch::no_grad(|| sequence_logp(&r.model.model, x, y, false));
                let rewards = (policy - reference) * r.beta;
                let pairs = rewards.size()[0] / 2;
                let diff = rewards.narrow(0, 0, pairs) - rewards.narrow(0, pairs, pairs);
                let loss = -diff.log_sigmoid().mean(Kind::Float);
                let diff = diff.detach();
                let accuracy = diff.gt(0.0).to_kind(Kind::Float).mean(Kind::Float);
                let rewards = Some((accuracy, diff.mean(Kind::Float)));
                Scored { loss, rewards }
            }
        }
    }
}

/// Summed log-probability of each row's target tokens (targets −1 contribute nothing).
fn sequence_logp(model: &LilLM, x: &Tensor, y: &Tensor, train: bool) -> Tensor {
    -model
        .token_losses(x, y, train)
        .sum_dim_intlist(1, false, Kind::Float)
}
