//! The container image cannot be built here (no registry, no container engine), so what can
//! be checked is checked: the runtime layer that `scripts/stage-runtime` stages resolves
//! every shared library the binaries need, from the staged tree or from a Debian package
//! the Containerfile's runtime stage installs — and the staged binary runs.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The packages the Containerfile's runtime stage installs.
fn runtime_packages() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("deploy/container/Containerfile")).unwrap();
    let runtime = text.split("AS runtime").nth(1).expect("a runtime stage");
    let install = runtime
        .split("install -y --no-install-recommends")
        .nth(1)
        .expect("an apt-get install in the runtime stage");
    install
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| *w != "\\")
        .map(String::from)
        .collect()
}

/// The Debian package that owns `path` (as ldd printed it; merged-/usr aware).
fn debian_package(path: &str) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let name = real.file_name()?.to_str()?.to_string();
    let candidates = [
        path.to_string(),
        format!("/usr{path}"),
        path.trim_start_matches("/usr").to_string(),
        real.display().to_string(),
        format!("/lib/x86_64-linux-gnu/{name}"),
    ];
    candidates.iter().find_map(|candidate| {
        let out = Command::new("dpkg").args(["-S", candidate]).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| {
            let package = text.split(':').next().unwrap_or_default().trim();
            package.to_string()
        })
    })
}

#[test]
fn the_staged_runtime_tree_resolves_every_library_the_binaries_need() {
    let target = repo_root().join("target");
    let dir = tempfile::tempdir_in(&target).unwrap();
    let stage = dir.path().join("stage");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lillm")).parent().unwrap();
    let out = Command::new(repo_root().join("scripts/stage-runtime"))
        .args([s(&stage), s(bin_dir), "--link"])
        .env("LILLM_PYTHON", python_path())
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The image's library path, and nothing of this machine's Python environment.
    let lib_path = stage.join("opt/lillm/lib/torch/lib");
    let packages = runtime_packages();
    let venv = std::fs::canonicalize(repo_root().join(".venv")).unwrap();
    for bin in ["lillm", "coordinator", "dataloader", "trainer"] {
        let binary = stage.join("opt/lillm/bin").join(bin);
        let ldd = Command::new("ldd")
            .arg(&binary)
            .env("LD_LIBRARY_PATH", &lib_path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&ldd.stdout).to_string();
        assert!(
            ldd.status.success() && !report.contains("not found"),
            "{bin}:\n{report}"
        );
        for line in report.lines() {
            let Some(path) = line.split("=> ").nth(1).and_then(|r| r.split(" (").next()) else {
                continue;
            };
            let real = std::fs::canonicalize(path).unwrap();
            if real.starts_with(&stage) {
                continue;
            }
            assert!(
                !real.starts_with(&venv),
                "{bin} loads {} from the build machine's .venv, not the staged tree",
                real.display()
            );
            let package = debian_package(path)
                .unwrap_or_else(|| panic!("{bin} loads {path}, which no Debian package owns"));
            assert!(
                packages.contains(&package),
                "{bin} loads {path} from {package}, which the runtime stage does not install ({packages:?})"
            );
        }
    }
    let libs: Vec<String> = std::fs::read_dir(&lib_path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !libs.iter().any(|l| l.contains("python")),
        "nothing that needs Python is staged: {libs:?}"
    );

    // The staged binary runs with the image's library path.
    let version = Command::new(stage.join("opt/lillm/bin/lillm"))
        .arg("--version")
        .env_clear()
        .env("LD_LIBRARY_PATH", &lib_path)
        .output()
        .unwrap();
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("lillm "));
}
