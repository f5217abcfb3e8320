//! Which implementation of the layers that have two runs ([`Kernels`]): the reference,
//! op by op as the original computes, or fused kernels with the same arithmetic up to
//! rounding — RMSNorm (`rms_norm.rs`) and the SwiGLU product ([`swiglu`], a kernel of
//! `lillm-cuda` compiled at run time). Fused is the default on CUDA; a CPU runs the
//! reference, which the exactness tests hold.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// Which implementation of the layers that have two runs (see [`crate::LilLM::set_kernels`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Op by op, as the original computes: what a CPU runs and tests hold exact.
    Reference,
    /// Fewer, fused kernels with the same arithmetic up to rounding.
    Fused,
}

impl Kernels {
    /// Fused on CUDA, the reference elsewhere.
    pub fn for_device(device: Device) -> Self {
        match device.is_cuda() {
            true => Self::Fused,
            false => Self::Reference,
        }
    }
}

/// `silu(gate) · up`: with fused kernels on CUDA one kernel forward and one backward
/// (computed in float32, rounded once), where the reference launches two and five and
/// rounds each to the activations' kind; the reference elsewhere, or when the fused kernel
/// failed its check in this process ([`fused_swiglu_in_use`]).
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor, kernels: Kernels) -> Tensor {
    if kernels == Kernels::Fused && fused_swiglu_in_use(gate.device()) {
        return lillm_cuda::kernels::swiglu(gate, up)
            .unwrap_or_else(|e| panic!("{e} (it passed its check at start)"));
    }
    gate.silu() * up
}

/// Whether [`swiglu`] runs the fused kernel on `device`: on CUDA once the kernel, compiled
/// on first use, has matched the reference on a known input in this process (checked once;
/// a kernel that fails to compile or differs is reported and the reference runs instead).
pub fn fused_swiglu_in_use(device: Device) -> bool {
    static CHECKED: OnceLock<bool> = OnceLock::new();
    if !device.is_cuda() {
        return false;
    }
    *CHECKED.get_or_init(|| match check_fused_swiglu(device) {
        Ok(()) => true,
        Err(reason) => {
            eprintln!(
                "warning: the fused SwiGLU kernel is not used ({reason}); the reference runs"
            );
            false
        }
    })
}

/// The fused kernel against the reference on a fixed bf16 input (no draw from libtorch's
/// generator, which seeded runs replay): outputs and both gradients within bf16 rounding.
fn check_fused_swiglu(device: Device) -> Result<(), String> {
    tch::with_grad(|| {
        let n = 64 * 96;
        let input = |from: f64, to: f64| {
            Tensor::linspace(from, to, n, (Kind::Float, device))
                .view([64, 96])
                .to_kind(Kind::BFloat16)
                .set_requires_grad(true)
        };
        let (gate, up) = (input(-9.0, 9.0), input(3.0, -3.0));
        // Each output's gradient differs: a weighted sum of the outputs.
        let weights = Tensor::linspace(-1.0, 1.0, n, (Kind::Float, device)).view([64, 96]);
        let run = |fused: bool| -> Result<[Tensor; 3], String> {
            let out = match fused {
                true => lillm_cuda::kernels::swiglu(&gate, &up).map_err(|e| e.to_string())?,
                false => gate.silu() * &up,
            };
            let out = out.to_kind(Kind::Float);
            let loss = (&out * &weights).sum(Kind::Float);
            let grads = Tensor::run_backward(&[&loss], &[&gate, &up], false, false);
            let grad = |i: usize| grads[i].to_kind(Kind::Float);
            Ok([out, grad(0), grad(1)])
        };
        let (fused, reference) = (run(true)?, run(false)?);
        for (what, (f, r)) in ["output", "gate gradient", "up gradient"]
            .iter()
            .zip(fused.iter().zip(&reference))
        {
            let diff = relative_diff(f, r);
            if !diff.is_finite() || diff > 2e-2 {
                return Err(format!(
                    "its {what} differs from the reference's by {diff:.1e}"
                ));
            }
        }
        Ok(())
    })
}

/// max |a − b| over max |b|: how far `a` is from `b` at the scale of `b` (the plain
/// difference when `b` is all zeros). How a fused form is held to its reference.
pub fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]);
    let diff = (a - b).abs().max().double_value(&[]);
    match scale {
        0.0 => diff,
        _ => diff / scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_cuda_the_swiglu_product_is_the_reference_whatever_is_asked() {
        assert!(!fused_swiglu_in_use(Device::Cpu));
        let gate = Tensor::linspace(-4.0, 4.0, 12, (Kind::Float, Device::Cpu));
        let up = Tensor::linspace(1.0, -1.0, 12, (Kind::Float, Device::Cpu));
        let want = gate.silu() * &up;
        for kernels in [Kernels::Reference, Kernels::Fused] {
            let got = swiglu(&gate, &up, kernels);
            assert_eq!((got - &want).abs().max().double_value(&[]), 0.0);
        }
        assert_eq!(Kernels::for_device(Device::Cpu), Kernels::Reference);
        assert_eq!(Kernels::for_device(Device::Cuda(0)), Kernels::Fused);
    }
}
