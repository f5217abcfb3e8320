//! An elastic job (`coordinator --nodes 1:2`, two trainers per node): when a node
//! disappears for good, the job goes on at the smaller size after the grace period, and
//! grows back when the node returns — with the math of an uninterrupted run throughout,
//! because the step's micro-batches are re-divided over whichever ranks there are.

mod common;

use common::job::*;
use common::*;
use std::time::Duration;

#[test]
fn a_node_lost_for_good_shrinks_the_job_and_its_return_grows_it_with_the_same_math() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let mut long = tiny_train_args(s(&tiny.data), "-", "300", "160");
    set_flag(&mut long, "--eval-interval", "20");
    // Four micro-batches a step: four ranks, or two.
    set_flag(&mut long, "--grad-accum", "4");
    set_flag(&mut long, "--lr-decay-iters", "160");
    let straight = dir.path().join("straight");
    set_flag(&mut long, "--out", s(&straight));
    lillm_ok(&long);

    let run = dir.path().join("run");
    set_flag(&mut long, "--out", s(&run));
    // Two nodes of two trainers each.
    let job = Job::new(
        dir.path(),
        2,
        2,
        &["--elastic-grace-ms=2000", "--heartbeat-timeout-ms=3000"],
    )
    .elastic(1);
    let _coordinator = job.start_coordinator();
    let node = |name: &str, round: &str| -> (Actor, Vec<Actor>) {
        let loader = Actor::lillm(
            &job.dataloader_args(&tiny.data, name, "127.0.0.1:0"),
            dir.path().join(format!("loader-{name}-{round}.log")),
        );
        let trainers = (0..2)
            .map(|k| {
                Actor::lillm(
                    &job.trainer_args(&long, name, k, "127.0.0.1"),
                    dir.path().join(format!("trainer{k}-{name}-{round}.log")),
                )
            })
            .collect();
        (loader, trainers)
    };
    let (_loader_a, trainers_a) = node("node-a", "1");
    let (mut loader_b, mut trainers_b) = node("node-b", "1");
    wait_until(Duration::from_secs(120), "30 steps on two nodes", || {
        losses(&run).len() >= 30
    });
    // Node b vanishes for good: its processes die without a word.
    for t in &mut trainers_b {
        t.kill();
    }
    loader_b.kill();
    let lost_at = losses(&run).len();
    wait_until(Duration::from_secs(60), "training to go on alone", || {
        losses(&run).len() >= lost_at + 20
    });
    let alone = job.status();
    let ranked: Vec<_> = alone["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["rank"].is_u64() && m["role"] == "trainer")
        .collect();
    assert_eq!(ranked.len(), 2, "node a's two ranks left: {alone}");
    let changes = alone["changes"].as_array().unwrap();
    assert!(
        changes
            .last()
            .and_then(|c| c.as_str())
            .is_some_and(|c| c.contains("(2 of 4 trainers): elastic: 2 of 4 trainers present")),
        "status says the size changed and why: {alone}"
    );
    let text = lillm_ok(&["status", "--coordinator", &job.address]);
    assert!(text.contains("change: generation"), "{text}");
    // It comes back: the job grows to four ranks again.
    let (_loader_b, trainers_b) = node("node-b", "2");
    for mut t in trainers_a.into_iter().chain(trainers_b) {
        t.finish(Duration::from_secs(240));
    }
    assert_same_losses(&losses(&straight), &losses(&run));
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(log.contains("elastic: 2 of 4 trainers present"), "{log}");
    let back = log
        .lines()
        .filter(|l| l.contains("node-b/trainer0 registered"))
        .count();
    assert!(back >= 2, "node b joined again: {log}");
    let max_diff = max_weight_diff(
        &straight.join("checkpoints/step-00000160/model.safetensors"),
        &run.join("checkpoints/step-00000160/model.safetensors"),
    );
    assert!(max_diff <= 1e-5, "final weights differ by {max_diff}");
}
