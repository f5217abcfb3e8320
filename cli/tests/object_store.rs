//! Datasets and run directories in a bucket, against a real S3-protocol server on loopback
//! (s3s-fs, which `scripts/bootstrap` builds: it checks request signatures as a cloud does,
//! and keeps each object as a plain file under its root, which lets a test damage one).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;

const ACCESS_KEY: &str = "lillm-test";
const SECRET_KEY: &str = "lillm-test-secret";
const BUCKET: &str = "lillm";

/// An s3s-fs server with one bucket, stopped when dropped.
struct S3 {
    child: Child,
    root: PathBuf,
    endpoint: String,
}

impl S3 {
    fn start(dir: &Path) -> S3 {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = std::env::var_os("LILLM_S3_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".tools/bin/s3s-fs"));
        let child = Command::new(&server)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/bootstrap)", server.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        S3 {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The file s3s-fs keeps object `key` of the bucket in.
    fn object(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    /// Every object of the bucket and its bytes: what "nothing lost" compares.
    fn contents(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root.join(BUCKET), &mut out);
        out
    }

    /// `lillm ARGS…` with this server's endpoint and `secret` as the credentials.
    fn lillm_as(&self, secret: &str, args: &[&str]) -> Output {
        self.command(secret, args).output().expect("lillm runs")
    }

    fn command(&self, secret: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lillm"));
        cmd.args(args)
            .env("LILLM_PYTHON", python_path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1");
        cmd
    }

    fn lillm(&self, args: &[&str]) -> String {
        let out = self.lillm_as(SECRET_KEY, args);
        assert!(
            out.status.success(),
            "lillm {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn lillm_err(&self, secret: &str, args: &[&str]) -> String {
        let out = self.lillm_as(secret, args);
        assert!(!out.status.success(), "lillm {args:?} should have failed");
        String::from_utf8(out.stderr).unwrap()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prepares the tiny corpus into `s3://lillm/data/` (through `cache`).
fn prepare_in_bucket(s3: &S3, tiny: &TinyData, cache: &Path) -> String {
    prepare_into(s3, tiny, "s3://lillm/data/", cache, &[])
}

/// Prepares the tiny corpus into `url` (through `cache`), with `extra` flags.
fn prepare_into(s3: &S3, tiny: &TinyData, url: &str, cache: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&tiny.corpus),
        "--out",
        url,
        "--val-fraction",
        "0.1",
        "--cache-dir",
        s(cache),
    ];
    args.extend(extra);
    s3.lillm(&args)
}

#[test]
fn a_run_in_a_bucket_killed_resumes_on_a_fresh_node_as_if_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let tiny = tiny_data(dir.path(), 300);
    let said = prepare_in_bucket(&s3, &tiny, &dir.path().join("cache-prep"));
    assert!(said.contains("the manifest last"), "{said}");
    for key in [
        "data/manifest.json",
        "data/train-00000.bin",
        "data/tokenizer.json",
    ] {
        assert!(s3.object(key).is_file(), "{key} is not in the bucket");
    }
    // Preparing again sends nothing: the bucket's manifest matches.
    let again = prepare_in_bucket(&s3, &tiny, &dir.path().join("cache-prep"));
    assert!(again.contains("0.0 MB sent"), "{again}");

    let straight = dir.path().join("straight");
    lillm_ok(&tiny_train_args(s(&tiny.data), s(&straight), "300", "40"));

    // Node one trains from the bucket into the bucket, and dies (SIGKILL) mid-run.
    let node_one = dir.path().join("node-one");
    let mut args = tiny_train_args("s3://lillm/data/", "s3://lillm/runs/killed", "300", "40");
    args.extend(["--cache-dir", s(&node_one)]);
    let mut child = s3
        .command(SECRET_KEY, &args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let committed = s3.object("runs/killed/checkpoints/step-00000015/manifest.json");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !committed.exists() {
        assert!(
            Instant::now() < deadline,
            "no checkpoint reached the bucket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!s3
        .object("runs/killed/checkpoints/step-00000040/manifest.json")
        .exists());

    // Without --resume the bucket's run is not overwritten.
    let mut fresh = tiny_train_args("s3://lillm/data/", "s3://lillm/runs/killed", "300", "40");
    let node_two = dir.path().join("node-two");
    fresh.extend(["--cache-dir", s(&node_two)]);
    let err = s3.lillm_err(SECRET_KEY, &fresh);
    assert!(
        err.contains("already holds checkpoints") && err.contains("--resume"),
        "{err}"
    );

    // Node two has nothing local: it fetches the dataset and the newest committed
    // checkpoint from the bucket, and finishes the run.
    fresh.push("--resume");
    let said = s3.lillm(&fresh);
    assert!(
        said.contains("the run is in s3://lillm/runs/killed"),
        "{said}"
    );
    let bucket_run = s3.root.join(BUCKET).join("runs/killed");
    assert_eq!(
        losses(&bucket_run),
        losses(&straight),
        "no step lost, none repeated, same numbers"
    );
    let last = "checkpoints/step-00000040/model.safetensors";
    assert_eq!(
        std::fs::read(bucket_run.join(last)).unwrap(),
        std::fs::read(straight.join(last)).unwrap(),
        "the final weights in the bucket are the uninterrupted run's"
    );

    // Inference reads the run straight from the bucket, as it reads a run directory: the
    // same greedy text as the local run's.
    let generate = |checkpoint: &str, cache: &Path| {
        let mut cmd = s3.command(SECRET_KEY, &["generate", "--checkpoint", checkpoint]);
        cmd.args([
            "--prompt",
            "the",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ])
        .args(["--device", "cpu"])
        .env("LILLM_CACHE_DIR", cache);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let node_three = dir.path().join("node-three");
    let local = lillm_ok(&[
        "generate",
        "--checkpoint",
        s(&straight),
        "--prompt",
        "the",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    assert_eq!(generate("s3://lillm/runs/killed", &node_three), local);
    assert_eq!(
        generate(
            "s3://lillm/runs/killed/checkpoints/step-00000040",
            &node_three
        ),
        local
    );
    let err = s3.lillm_err(
        SECRET_KEY,
        &[
            "generate",
            "--checkpoint",
            "s3://lillm/runs/none",
            "--prompt",
            "the",
        ],
    );
    assert!(err.contains("holds no committed checkpoint"), "{err}");
}

#[test]
fn bad_credentials_a_missing_bucket_and_no_endpoint_each_fail_clearly_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let tiny = tiny_data(dir.path(), 300);
    prepare_in_bucket(&s3, &tiny, &dir.path().join("cache"));
    let cache = dir.path().join("cache-train");
    let mut args = tiny_train_args("s3://lillm/data/", "s3://lillm/runs/a", "300", "5");
    args.extend(["--cache-dir", s(&cache)]);
    s3.lillm(&args);
    let before = s3.contents();

    args.push("--resume");
    let err = s3.lillm_err("not-the-secret", &args);
    assert!(err.contains("access denied"), "{err}");
    assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(
        !err.contains("not-the-secret"),
        "the secret is never printed: {err}"
    );

    let mut missing = args.clone();
    set_flag(&mut missing, "--out", "s3://no-such-bucket/runs/a");
    let err = s3.lillm_err(SECRET_KEY, &missing);
    assert!(
        err.contains("s3://no-such-bucket/runs/a/") && err.contains("bucket does not exist"),
        "{err}"
    );

    let out = s3
        .command(SECRET_KEY, &args)
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach the object store") && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );

    let err = s3.lillm_err(
        "not-the-secret",
        &[
            "data",
            "prepare",
            "--tokenizer",
            s(&tiny.tokenizer),
            "--input",
            s(&tiny.corpus),
            "--out",
            "s3://lillm/data/",
            "--force",
            "--cache-dir",
            s(&cache),
        ],
    );
    assert!(err.contains("access denied"), "{err}");
    assert_eq!(s3.contents(), before, "no failure changed the bucket");

    // A credentials file stands in for the variables.
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        format!(
            "[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        ),
    )
    .unwrap();
    let mut with_file = args.clone();
    set_flag(&mut with_file, "--max-iters", "10");
    with_file.extend(["--credentials-file", s(&file)]);
    let out = s3
        .command("not-the-secret", &with_file)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s3
        .object("runs/a/checkpoints/step-00000010/manifest.json")
        .is_file());
}

#[test]
fn a_damaged_shard_is_fetched_again_then_refused_by_name_and_mended_by_preparing_again() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let tiny = tiny_data(dir.path(), 300);
    let prep_cache = dir.path().join("cache-prep");
    prepare_in_bucket(&s3, &tiny, &prep_cache);
    let shard = s3.object("data/train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();

    let cache = dir.path().join("cache-train");
    let mut args = tiny_train_args("s3://lillm/data/", "s3://lillm/runs/a", "300", "5");
    args.extend(["--cache-dir", s(&cache)]);
    let err = s3.lillm_err(SECRET_KEY, &args);
    assert!(err.contains("s3://lillm/data/train-00000.bin"), "{err}");
    assert!(
        err.contains("twice downloaded") && err.contains("--force"),
        "{err}"
    );
    assert!(
        !cache.join("data/s3/lillm/data/train-00000.bin").exists(),
        "a damaged download never enters the cache"
    );

    // Preparing again with --force rewrites every object; training then goes ahead.
    let mut prepare = vec![
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&tiny.corpus),
    ];
    prepare.extend([
        "--out",
        "s3://lillm/data/",
        "--val-fraction",
        "0.1",
        "--force",
        "--cache-dir",
        s(&prep_cache),
    ]);
    s3.lillm(&prepare);
    s3.lillm(&args);
}

/// Shard files (`train-*.bin`) under `dir`, by name.
fn shard_files(dir: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                todo.push(path);
            } else if name.starts_with("train-") && name.ends_with(".bin") {
                out.insert(name);
            }
        }
    }
    out
}

/// The shard files placed on each dataloader index, from `lillm status --json`.
fn placed_files(job: &common::job::Job) -> Vec<std::collections::BTreeSet<String>> {
    job.status()["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["first_shards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| format!("train-{:05}.bin", s.as_u64().unwrap()))
                .collect()
        })
        .collect()
}

/// Which of the started dataloaders (by start order) holds dataloader index `index`: the
/// one whose log says so.
fn loader_of_index(job: &common::job::Job, index: usize) -> usize {
    (0..3)
        .find(|k| {
            let log =
                std::fs::read_to_string(job.dir.join(format!("loader{k}.log"))).unwrap_or_default();
            log.contains(&format!("serving batches index={index} "))
        })
        .unwrap_or_else(|| panic!("no dataloader log names index {index}"))
}

/// The cached shard files of each dataloader index, once every index is known.
fn cache_by_index(
    job: &common::job::Job,
    loaders: &[common::job::Actor],
    cached: &[std::collections::BTreeSet<String>],
) -> Option<Vec<std::collections::BTreeSet<String>>> {
    let known = (0..loaders.len()).all(|i| {
        (0..loaders.len()).any(|k| {
            std::fs::read_to_string(job.dir.join(format!("loader{k}.log")))
                .unwrap_or_default()
                .contains(&format!("serving batches index={i} "))
        })
    });
    known.then(|| {
        (0..loaders.len())
            .map(|i| cached[loader_of_index(job, i)].clone())
            .collect()
    })
}

#[test]
fn shards_placed_on_three_dataloaders_are_fetched_only_there_and_a_lost_ones_move() {
    use common::job::{assert_same_losses, strings, wait_until, Actor, Job};
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let tiny = tiny_data(dir.path(), 300);
    let url = "s3://lillm/sharded/";
    let cache_prep = dir.path().join("cache-prep");
    prepare_into(&s3, &tiny, url, &cache_prep, &["--shard-tokens", "2000"]);
    let mut train = tiny_train_args(url, "", "300", "60");
    set_flag(&mut train, "--eval-interval", "100");
    train.extend(["--data-order", "epochs"]);

    // The same run in one process: what the job must reproduce, sample for sample.
    let alone = dir.path().join("alone");
    let mut args = train.clone();
    set_flag(&mut args, "--out", s(&alone));
    let cache_alone = dir.path().join("cache-alone");
    args.extend(["--cache-dir", s(&cache_alone)]);
    let out = s3.lillm(&args);
    assert!(alone.join("metrics.jsonl").is_file(), "{out}");

    // A job of one trainer and three dataloaders, each with its own cache (its own node's).
    let job = Job::new(
        dir.path(),
        1,
        1,
        &["--dataloaders-per-node=3", "--heartbeat-timeout-ms=2000"],
    );
    let _coordinator = job.start_coordinator();
    let credentials = [
        ("AWS_ACCESS_KEY_ID", Path::new(ACCESS_KEY)),
        ("AWS_SECRET_ACCESS_KEY", Path::new(SECRET_KEY)),
        ("AWS_ENDPOINT_URL", Path::new(&s3.endpoint)),
        ("AWS_ALLOW_HTTP", Path::new("true")),
        ("AWS_REGION", Path::new("us-east-1")),
    ];
    let caches: Vec<PathBuf> = (0..3)
        .map(|k| dir.path().join(format!("cache-{k}")))
        .collect();
    let mut loaders: Vec<Actor> = (0..3)
        .map(|k| {
            let mut args = job.dataloader_args(Path::new(url), "local", "127.0.0.1:0");
            args.extend(strings(&["--local-index", &k.to_string(), "--cache-dir"]));
            args.push(caches[k].display().to_string());
            Actor::start_with_env(
                env!("CARGO_BIN_EXE_lillm"),
                &args,
                dir.path().join(format!("loader{k}.log")),
                &credentials,
            )
        })
        .collect();
    let run = dir.path().join("job");
    let mut trainer_train = train.clone();
    set_flag(&mut trainer_train, "--out", s(&run));
    let mut trainer = Actor::start_with_env(
        env!("CARGO_BIN_EXE_lillm"),
        &job.trainer_args(&trainer_train, "local", 0, "127.0.0.1"),
        dir.path().join("trainer.log"),
        &credentials,
    );

    // Each dataloader holds exactly the shards placed on it: two copies of every shard, none
    // with all of them. The train-loss estimate at each evaluation reads in the job's order
    // too, from the holders, so not even the trainer's own dataloader fetches the rest.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s3.object("sharded/manifest.json")).unwrap())
            .unwrap();
    let shards = manifest["train"].as_array().unwrap().len();
    assert!(shards >= 6, "{shards} train shards");
    let evaluating = || -> Option<usize> {
        job.status()["members"]
            .as_array()?
            .iter()
            .find_map(|m| Some(m["dataloader_index"].as_u64()? as usize))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (placed, own) = loop {
        let placed = placed_files(&job);
        let cached: Vec<_> = caches.iter().map(|c| shard_files(c)).collect();
        // Dataloader k registered as index k: they start in order of their local index only
        // by chance, so map by the address each serves instead.
        let by_index = cache_by_index(&job, &loaders, &cached);
        if let (Some(own), Some(by_index)) = (evaluating(), by_index) {
            let holds = |i: usize| {
                let c = &by_index[i];
                !placed[i].is_empty() && placed[i] == *c
            };
            if placed.len() == 3 && (0..3).all(holds) {
                break (placed, own);
            }
        }
        assert!(
            Instant::now() < deadline,
            "placed {placed:?}, cached {cached:?}; dataloader 0 said:\n{}",
            loaders[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(placed.iter().map(|p| p.len()).sum::<usize>(), 2 * shards);
    assert!(placed.iter().all(|p| p.len() < shards), "{placed:?}");
    let text = lillm_ok(&["status", "--coordinator", &job.address]);
    assert!(text.contains("shards on dataloader 2"), "{text}");

    // A dataloader other than the trainer's own (which streams its val batches) dies for good
    // a few steps in: the trainer reads the other copies,
    // the coordinator moves its shards to the survivors, which fetch them.
    wait_until(Duration::from_secs(60), "a few steps", || {
        job.status()["summary"]["step"].as_u64().unwrap_or(0) >= 5
    });
    // By now the trainer has estimated its train loss once (at step 0), from the holders.
    let cached: Vec<_> = caches.iter().map(|c| shard_files(c)).collect();
    let by_index = cache_by_index(&job, &loaders, &cached).unwrap();
    assert_eq!(
        by_index[own], placed[own],
        "the trainer's own dataloader fetched more"
    );
    let lost = (0..3).find(|&i| i != own).unwrap();
    let victim = loader_of_index(&job, lost);
    loaders[victim].kill();
    wait_until(Duration::from_secs(30), "the shards to move", || {
        let placed = placed_files(&job);
        let cached: Vec<_> = caches.iter().map(|c| shard_files(c)).collect();
        placed[lost].is_empty()
            && (0..3).filter(|&i| i != lost).all(|i| {
                placed[i].len() == shards && placed[i].is_subset(&cached[loader_of_index(&job, i)])
            })
    });
    trainer.finish(Duration::from_secs(180));
    assert!((0..3)
        .filter(|&k| k != victim)
        .all(|k| loaders[k].running()));
    // No sample lost or repeated: the job's losses are the single process's.
    assert_same_losses(&losses(&alone), &losses(&run));
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `lillm sft --data s3://…/chat.jsonl`: the conversations are fetched into the node's
/// cache and the run is the one on the local file; a run after the object was written again
/// fetches the new one; a missing object is named.
#[test]
fn fine_tuning_reads_its_conversations_from_a_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let (_, pre) = tiny_pretrained(dir.path(), "64", "10");
    let local = dir.path().join("chat.jsonl");
    std::fs::write(&local, conversations(40)).unwrap();
    let object = s3.object("ft/chat.jsonl");
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::copy(&local, &object).unwrap();
    let cache = dir.path().join("cache");
    let sft = |data: &str, out: &Path| -> Vec<String> {
        [
            "sft",
            "--init",
            s(&pre),
            "--data",
            data,
            "--out",
            s(out),
            "--max-iters",
            "12",
            "--batch-size",
            "4",
            "--eval-interval",
            "6",
            "--eval-iters",
            "1",
            "--log-interval",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--val-fraction",
            "0.1",
            "--cache-dir",
            s(&cache),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let url = "s3://lillm/ft/chat.jsonl";
    let (here, there) = (dir.path().join("here"), dir.path().join("there"));
    lillm_ok(&strs(&sft(s(&local), &here)));
    s3.lillm(&strs(&sft(url, &there)));
    common::job::assert_same_losses(&losses(&here), &losses(&there));

    // Written again: the next run fetches the new conversations, not the cached copy.
    let newer = conversations(60);
    std::fs::write(&object, &newer).unwrap();
    let again = dir.path().join("again");
    s3.lillm(&strs(&sft(url, &again)));
    let cached = cache.join("data/s3/lillm/ft/chat.jsonl");
    assert_eq!(std::fs::read_to_string(&cached).unwrap(), newer);
    assert_ne!(losses(&again), losses(&there));

    // A malformed line is named by the object's URL, not by the cache's copy.
    std::fs::write(&object, format!("{newer}\n{{not json\n")).unwrap();
    let err = s3.lillm_err(SECRET_KEY, &strs(&sft(url, &dir.path().join("bad"))));
    assert!(err.contains(&format!("{url}:61")), "{err}");

    let missing = "s3://lillm/ft/missing.jsonl";
    let err = s3.lillm_err(SECRET_KEY, &strs(&sft(missing, &dir.path().join("none"))));
    assert!(
        err.contains(missing) && err.contains("no such object"),
        "{err}"
    );
}

/// A `--nproc 2` job whose run directory is a bucket, started again on a node with nothing
/// local: without --resume it refuses to write over the bucket's run; with --resume its new
/// coordinator resumes from the bucket's newest committed checkpoint, and the run ends as
/// one uninterrupted process would.
#[test]
fn a_local_job_in_a_bucket_resumes_on_a_fresh_node_from_its_committed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(dir.path());
    let tiny = tiny_data(dir.path(), 300);
    prepare_in_bucket(&s3, &tiny, &dir.path().join("cache-prep"));
    let straight = dir.path().join("straight");
    lillm_ok(&tiny_train_args(s(&tiny.data), s(&straight), "300", "40"));

    let url = "s3://lillm/runs/job";
    let job = |iters: &'static str, node: &Path, resume: bool| -> Vec<String> {
        let mut args = tiny_train_args("s3://lillm/data/", url, "300", iters);
        args.extend(["--nproc", "2", "--cache-dir", s(node)]);
        if resume {
            args.push("--resume");
        }
        args.iter().map(|a| a.to_string()).collect()
    };
    // Node one runs the first 20 steps (committed to the bucket) and is gone with its disk.
    s3.lillm(&strs(&job("20", &dir.path().join("node-one"), false)));
    assert!(s3
        .object("runs/job/checkpoints/step-00000020/manifest.json")
        .is_file());

    let node_two = dir.path().join("node-two");
    let err = s3.lillm_err(SECRET_KEY, &strs(&job("40", &node_two, false)));
    assert!(
        err.contains(url) && err.contains("step 20") && err.contains("--resume"),
        "{err}"
    );
    s3.lillm(&strs(&job("40", &node_two, true)));
    let bucket_run = s3.root.join(BUCKET).join("runs/job");
    common::job::assert_same_losses(&losses(&straight), &losses(&bucket_run));
}
