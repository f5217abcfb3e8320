//! RMSNorm, in its reference and its fused form ([`Kernels`]).
//!
//! The reference computes the statistics in float32 and casts the normalised activations
//! back before the gain, as the original and Hugging Face's Llama do: in bf16 that is five
//! kernels forward (two casts, the norm, a cast of the gain, the product) and more backward,
//! each a pass over the activations. The fused form is libtorch's `rms_norm` with the gain
//! in the activations' kind: on CUDA one kernel forward and one backward, which compute in
//! float32 inside and round once (so in bf16 it differs from the reference by at most a
//! bf16 rounding). In float32 the two are the same computation.

use tch::{nn, Kind, Tensor};

use crate::fused::Kernels;

/// RMSNorm with a learned `gain`.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    gain: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(vs: nn::Path, d_model: usize, eps: f64) -> Self {
        let gain = vs.var("gain", &[d_model as i64], nn::Init::Const(1.0));
        Self { gain, eps }
    }

    pub(crate) fn forward(&self, x: &Tensor, kernels: Kernels) -> Tensor {
        let d = [x.size()[2]];
        if x.kind() == Kind::Float {
            // Already float32: the fused op computes exactly x·rsqrt(mean(x²)+eps)·gain.
            return x.rms_norm(d, Some(&self.gain), self.eps);
        }
        if kernels.rms_norm {
            return x.rms_norm(d, Some(&self.gain.to_kind(x.kind())), self.eps);
        }
        let normed = x
            .to_kind(Kind::Float)
            .rms_norm(d, None::<&Tensor>, self.eps)
            .to_kind(x.kind());
        normed * self.gain.to_kind(x.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_fused_norm_is_the_reference_within_a_bf16_rounding() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(vs.root(), 64, 1e-5);
        let _ = tch::no_grad(|| norm.gain.shallow_clone().uniform_(0.5, 1.5));
        let x = (Tensor::randn([3, 7, 64], (Kind::Float, Device::Cpu)) * 3.0)
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true);
        let run = |kernels| {
            let y = norm.forward(&x, kernels);
            let out = y.to_kind(Kind::Float);
            // A weighted sum, so that every output's gradient differs.
            let weights = Tensor::arange(64, (Kind::Float, Device::Cpu)) / 64.0 - 0.5;
            (out * weights).sum(Kind::Float).backward();
            let grads = (x.grad().to_kind(Kind::Float), norm.gain.grad().copy());
            let (mut gx, mut gg) = (x.grad(), norm.gain.grad());
            let _ = (gx.zero_(), gg.zero_());
            (y.to_kind(Kind::Float), grads.0, grads.1)
        };
        let (reference, fused) = (run(Kernels::REFERENCE), run(Kernels::FUSED));
        let rel = crate::relative_diff;
        // bf16 keeps 8 bits: a rounding is at most 2^-8 of the value.
        assert!(rel(&fused.0, &reference.0) <= 1.0 / 128.0, "outputs");
        assert!(rel(&fused.1, &reference.1) <= 1.0 / 64.0, "input gradients");
        assert!(rel(&fused.2, &reference.2) <= 1.0 / 64.0, "gain gradients");
        assert!(reference.2.abs().max().double_value(&[]) > 0.0);
        // In float32 both are one computation.
        let x32 = x.detach().to_kind(Kind::Float);
        let same = norm.forward(&x32, Kernels::FUSED) - norm.forward(&x32, Kernels::REFERENCE);
        assert_eq!(same.abs().max().double_value(&[]), 0.0);
    }
}
