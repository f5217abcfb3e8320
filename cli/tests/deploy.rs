//! The deploy/ files: the systemd units pass `systemd-analyze verify`, the variables they use
//! are in the environment file, and the example training config is a valid config.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn the_systemd_units_verify_against_the_built_binaries() {
    let deploy = repo_root().join("deploy");
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lillm")).parent().unwrap();
    let env_file = deploy.join("systemd/lillm.env");
    let env_text = std::fs::read_to_string(&env_file).unwrap();
    let mut units = Vec::new();
    for name in [
        "lillm-coordinator.service",
        "lillm-dataloader.service",
        "lillm-trainer@.service",
    ] {
        let text = std::fs::read_to_string(deploy.join("systemd").join(name)).unwrap();
        // Every ${VAR} a command line uses must be set by the environment file.
        for var in text.split("${").skip(1).filter_map(|r| r.split('}').next()) {
            assert!(
                env_text.contains(&format!("\n{var}=")),
                "{name} uses ${{{var}}}, which lillm.env does not set"
            );
        }
        let local = text
            .replace("/opt/lillm/bin", bin_dir.to_str().unwrap())
            .replace("/etc/lillm/lillm.env", env_file.to_str().unwrap());
        // The template is verified as instance 0, so %i resolves.
        let file = dir.path().join(name.replace("@.", "@0."));
        std::fs::write(&file, local).unwrap();
        units.push(file);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian package systemd, installed by scripts/bootstrap)");
    let report =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && report.trim().is_empty(), "{report}");
}

#[test]
fn the_example_training_config_is_valid() {
    let config = repo_root().join("deploy/config/train.toml");
    let out = lillm_ok(&["train", "--config", s(&config), "--print-config"]);
    assert!(
        out.contains("preset = \"lillm-39m\"") && out.contains("grad_accum = 16"),
        "{out}"
    );
}
