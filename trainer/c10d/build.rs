//! Compiles `csrc/c10d_shim.cpp` (c10d's TCPStore and Gloo process group behind a C ABI) and
//! `csrc/fused_optim.cpp` (libtorch's fused AdamW)
//! against the headers of the libtorch that tch links: the `LIBTORCH` directory, or the
//! torch package of the `python` on PATH (LIBTORCH_USE_PYTORCH, as torch-sys does).
use std::path::PathBuf;
use std::process::Command;

fn torch_dir() -> PathBuf {
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

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/fused_optim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let torch = torch_dir();
    let include = torch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/c10d_shim.cpp")
        .file("csrc/fused_optim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DUSE_C10D_GLOO")
        .flag("-w");
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
    println!(
        "cargo:rustc-link-search=native={}",
        torch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

/// Include directories for `ProcessGroupNCCL.hpp`, when this torch has CUDA and the venv has
/// the NCCL and CUDA headers (packages nvidia-nccl-cu13, nvidia-cuda-crt, nvidia-cuda-cccl).
fn nccl_includes(torch: &std::path::Path) -> Option<Vec<PathBuf>> {
    if !torch.join("lib/libtorch_cuda.so").is_file() {
        return None;
    }
    let nvidia = torch.parent()?.join("nvidia");
    let dirs = vec![nvidia.join("nccl/include"), nvidia.join("cu13/include")];
    let complete = dirs[0].join("nccl.h").is_file()
        && dirs[1].join("cuda_runtime.h").is_file()
        && dirs[1].join("crt/host_config.h").is_file();
    complete.then_some(dirs)
}
