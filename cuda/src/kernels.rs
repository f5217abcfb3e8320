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
    fn on_a_cpu_the_fused_swiglu_is_refused_with_a_reason() {
        let t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let err = swiglu(&t, &t).unwrap_err().to_string();
        assert!(
            err.contains("fused SwiGLU") && err.contains("CUDA"),
            "{err}"
        );
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
            assert!(ptx.contains(".entry lillm_check_swiglu"), "{arch}:\n{ptx}");
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
