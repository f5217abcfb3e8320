//! Checkpoints that outlive a node: in a job on two nodes, rank 0 and the first rank of the
//! other node each write every checkpoint to their own disk, and the coordinator records a
//! checkpoint as durable only when both copies are in. When rank 0's node is lost with its
//! disk and the job restarts, it resumes from the copy on the other node — exactly.

mod common;

use common::job::*;
use common::*;
use std::time::Duration;

#[test]
fn the_job_resumes_from_the_other_nodes_copy_when_rank_0s_disk_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let mut train = long_run_of(s(&tiny.data), "-", "400");
    set_flag(&mut train, "--eval-interval", "20");
    let straight = dir.path().join("straight");
    set_flag(&mut train, "--out", s(&straight));
    lillm_ok(&train);

    // Each node has its own disk: its own run directory.
    let disk = |node: &str| dir.path().join(format!("disk-{node}"));
    let job = Job::new(dir.path(), 2, 1, &["--heartbeat-timeout-ms=3000"]);
    let _coordinator = job.start_coordinator();
    let node = |name: &str, round: &str| -> (Actor, Actor) {
        let out = disk(name);
        let mut args = train.clone();
        set_flag(&mut args, "--out", s(&out));
        let loader = Actor::lillm(
            &job.dataloader_args(&tiny.data, name, "127.0.0.1:0"),
            dir.path().join(format!("loader-{name}-{round}.log")),
        );
        let trainer = Actor::lillm(
            &job.trainer_args(&args, name, 0, "127.0.0.1"),
            dir.path().join(format!("trainer-{name}-{round}.log")),
        );
        (loader, trainer)
    };
    let (mut loader_a, mut trainer_a) = node("node-a", "1");
    let (_loader_b, mut trainer_b) = node("node-b", "1");
    let durable_step = |status: &serde_json::Value| status["last_checkpoint"]["step"].as_u64();
    wait_until(Duration::from_secs(120), "a durable checkpoint", || {
        durable_step(&job.status()) >= Some(40)
    });
    // Node a dies with its disk; node b's trainer dies too (a full stop).
    trainer_a.kill();
    loader_a.kill();
    trainer_b.kill();
    let status = job.status();
    let copies = &status["last_checkpoint"]["copies"];
    let step = durable_step(&status).unwrap();
    let copy_b = disk("node-b").join(format!("checkpoints/step-{step:08}"));
    assert_eq!(
        copies.as_array().map(Vec::len),
        Some(2),
        "a copy on each node: {status}"
    );
    assert!(
        copies.to_string().contains(s(&copy_b)),
        "node b's copy is recorded: {status}"
    );
    assert!(copy_b.join("manifest.json").is_file());
    std::fs::remove_dir_all(disk("node-a")).unwrap();
    // A new machine takes node a's place; node b comes back with its disk.
    let (_loader_a, mut trainer_a) = node("node-a", "2");
    let disk_b = disk("node-b");
    let mut args_b = train.clone();
    set_flag(&mut args_b, "--out", s(&disk_b));
    let mut trainer_b = Actor::lillm(
        &job.trainer_args(&args_b, "node-b", 0, "127.0.0.1"),
        dir.path().join("trainer-node-b-2.log"),
    );
    trainer_a.finish(Duration::from_secs(180));
    trainer_b.finish(Duration::from_secs(60));
    let new_a = trainer_a.log_text();
    assert!(
        new_a.contains("this node's copy of the checkpoint is missing or damaged"),
        "{new_a}"
    );
    // Rank 0 (node a) logged from the resumed step on; those losses are the straight run's.
    let resumed = losses(&disk("node-a"));
    assert!(
        resumed.first().is_some_and(|(s, _)| *s > step),
        "{resumed:?}"
    );
    let expected: Vec<_> = losses(&straight)
        .into_iter()
        .filter(|(s, _)| *s > step)
        .collect();
    assert_same_losses(&expected, &resumed);
    for node in ["node-a", "node-b"] {
        let max_diff = max_weight_diff(
            &straight.join("checkpoints/step-00000400/model.safetensors"),
            &disk(node).join("checkpoints/step-00000400/model.safetensors"),
        );
        assert!(
            max_diff <= 1e-5,
            "{node}'s final weights differ by {max_diff}"
        );
    }
}
