//! Serving reads checkpoints and runs the model; it must never pull in the training engine
//! or the c10d bindings (and their C++ shim) that only distributed training needs.

#[test]
fn serving_depends_on_neither_the_trainer_nor_c10d() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "lillm-serve",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.contains("lillm-checkpoint"), "{tree}");
    for forbidden in ["lillm-trainer", "lillm-c10d", "lillm-coordinator"] {
        assert!(
            !tree.contains(forbidden),
            "lillm-serve depends on {forbidden}:\n{tree}"
        );
    }
}
