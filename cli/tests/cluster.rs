//! The distributed job as real processes on this machine: a coordinator, dataloader actors
//! and trainer actors talking gRPC and c10d/Gloo, killed and restarted like a real cluster.

mod common;

use common::job::*;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `grpc_probe.py`-style checks against the coordinator with grpcio, as grpcurl would.
const GRPC_PROBE: &str = r#"
import sys, json, urllib.request
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
addr, metrics = sys.argv[1], sys.argv[2]
ch = grpc.insecure_channel(addr)
db = ProtoReflectionDescriptorDatabase(ch)
services = sorted(db.get_services())
pool = DescriptorPool(db)
coord = pool.FindServiceByName("lillm.v1.Coordinator")
status = pool.FindServiceByName("lillm.v1.Status")
health = ch.unary_unary("/grpc.health.v1.Health/Check")(b"")
text = urllib.request.urlopen(f"http://{metrics}/metrics").read().decode()
print(json.dumps({
    "services": services,
    "coordinator_methods": [m.name for m in coord.methods],
    "status_methods": [m.name for m in status.methods],
    "health": health.hex(),
    "metrics": text,
}))
"#;

#[test]
fn two_nodes_train_together_and_the_job_is_visible_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let job = Job::new(dir.path(), 2, 1, &["--heartbeat-timeout-ms=60000"]);
    let _coordinator = job.start_coordinator();
    // Two "nodes": distinct loopback addresses, each with a dataloader and a trainer.
    let _loaders: Vec<Actor> = [("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")]
        .iter()
        .map(|(node, host)| {
            Actor::lillm(
                &job.dataloader_args(&tiny.data, node, &format!("{host}:0")),
                dir.path().join(format!("dataloader-{node}.log")),
            )
        })
        .collect();
    let run_a = dir.path().join("run-a");
    let run_b = dir.path().join("run-b");
    let mut trainers: Vec<Actor> = [
        ("node-a", "127.0.0.1", &run_a),
        ("node-b", "127.0.0.2", &run_b),
    ]
    .iter()
    .map(|(node, host, run)| {
        let train = tiny_train_args(s(&tiny.data), s(run), "300", "12");
        // The `trainer` binary is `lillm train`.
        Actor::start(
            env!("CARGO_BIN_EXE_trainer"),
            &job.trainer_args(&train[1..], node, 0, host),
            dir.path().join(format!("trainer-{node}.log")),
        )
    })
    .collect();
    for t in &mut trainers {
        t.finish(Duration::from_secs(180));
    }
    // Rank 0 (node-a sorts first) logged the run; the checkpoint exists on both nodes'
    // disks, identical, and the coordinator knows both copies.
    assert_eq!(losses(&run_a).len(), 12);
    assert!(losses(&run_b).is_empty());
    let last = |run: &std::path::Path| run.join("checkpoints/step-00000012");
    for run in [&run_a, &run_b] {
        assert!(last(run).join("manifest.json").is_file());
    }
    let max_diff = max_weight_diff(
        &last(&run_a).join("model.safetensors"),
        &last(&run_b).join("model.safetensors"),
    );
    assert_eq!(max_diff, 0.0);

    let status = job.status();
    assert_eq!(status["phase"], "running");
    assert_eq!(status["last_checkpoint"]["step"], 12);
    assert_eq!(
        status["last_checkpoint"]["copies"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    // The evaluation actor scored the final checkpoint from disk.
    assert_eq!(status["eval"]["step"], 12, "{status}");
    let (eval_loss, train_val) = (
        status["eval"]["val_loss"].as_f64().unwrap(),
        status["last_checkpoint"]["val_loss"].as_f64().unwrap(),
    );
    assert!(
        (eval_loss - train_val).abs() < 0.5,
        "{eval_loss} vs {train_val}"
    );
    assert!(!status["eval"]["sample"].as_str().unwrap().is_empty());
    let mut ranks: Vec<(String, String, u64, String)> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "trainer")
        .map(|m| {
            (
                m["node"].as_str().unwrap().to_string(),
                // host:port of the c10d store the trainer's process serves.
                lillm_coordinator::host_of(m["address"].as_str().unwrap()),
                m["rank"].as_u64().unwrap(),
                m["step"].to_string(),
            )
        })
        .collect();
    ranks.sort();
    assert_eq!(
        ranks,
        vec![
            ("node-a".into(), "127.0.0.1".into(), 0, "12".into()),
            ("node-b".into(), "127.0.0.2".into(), 1, "12".into())
        ]
    );
    // --watch streams one JSON line per update.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(["status", "--watch", "--json", "--coordinator", &job.address])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    for _ in 0..2 {
        let update: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(update["last_checkpoint"]["step"], 12);
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let text = lillm_ok(&["status", "--coordinator", &job.address]);
    assert!(
        text.contains("2/2 trainers (2 ranked) and 2/2 dataloaders on 2 node(s)")
            && text.contains("node-b/trainer0"),
        "{text}"
    );
    // One node's members alone (what launchers poll for hung trainers).
    let node_b = lillm_ok(&["status", "--coordinator", &job.address, "--node", "node-b"]);
    assert!(
        node_b.contains("node-b/trainer0") && !node_b.contains("node-a/"),
        "{node_b}"
    );

    let probe: serde_json::Value =
        serde_json::from_str(&python(GRPC_PROBE, &[&job.address, &job.metrics])).unwrap();
    for service in [
        "grpc.health.v1.Health",
        "lillm.v1.Coordinator",
        "lillm.v1.Status",
    ] {
        assert!(
            probe["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == service),
            "{service} not listed: {probe}"
        );
    }
    assert_eq!(
        probe["coordinator_methods"],
        serde_json::json!([
            "Register",
            "AwaitAssignment",
            "Heartbeat",
            "Commit",
            "ReportEval",
            "LocateDataloader",
            "GetPlacement",
            "Leave"
        ])
    );
    assert_eq!(probe["health"], "0801", "health says SERVING");
    let metrics = probe["metrics"].as_str().unwrap();
    assert!(metrics.contains("lillm_checkpoint_step 12"), "{metrics}");
    assert!(
        metrics.contains(r#"lillm_member_step{node="node-b",role="trainer",index="0"} 12"#),
        "{metrics}"
    );
}

/// Tiny-model flags for the kill tests: long enough to be killed mid-run, a checkpoint
/// every 20 steps.
fn long_run<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    long_run_of(data, out, "200")
}

#[test]
fn a_job_killed_everywhere_resumes_on_the_exact_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let job = Job::new(dir.path(), 1, 2, &[]);
    let loader_args = job.dataloader_args(&tiny.data, "local", "127.0.0.1:0");
    let train = long_run(s(&tiny.data), s(&run));
    let trainer_args = job.local_trainers(&train, 2);
    let mut first = job.start_all(&loader_args, &trainer_args, "1");
    wait_until(Duration::from_secs(120), "a committed checkpoint", || {
        job.status()["last_checkpoint"]["step"].as_u64() >= Some(20)
    });
    for actor in first.iter_mut().rev() {
        actor.kill(); // SIGKILL: no process gets to clean up
    }
    let seen = losses(&run).len();
    assert!(
        (20..200).contains(&seen),
        "killed mid-run, after {seen} steps"
    );

    // The same commands again.
    let mut second = job.start_all(&loader_args, &trainer_args, "2");
    for trainer in &mut second[2..] {
        trainer.finish(Duration::from_secs(180));
    }
    assert_same_losses(&losses(&straight), &losses(&run));
    let status = job.status();
    assert_eq!(status["last_checkpoint"]["step"], 200);
    assert!(status["restarts"].as_u64() >= Some(3), "{status}");
    assert!(status["generation"].as_u64() >= Some(3), "{status}");
}

#[test]
fn a_restarted_dataloader_costs_a_wait_not_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let job = Job::new(dir.path(), 1, 1, &[]);
    let _coordinator = job.start_coordinator();
    let loader_args =
        job.dataloader_args(&tiny.data, "local", &format!("127.0.0.1:{}", free_port()));
    let mut loader = Actor::lillm(&loader_args, dir.path().join("loader-1.log"));
    let mut trainer = Actor::lillm(
        &job.trainer_args(&long_run(s(&tiny.data), s(&run)), "local", 0, "127.0.0.1"),
        dir.path().join("trainer.log"),
    );
    wait_until(Duration::from_secs(120), "ten training steps", || {
        losses(&run).len() >= 10
    });
    loader.kill();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(trainer.running(), "the trainer waits for its dataloader");
    let seen = losses(&run).len();
    assert!(
        seen < 200,
        "the dataloader died mid-run, after {seen} steps"
    );
    let _loader = Actor::lillm(&loader_args, dir.path().join("loader-2.log"));
    trainer.finish(Duration::from_secs(180));
    assert!(
        trainer.log_text().contains("retrying"),
        "{}",
        trainer.log_text()
    );
    assert_same_losses(&losses(&straight), &losses(&run));
    let status = job.status();
    assert_eq!(
        status["generation"], 1,
        "a dataloader restart keeps the group: {status}"
    );
    assert_eq!(status["restarts"], 1);
}

/// Raw gRPC calls the Rust clients never make: malformed and unauthenticated requests.
const BAD_REQUESTS: &str = r#"
import sys, json, grpc
ch = grpc.insecure_channel(sys.argv[1])
def call(method, body):
    try:
        ch.unary_unary(method)(body, timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
token = b"\x1a\x06s3cret"                       # job_token = "s3cret" (field 3)
print(json.dumps({
    "no_id": call("/lillm.v1.Coordinator/Register", token),
    "bad_role": call("/lillm.v1.Coordinator/Register", b"\x0a\x03\x0a\x01x" + token),
    "garbage": call("/lillm.v1.Coordinator/Register", b"\xff\xff\xff\xff"),
    "heartbeat_without_token": call("/lillm.v1.Coordinator/Heartbeat", b""),
    "status": call("/lillm.v1.Status/GetStatus", b""),
}))
"#;

#[test]
fn bad_members_and_malformed_requests_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let job = Job::new(dir.path(), 1, 2, &["--job-token=s3cret"]);
    let _coordinator = job.start_coordinator();
    let run = dir.path().join("run");
    let train = tiny_train_args(s(&tiny.data), s(&run), "300", "12");
    let trainer = |train: &[&str], node: &str, k: usize, token: &str| -> Vec<String> {
        let mut args = job.trainer_args(train, node, k, "127.0.0.1");
        args.push(format!("--job-token={token}"));
        args
    };

    let err = lillm_err_owned(&trainer(&train, "local", 0, "guess"));
    assert!(err.contains("job token"), "{err}");

    // Trainers that join wait: with no dataloader the group never forms.
    let join = |k: usize| -> Actor {
        let actor = Actor::lillm(
            &trainer(&train, "local", k, "s3cret"),
            dir.path().join(format!("trainer{k}.log")),
        );
        wait_until(Duration::from_secs(60), "the trainer to register", || {
            job.members() == k + 1
        });
        actor
    };
    let _first = join(0);
    let mut other_lr = train.clone();
    set_flag(&mut other_lr, "--lr", "1e-3");
    let err = lillm_err_owned(&trainer(&other_lr, "local", 1, "s3cret"));
    assert!(
        err.contains("config fingerprint") && err.contains("same training config"),
        "{err}"
    );
    let err = lillm_err_owned(&trainer(&train, "elsewhere", 0, "s3cret"));
    assert!(err.contains("--nodes 1"), "{err}");
    let _second = join(1);
    let err = lillm_err_owned(&trainer(&train, "local", 2, "s3cret"));
    assert!(err.contains("already has its 2 trainer"), "{err}");

    let replies: serde_json::Value =
        serde_json::from_str(&python(BAD_REQUESTS, &[&job.address])).unwrap();
    let reply = |k: &str| replies[k].as_str().unwrap().to_string();
    assert!(
        reply("no_id").starts_with("INVALID_ARGUMENT: `id` is missing"),
        "{replies}"
    );
    assert!(
        reply("bad_role").starts_with("INVALID_ARGUMENT")
            && reply("bad_role").contains("ROLE_TRAINER"),
        "{replies}"
    );
    // Bytes that are no protobuf at all: INTERNAL, as the gRPC status-code guide prescribes
    // for unparseable requests (tonic's codec); the coordinator carries on.
    assert!(reply("garbage").starts_with("INTERNAL"), "{replies}");
    assert!(
        reply("heartbeat_without_token").starts_with("UNAUTHENTICATED"),
        "{replies}"
    );
    assert_eq!(
        reply("status"),
        "OK",
        "status is read-only and open: {replies}"
    );
    // The coordinator kept serving and its job is unchanged.
    assert_eq!(job.members(), 2);
}

#[test]
fn with_tls_configured_members_need_the_ca_and_the_job_still_trains() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    let p = |name: &str| dir.path().join(name);
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ]
        .into_iter()
        .chain(["-keyout", s(&p("ca.key")), "-out", s(&ca)])
        .collect::<Vec<_>>(),
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ]
        .into_iter()
        .chain(["-keyout", s(&key), "-out", s(&p("req.csr"))])
        .collect(),
        vec![
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            s(&p("req.csr")),
            "-CA",
            s(&ca),
        ]
        .into_iter()
        .chain([
            "-CAkey",
            s(&p("ca.key")),
            "-CAcreateserial",
            "-extfile",
            s(&p("ext.cnf")),
        ])
        .chain(["-out", s(&cert)])
        .collect(),
    ] {
        let made = Command::new("openssl").args(&args).output().unwrap();
        assert!(made.status.success(), "{made:?}");
    }
    let tls = [
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let job = Job::new(dir.path(), 1, 1, &tls);
    let _coordinator = job.start_coordinator();
    let ca_env = [("LILLM_TLS_CA", ca.as_path())];
    let mut loader_args = job.dataloader_args(&tiny.data, "local", "127.0.0.1:0");
    loader_args.extend(tls.iter().map(|a| a.to_string()));
    let _loader = Actor::start_with_env(
        env!("CARGO_BIN_EXE_lillm"),
        &loader_args,
        dir.path().join("loader.log"),
        &ca_env,
    );
    let run = dir.path().join("run");
    let mut trainer = Actor::start_with_env(
        env!("CARGO_BIN_EXE_lillm"),
        &job.trainer_args(
            &tiny_train_args(s(&tiny.data), s(&run), "300", "6"),
            "local",
            0,
            "127.0.0.1",
        ),
        dir.path().join("trainer.log"),
        &ca_env,
    );
    trainer.finish(Duration::from_secs(120));
    assert_eq!(losses(&run).len(), 6);

    let status = |with_ca: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lillm"));
        cmd.args(["status", "--json", "--coordinator", &job.address]);
        if with_ca {
            cmd.env("LILLM_TLS_CA", &ca);
        }
        cmd.output().unwrap()
    };
    let ok = status(true);
    assert!(ok.status.success(), "{ok:?}");
    let job_status: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(job_status["last_checkpoint"]["step"], 6);
    let plain = status(false);
    assert!(!plain.status.success(), "a plaintext client is not served");
}

#[test]
fn a_restarted_coordinator_carries_on_from_its_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let job = Job::new(dir.path(), 1, 1, &[]);
    let mut coordinator = job.start_coordinator();
    let _loader = Actor::lillm(
        &job.dataloader_args(&tiny.data, "local", "127.0.0.1:0"),
        dir.path().join("loader.log"),
    );
    let mut trainer = Actor::lillm(
        &job.trainer_args(&long_run(s(&tiny.data), s(&run)), "local", 0, "127.0.0.1"),
        dir.path().join("trainer.log"),
    );
    wait_until(Duration::from_secs(120), "ten training steps", || {
        losses(&run).len() >= 10
    });
    coordinator.kill();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(losses(&run).len() < 200, "the coordinator died mid-run");
    let _coordinator = job.start_coordinator();
    trainer.finish(Duration::from_secs(180));
    assert_same_losses(&losses(&straight), &losses(&run));
    let status = job.status();
    assert_eq!(status["generation"], 1, "the group never changed: {status}");
    assert_eq!(status["restarts"], 0);
    assert_eq!(status["last_checkpoint"]["step"], 200);
}

/// A coordinator away for longer than the heartbeat timeout — frozen (SIGSTOP), then killed
/// and restarted from its state — costs no step: the trainer trains on meanwhile, keeps its
/// commits until the coordinator answers, and stays in its generation (no regroup, no
/// failure counted), with the losses of an uninterrupted run.
#[test]
fn training_goes_on_while_the_coordinator_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run_of(s(&tiny.data), s(&straight), "1500"));

    // Long enough (~10 ms a step here) that both absences fall mid-run on a faster machine.
    let run = dir.path().join("run");
    let job = Job::new(dir.path(), 1, 1, &["--heartbeat-timeout-ms=1000"]);
    let mut coordinator = job.start_coordinator();
    let _loader = Actor::lillm(
        &job.dataloader_args(&tiny.data, "local", "127.0.0.1:0"),
        dir.path().join("loader.log"),
    );
    let mut trainer = Actor::lillm(
        &job.trainer_args(
            &long_run_of(s(&tiny.data), s(&run), "1500"),
            "local",
            0,
            "127.0.0.1",
        ),
        dir.path().join("trainer.log"),
    );
    wait_until(Duration::from_secs(120), "ten training steps", || {
        losses(&run).len() >= 10
    });
    let away = Duration::from_millis(2_000);
    let pid = coordinator.child.id();
    let before = losses(&run).len();
    signal(pid, libc::SIGSTOP);
    std::thread::sleep(away);
    let frozen = losses(&run).len();
    signal(pid, libc::SIGCONT);
    assert!(frozen > before, "training waited for a frozen coordinator");
    assert!(frozen < 1500, "the coordinator was frozen mid-run");

    coordinator.kill();
    let before = losses(&run).len();
    std::thread::sleep(away);
    let dead = losses(&run).len();
    assert!(dead > before, "training waited for a dead coordinator");
    let _coordinator = job.start_coordinator();
    trainer.finish(Duration::from_secs(180));
    assert_same_losses(&losses(&straight), &losses(&run));
    let status = job.status();
    assert_eq!(status["generation"], 1, "the group never changed: {status}");
    assert_eq!(status["restarts"], 0, "{status}");
    assert_eq!(status["last_checkpoint"]["step"], 1500);
}

#[test]
fn a_dataloader_evicted_while_paused_registers_again() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let job = Job::new(dir.path(), 1, 1, &["--heartbeat-timeout-ms=1000"]);
    let _coordinator = job.start_coordinator();
    let mut loader = Actor::lillm(
        &job.dataloader_args(&tiny.data, "local", "127.0.0.1:0"),
        dir.path().join("loader.log"),
    );
    wait_until(
        Duration::from_secs(60),
        "the dataloader to register",
        || job.members() == 1,
    );
    let pid = loader.child.id();
    signal(pid, libc::SIGSTOP);
    wait_until(
        Duration::from_secs(30),
        "the paused dataloader's eviction",
        || job.members() == 0,
    );
    signal(pid, libc::SIGCONT);
    wait_until(
        Duration::from_secs(30),
        "the dataloader to register again",
        || job.members() == 1,
    );
    assert!(loader.running());
    assert!(job.status()["restarts"].as_u64() >= Some(1));
}
