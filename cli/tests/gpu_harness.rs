//! The GPU harness (`bench/gpu.sh`) rehearsed on the CPU, as `make test` must: a lent GPU
//! machine has minutes, not time to find a broken script. Every row runs and reaches the
//! table; the correctness check passes where it can be checked (CPU against CPU).

mod common;

use std::path::Path;
use std::process::Command;

use common::{s, tiny_data};

/// `bench/gpu.sh` on the CPU with tiny presets, a few steps and `env` on top; its output
/// (stdout, then stderr) and exit status.
fn harness(data: &Path, out: &Path, env: &[(&str, &str)]) -> (String, Option<i32>) {
    let python = std::env::var("LILLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ran = Command::new("bash")
        .arg("bench/gpu.sh")
        .current_dir(&root)
        .envs([
            ("LILLM", env!("CARGO_BIN_EXE_lillm")),
            ("DATA", s(data)),
            ("OUT", s(out)),
            ("PYTHON", python.as_str()),
            ("DEVICE", "cpu"),
            ("DTYPE", "float32"),
            ("DENSE", "tiny"),
            ("LARGE", "tiny"),
            ("MOE", "tiny-moe"),
            ("BLOCK", "32"),
            ("ROWS", "4"),
            ("SMALL_ROWS", "2"),
            ("LARGE_ROWS", "2"),
            ("MOE_ROWS", "4"),
            ("STEPS", "20"),
            ("CURVE_STEPS", "20"),
            ("COMPILE", "0"),
            ("SERVE_SECONDS", "1"),
            ("PEAK_TFLOPS", "1"),
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    (printed, ran.status.code())
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn the_gpu_harness_runs_every_row_on_a_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let out = dir.path().join("out");
    let results = dir.path().join("results");
    // A profiler trace over 2 MiB, as a GPU run leaves: too large to come back.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("trace.json"), vec![b' '; 3 << 20]).unwrap();
    let (printed, status) = harness(&tiny.data, &out, &[("RESULTS", s(&results))]);
    assert_eq!(status, Some(0), "bench/gpu.sh failed:\n{printed}");
    // The table, for whoever reads the test's output.
    eprintln!("{printed}");
    let summary = summary(&out);
    let rows = summary["rows"].as_array().unwrap();
    let row = |starts: &str| {
        rows.iter()
            .find(|r| r["what"].as_str().unwrap().starts_with(starts))
            .unwrap_or_else(|| panic!("no row `{starts}…` in:\n{printed}"))
    };
    // Every section ran within the deadline and left every figure.
    assert_eq!(
        summary["failed_sections"],
        serde_json::json!([]),
        "{printed}"
    );
    assert_eq!(summary["incomplete"], serde_json::json!([]), "{printed}");
    assert_eq!(
        summary["sections"].as_array().unwrap().len(),
        11,
        "{printed}"
    );
    assert_eq!(row("same seed, CPU vs device")["ok"], true, "{printed}");
    assert_eq!(row("float32 vs float32 loss")["ok"], true, "{printed}");
    // The chunked head loss against the full logits: both paths run, and on the CPU in
    // float32 they agree far inside the GPU's bf16 tolerance.
    assert_eq!(
        row("chunked vs full head loss, float32")["ok"],
        true,
        "{printed}"
    );
    for what in [
        "tiny 4 rows vs eager PyTorch",
        "tiny 2 rows vs eager PyTorch",
        "tiny: 2 rows vs 4 rows",
        "tiny-moe vs tiny MFU",
        "tiny 4 rows peak GPU memory",
        "chunked vs full head loss, tiny 4 rows tokens/s",
        "job path vs one process",
        "serve tiny (static) 1 streams",
        "serve tiny (static) 8 streams",
        "serve tiny (static) 32 streams",
        "serve tiny-moe (static) 32 streams",
        "lillm generate tiny, one stream",
        "decode step alone, tiny 1 rows: kernels (operator calls)",
        "decode step alone, tiny 32 rows: kernels (operator calls)",
    ] {
        let found = row(what);
        assert!(
            !found["lillm"].as_str().unwrap().is_empty(),
            "row `{what}` has no figure:\n{printed}"
        );
    }
    // The steps the graphs capture, run uncaptured: on the CPU in float32 they answer as the
    // eager steps do, and a seeded answer is the same alone and batched. (Graphs against
    // those steps is a GPU-only row.)
    assert!(
        rows.iter()
            .all(|r| !r["what"].as_str().unwrap().contains("vs static")),
        "{printed}"
    );
    // A decode step alone: timed uncaptured at every batch size (no graphs on a CPU).
    for rows in [1, 8, 32] {
        let step = row(&format!("decode step alone, tiny {rows} rows: ms replayed"));
        assert_eq!(step["lillm"], "not captured", "{printed}");
        let ms: f64 = step["baseline"].as_str().unwrap().parse().unwrap();
        assert!(ms > 0.0, "{printed}");
    }
    for what in [
        "seeded answer alone vs among 8 streams",
        "serve tiny: failed requests",
        "serve tiny-moe: failed requests",
    ] {
        assert_eq!(row(what)["ok"], true, "{printed}");
    }
    // Beside each load level, the server's own count and latencies over the same span: the
    // tokens its counter says it generated are the ones the clients received.
    for streams in [1, 8, 32] {
        let level = format!("serve tiny (static) {streams} streams");
        let by_server = row(&format!("{level}, by the server"));
        assert_eq!(
            by_server["lillm"],
            row(&format!("{level}:"))["lillm"],
            "{printed}"
        );
        let bounds: Vec<&str> = by_server["baseline"]
            .as_str()
            .unwrap()
            .split(" / ")
            .collect();
        assert!(
            bounds.len() == 3 && bounds.iter().all(|b| b.parse::<f64>().is_ok()),
            "{printed}"
        );
    }
    // The fused kernels against the reference: in float32 one computation.
    let kernels = row("fused vs reference kernels, tiny float32");
    assert_eq!(kernels["ok"], true, "{printed}");
    assert_eq!(kernels["lillm"], "0.0e+00 / 0.0e+00", "{printed}");
    // And what each fused layer gives alone, timed.
    for layer in ["RMSNorm", "RoPE", "SwiGLU"] {
        let alone = row(&format!("fused {layer} alone vs reference, tiny"));
        assert!(alone["ratio"].as_str().unwrap().ends_with('x'), "{printed}");
    }
    // The head's loss alone, chunked against the full logits: in float32 within a rounding.
    let head = row("chunked vs full head loss alone, tiny float32");
    assert_eq!(head["ok"], true, "{printed}");
    assert!(
        row("chunked vs full head loss alone, tiny 2 rows")["ratio"]
            .as_str()
            .unwrap()
            .ends_with('x'),
        "{printed}"
    );
    // The training step a CUDA graph captures, run uncaptured, trains as the eager step
    // does, bit for bit on the CPU; each run says how its step ran.
    for rows in [4, 2] {
        let same = row(&format!(
            "tiny {rows} rows, static vs eager step: max |loss diff|"
        ));
        assert_eq!(same["lillm"], "0.00e+00", "{printed}");
        assert!(
            row(&format!("tiny {rows} rows, static vs eager step tokens/s"))["ratio"]
                .as_str()
                .unwrap()
                .ends_with('x')
        );
    }
    assert_eq!(
        row("step as one CUDA graph, dense run (tiny, 4 rows)")["lillm"],
        "static (uncaptured)",
        "{printed}"
    );
    assert_eq!(
        row("greedy answers, static vs eager")["lillm"],
        "5/5",
        "{printed}"
    );
    // What a device call brings back (8 files of 16 MiB at most): the table, the summary and
    // one archive of every figure and log, without the runs' weights.
    let mut brought: Vec<String> = std::fs::read_dir(&results)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    brought.sort();
    assert_eq!(brought, ["results.tar.gz", "summary.json", "table.txt"]);
    assert_eq!(
        std::fs::read(results.join("summary.json")).unwrap(),
        std::fs::read(out.join("summary.json")).unwrap()
    );
    let listed = Command::new("tar")
        .arg("-tzf")
        .arg(results.join("results.tar.gz"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for file in [
        "./sections.jsonl",
        "./kernels.json",
        "./decode-step.json",
        "./serve-dense.json",
        "./dense.log",
        "./dense/metrics.jsonl",
        "./profile/profile-rank0.txt",
    ] {
        assert!(
            listed.lines().any(|l| l == file),
            "{file} not in:\n{listed}"
        );
    }
    assert!(
        !listed.contains(".safetensors"),
        "no weights come back:\n{listed}"
    );
    assert!(
        !listed.contains("trace.json"),
        "a file over 2 MiB stays behind:\n{listed}"
    );
    for entry in std::fs::read_dir(&results).unwrap() {
        let bytes = entry.unwrap().metadata().unwrap().len();
        assert!(bytes < 16 << 20, "{bytes} bytes is over what comes back");
    }
    // The table the user reads carries the same rows, and the profile of five steps.
    assert!(printed.contains("job path vs one process"), "{printed}");
    assert!(
        printed.contains("profile of steps 20..24") && printed.contains("aten::mm"),
        "{printed}"
    );
}

/// A lent machine's minutes run out, or a path breaks there: each section costs only its
/// own rows, the table is printed all the same with every figure that was not measured
/// saying why, and the exit status says the run is not whole; a machine that cannot run it
/// at all is told why before anything starts.
#[test]
fn the_gpu_harness_prints_its_table_when_sections_fail_or_run_out_of_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("no-data");
    let sections = |out: &Path| -> Vec<(String, String)> {
        summary(out)["sections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let field = |k: &str| s[k].as_str().unwrap().to_string();
                (field("section"), field("status"))
            })
            .collect()
    };
    let not_run = |out: &Path| {
        summary(out)["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["lillm"] == "not run")
    };

    // A binary that fails every command: every section is tried, and fails by itself.
    let out = dir.path().join("broken");
    let (printed, status) = harness(&data, &out, &[("LILLM", "/bin/false")]);
    assert_eq!(status, Some(1), "{printed}");
    let tried = sections(&out);
    assert_eq!(tried.len(), 11, "{printed}");
    assert!(
        tried.iter().all(|(_, status)| status == "failed (exit 1)"),
        "{tried:?}"
    );
    assert!(not_run(&out), "{printed}");
    assert!(printed.contains("not run"), "{printed}");

    // No time left: nothing starts, and the table says so.
    let out = dir.path().join("late");
    let (printed, status) = harness(&data, &out, &[("DEADLINE_S", "0")]);
    assert_eq!(status, Some(3), "{printed}");
    let skipped = sections(&out);
    assert_eq!(skipped.len(), 11, "{printed}");
    assert!(
        skipped
            .iter()
            .all(|(_, status)| status.starts_with("skipped")),
        "{skipped:?}"
    );
    assert!(not_run(&out), "{printed}");

    // ONLY: just the sections named (a later call for what an earlier one skipped).
    let out = dir.path().join("only");
    let (printed, _) = harness(
        &data,
        &out,
        &[("DEADLINE_S", "0"), ("ONLY", "serving-more,curves")],
    );
    let names: Vec<String> = sections(&out).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["curves", "serving-more"], "{printed}");

    // A machine that cannot run any section is told so at once, and why, before any work.
    for (env, says) in [
        (
            &[("LILLM", "/nonexistent/lillm")][..],
            "run scripts/pack-gpu first",
        ),
        (&[("PYTHON", "/bin/false")], "cannot import torch"),
        (&[("DEVICE", "cuda")], "sees no CUDA device"),
    ] {
        if env[0].0 == "DEVICE" && tch::Cuda::is_available() {
            continue;
        }
        let out = dir.path().join("unfit");
        let (printed, status) = harness(&data, &out, env);
        assert_eq!(status, Some(2), "{printed}");
        assert!(printed.contains(says), "{printed}");
        assert!(!out.exists(), "nothing is written: {printed}");
    }
}
