//! `lillm bench` at a size that runs in seconds: the coordinator simulation speaks the real
//! protocol end to end (storm, heartbeats, kill, regroup, commits) and shows that steady
//! heartbeats never write the coordinator's store, and a coordinator that dies under it is
//! named; the epoch-order bench reports its reads.

mod common;

use common::*;

#[test]
fn the_coordinator_bench_runs_every_phase_and_heartbeats_never_write_the_store() {
    let out = lillm_ok(&[
        "bench",
        "coordinator",
        "--trainers",
        "24",
        "--trainers-per-node",
        "4",
        "--steady-seconds",
        "2",
    ]);
    assert!(out.contains("### 24 trainers on 6 nodes"), "{out}");
    assert!(
        out.contains("| state-store writes, steady | 0.00 per s |"),
        "{out}"
    );
    assert!(
        out.contains("| detection of 1 silent trainers (kill → eviction) |"),
        "{out}"
    );
    let commits = out
        .lines()
        .find(|l| l.starts_with("| commit latency"))
        .unwrap();
    assert_eq!(commits.matches(" / ").count(), 1, "two writers: {commits}");
}

#[test]
fn a_coordinator_that_dies_under_the_bench_is_named_with_its_log() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    // The real coordinator (`lillm coordinator`), started through a script that leaves its
    // process id behind and a line in its log.
    let pid_file = dir.path().join("coordinator.pid");
    let wrapper = dir.path().join("coordinator");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho $$ > {}\necho 'a line of its log' >&2\nexec {} coordinator \"$@\"\n",
            pid_file.display(),
            env!("CARGO_BIN_EXE_lillm")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut bench = Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args([
            "bench",
            "coordinator",
            "--trainers",
            "8",
            "--trainers-per-node",
            "4",
        ])
        .args(["--steady-seconds", "1", "--coordinator-bin"])
        .arg(&wrapper)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut said = String::new();
    for line in std::io::BufReader::new(bench.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        said.push_str(&line);
        said.push('\n');
        // The coordinator dies as the bench silences a trainer and waits for its eviction.
        if line.contains("killing 1 trainers") {
            let pid = std::fs::read_to_string(&pid_file).unwrap();
            signal(pid.trim().parse().unwrap(), libc::SIGKILL);
        }
    }
    let status = bench.wait().unwrap();
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("the coordinator under test exited (signal: 9 (SIGKILL))"),
        "{said}"
    );
    assert!(
        said.contains("the end of its log:\na line of its log"),
        "{said}"
    );
    // It says so at once, not after the 120 s it would wait for the regroup.
    assert!(started.elapsed().as_secs() < 60, "{said}");
}

#[test]
fn the_epoch_order_bench_reads_few_shards_per_step() {
    let out = lillm_ok(&["bench", "epochs", "--shards", "2000"]);
    assert!(out.contains("over 2000 shards"), "{out}");
    // A step of 1,024 sequences reads at most two windows of 8 shards.
    let shards: usize = out
        .split("reading at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no shard count in {out}"));
    assert!((1..=16).contains(&shards), "{out}");
}

#[test]
fn the_placement_bench_moves_only_the_departed_dataloaders_copies() {
    let out = lillm_ok(&[
        "bench",
        "epochs",
        "--shards",
        "2000",
        "--dataloaders",
        "100",
    ]);
    assert!(
        out.contains("2 copies of 2000 shards on 100 dataloaders"),
        "{out}"
    );
    let placed = out.lines().find(|l| l.contains("re-placed")).unwrap_or("");
    let after = |marker: &str| -> f64 {
        placed
            .split(marker)
            .nth(1)
            .and_then(|rest| {
                let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
                rest[..end].parse().ok()
            })
            .unwrap_or_else(|| panic!("no figure after `{marker}` in {out}"))
    };
    // 1 of 100 dataloaders leaves: the copies it held move, and nothing else.
    assert!(after("re-placed in ").is_finite(), "{out}");
    assert_eq!(
        after("shard copies move (the departed held "),
        after("ms, "),
        "{out}"
    );
    assert!(after("busiest dataloader at ") < 1.05, "{out}");
}
