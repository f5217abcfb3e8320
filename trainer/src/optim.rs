//! AdamW with decoupled weight decay (PyTorch's update rule), state kept as plain tensors so
//! checkpoints can store it exactly and a resumed run continues bit for bit.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One trainable parameter with its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken (for bias correction).
    steps: u64,
}

impl AdamW {
    /// Tracks `params` (name → variable), in name order so every rank agrees.
    pub fn new(cfg: AdamWConfig, params: BTreeMap<String, Tensor>) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| Slot {
                name,
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                param,
            })
            .collect();
        Self {
            cfg,
            slots,
            steps: 0,
        }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Elements of the parameters it trains.
    pub fn trained_numel(&self) -> usize {
        self.slots.iter().map(|s| s.param.numel()).sum()
    }

    /// Bytes of its state (both moments of every trained parameter).
    pub fn state_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        self.slots
            .iter()
            .map(|s| bytes(&s.exp_avg) + bytes(&s.exp_avg_sq))
            .sum()
    }

    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|s| &s.param)
    }

    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping as a scalar tensor (no host sync: read it only when logging).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return Tensor::from(0.0f32);
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        let total = Tensor::stack(&norms, 0).norm();
        if max_norm > 0.0 {
            let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
            for mut g in grads {
                let _ = g.g_mul_(&coef);
            }
        }
        total
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bias1 = 1.0 - beta1.powi(self.steps as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.steps as i32)).sqrt();
        for slot in &mut self.slots {
            let grad = slot.param.grad();
            if !grad.defined() {
                continue;
            }
            let _ = slot.param.g_mul_scalar_(1.0 - lr * weight_decay);
            let _ = slot.exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = slot.exp_avg_sq.g_mul_scalar_(beta2);
            let _ = slot.exp_avg_sq.addcmul_(&grad, &(&grad * (1.0 - beta2)));
            let denom = slot.exp_avg_sq.sqrt() / bias2_sqrt + eps;
            let _ = slot
                .param
                .addcdiv_(&(&slot.exp_avg * (-lr / bias1)), &denom);
        }
    }

    /// Moments keyed `exp_avg.NAME` / `exp_avg_sq.NAME`, plus `step`.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for slot in &self.slots {
            out.insert(
                format!("exp_avg.{}", slot.name),
                slot.exp_avg.shallow_clone(),
            );
            out.insert(
                format!("exp_avg_sq.{}", slot.name),
                slot.exp_avg_sq.shallow_clone(),
            );
        }
        out.insert("step".into(), Tensor::from_slice(&[self.steps as i64]));
        out
    }

    /// Restores what [`AdamW::state_tensors`] produced.
    pub fn load_state_tensors(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let missing =
            |key: &str| Error::checkpoint(origin, format!("optimizer state lacks `{key}`"));
        for slot in &mut self.slots {
            for (key, target) in [
                (format!("exp_avg.{}", slot.name), &mut slot.exp_avg),
                (format!("exp_avg_sq.{}", slot.name), &mut slot.exp_avg_sq),
            ] {
                let src = state.get(&key).ok_or_else(|| missing(&key))?;
                if src.size() != target.size() {
                    return Err(Error::checkpoint(
                        origin,
                        format!(
                            "optimizer tensor `{key}` has shape {:?}, expected {:?}",
                            src.size(),
                            target.size()
                        ),
                    ));
                }
                target.copy_(&src.to_device(target.device()));
            }
        }
        let step = state.get("step").ok_or_else(|| missing("step"))?;
        self.steps = step.int64_value(&[0]) as u64;
        Ok(())
    }
}
