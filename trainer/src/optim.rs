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

/// How an update is computed: the same rule either way (they agree to float rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Element-wise tensor operations from Rust, parameter by parameter: the reference, and
    /// what runs on a CPU (where resumes and world sizes are checked bit for bit).
    PerParameter,
    /// libtorch's fused multi-tensor AdamW kernel: on CUDA one launch for every parameter
    /// instead of about ten per parameter.
    Fused,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken (for bias correction).
    steps: u64,
    update: Update,
}

impl AdamW {
    /// Tracks `params` (name → variable), in name order so every rank agrees.
    pub fn new(cfg: AdamWConfig, params: BTreeMap<String, Tensor>) -> Self {
        let slots: Vec<Slot> = params
            .into_iter()
            .map(|(name, param)| Slot {
                name,
                exp_avg: param.zeros_like(),
                exp_avg_sq: param.zeros_like(),
                param,
            })
            .collect();
        let on_gpu = slots
            .first()
            .is_some_and(|s: &Slot| s.param.device().is_cuda());
        Self {
            cfg,
            slots,
            steps: 0,
            update: if on_gpu {
                Update::Fused
            } else {
                Update::PerParameter
            },
        }
    }

    /// Computes updates the given way instead of the device's default (fused on CUDA).
    pub fn with_update(self, update: Update) -> Self {
        Self { update, ..self }
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

    /// Zeroes every gradient in place (they keep their memory, which a captured step
    /// accumulates into).
    pub fn zero_grad(&mut self) -> Result<()> {
        if self.update == Update::Fused {
            let grads: Vec<Tensor> = self.grads().collect();
            return Ok(crate::dist::foreach_zero(&grads)?);
        }
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
        Ok(())
    }

    /// The gradients the parameters have.
    fn grads(&self) -> impl Iterator<Item = Tensor> + '_ {
        self.slots
            .iter()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping as a scalar tensor (no host sync: read it only when logging).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self.grads().collect();
        if grads.is_empty() {
            return Ok(Tensor::from(0.0f32));
        }
        if self.update == Update::Fused {
            return Ok(crate::dist::fused_clip_grad_norm(&grads, max_norm)?);
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
        Ok(total)
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        if self.update == Update::Fused {
            return self.step_fused(lr);
        }
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
        Ok(())
    }

    /// [`AdamW::step`] by libtorch's fused kernel, for the parameters that have gradients.
    fn step_fused(&mut self, lr: f64) -> Result<()> {
        let mut lists: [Vec<Tensor>; 4] = Default::default();
        for slot in &self.slots {
            let grad = slot.param.grad();
            if grad.defined() {
                lists[0].push(slot.param.shallow_clone());
                lists[1].push(grad);
                lists[2].push(slot.exp_avg.shallow_clone());
                lists[3].push(slot.exp_avg_sq.shallow_clone());
            }
        }
        let [params, grads, exp_avgs, exp_avg_sqs] = &lists;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let step = crate::dist::AdamWStep {
            step: self.steps,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
        };
        Ok(crate::dist::fused_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            step,
        )?)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The same parameters, clipped and updated five times with the same gradients: the
    /// weights, and the norms before clipping.
    fn trained(update: Update) -> (Vec<Tensor>, Vec<f64>) {
        let mut norms = Vec::new();
        tch::manual_seed(3);
        let params: BTreeMap<String, Tensor> = [("a", vec![4, 3]), ("b", vec![7])]
            .into_iter()
            .map(|(name, shape)| {
                let t =
                    Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
                (name.to_string(), t)
            })
            .collect();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let shared = params.iter().map(|(k, v)| (k.clone(), v.shallow_clone()));
        let mut opt = AdamW::new(cfg, shared.collect()).with_update(update);
        for step in 0..5 {
            opt.zero_grad().unwrap();
            let loss: Tensor = params
                .values()
                .map(|p| (p * p * (step + 1) as f64).sum(Kind::Float))
                .sum();
            loss.backward();
            // Large gradients, so that clipping scales them.
            let norm = opt.clip_grad_norm(0.5).unwrap().double_value(&[]);
            norms.push(norm);
            opt.step(1e-2).unwrap();
        }
        (params.into_values().map(|p| p.detach()).collect(), norms)
    }

    #[test]
    fn the_fused_kernels_clip_and_update_as_the_per_parameter_rule_does() {
        let ((reference, ref_norms), (fused, fused_norms)) =
            (trained(Update::PerParameter), trained(Update::Fused));
        for (r, f) in ref_norms.iter().zip(&fused_norms) {
            assert!(
                (r - f).abs() < 1e-5 * r,
                "norms {ref_norms:?} vs {fused_norms:?}"
            );
        }
        assert!(
            ref_norms.iter().all(|&n| n > 0.5),
            "clipping was exercised: {ref_norms:?}"
        );
        for (r, f) in reference.iter().zip(&fused) {
            let diff = (r - f).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "fused AdamW differs by {diff}");
        }
        // And the updates did something.
        assert!(reference
            .iter()
            .any(|p| p.abs().max().double_value(&[]) > 0.0));
    }
}
