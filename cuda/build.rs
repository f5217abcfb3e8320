//! Compiles `csrc/cuda_graph.cpp`, `csrc/profiler.cpp` and `csrc/kernels.cpp` against the headers of the
//! libtorch that tch links (see `build_support/libtorch.rs`); with a torch that has no CUDA,
//! the graph functions only fail.
#[path = "../build_support/libtorch.rs"]
mod libtorch;

fn main() {
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/kernels.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_error.h");
    println!("cargo:rerun-if-changed=../build_support/libtorch.rs");
    let torch = libtorch::torch_dir();
    let mut build = libtorch::shim_build(&torch);
    build
        .file("csrc/cuda_graph.cpp")
        .file("csrc/profiler.cpp")
        .file("csrc/kernels.cpp");
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
    libtorch::link_torch(&torch, cuda.is_some());
}
