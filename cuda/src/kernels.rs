//! The model's fused element-wise kernels on CUDA (`csrc/kernels.cpp`): CUDA C++ source that
//! libtorch's jiterator compiles at run time with NVRTC, wrapped as autograd functions. The
//! same source is compiled for the host too, which is how a machine without a GPU checks
//! what each element computes (the tests below hold it to the reference formulas), and
//! compiles the kernels for the device with NVRTC ([`device_ptx`]), which needs no GPU.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;

use tch::Tensor;

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
    fn lillm_cuda_swiglu_forward_host(gate: f32, up: f32) -> f32;
    #[cfg(test)]
    fn lillm_cuda_swiglu_backward_host(
        grad: f32,
        gate: f32,
        up: f32,
        d_gate: *mut f32,
        d_up: *mut f32,
    );
    #[cfg(test)]
    fn lillm_cuda_rope_forward_host(
        a: f32,
        b: f32,
        cos: f32,
        sin: f32,
        out_a: *mut f32,
        out_b: *mut f32,
    );
    #[cfg(test)]
    fn lillm_cuda_rope_backward_host(
        grad_a: f32,
        grad_b: f32,
        cos: f32,
        sin: f32,
        d_a: *mut f32,
        d_b: *mut f32,
    );
}

/// `silu(gate) · up` in one kernel, with a one-kernel backward, for CUDA tensors of one
/// shape and dtype; computed in float32 and rounded once.
///
/// # Errors
/// On tensors that are not on CUDA, of different shapes or dtypes, a build without CUDA, or
/// a kernel that does not compile.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let mut err = std::ptr::null_mut();
    // SAFETY: both pointers are live at::Tensor objects owned by the arguments, which
    // outlive the call; the shim catches libtorch's exceptions.
    let out = unsafe {
        lillm_cuda_swiglu(
            gate.as_ptr() as *mut c_void,
            up.as_ptr() as *mut c_void,
            &mut err,
        )
    };
    if out.is_null() {
        return Err(take_error("fused SwiGLU", err));
    }
    // SAFETY: the shim returned a fresh heap-allocated at::Tensor (tch's C_tensor) that
    // nobody else owns; the Tensor frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
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
    let mut err = std::ptr::null_mut();
    // SAFETY: the three pointers are live at::Tensor objects owned by the arguments, which
    // outlive the call; the shim catches libtorch's exceptions.
    let out = unsafe {
        lillm_cuda_rope(
            x.as_ptr() as *mut c_void,
            cos.as_ptr() as *mut c_void,
            sin.as_ptr() as *mut c_void,
            &mut err,
        )
    };
    if out.is_null() {
        return Err(take_error("fused RoPE", err));
    }
    // SAFETY: the shim returned a fresh heap-allocated at::Tensor (tch's C_tensor) that
    // nobody else owns; the Tensor frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
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
    use tch::{Device, Kind};

    /// The reference, as the model computes it without the kernel: silu(gate)·up and its
    /// gradients by autograd, in float32.
    fn reference(gate: f32, up: f32) -> (f32, f32, f32) {
        let g = Tensor::from(gate).set_requires_grad(true);
        let u = Tensor::from(up).set_requires_grad(true);
        let out = g.silu() * &u;
        out.backward();
        let value = |t: &Tensor| t.double_value(&[]) as f32;
        (value(&out), value(&g.grad()), value(&u.grad()))
    }

    #[test]
    fn the_swiglu_kernels_compute_silu_times_up_and_its_gradients() {
        for gate in [-12.0f32, -3.5, -1.0, -0.1, 0.0, 0.3, 1.0, 2.7, 9.0] {
            for up in [-2.0f32, 0.0, 0.5, 3.0] {
                let (want, want_gate, want_up) = reference(gate, up);
                // SAFETY: plain values in and out.
                let got = unsafe { lillm_cuda_swiglu_forward_host(gate, up) };
                let (mut d_gate, mut d_up) = (0.0f32, 0.0f32);
                // SAFETY: plain values in; the shim writes two floats it is given.
                unsafe { lillm_cuda_swiglu_backward_host(2.0, gate, up, &mut d_gate, &mut d_up) };
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
                assert!(close(got, want), "forward at {gate}, {up}: {got} vs {want}");
                assert!(
                    close(d_gate, 2.0 * want_gate),
                    "d gate at {gate}, {up}: {d_gate} vs {}",
                    2.0 * want_gate
                );
                assert!(close(d_up, 2.0 * want_up), "d up at {gate}, {up}");
            }
        }
    }

    #[test]
    fn the_rope_kernels_rotate_each_pair_and_rotate_its_gradient_back() {
        for angle in [-7.0f32, -1.2, 0.0, 0.4, 1.0, 3.0, 500.0] {
            for (a, b) in [(1.0f32, 0.0f32), (0.0, 1.0), (-2.5, 0.75), (3.0, -4.0)] {
                let (cos, sin) = (angle.cos(), angle.sin());
                // The reference as the model computes it: (a, b)·cos + (b, a)·(−sin, sin),
                // and its gradient by autograd of a weighted sum of the outputs.
                let x = Tensor::from_slice(&[a, b]).set_requires_grad(true);
                let table_cos = Tensor::from_slice(&[cos, cos]);
                let table_sin = Tensor::from_slice(&[-sin, sin]);
                let want = &x * &table_cos + x.flip([0]) * &table_sin;
                let (grad_a, grad_b) = (0.5f32, -1.5f32);
                (&want * Tensor::from_slice(&[grad_a, grad_b]))
                    .sum(Kind::Float)
                    .backward();
                let want = Vec::<f32>::try_from(&want).unwrap();
                let want_grad = Vec::<f32>::try_from(&x.grad()).unwrap();
                let (mut out_a, mut out_b, mut d_a, mut d_b) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
                // SAFETY: plain values in; the shim writes the two floats it is given.
                unsafe { lillm_cuda_rope_forward_host(a, b, cos, sin, &mut out_a, &mut out_b) };
                // SAFETY: as above.
                unsafe {
                    lillm_cuda_rope_backward_host(grad_a, grad_b, cos, sin, &mut d_a, &mut d_b)
                };
                let close = |x: f32, y: f32| (x - y).abs() <= 1e-6 * (1.0 + y.abs());
                assert!(
                    close(out_a, want[0]) && close(out_b, want[1]),
                    "forward of ({a}, {b}) by {angle}: ({out_a}, {out_b}) vs {want:?}"
                );
                assert!(
                    close(d_a, want_grad[0]) && close(d_b, want_grad[1]),
                    "backward of ({a}, {b}) by {angle}: ({d_a}, {d_b}) vs {want_grad:?}"
                );
            }
        }
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
