//! Helpers shared by the CLI integration tests: run the real `lillm` binary and the
//! project's Python (torch, transformers, tokenizers) as the interop oracle.
#![allow(dead_code)]

pub mod job;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Sends `sig` to process `pid`: a child of the test or of its child, whose pid the test
/// just read (from `Child::id` or `/proc`) and has not reaped.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes no pointers; at worst it fails (ESRCH) for a process gone.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `lillm ARGS…`.
pub fn lillm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(args)
        .env("LILLM_PYTHON", python_path())
        .output()
        .expect("lillm runs")
}

/// Runs `lillm ARGS…`, failing the test with its stderr unless it succeeds; returns stdout.
pub fn lillm_ok(args: &[&str]) -> String {
    let out = lillm(args);
    assert!(
        out.status.success(),
        "lillm {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `lillm ARGS…` expecting failure; returns stderr.
pub fn lillm_err(args: &[&str]) -> String {
    let out = lillm(args);
    assert!(!out.status.success(), "lillm {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

pub fn python_path() -> PathBuf {
    std::env::var_os("LILLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Runs a Python script with `args`; returns stdout, failing on a non-zero exit.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python_path())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python runs (make test bootstraps .venv)");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn shared_reference(name: &str) -> PathBuf {
    repo_root().join("../shared/reference").join(name)
}

/// A deterministic English-like corpus of `paragraphs` paragraphs.
pub fn corpus_text(paragraphs: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "king", "queen", "of", "and", "to", "my", "lord", "good", "night", "sweet",
        "prince", "what", "is", "a", "man", "love", "death", "sleep", "dream", "heaven", "earth",
        "speak", "hear", "thou", "art", "thy", "mine", "honour", "crown", "sword", "friend",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut text = String::new();
    for p in 0..paragraphs {
        text.push_str(&format!("SPEAKER{}.\n", p % 7));
        for _ in 0..(2 + next() % 3) {
            let n = 5 + next() % 8;
            let words: Vec<&str> = (0..n).map(|_| WORDS[next() % WORDS.len()]).collect();
            let mut line = words.join(" ");
            line[..1].make_ascii_uppercase();
            text.push_str(&line);
            text.push_str(if next() % 3 == 0 { "!\n" } else { ".\n" });
        }
        text.push('\n');
    }
    text
}

/// A corpus file, a trained tokenizer and a prepared dataset under `dir`.
pub struct TinyData {
    pub corpus: PathBuf,
    pub tokenizer: PathBuf,
    pub data: PathBuf,
}

pub fn tiny_data(dir: &Path, vocab: usize) -> TinyData {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, corpus_text(600, 7)).unwrap();
    let tokenizer = dir.join("tok");
    let data = dir.join("data");
    let vocab = vocab.to_string();
    lillm_ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&corpus),
        "--vocab-size",
        &vocab,
        "--out",
        s(&tokenizer),
    ]);
    lillm_ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tokenizer),
        "--input",
        s(&corpus),
        "--out",
        s(&data),
        "--val-fraction",
        "0.1",
    ]);
    TinyData {
        corpus,
        tokenizer,
        data,
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny model config for tests: `lillm train` flags.
pub fn tiny_train_args<'a>(
    data: &'a str,
    out: &'a str,
    vocab: &'a str,
    iters: &'a str,
) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "tiny",
        "--data",
        data,
        "--out",
        out,
        "--vocab-size",
        vocab,
        "--d-model",
        "32",
        "--n-layers",
        "2",
        "--q-heads",
        "4",
        "--kv-heads",
        "2",
        "--max-seq-len",
        "32",
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--max-iters",
        iters,
        "--warmup-iters",
        "5",
        "--lr-decay-iters",
        "20",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--eval-interval",
        "5",
        "--eval-iters",
        "2",
        "--log-interval",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
}

/// Replaces the value that follows `flag` in an argument list.
pub fn set_flag<'a>(args: &mut [&'a str], flag: &str, value: &'a str) {
    let i = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    args[i + 1] = value;
}

/// A tiny model pretrained for `iters` steps on `tiny_data`, with context `max_seq_len`.
pub fn tiny_pretrained(dir: &Path, max_seq_len: &str, iters: &str) -> (TinyData, PathBuf) {
    let tiny = tiny_data(dir, 300);
    let run = dir.join("pre");
    let mut args = tiny_train_args(s(&tiny.data), s(&run), "300", iters);
    set_flag(&mut args, "--max-seq-len", max_seq_len);
    lillm_ok(&args);
    (tiny, run)
}

/// A tiny dataset cut into shards of 2,000 tokens, so that the order shuffles shards too.
pub fn sharded_data(dir: &Path) -> PathBuf {
    let tiny = tiny_data(dir, 300);
    let data = dir.join("sharded");
    lillm_ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&tiny.corpus),
        "--out",
        s(&data),
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "2000",
    ]);
    data
}

/// (step, training loss) of every logged step of a run.
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// [`lillm_err`] for owned arguments.
pub fn lillm_err_owned(args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    lillm_err(&refs)
}

/// The largest |difference| between two safetensors weight files (same tensor names).
pub fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    python(
        "import sys\nfrom safetensors.torch import load_file\na=load_file(sys.argv[1]);b=load_file(sys.argv[2])\nprint(max((a[k]-b[k]).abs().max().item() for k in a))",
        &[s(a), s(b)],
    )
    .trim()
    .parse()
    .unwrap()
}

/// A tiny run of `iters` steps that evaluates (and checkpoints) every 20 steps.
pub fn long_run_of<'a>(data: &'a str, out: &'a str, iters: &'a str) -> Vec<&'a str> {
    let mut args = tiny_train_args(data, out, "300", iters);
    set_flag(&mut args, "--eval-interval", "20");
    set_flag(&mut args, "--lr-decay-iters", iters);
    args
}

/// Makes a tiny run's steps take seconds on this CPU (a wider model, longer sequences and a
/// batch sized for this CPU: [`rows_for_a_step_of_seconds`]), as real jobs do: heartbeats
/// and failure detection must hold up then too.
pub fn seconds_per_step(args: &mut [&str]) {
    widen_to_seconds(args);
    let rows = rows_for_a_step_of_seconds(args);
    set_flag(args, "--batch-size", rows);
}

fn widen_to_seconds(args: &mut [&str]) {
    for (flag, value) in [
        ("--d-model", "256"),
        ("--n-layers", "4"),
        ("--max-seq-len", "128"),
        ("--block-size", "128"),
    ] {
        set_flag(args, flag, value);
    }
}

/// How long a step of [`seconds_per_step`]'s runs takes on this CPU, alone: longer than a
/// heartbeat interval and, under the load of a test's other processes, than the tests' 3 s
/// heartbeat timeout.
const STEP_SECONDS: f64 = 3.0;

/// The rows per micro-batch that make a step of the run `train` (its `lillm train`
/// arguments) take about [`STEP_SECONDS`] on this CPU, measured once per test binary: a
/// fixed batch of 96 rows took 9 s a step on a 2-core AMD EPYC, several times what the
/// tests' time budgets were set with. Two steps of a small batch of the same run are timed
/// and the batch scaled to the target (a step's time grows with its rows). Every run of a
/// test takes the same batch, so their math agrees.
fn rows_for_a_step_of_seconds(train: &[&str]) -> &'static str {
    static ROWS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| {
        const PROBE_ROWS: f64 = 24.0;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("probe");
        let probe_rows = PROBE_ROWS.to_string();
        let mut args = train.to_vec();
        for (flag, value) in [
            ("--out", s(&out)),
            ("--batch-size", &probe_rows),
            ("--max-iters", "3"),
            ("--eval-interval", "100"),
            ("--eval-iters", "1"),
        ] {
            set_flag(&mut args, flag, value);
        }
        lillm_ok(&args);
        // The first step warms libtorch up: the fastest of the later ones.
        let step_ms = step_times_ms(&out)
            .into_iter()
            .skip(1)
            .fold(f64::INFINITY, f64::min);
        assert!(step_ms.is_finite(), "the probe logged no step times");
        let rows = rows_for(PROBE_ROWS, step_ms / 1000.0, STEP_SECONDS);
        eprintln!("seconds_per_step: {rows} rows ({PROBE_ROWS} took {step_ms:.0} ms a step)");
        rows.to_string()
    })
}

/// Rows that take `target` seconds a step where `probe_rows` took `probe_seconds`, rounded
/// to a multiple of 8, from 16 to 512.
fn rows_for(probe_rows: f64, probe_seconds: f64, target: f64) -> usize {
    let rows = probe_rows * target / probe_seconds;
    ((rows / 8.0).round() as usize * 8).clamp(16, 512)
}

/// Step times (ms) of a run's logged steps.
pub fn step_times_ms(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step_ms"].as_f64())
        .collect()
}

/// Two runs logged the same losses at every step and ended with the same weights (within
/// `tolerance`); the second ran as a job of two ranks when its run directory says so.
pub fn assert_same_run(a: &Path, b: &Path, last_step: u64, tolerance: f64) {
    let (x, y) = (losses(a), losses(b));
    assert_eq!(x.len() as u64, last_step, "{x:?}");
    assert_eq!(x.len(), y.len(), "{x:?} vs {y:?}");
    for ((step, p), (_, q)) in x.iter().zip(&y) {
        assert!((p - q).abs() <= tolerance, "step {step}: {p} vs {q}");
    }
    let last = format!("checkpoints/step-{last_step:08}/model.safetensors");
    let diff = max_weight_diff(&a.join(&last), &b.join(&last));
    assert!(diff <= tolerance, "final weights differ by {diff}");
}

/// The world size every checkpoint of a run was written at.
pub fn checkpoint_world_sizes(run: &Path) -> Vec<u64> {
    std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| {
            let state = std::fs::read_to_string(e.unwrap().path().join("state.json")).unwrap();
            serde_json::from_str::<serde_json::Value>(&state).unwrap()["world_size"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

pub fn conversations(n: usize) -> String {
    const WHO: &[&str] = &["king", "queen", "prince", "lord"];
    (0..n)
        .map(|i| {
            let who = WHO[i % WHO.len()];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("who is the {who}?")},
                {"role": "assistant", "content": format!("the {who} is my friend.")},
            ]})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes the logits of token ids `ids` (a JSON array) under `checkpoint` to `out`
/// (`lillm model logits`: tensor `logits`).
pub fn model_logits(checkpoint: &Path, ids: &str, out: &Path) {
    lillm_ok(&[
        "model",
        "logits",
        "--checkpoint",
        s(checkpoint),
        "--ids",
        ids,
        "--out",
        s(out),
    ]);
}
