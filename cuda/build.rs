//! Compiles `csrc/cuda_graph.cpp`, `csrc/profiler.cpp`, `csrc/kernels.cpp` and
//! `csrc/nvrtc.cpp` against the headers of the libtorch that tch links (see
//! `build_support/libtorch.rs`); with a torch that has no CUDA, the graph functions only fail.
#[path = "../build_support/libtorch.rs"]
mod libtorch;

fn main() {
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/kernels.cpp");
    println!("cargo:rerun-if-changed=csrc/nvrtc.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_error.h");
    println!("cargo:rerun-if-changed=../build_support/libtorch.rs");
    let torch = libtorch::torch_dir();
    let mut build = libtorch::shim_build(&torch);
    build
        .file("csrc/cuda_graph.cpp")
        .file("csrc/profiler.cpp")
        .file("csrc/kernels.cpp")
        .file("csrc/nvrtc.cpp");
    let cuda = libtorch::cuda_include(&torch);
    match &cuda {
        Some(dir) => {
            build.include(dir).define("LILLM_WITH_CUDA", None);
        }
        None => println!(
            "cargo:warning=building without CUDA graphs (CPU-only torch or missing CUDA headers)"
        ),
    }
    build.compile("lillm_cuda_shim");
    // Where the tests find NVRTC to compile the kernels without a GPU (empty: not found).
    println!("cargo:rustc-check-cfg=cfg(lillm_cuda)");
    if cuda.is_some() {
        println!("cargo:rustc-cfg=lillm_cuda");
    }
    let nvrtc = nvrtc_dir(&torch);
    println!(
        "cargo:rustc-env=LILLM_NVRTC_DIR={}",
        nvrtc.map(|d| d.display().to_string()).unwrap_or_default()
    );
    libtorch::link_torch(&torch, cuda.is_some());
}

/// The directory of the NVRTC libraries (`libnvrtc.so.13` and its builtins) that the torch
/// wheel depends on, when it has them.
fn nvrtc_dir(torch: &std::path::Path) -> Option<std::path::PathBuf> {
    let dir = torch.parent()?.join("nvidia/cu13/lib");
    dir.join("libnvrtc.so.13").is_file().then_some(dir)
}
