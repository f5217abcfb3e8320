//! Supervised fine-tuning: the chat template, the assistant-only mask, and a fine-tuning run
//! that starts from a pretrained checkpoint and learns the conversations.

mod common;
use common::*;
use std::fs;

#[test]
fn render_pins_text_ids_and_assistant_only_mask() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conv.jsonl");
    fs::write(
        &conv,
        concat!(
            r#"{"conversation": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, "#,
            r#"{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "LilLM"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "a very long question that will not fit in the context at all, however hard we try to squeeze it in there, and then some more words, and again some more words to be sure"}, {"role": "assistant", "content": "ok"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let tok = shared_reference("lilLM-tokenizer.json");
    let out = lillm(&[
        "data",
        "sft-render",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&conv),
        "--max-seq-len",
        "43",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("filtered 1 conversation"));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the over-long conversation is dropped");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let text = v["text"].as_str().unwrap();
    assert_eq!(text, "<r0>user<r1>Hi!</r2><r0>assistant<r1>Hello.</s><r0>user<r1>Name?</r2><r0>assistant<r1>LilLM</s>");
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    let mask: Vec<u8> = serde_json::from_value(v["mask"].clone()).unwrap();
    // The released tokenizer's encoding, pinned, and equal to Python's.
    assert_eq!(
        ids,
        [
            3, 400, 279, 4, 55, 88, 16, 7065, 97, 33, 45, 3, 591, 402, 436, 4, 55, 851, 94, 29, 2,
            3, 400, 279, 4, 61, 507, 46, 7065, 97, 33, 45, 3, 591, 402, 436, 4, 59, 366, 59, 60, 2
        ]
    );
    let py = python(
        "import sys, json\nfrom tokenizers import Tokenizer\nprint(json.dumps(Tokenizer.from_file(sys.argv[1]).encode(sys.argv[2], add_special_tokens=False).ids))",
        &[s(&tok), text],
    );
    assert_eq!(serde_json::from_str::<Vec<u32>>(py.trim()).unwrap(), ids);
    // Loss targets: exactly each assistant's content and its closing </s>.
    let targets: Vec<usize> = mask
        .iter()
        .enumerate()
        .filter(|(_, &m)| m == 1)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(targets, [16, 17, 18, 19, 20, 37, 38, 39, 40, 41]);
    let decode = |range: &[u32]| {
        lillm_ok(&[
            "tokenizer",
            "decode",
            "--tokenizer",
            s(&tok),
            "--ids",
            &serde_json::to_string(range).unwrap(),
        ])
    };
    assert_eq!(decode(&ids[16..21]).trim_end(), "Hello.</s>");
    assert_eq!(decode(&ids[37..42]).trim_end(), "LilLM</s>");

    let bad = dir.path().join("bad.jsonl");
    fs::write(&bad, "{\"conversation\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"bot\", \"content\": \"y\"}]}\n").unwrap();
    let err = lillm_err(&[
        "data",
        "sft-render",
        "--tokenizer",
        s(&tok),
        "--input",
        s(&bad),
    ]);
    assert!(
        err.contains("bad.jsonl:1") && err.contains("unknown role `bot`"),
        "{err}"
    );
}

#[test]
fn sft_learns_the_assistant_replies_from_a_pretrained_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = tiny_pretrained(dir.path(), "64", "10");
    let conv = dir.path().join("chat.jsonl");
    fs::write(&conv, conversations(80)).unwrap();
    let run = dir.path().join("sft");
    let out = lillm_ok(&[
        "sft",
        "--init",
        s(&pre),
        "--data",
        s(&conv),
        "--out",
        s(&run),
        "--max-iters",
        "150",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--dropout",
        "0.05",
        "--eval-interval",
        "50",
        "--eval-iters",
        "2",
        "--log-interval",
        "5",
        "--device",
        "cpu",
        "--val-fraction",
        "0.1",
    ]);
    assert!(out.contains("best checkpoint"), "{out}");
    let evals: Vec<f64> = fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64())
        .collect();
    assert!(evals.len() >= 3);
    assert!(evals.iter().all(|v| v.is_finite()));
    assert!(
        evals.last().unwrap() < &(evals[0] * 0.5),
        "held-out assistant loss falls: {evals:?}"
    );
    // The fine-tuned model answers in the learned form.
    let reply = lillm_ok(&[
        "generate",
        "--checkpoint",
        s(&run),
        "--mode",
        "sft",
        "--prompt",
        "who is the queen?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
        "--device",
        "cpu",
    ]);
    assert!(reply.contains("the queen is my friend."), "{reply}");

    // The terminal chat keeps a multi-turn history and /reset clears it.
    use std::io::Write;
    let mut chat = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args([
            "chat",
            "--checkpoint",
            s(&run),
            "--temperature",
            "0",
            "--max-new-tokens",
            "40",
            "--device",
            "cpu",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"who is the king?\nwho is the lord?\n/reset\nwho is the prince?\n/quit\n")
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("lillm> the king is my friend."), "{stdout}");
    assert!(
        stdout.contains("lillm> the prince is my friend."),
        "{stdout}"
    );
    assert_eq!(stdout.matches("lillm> ").count(), 3, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("history cleared"));
}

/// 60 preference pairs: the chosen reply praises, the rejected one does not.
fn preference_pairs(dir: &std::path::Path) -> std::path::PathBuf {
    const WHO: &[&str] = &["king", "queen", "prince", "lord", "man", "friend"];
    let pairs: Vec<String> = (0..60)
        .map(|i| {
            let who = WHO[i % WHO.len()];
            serde_json::json!({"prompt": format!("who is the {who}?"), "chosen": format!("the {who} is good."), "rejected": format!("sleep {who} death.")}).to_string()
        })
        .collect();
    let data = dir.join("pairs.jsonl");
    fs::write(&data, pairs.join("\n")).unwrap();
    data
}

#[test]
fn dpo_prefers_the_chosen_replies_on_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = tiny_pretrained(dir.path(), "64", "10");
    let data = preference_pairs(dir.path());
    let run = dir.path().join("dpo");
    let out = lillm_ok(&[
        "dpo",
        "--init",
        s(&pre),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--max-iters",
        "40",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--beta",
        "0.5",
        "--eval-interval",
        "20",
        "--val-fraction",
        "0.2",
        "--device",
        "cpu",
    ]);
    let accuracies: Vec<f64> = fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("val_loss").is_some())
        .map(|v| v["reward_accuracy"].as_f64().unwrap())
        .collect();
    assert_eq!(accuracies.len(), 3, "evaluations at steps 0, 20, 40: {out}");
    assert!(
        *accuracies.last().unwrap() > 0.8,
        "held-out reward accuracy after DPO: {accuracies:?}"
    );
    assert!(out.contains("held-out reward accuracy"), "{out}");
    assert!(run
        .join("checkpoints/step-00000040/manifest.json")
        .is_file());

    let bad = dir.path().join("bad.jsonl");
    fs::write(&bad, "{\"prompt\": \"x\", \"chosen\": \"y\"}\n").unwrap();
    let err = lillm_err(&[
        "dpo",
        "--init",
        s(&pre),
        "--data",
        s(&bad),
        "--out",
        s(&dir.path().join("d2")),
    ]);
    assert!(
        err.contains("bad.jsonl:1") && err.contains("rejected"),
        "{err}"
    );
}

/// A DPO run stopped halfway and resumed (`--resume`) continues with the optimizer state and
/// the next batch: the same losses and final weights as one uninterrupted run. A resume
/// against another reference is refused.
#[test]
fn dpo_resumes_exactly_and_only_against_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (tiny, pre) = tiny_pretrained(dir.path(), "64", "10");
    let data = preference_pairs(dir.path());
    let dpo = |out: &std::path::Path, iters: &str, extra: &[&str]| {
        let mut args = vec![
            "dpo",
            "--init",
            s(&pre),
            "--data",
            s(&data),
            "--max-iters",
            iters,
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--eval-interval",
            "10",
            "--log-interval",
            "1",
            "--device",
            "cpu",
            "--out",
            s(out),
        ];
        args.extend(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| lillm_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (straight, halves) = (dir.path().join("straight"), dir.path().join("halves"));
    run(dpo(&straight, "20", &[]));
    run(dpo(&halves, "10", &[]));
    let refused = lillm_err_owned(&dpo(&halves, "20", &[]));
    assert!(refused.contains("pass --resume"), "{refused}");
    run(dpo(&halves, "20", &["--resume"]));
    assert_eq!(losses(&straight), losses(&halves));
    let last = "checkpoints/step-00000020/model.safetensors";
    let max_diff = max_weight_diff(&straight.join(last), &halves.join(last));
    assert!(max_diff <= 1e-6, "final weights differ by {max_diff}");

    // Another reference: refused, naming what to do.
    let other = dir.path().join("other");
    let mut train = tiny_train_args(s(&tiny.data), s(&other), "300", "2");
    set_flag(&mut train, "--max-seq-len", "64");
    lillm_ok(&train);
    let mut wrong = dpo(&halves, "30", &["--resume"]);
    let i = wrong.iter().position(|a| a == "--init").unwrap();
    wrong[i + 1] = s(&other).to_string();
    let err = lillm_err_owned(&wrong);
    assert!(
        err.contains("resume with the --init the run started from"),
        "{err}"
    );
}

/// `lillm sft --nproc 2` (two trainer processes, Gloo, one micro-batch each) computes the
/// single-process run with the same global batch: the same per-step losses and final weights,
/// dropout included. A run stopped halfway and resumed equals one uninterrupted run.
#[test]
fn sft_at_two_ranks_equals_one_process_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = tiny_pretrained(dir.path(), "64", "10");
    let conv = dir.path().join("chat.jsonl");
    fs::write(&conv, conversations(60)).unwrap();
    let sft = |out: &std::path::Path, iters: &str, extra: &[&str]| {
        let mut args = vec![
            "sft",
            "--init",
            s(&pre),
            "--data",
            s(&conv),
            "--max-iters",
            iters,
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--lr",
            "3e-3",
            "--dropout",
            "0.1",
            "--eval-interval",
            "5",
            "--eval-iters",
            "2",
            "--log-interval",
            "1",
            "--device",
            "cpu",
            "--out",
            s(out),
        ];
        args.extend(extra);
        lillm_ok(&args)
    };
    let one = dir.path().join("one");
    sft(&one, "10", &[]);
    let two = dir.path().join("two");
    sft(&two, "10", &["--nproc", "2"]);
    assert!(two.join("coordinator").is_dir(), "--nproc 2 ran as a job");
    let world = checkpoint_world_sizes(&two);
    assert!(
        !world.is_empty() && world.iter().all(|&w| w == 2),
        "{world:?}"
    );
    assert_same_run(&one, &two, 10, 1e-5);
    let halves = dir.path().join("halves");
    sft(&halves, "5", &[]);
    sft(&halves, "10", &["--resume"]);
    assert_eq!(losses(&one), losses(&halves));
    assert_same_run(&one, &halves, 10, 1e-6);
}

/// `lillm dpo --nproc 2` runs the one training engine as a job: the same per-step losses,
/// reward figures and final weights as one process with the same global batch.
#[test]
fn dpo_at_two_ranks_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = tiny_pretrained(dir.path(), "64", "10");
    let data = preference_pairs(dir.path());
    let dpo = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "dpo",
            "--init",
            s(&pre),
            "--data",
            s(&data),
            "--max-iters",
            "8",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--lr",
            "3e-3",
            "--beta",
            "0.5",
            "--eval-interval",
            "4",
            "--eval-iters",
            "2",
            "--log-interval",
            "1",
            "--device",
            "cpu",
            "--out",
            s(out),
        ];
        args.extend(extra);
        lillm_ok(&args)
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let printed = dpo(&one, &[]);
    assert!(printed.contains("held-out reward accuracy"), "{printed}");
    dpo(&two, &["--nproc", "2"]);
    let world = checkpoint_world_sizes(&two);
    assert!(
        !world.is_empty() && world.iter().all(|&w| w == 2),
        "{world:?}"
    );
    assert_same_run(&one, &two, 8, 1e-5);
    let rewards = |run: &std::path::Path| -> Vec<(f64, f64)> {
        fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .map(|v| {
                (
                    v["reward_accuracy"].as_f64().unwrap(),
                    v["reward_margin"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (r1, r2) = (rewards(&one), rewards(&two));
    assert_eq!(r1.len(), 8);
    for ((a1, m1), (a2, m2)) in r1.iter().zip(&r2) {
        assert!(
            (a1 - a2).abs() <= 1e-6 && (m1 - m2).abs() <= 1e-5,
            "{r1:?} vs {r2:?}"
        );
    }
}
