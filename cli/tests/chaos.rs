//! A short chaos run (bench/chaos.py): a `--nproc 2` job with three dataloaders, the train
//! shards placed on them and read exactly once per epoch, keeps training while a random
//! trainer, dataloader or coordinator is SIGKILLed every ~2 s, each role at least once (and
//! a trainer and a dataloader frozen by SIGSTOP past the heartbeat timeout), and ends with
//! exactly the model of an uninterrupted run. `make bench` runs the long one.

mod common;

use common::*;

#[test]
fn a_job_under_random_sigkills_of_every_role_trains_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    // Small shards, so that each dataloader holds some and not others.
    let data = sharded_data(dir.path());
    let out = dir.path().join("chaos");
    let figures = dir.path().join("chaos.json");
    let bin = env!("CARGO_BIN_EXE_lillm");
    let mut train: Vec<&str> = tiny_train_args("-", "-", "300", "3000")
        .into_iter()
        .skip(1)
        .collect();
    // chaos.py sets these itself.
    for flag in ["--data", "--out"] {
        let i = train.iter().position(|a| *a == flag).unwrap();
        train.drain(i..i + 2);
    }
    set_flag(&mut train, "--eval-interval", "100");
    set_flag(&mut train, "--lr-decay-iters", "3000");
    // A killed dataloader's rows come from the other copy of its shards, and its shards move
    // to the two survivors until the supervisor's restart takes a share back.
    train.extend(["--dataloaders", "3", "--data-order", "epochs"]);
    let script = repo_root().join("bench/chaos.py");
    let mut args = vec![
        s(&script),
        "--lillm",
        bin,
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--duration",
        "24",
        "--every",
        "2",
        "--json",
        s(&figures),
        "--",
    ];
    args.extend(train);
    let run = std::process::Command::new(python_path())
        .args(&args)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{report}");
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    assert!(f["failures_injected"].as_u64().unwrap() >= 5, "{report}");
    for role in ["trainer", "dataloader", "coordinator"] {
        assert!(
            f["by_role"][role].as_u64().unwrap() >= 1,
            "{role} never killed: {report}"
        );
    }
    assert!(f["trainer_freezes"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(f["failures_detected"], f["failures_injected"], "{report}");
    assert_eq!(f["steps_with_a_different_loss"], 0, "{report}");
    assert_eq!(
        f["final_max_abs_dw"], 0.0,
        "bitwise the uninterrupted model: {report}"
    );
    // In place, nothing is recomputed; should two kills land in one regroup, the job may fall
    // back to its last checkpoint, never further.
    assert!(
        f["steps_recomputed_per_trainer_failure_max"]
            .as_u64()
            .unwrap()
            <= 100,
        "{report}"
    );
    // A frozen dataloader was evicted and its shards placed on the others, while the
    // trainers read its rows from the other copy.
    assert!(f["dataloader_freezes"].as_u64().unwrap() >= 1, "{report}");
    assert!(f["shard_moves"].as_u64().unwrap() >= 1, "{report}");
    println!("{report}");
}
