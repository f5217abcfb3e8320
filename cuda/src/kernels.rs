//! The model's fused element-wise kernels on CUDA (`csrc/kernels.cpp`): CUDA C++ source that
//! libtorch's jiterator compiles at run time with NVRTC, wrapped as autograd functions. The
//! same source is compiled for the host too, and the same autograd functions run it on CPU
//! tensors, element by element, in place of jiterator: that is how a machine without a GPU
//! checks what they compute, forward and backward (the tests below hold them to the
//! reference formulas and autograd), and it compiles the kernels for the device with NVRTC
//! ([`device_ptx`]), which needs no GPU.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;

use tch::{Kind, Tensor};

use crate::{take_error, take_string, Error, Result};

extern "C" {
    fn lillm_cuda_swiglu(gate: *mut c_void, up: *mut c_void, err: *mut *mut c_char) -> *mut c_void;
    fn lillm_cuda_rope(
        x: *mut c_void,
        cos: *mut c_void,
        sin: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn lillm_cuda_kernels_source() -> *mut c_char;
    fn lillm_cuda_nvrtc_ptx(
        nvrtc: *const c_char,
        builtins: *const c_char,
        source: *const c_char,
        arch: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut c_char;
    #[cfg(test)]
    fn lillm_cuda_swiglu_host(
        gate: *mut c_void,
        up: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    #[cfg(test)]
    fn lillm_cuda_rope_host(
        x: *mut c_void,
        cos: *mut c_void,
        sin: *mut c_void,
        err: *mut *mut c_char,
    ) -> *mut c_void;
}

/// `silu(gate) · up` in one kernel, with a one-kernel backward, for CUDA tensors of one
/// shape and dtype; computed in float32 and rounded once.
///
/// # Errors
/// On tensors that are not on CUDA, of different shapes or dtypes, a build without CUDA, or
/// a kernel that does not compile.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    // SAFETY: both pointers are live at::Tensor objects owned by the arguments, which
    // outlive the call; the shim catches libtorch's exceptions.
    new_tensor("fused SwiGLU", |err| unsafe {
        lillm_cuda_swiglu(raw(gate), raw(up), err)
    })
}

/// `x` (…, n) with each pair of its last dimension, (a, b), rotated to
/// (a·cos − b·sin, b·cos + a·sin) by the float32 tables `cos` and `sin` (broadcastable to
/// (…, n/2)): one kernel and two interleaving copies forward, the same backward (which needs
/// only the tables). Computed in float32, rounded once to x's dtype.
///
/// # Errors
/// On tensors that are not on CUDA, an odd last dimension, tables that are not float32 or do
/// not broadcast, a build without CUDA, or a kernel that does not compile.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // SAFETY: the three pointers are live at::Tensor objects owned by the arguments, which
    // outlive the call; the shim catches libtorch's exceptions.
    new_tensor("fused RoPE", |err| unsafe {
        lillm_cuda_rope(raw(x), raw(cos), raw(sin), err)
    })
}

/// A tensor as the shim takes it.
fn raw(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// The tensor a shim call made, or its error: `call` returns a new at::Tensor or null with
/// the error it was given set.
fn new_tensor(what: &str, call: impl FnOnce(*mut *mut c_char) -> *mut c_void) -> Result<Tensor> {
    let mut err = std::ptr::null_mut();
    let out = call(&mut err);
    if out.is_null() {
        return Err(take_error(what, err));
    }
    // SAFETY: the shim returned a fresh heap-allocated at::Tensor (tch's C_tensor) that
    // nobody else owns; the Tensor frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// `f`'s output on leaves made from `inputs`, then the gradient of each input of a weighted
/// sum of the outputs (weights all different, so that each output's gradient differs), all
/// in float32: what a fused kernel is held to its reference on. A gradient `f` does not give
/// counts as zero, so that it differs from one the reference gives.
///
/// # Errors
/// What `f` returned.
pub fn output_and_gradients<E>(
    inputs: &[Tensor],
    f: impl FnOnce(&[Tensor]) -> std::result::Result<Tensor, E>,
) -> std::result::Result<Vec<Tensor>, E> {
    tch::with_grad(|| {
        let leaves: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect();
        let out = f(&leaves)?.to_kind(Kind::Float);
        let weights = Tensor::linspace(-1.0, 2.0, out.numel() as i64, (Kind::Float, out.device()))
            .view(out.size().as_slice());
        let grads = Tensor::run_backward(
            &[(&out * weights).sum(Kind::Float)],
            &leaves.iter().collect::<Vec<_>>(),
            false,
            false,
        );
        let grads = grads
            .iter()
            .zip(&leaves)
            .map(|(g, leaf)| match g.defined() {
                true => g.to_kind(Kind::Float),
                false => leaf.zeros_like().to_kind(Kind::Float),
            });
        Ok(std::iter::once(out).chain(grads).collect())
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

/// Every fused kernel's CUDA C++ source, with a kernel calling each as libtorch's jiterator
/// does (on float, the compute type of float32 and bf16 tensors alike).
pub fn kernels_source() -> String {
    // SAFETY: no arguments; the shim returns a strdup'ed string (freed by take_string).
    take_string(unsafe { lillm_cuda_kernels_source() }).expect("the shim returns the source")
}

/// `source` compiled to PTX for `arch` ("compute_90": Hopper) by the NVRTC libraries in
/// `nvrtc_dir` (the torch wheel's `nvidia/cu13/lib`) with the options jiterator uses; no GPU
/// needed.
///
/// # Errors
/// NVRTC's log when the source does not compile, or why NVRTC could not be loaded.
pub fn device_ptx(nvrtc_dir: &Path, source: &str, arch: &str) -> Result<String> {
    let c = |s: &str| CString::new(s).map_err(|e| Error::Cuda(format!("NVRTC input: {e}")));
    let path = |name: &str| c(&nvrtc_dir.join(name).to_string_lossy());
    let (nvrtc, builtins) = (path("libnvrtc.so.13")?, path("libnvrtc-builtins.so.13.0")?);
    let (source, arch) = (c(source)?, c(arch)?);
    let mut err = std::ptr::null_mut();
    // SAFETY: four NUL-terminated strings that outlive the call; the shim returns a strdup'ed
    // PTX or null with `err` set, and catches every exception.
    let ptx = unsafe {
        lillm_cuda_nvrtc_ptx(
            nvrtc.as_ptr(),
            builtins.as_ptr(),
            source.as_ptr(),
            arch.as_ptr(),
            &mut err,
        )
    };
    take_string(ptx).ok_or_else(|| take_error("NVRTC", err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The SwiGLU autograd function on CPU tensors, its kernels run on the host.
    fn swiglu_on_host(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        // SAFETY: live tensors owned by the arguments; the shim catches libtorch's exceptions.
        new_tensor("SwiGLU on the host", |err| unsafe {
            lillm_cuda_swiglu_host(raw(gate), raw(up), err)
        })
    }

    /// The RoPE autograd function on CPU tensors, its kernels run on the host.
    fn rope_on_host(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // SAFETY: live tensors owned by the arguments; the shim catches libtorch's exceptions.
        new_tensor("RoPE on the host", |err| unsafe {
            lillm_cuda_rope_host(raw(x), raw(cos), raw(sin), err)
        })
    }

    /// `f`'s output and the gradients of `inputs` ([`output_and_gradients`]).
    fn with_grads(inputs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Tensor) -> Vec<Tensor> {
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        output_and_gradients(&inputs, |x| Ok::<_, Error>(f(x))).unwrap()
    }

    /// Asserts that `got` and `want` (output, then gradients) agree within `tolerance` of the
    /// largest value of each.
    fn assert_close(got: &[Tensor], want: &[Tensor], tolerance: f64, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let diff = relative_diff(g, w);
            assert!(
                diff <= tolerance,
                "{what}, tensor {i} of (output, gradients...): {diff:e}"
            );
        }
    }

    /// The largest relative error of one bf16 rounding.
    const BF16_ROUNDING: f64 = 1.0 / 256.0;

    #[test]
    fn the_swiglu_function_computes_silu_times_up_and_its_gradients() {
        // Across silu's curve: both signs, zero, saturated ends.
        let gate = Tensor::linspace(-12.0, 9.0, 48, (Kind::Float, Device::Cpu)).view([4, 12]);
        let up = Tensor::linspace(3.0, -2.0, 48, (Kind::Float, Device::Cpu)).view([4, 12]);
        // The reference rounds silu and the product apart, the kernel once.
        for (kind, tolerance) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2.0 * BF16_ROUNDING)] {
            let (gate, up) = (gate.to_kind(kind), up.to_kind(kind));
            let fused = with_grads(&[&gate, &up], |x| swiglu_on_host(&x[0], &x[1]).unwrap());
            let reference = with_grads(&[&gate, &up], |x| x[0].silu() * &x[1]);
            assert_close(&fused, &reference, tolerance, &format!("{kind:?}"));
            assert_eq!(swiglu_on_host(&gate, &up).unwrap().kind(), kind);
        }
    }

    /// The rotation written out as the original does: each pair's halves apart, then
    /// stacked; `cos` and `sin` per pair, broadcast against x's pairs.
    fn rotate_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let size = x.size();
        let mut pairs = size.clone();
        let hd = pairs.pop().unwrap();
        pairs.extend([hd / 2, 2]);
        let halves = x.to_kind(Kind::Float).view(pairs.as_slice());
        let (a, b) = (halves.select(-1, 0), halves.select(-1, 1));
        let rotated = [&a * cos - &b * sin, &b * cos + &a * sin];
        Tensor::stack(&rotated, -1)
            .view(size.as_slice())
            .to_kind(x.kind())
    }

    #[test]
    fn the_rope_function_rotates_each_pair_and_its_gradient_back() {
        let (t, pairs) = (5, 4);
        let opts = (Kind::Float, Device::Cpu);
        let angles = Tensor::linspace(-3.0, 40.0, t * pairs, opts).view([t, pairs]);
        let (cos, sin) = (angles.cos(), angles.sin());
        // q or k: 2 rows, 5 positions, 3 heads, 8 features.
        let x = Tensor::linspace(-4.0, 6.0, 2 * t * 3 * 2 * pairs, opts).view([2, t, 3, 2 * pairs]);
        let rows = Tensor::from_slice(&[3i64, 0]);
        // Joined projections' output: q's and k's heads side by side, then v's (one more
        // head), so that q and k are strided (float32 keeps the strides, bf16 casts them
        // away).
        let joined = Tensor::linspace(-5.0, 7.0, 2 * t * 4 * 2 * pairs, opts)
            .view([2, t, 4 * 2 * pairs])
            .narrow(2, 0, 3 * 2 * pairs)
            .view([2, t, 3, 2 * pairs]);
        let cases = [
            // A batch: its positions in order, the tables broadcast over rows and heads.
            (
                "batch",
                x.shallow_clone(),
                cos.view([1, t, 1, pairs]),
                sin.view([1, t, 1, pairs]),
            ),
            (
                "joined",
                joined,
                cos.view([1, t, 1, pairs]),
                sin.view([1, t, 1, pairs]),
            ),
            // A decode step: one position per row.
            (
                "decode",
                x.narrow(1, 1, 1),
                cos.index_select(0, &rows).view([2, 1, 1, pairs]),
                sin.index_select(0, &rows).view([2, 1, 1, pairs]),
            ),
        ];
        for (kind, tolerance) in [(Kind::Float, 1e-6), (Kind::BFloat16, BF16_ROUNDING)] {
            for (what, x, cos, sin) in &cases {
                let x = x.to_kind(kind);
                let what = format!("{what}, {kind:?}");
                let fused = with_grads(&[&x], |x| rope_on_host(&x[0], cos, sin).unwrap());
                let reference = with_grads(&[&x], |x| rotate_pairs(&x[0], cos, sin));
                assert_close(&fused, &reference, tolerance, &what);
                // As attention uses it: transposed after, so that its gradient comes back
                // strided.
                let transposed = |out: Tensor| out.transpose(1, 2).contiguous();
                let fused = with_grads(&[&x], |x| {
                    transposed(rope_on_host(&x[0], cos, sin).unwrap())
                });
                let reference = with_grads(&[&x], |x| transposed(rotate_pairs(&x[0], cos, sin)));
                assert_close(
                    &fused,
                    &reference,
                    tolerance,
                    &format!("{what}, transposed"),
                );
                assert_eq!(rope_on_host(&x, cos, sin).unwrap().kind(), kind);
            }
        }
        let odd = rope_on_host(&x.narrow(3, 0, 7), &cos, &sin).unwrap_err();
        assert!(odd.to_string().contains("must be even"), "{odd}");
    }

    #[test]
    fn on_a_cpu_the_fused_kernels_are_refused_with_a_reason() {
        let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let err = swiglu(&t, &t).unwrap_err().to_string();
        assert!(
            err.contains("fused SwiGLU") && err.contains("CUDA"),
            "{err}"
        );
        let err = rope(&t, &t, &t).unwrap_err().to_string();
        assert!(err.contains("fused RoPE") && err.contains("CUDA"), "{err}");
    }

    /// The torch wheel's NVRTC, as the build found it.
    fn nvrtc_dir() -> &'static Path {
        let dir = env!("LILLM_NVRTC_DIR");
        assert!(
            !dir.is_empty(),
            "this torch has CUDA but no NVRTC in its nvidia/cu13/lib; run scripts/bootstrap"
        );
        Path::new(dir)
    }

    #[test]
    #[cfg_attr(
        not(lillm_cuda),
        ignore = "this torch has no CUDA: the kernels never run"
    )]
    fn every_kernel_compiles_for_the_gpus_it_runs_on() {
        let source = kernels_source();
        // A100 (the seed's GPUs) and H100/H200.
        for arch in ["compute_80", "compute_90"] {
            let ptx = device_ptx(nvrtc_dir(), &source, arch).unwrap_or_else(|e| panic!("{e}"));
            for kernel in ["lillm_check_swiglu", "lillm_check_rope"] {
                assert!(ptx.contains(&format!(".entry {kernel}")), "{arch}:\n{ptx}");
            }
            assert!(ptx.contains(&format!(".target sm_{}", &arch[8..])), "{ptx}");
        }
    }

    #[test]
    #[cfg_attr(
        not(lillm_cuda),
        ignore = "this torch has no CUDA: the kernels never run"
    )]
    fn a_kernel_that_does_not_compile_is_reported_with_nvrtcs_log() {
        // What jiterator would refuse on the GPU: a function it cannot find, on the line named.
        let broken = kernels_source().replace("expf(", "exp_f(");
        let err = device_ptx(nvrtc_dir(), &broken, "compute_90")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NVRTC: compiling for compute_90") && err.contains("exp_f"),
            "{err}"
        );
        let missing = device_ptx(Path::new("/nonexistent"), &broken, "compute_90")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot load /nonexistent/"), "{missing}");
    }
}
