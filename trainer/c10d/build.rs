//! Compiles `csrc/c10d_shim.cpp` (c10d's TCPStore and Gloo process group behind a C ABI) and
//! `csrc/fused_optim.cpp` (libtorch's fused AdamW) against the headers of the libtorch that
//! tch links (see `build_support/libtorch.rs`).
use std::path::{Path, PathBuf};

#[path = "../../build_support/libtorch.rs"]
mod libtorch;

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_optim.cpp");
    println!("cargo:rerun-if-changed=../../build_support/libtorch.rs");
    let torch = libtorch::torch_dir();
    let mut build = libtorch::shim_build(&torch);
    build
        .file("csrc/c10d_shim.cpp")
        .file("csrc/fused_optim.cpp")
        .flag("-DUSE_C10D_GLOO");
    let nccl = nccl_includes(&torch);
    if let Some(dirs) = &nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("LILLM_WITH_NCCL", None);
        for d in dirs {
            build.include(d);
        }
    } else {
        println!("cargo:warning=building without NCCL (CPU-only torch or missing CUDA headers): distributed CUDA training is unavailable");
    }
    build.compile("lillm_c10d_shim");
    libtorch::link_torch(&torch, nccl.is_some());
}

/// Include directories for `ProcessGroupNCCL.hpp`, when this torch has CUDA and the venv has
/// the NCCL and CUDA headers (packages nvidia-nccl-cu13, nvidia-cuda-crt, nvidia-cuda-cccl).
fn nccl_includes(torch: &Path) -> Option<Vec<PathBuf>> {
    let cuda = libtorch::cuda_include(torch)?;
    let nccl = torch.parent()?.join("nvidia/nccl/include");
    nccl.join("nccl.h").is_file().then(|| vec![nccl, cuda])
}
