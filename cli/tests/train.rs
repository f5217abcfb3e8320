//! Pretraining: resume continues on the exact next batch (identical losses), checkpoints are
//! verified, and bad configs or damaged checkpoints fail clearly without damage.

mod common;
use common::*;
use std::fs;

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let data = s(&tiny.data);
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    lillm_ok(&tiny_train_args(data, s(&straight), "300", "20"));
    lillm_ok(&tiny_train_args(data, s(&split), "300", "10"));
    // Starting again without --resume would overwrite the run: refused.
    let err = lillm_err(&tiny_train_args(data, s(&split), "300", "20"));
    assert!(err.contains("--resume"), "{err}");
    let mut args = tiny_train_args(data, s(&split), "300", "20");
    args.push("--resume");
    lillm_ok(&args);

    let a = losses(&straight);
    let b = losses(&split);
    assert_eq!(a.len(), 20, "one record per step");
    assert_eq!(
        a, b,
        "10 steps + resume + 10 steps gives the same losses bit for bit"
    );
    assert!(a[19].1 < a[0].1, "the loss goes down");
    // Metrics carry the documented fields; the run has a plot and best/last checkpoints.
    let first: serde_json::Value = serde_json::from_str(
        fs::read_to_string(straight.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    for field in ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"] {
        assert!(
            first.get(field).is_some(),
            "metrics record lacks {field}: {first}"
        );
    }
    assert!(fs::read_to_string(straight.join("metrics.jsonl"))
        .unwrap()
        .contains("\"val_loss\""));
    assert!(fs::metadata(straight.join("loss.png")).unwrap().len() > 1000);
    let ckpts: Vec<String> = fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(ckpts.contains(&"step-00000020".to_string()), "{ckpts:?}");
    assert!(ckpts.len() <= 3, "last 2 + best are kept: {ckpts:?}");
    // The final weights agree too.
    let wa = fs::read(straight.join("checkpoints/step-00000020/model.safetensors")).unwrap();
    let wb = fs::read(split.join("checkpoints/step-00000020/model.safetensors")).unwrap();
    assert!(wa == wb, "final parameters are identical");
}

#[test]
fn eval_generate_and_checkpoint_damage() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let run = dir.path().join("run");
    lillm_ok(&tiny_train_args(s(&tiny.data), s(&run), "300", "10"));

    let text = dir.path().join("eval.txt");
    fs::write(&text, corpus_text(5, 99)).unwrap();
    let out = lillm_ok(&[
        "eval",
        "--checkpoint",
        s(&run),
        "--text-file",
        s(&text),
        "--device",
        "cpu",
    ]);
    let loss: f64 = out
        .split("loss=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let tokens: usize = out
        .split("tokens=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        loss.is_finite() && loss > 0.0 && loss < (300f64).ln(),
        "{out}"
    );
    let ids: Vec<u32> = serde_json::from_str(
        lillm_ok(&[
            "tokenizer",
            "encode",
            "--tokenizer",
            s(&tiny.tokenizer),
            "--input",
            s(&text),
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(
        tokens,
        ids.len() - 1,
        "every token after the first is scored once"
    );

    let gen = |seed: &str| {
        lillm_ok(&[
            "generate",
            "--checkpoint",
            s(&run),
            "--prompt",
            "The king",
            "--max-new-tokens",
            "12",
            "--seed",
            seed,
            "--device",
            "cpu",
        ])
    };
    let first = gen("5");
    assert!(first.starts_with("The king"), "{first}");
    assert_eq!(first, gen("5"), "same seed, same text");
    let sft = lillm_ok(&[
        "generate",
        "--checkpoint",
        s(&run),
        "--prompt",
        "hi",
        "--mode",
        "sft",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(
        !sft.contains("<r0>"),
        "sft mode prints only the reply: {sft}"
    );

    // A corrupted checkpoint is refused by name, and a run resumes from the newest valid one.
    let ckpt = run.join("checkpoints/step-00000010");
    let model = ckpt.join("model.safetensors");
    let bytes = fs::read(&model).unwrap();
    fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = lillm_err(&["eval", "--checkpoint", s(&ckpt), "--text-file", s(&text)]);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupted"),
        "{err}"
    );
    let out = lillm_ok(&[
        "eval",
        "--checkpoint",
        s(&run),
        "--text-file",
        s(&text),
        "--device",
        "cpu",
    ]);
    assert!(
        out.contains("loss="),
        "the run falls back to its newest valid checkpoint (step 5)"
    );
}

#[test]
fn bad_configs_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let run = dir.path().join("run");
    let with = |flag: &str, value: &'static str| {
        let mut args = tiny_train_args(s(&tiny.data), s(&run), "300", "5");
        set_flag(&mut args, flag, value);
        lillm_err(&args)
    };
    let err = with("--kv-heads", "3");
    assert!(
        err.contains("q_heads (4) must be divisible by kv_heads (3)"),
        "{err}"
    );
    let err = with("--d-model", "30");
    assert!(
        err.contains("d_model (30) must be divisible by q_heads (4)"),
        "{err}"
    );
    // The dataset's tokenizer has 300 tokens; a 256-row embedding cannot hold them.
    let err = lillm_err(&tiny_train_args(s(&tiny.data), s(&run), "256", "5"));
    assert!(err.contains("vocab_size") && err.contains("300"), "{err}");
    let err = lillm_err(&tiny_train_args(
        s(&dir.path().join("nodata")),
        s(&run),
        "300",
        "5",
    ));
    assert!(
        err.contains("nodata") && err.contains("lillm data prepare"),
        "{err}"
    );
    // Dataloaders are started by a local job only; alone the flag would do nothing.
    let mut args = tiny_train_args(s(&tiny.data), s(&run), "300", "5");
    args.extend(["--dataloaders", "2"]);
    let err = lillm_err(&args);
    assert!(
        err.contains("--dataloaders 2") && err.contains("--nproc"),
        "{err}"
    );
    // A TOML config layers under flags; --print-config shows the result.
    let cfg = dir.path().join("c.toml");
    fs::write(&cfg, "batch_size = 7\nlr = 0.5\n[model]\nd_model = 64\n").unwrap();
    let print = [
        "train",
        "--config",
        s(&cfg),
        "--lr",
        "0.25",
        "--print-config",
    ];
    let out = lillm_ok(&print);
    assert!(
        out.contains("batch_size = 7") && out.contains("lr = 0.25") && out.contains("d_model = 64"),
        "{out}"
    );
    // The environment layers between the TOML file and the flags, nested keys and fields
    // unset by default included.
    let layered = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(print)
        .env("LILLM_LR", "0.125")
        .env("LILLM_BATCH_SIZE", "9")
        .env("LILLM_MODEL__MOE__EXPERTS", "4")
        .env("LILLM_INIT_FROM", "base-run")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&layered.stdout);
    assert!(
        out.contains("batch_size = 9") && out.contains("lr = 0.25") && out.contains("experts = 4"),
        "{out}"
    );
    assert!(out.contains("init_from = \"base-run\""), "{out}");
    // Misspelt keys of the job's part and of the process's part are both refused by name,
    // with the file and the fields a config may hold.
    for bad in ["batch_sise = 7\n", "devcie = \"cpu\"\n"] {
        fs::write(&cfg, bad).unwrap();
        let err = lillm_err(&["train", "--config", s(&cfg), "--print-config"]);
        let key = bad.split(' ').next().unwrap();
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
        assert!(
            err.contains(s(&cfg)) && err.contains("device, dpo_beta"),
            "{err}"
        );
    }
    assert!(
        !run.join("checkpoints").exists(),
        "nothing was written by refused runs"
    );
}

#[test]
fn two_ranks_through_gloo_match_one_rank_with_two_accumulation_steps() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    lillm_ok(&tiny_train_args(s(&tiny.data), s(&one), "300", "12"));
    let mut args = tiny_train_args(s(&tiny.data), s(&two), "300", "12");
    // The ranks also compare parameter checksums every 3 steps; they must keep agreeing.
    args.extend(["--nproc", "2", "--check-params-every", "3"]);
    lillm_ok(&args);
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 12);
    assert_eq!(a.len(), b.len());
    for ((step, la), (_, lb)) in a.iter().zip(&b) {
        assert!((la - lb).abs() <= 1e-5, "step {step}: {la} vs {lb}");
    }
    let max_diff = max_weight_diff(
        &one.join("checkpoints/step-00000012/model.safetensors"),
        &two.join("checkpoints/step-00000012/model.safetensors"),
    );
    assert!(max_diff <= 1e-5, "final parameters differ by {max_diff}");

    // Both continue to step 16 (a changed config: a local job restarts as a new group).
    let mut more = tiny_train_args(s(&tiny.data), s(&one), "300", "16");
    more.push("--resume");
    lillm_ok(&more);
    set_flag(&mut more, "--out", s(&two));
    more.extend(["--nproc", "2"]);
    lillm_ok(&more);
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!((a.len(), b.len()), (16, 16));
    for ((step, la), (_, lb)) in a.iter().zip(&b) {
        assert!((la - lb).abs() <= 1e-5, "step {step}: {la} vs {lb}");
    }

    // Accumulation steps must split evenly across ranks.
    let three = dir.path().join("three");
    let mut args = tiny_train_args(s(&tiny.data), s(&three), "300", "2");
    args.extend(["--nproc", "3"]);
    let err = lillm_err(&args);
    assert!(
        err.contains("grad_accum (2) must be divisible by world_size (3)"),
        "{err}"
    );
}

#[test]
fn a_run_killed_mid_training_resumes_as_if_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    let killed = dir.path().join("killed");
    lillm_ok(&tiny_train_args(s(&tiny.data), s(&straight), "300", "40"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(tiny_train_args(s(&tiny.data), s(&killed), "300", "40"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !killed
        .join("checkpoints/step-00000015/manifest.json")
        .exists()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, possibly in the middle of writing the next checkpoint
    child.wait().unwrap();
    assert!(
        !killed.join("checkpoints/step-00000040").exists(),
        "the run was stopped before it finished"
    );
    let mut args = tiny_train_args(s(&tiny.data), s(&killed), "300", "40");
    args.push("--resume");
    lillm_ok(&args);
    assert_eq!(
        losses(&killed),
        losses(&straight),
        "no step lost, none repeated, same numbers"
    );
}

#[test]
fn the_chunked_head_loss_trains_the_model_the_full_logits_train() {
    // The loss through the output head a chunk of positions at a time (CUDA's default) is the
    // full-logits loss with its gradients: the same run either way, to float32 rounding, on
    // pretraining and on an MoE model (its router losses are added to it).
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    for moe in [false, true] {
        let run = |head_loss: &str| {
            let out = dir.path().join(format!("{head_loss}-{moe}"));
            float32_losses(&tiny.data, &out, "20", moe, &["--head-loss", head_loss])
        };
        let (full, chunked) = (run("full"), run("chunked"));
        assert_eq!(full.len(), 20, "{full:?}");
        assert_eq!(
            full.iter().map(|l| l.0).collect::<Vec<_>>(),
            chunked.iter().map(|l| l.0).collect::<Vec<_>>()
        );
        for ((step, a), (_, b)) in full.iter().zip(&chunked) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                "moe {moe}, step {step}: full {a} vs chunked {b}"
            );
        }
        // The training did move: a test of two frozen runs would prove nothing.
        assert!(full[19].1 < full[0].1 - 0.5, "{full:?}");
    }
    let err = {
        let mut args = tiny_train_args(s(&tiny.data), "unused", "300", "5");
        args.extend(["--head-loss", "fused"]);
        lillm_err(&args)
    };
    assert!(err.contains("head_loss") || err.contains("fused"), "{err}");
}

#[test]
fn a_step_through_fixed_input_tensors_trains_exactly_as_the_eager_step() {
    // `--step-mode static` runs, op by op, what a CUDA graph of the step captures: every
    // micro-batch copied into the same input tensors, its loss divided by a count held on
    // the device, its figures left in a tensor the caller adds up. On a CPU that is the
    // eager run bit for bit: with accumulation, dropout and an MoE model.
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    for moe in [false, true] {
        let run = |mode: &str| {
            let out = dir.path().join(format!("{mode}-{moe}"));
            let flags = ["--dropout", "0.1", "--step-mode", mode];
            float32_losses(&tiny.data, &out, "12", moe, &flags)
        };
        let (eager, fixed) = (run("eager"), run("static"));
        assert_eq!(eager.len(), 12, "{eager:?}");
        assert_eq!(eager, fixed, "moe {moe}");
        assert!(eager[11].1 < eager[0].1, "the runs trained: {eager:?}");
    }
    let err = {
        let mut args = tiny_train_args(s(&tiny.data), "unused", "300", "5");
        args.extend(["--step-mode", "graphs"]);
        lillm_err(&args)
    };
    assert!(
        err.contains("CUDA device") && err.contains("static"),
        "{err}"
    );
}

/// The losses of a float32 run of the tiny model (with four experts when `moe`) for `iters`
/// steps into `out`, with `flags` added.
fn float32_losses(
    data: &std::path::Path,
    out: &std::path::Path,
    iters: &str,
    moe: bool,
    flags: &[&str],
) -> Vec<(u64, f64)> {
    let mut args = tiny_train_args(s(data), s(out), "300", iters);
    args.extend(["--dtype", "float32"]);
    args.extend(flags);
    if moe {
        args.extend(["--experts", "4", "--experts-per-token", "2"]);
    }
    lillm_ok(&args);
    losses(out)
}
