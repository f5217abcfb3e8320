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
    s3.lillm(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&tiny.corpus),
        "--out",
        "s3://lillm/data/",
        "--val-fraction",
        "0.1",
        "--cache-dir",
        s(cache),
    ])
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
