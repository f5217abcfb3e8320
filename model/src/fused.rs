//! Which implementation of the layers that have two runs ([`Kernels`]): the reference,
//! op by op as the original computes, or fused kernels with the same arithmetic up to
//! rounding — RMSNorm (`rms_norm.rs`), RoPE (`rope.rs`) and the SwiGLU product ([`swiglu`]),
//! the last two kernels of `lillm-cuda` compiled at run time and checked once against the
//! reference before they are used. Fused is the default on CUDA; a CPU runs the reference,
//! which the exactness tests hold.

use std::sync::OnceLock;

use lillm_cuda::kernels::{output_and_gradients, relative_diff};
use tch::{Device, Kind, Tensor};

/// Which of the layers that have two runs run fused (see [`crate::LilLM::set_kernels`]);
/// the others run the reference, op by op as the original computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    pub rms_norm: bool,
    pub rope: bool,
    pub swiglu: bool,
}

impl Kernels {
    /// Every layer op by op, as the original computes: what a CPU runs and tests hold exact.
    pub const REFERENCE: Self = Self {
        rms_norm: false,
        rope: false,
        swiglu: false,
    };

    /// Every layer fused: fewer kernels with the same arithmetic up to rounding.
    pub const FUSED: Self = Self {
        rms_norm: true,
        rope: true,
        swiglu: true,
    };

    /// Each layer with a fused form, by name, fused alone: what each one gives
    /// (`lillm bench kernels`).
    pub const EACH_ALONE: [(&'static str, Self); 3] = [
        (
            "RMSNorm",
            Self {
                rms_norm: true,
                ..Self::REFERENCE
            },
        ),
        (
            "RoPE",
            Self {
                rope: true,
                ..Self::REFERENCE
            },
        ),
        (
            "SwiGLU",
            Self {
                swiglu: true,
                ..Self::REFERENCE
            },
        ),
    ];

    /// Fused on CUDA, the reference elsewhere.
    pub fn for_device(device: Device) -> Self {
        match device.is_cuda() {
            true => Self::FUSED,
            false => Self::REFERENCE,
        }
    }
}

/// `silu(gate) · up`: with fused kernels on CUDA one kernel forward and one backward
/// (computed in float32, rounded once), where the reference launches two and five and
/// rounds each to the activations' kind; the reference elsewhere, or when the fused kernel
/// failed its check in this process ([`fused_swiglu_in_use`]).
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor, kernels: Kernels) -> Tensor {
    if kernels.swiglu && fused_swiglu_in_use(gate.device()) {
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
    checked_once(&CHECKED, device, "SwiGLU", || check_fused_swiglu(device))
}

/// Whether the fused kernel `name` may run on `device`: never off CUDA; on CUDA, what its
/// `check` said the first time it was asked in this process (a kernel that fails it, or
/// whose libtorch call panics in it, is reported once, and its layer runs the reference
/// from then on).
pub(crate) fn checked_once(
    cell: &OnceLock<bool>,
    device: Device,
    name: &str,
    check: impl FnOnce() -> Result<(), String>,
) -> bool {
    if !device.is_cuda() {
        return false;
    }
    // tch turns libtorch's exceptions (a backward that jiterator refuses, say) into panics.
    let outcome = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(check))
            .unwrap_or_else(|panic| Err(lillm_cuda::panic_message(&panic)))
    };
    *cell.get_or_init(|| match outcome() {
        Ok(()) => true,
        Err(reason) => {
            eprintln!(
                "warning: the fused {name} kernel is not used ({reason}); the reference runs"
            );
            false
        }
    })
}

/// The fused SwiGLU against the reference on a fixed bf16 input (no draw from libtorch's
/// generator, which seeded runs replay).
fn check_fused_swiglu(device: Device) -> Result<(), String> {
    let n = 64 * 96;
    let input = |from: f64, to: f64| {
        Tensor::linspace(from, to, n, (Kind::Float, device))
            .view([64, 96])
            .to_kind(Kind::BFloat16)
    };
    agrees_with_reference(
        &[input(-9.0, 9.0), input(3.0, -3.0)],
        |x| lillm_cuda::kernels::swiglu(&x[0], &x[1]).map_err(|e| e.to_string()),
        |x| x[0].silu() * &x[1],
    )
}

/// Whether `fused` computes what `reference` does on `inputs`: its output and the gradient
/// of every input (of a weighted sum of the outputs, so that each output's gradient
/// differs) within bf16 rounding, 2e-2 of the reference's largest. Says what differs.
pub(crate) fn agrees_with_reference(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor, String>,
    reference: impl Fn(&[Tensor]) -> Tensor,
) -> Result<(), String> {
    let fused = output_and_gradients(inputs, fused)?;
    let reference = output_and_gradients(inputs, |x| Ok::<_, String>(reference(x)))?;
    for (i, (f, r)) in fused.iter().zip(&reference).enumerate() {
        let diff = relative_diff(f, r);
        if !diff.is_finite() || diff > 2e-2 {
            let what = match i {
                0 => "output".to_string(),
                i => format!("input {}'s gradient", i - 1),
            };
            return Err(format!(
                "its {what} differs from the reference's by {diff:.1e}"
            ));
        }
    }
    Ok(())
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
        for kernels in [Kernels::REFERENCE, Kernels::FUSED] {
            let got = swiglu(&gate, &up, kernels);
            assert_eq!((got - &want).abs().max().double_value(&[]), 0.0);
        }
        assert_eq!(Kernels::for_device(Device::Cpu), Kernels::REFERENCE);
        assert_eq!(Kernels::for_device(Device::Cuda(0)), Kernels::FUSED);
    }

    #[test]
    fn the_check_against_the_reference_names_what_differs() {
        let x = Tensor::linspace(-3.0, 3.0, 24, (Kind::Float, Device::Cpu)).view([4, 6]);
        let reference = |x: &[Tensor]| x[0].silu() * &x[1];
        let inputs = [x.shallow_clone(), x.flip([1])];
        assert_eq!(
            agrees_with_reference(&inputs, |x| Ok(reference(x)), reference),
            Ok(())
        );
        // Within a bf16 rounding passes; a few percent off does not.
        let rounded = |x: &[Tensor]| Ok(reference(x) * (1.0 + 1.0 / 256.0));
        assert_eq!(agrees_with_reference(&inputs, rounded, reference), Ok(()));
        let off = |x: &[Tensor]| Ok(reference(x) * 1.05);
        let err = agrees_with_reference(&inputs, off, reference).unwrap_err();
        assert!(err.starts_with("its output differs"), "{err}");
        // The right output with a wrong gradient for the second input.
        let wrong_backward = |x: &[Tensor]| {
            let out = reference(x);
            Ok(out.detach() + (&x[1] - x[1].detach()) * 0.5)
        };
        let err = agrees_with_reference(&inputs, wrong_backward, reference).unwrap_err();
        assert!(err.starts_with("its input 0's gradient differs"), "{err}");
        let failing = |_: &[Tensor]| Err("no kernel".to_string());
        assert_eq!(
            agrees_with_reference(&inputs, failing, reference),
            Err("no kernel".into())
        );
    }

    #[test]
    fn a_fused_kernel_runs_only_once_its_check_passed_and_a_panic_fails_the_check() {
        let off_cuda = OnceLock::new();
        assert!(!checked_once(&off_cuda, Device::Cpu, "test", || Ok(())));
        assert!(off_cuda.get().is_none(), "nothing is checked off CUDA");
        // The checks below touch no device: what is decided is what their outcome means.
        let (passes, mut checks) = (OnceLock::new(), 0);
        for _ in 0..3 {
            assert!(checked_once(&passes, Device::Cuda(0), "test", || {
                checks += 1;
                Ok(())
            }));
        }
        assert_eq!(checks, 1, "checked once per process");
        let differs = OnceLock::new();
        assert!(!checked_once(&differs, Device::Cuda(0), "test", || Err(
            "its output differs".into()
        )));
        let panics = OnceLock::new();
        assert!(!checked_once(&panics, Device::Cuda(0), "test", || panic!(
            "the backward was refused"
        )));
        assert_eq!(
            panics.get(),
            Some(&false),
            "a panic is a failed check, remembered"
        );
    }
}
