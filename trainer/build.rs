//! Compiles `csrc/c10d_shim.cpp` (c10d's TCPStore and Gloo process group behind a C ABI)
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
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let torch = torch_dir();
    let include = torch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/c10d_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DUSE_C10D_GLOO")
        .flag("-w")
        .compile("lillm_c10d_shim");
    println!(
        "cargo:rustc-link-search=native={}",
        torch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
