//! What the build scripts of the crates with a C++ shim (`lillm-c10d`, `lillm-cuda`) share:
//! finding the libtorch that tch links and compiling against its headers. Included by each
//! `build.rs` with `#[path]`, as build scripts cannot share a library crate's code.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libtorch directory: `LIBTORCH`, or the torch package of the `python` on PATH
/// (LIBTORCH_USE_PYTORCH, as torch-sys does).
pub fn torch_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return PathBuf::from(dir);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{python}` to find torch ({e}); run scripts/bootstrap")
        });
    assert!(
        out.status.success(),
        "`{python}` cannot import torch; run scripts/bootstrap"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A C++17 build against libtorch's headers, with libtorch's ABI.
pub fn shim_build(torch: &Path) -> cc::Build {
    let include = torch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-w");
    build
}

/// The CUDA runtime's headers, when this torch has CUDA and the venv has them (packages
/// nvidia-cuda-crt and nvidia-cuda-cccl).
pub fn cuda_include(torch: &Path) -> Option<PathBuf> {
    if !torch.join("lib/libtorch_cuda.so").is_file() {
        return None;
    }
    let dir = torch.parent()?.join("nvidia/cu13/include");
    (dir.join("cuda_runtime.h").is_file() && dir.join("crt/host_config.h").is_file()).then_some(dir)
}

/// Links libtorch's libraries (its CUDA ones with `cuda`).
pub fn link_torch(torch: &Path, cuda: bool) {
    println!(
        "cargo:rustc-link-search=native={}",
        torch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if cuda {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
