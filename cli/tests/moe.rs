//! Mixture of Experts end to end: training logs the routing, two ranks equal one process,
//! a resume is exact, and the exported model is transformers' `MixtralForCausalLM`.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// `tiny_train_args` as a sparse model: 4 experts of hidden size 48, top-2, every layer.
fn moe_args<'a>(data: &'a str, out: &'a str, iters: &'a str) -> Vec<&'a str> {
    let mut args = tiny_train_args(data, out, "300", iters);
    set_flag(&mut args, "--preset", "tiny-moe");
    args.extend([
        "--experts",
        "4",
        "--expert-hidden-dim",
        "48",
        "--dropout",
        "0.1",
    ]);
    args
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn moe_run(dir: &Path, iters: &str) -> PathBuf {
    let tiny = tiny_data(dir, 300);
    let run = dir.join("moe");
    lillm_ok(&moe_args(s(&tiny.data), s(&run), iters));
    run
}

/// Every training record says how the routers spread the tokens, and at two ranks (each
/// with its own tokens, experts that got none on one rank included in the averaging) the
/// run equals one process; a resume continues exactly.
#[test]
fn moe_trains_at_two_ranks_like_one_process_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let train = |out: &Path, iters: &str, extra: &[&str]| {
        let mut args = moe_args(s(&tiny.data), s(out), iters);
        args.extend(extra);
        lillm_ok(&args)
    };
    let one = dir.path().join("one");
    let banner = train(&one, "8", &[]);
    assert!(
        banner.contains("active per token (4 experts of hidden size 48, top-2 on 2 of 2 layers)"),
        "{banner}"
    );
    for record in records(&one).iter().filter(|r| r.get("loss").is_some()) {
        let load: Vec<f64> = serde_json::from_value(record["expert_load"].clone()).unwrap();
        assert_eq!(load.len(), 4, "{record}");
        assert!((load.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{record}");
        let aux = record["aux_loss"].as_f64().unwrap();
        // k = 2 when balanced, k × experts = 8 when collapsed onto two experts.
        assert!((2.0..8.0).contains(&aux), "{record}");
        // The extremes over (layer, expert) bound the layer-averaged loads, in fair shares.
        let fair: Vec<f64> = load.iter().map(|l| l * 4.0).collect();
        let (lowest, highest) = (
            fair.iter().copied().fold(f64::MAX, f64::min),
            fair.iter().copied().fold(f64::MIN, f64::max),
        );
        let min = record["expert_load_min"].as_f64().unwrap();
        let max = record["expert_load_max"].as_f64().unwrap();
        assert!((0.0..=lowest + 1e-6).contains(&min), "{record}");
        assert!(max >= highest - 1e-6 && max <= 4.0, "{record}");
        assert!(record["z_loss"].as_f64().unwrap() > 0.0);
    }
    let two = dir.path().join("two");
    train(&two, "8", &["--nproc", "2"]);
    assert!(checkpoint_world_sizes(&two).iter().all(|&w| w == 2));
    assert_same_run(&one, &two, 8, 1e-5);
    let halves = dir.path().join("halves");
    train(&halves, "4", &[]);
    train(&halves, "8", &["--resume"]);
    assert_same_run(&one, &halves, 8, 1e-6);
}

/// Our Mixtral export gives transformers' logits, including for a batch in which some
/// experts get no token; importing it back (and the copy transformers saves) is exact.
#[test]
fn moe_export_matches_transformers_mixtral_and_imports_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = moe_run(dir.path(), "6");
    let hf = dir.path().join("hf");
    let out = lillm_ok(&["export", "hf", "--checkpoint", s(&run), "--out", s(&hf)]);
    assert!(out.contains("Hugging Face Mixtral"), "{out}");
    let ids = "[1, 17, 42, 99, 5, 250, 3, 4, 77, 123, 200, 2, 64, 8]";
    let short = "[1, 17]";
    let logits = |checkpoint: &Path, ids: &str, name: &str| {
        let out = dir.path().join(name);
        model_logits(checkpoint, ids, &out);
        out
    };
    let ours = logits(&run, ids, "ours.safetensors");
    let ours_short = logits(&run, short, "ours-short.safetensors");
    let resaved = dir.path().join("resaved");
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import MixtralForCausalLM
model = MixtralForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32, attn_implementation="eager").eval()
out = {}
for ids, ours, key in [(sys.argv[2], sys.argv[3], "long"), (sys.argv[4], sys.argv[5], "short")]:
    with torch.no_grad():
        r = model(torch.tensor([json.loads(ids)]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    used = [len(set(torch.topk(l, k, dim=-1).indices.flatten().tolist())) for l in r.router_logits]
    out[key] = {"diff": (r.logits - load_file(ours)["logits"]).abs().max().item(), "experts_used": used}
out["tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
model.save_pretrained(sys.argv[6])
print(json.dumps(out))
"#;
    let result: serde_json::Value = serde_json::from_str(
        python(
            script,
            &[s(&hf), ids, s(&ours), short, s(&ours_short), s(&resaved)],
        )
        .trim()
        .lines()
        .last()
        .unwrap(),
    )
    .unwrap();
    for key in ["long", "short"] {
        let diff = result[key]["diff"].as_f64().unwrap();
        assert!(diff <= 1e-4, "{key}: max |logits diff| = {diff}");
    }
    // Two tokens × top-2 of 4 experts: an expert of some layer got no token.
    let used: Vec<u64> = serde_json::from_value(result["short"]["experts_used"].clone()).unwrap();
    assert!(used.iter().any(|&n| n < 4), "{result}");
    assert_eq!(result["tied"], true);

    // Importing our export, or the directory transformers itself saved, is exact.
    for (source, name) in [(&hf, "back"), (&resaved, "back-resaved")] {
        let back = dir.path().join(name);
        let out = lillm_ok(&["import", "hf", s(source), "--out", s(&back)]);
        assert!(out.contains("active per token"), "{out}");
        let again = logits(&back, ids, &format!("{name}.safetensors"));
        let same = python(
            "import sys\nfrom safetensors.torch import load_file\na=load_file(sys.argv[1])['logits'];b=load_file(sys.argv[2])['logits']\nprint((a-b).abs().max().item())",
            &[s(&ours), s(&again)],
        );
        assert_eq!(same.trim().parse::<f64>().unwrap(), 0.0, "{name}");
    }
}

/// A model Mixtral cannot express is refused by name, and an MoE field on a dense preset
/// says what is missing.
#[test]
fn moe_shapes_mixtral_lacks_and_incomplete_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let run = dir.path().join("shared");
    let mut args = moe_args(s(&tiny.data), s(&run), "2");
    args.extend(["--shared-expert", "true"]);
    let banner = lillm_ok(&args);
    assert!(banner.contains("+ a shared expert"), "{banner}");
    let hf = dir.path().join("hf");
    let err = lillm_err(&["export", "hf", "--checkpoint", s(&run), "--out", s(&hf)]);
    assert!(err.contains("no shared expert"), "{err}");
    assert!(!hf.exists(), "nothing is written for a refused export");

    let mut args = tiny_train_args(s(&tiny.data), s(&run), "300", "2");
    args.extend(["--experts-per-token", "2"]);
    let err = lillm_err(&args);
    assert!(err.contains("without model.moe.experts"), "{err}");
}

/// The demo corpus (Shakespeare) prepared as `make demo` prepares it.
fn demo_data(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    let fetched = std::process::Command::new(repo_root().join("scripts/fetch-corpus"))
        .arg(&corpus)
        .status()
        .unwrap();
    assert!(fetched.success(), "scripts/fetch-corpus failed");
    let (tokenizer, data) = (dir.join("tokenizer"), dir.join("data"));
    let train = corpus.join("train");
    lillm_ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&train),
        "--vocab-size",
        "4096",
        "--out",
        s(&tokenizer),
    ]);
    lillm_ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tokenizer),
        "--input",
        s(&train),
        "--out",
        s(&data),
        "--val-fraction",
        "0.02",
        "--text-unit",
        "paragraph",
    ]);
    data
}

/// On the demo corpus, with the demo's hyper-parameters, `tiny-moe` (8 experts of half
/// the FFN, top-2: the dense model's active parameters plus the routers) reaches a lower
/// validation loss than `tiny` in the same steps, and no expert starves.
#[test]
fn moe_beats_dense_at_equal_active_parameters_on_the_demo_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let data = demo_data(dir.path());
    let config = repo_root().join("configs/demo-tiny.toml");
    let val_loss = |preset: &str| {
        let run = dir.path().join(preset);
        lillm_ok(&[
            "train",
            "--config",
            s(&config),
            "--preset",
            preset,
            "--data",
            s(&data),
            "--out",
            s(&run),
            "--max-iters",
            STEPS,
            "--lr-decay-iters",
            STEPS,
            "--warmup-iters",
            "30",
            "--eval-interval",
            STEPS,
            // Float32 everywhere: auto would pick bf16 on CPUs that have it.
            "--dtype",
            "float32",
        ]);
        let records = records(&run);
        let val = records.iter().rev().find_map(|r| r["val_loss"].as_f64());
        (val.unwrap(), records)
    };
    const STEPS: &str = "300";
    let (dense, _) = val_loss("tiny");
    let (moe, records) = val_loss("tiny-moe");
    let last = records
        .iter()
        .rev()
        .find(|r| r.get("loss").is_some())
        .unwrap();
    let starved = last["expert_load_min"].as_f64().unwrap();
    println!(
        "after {STEPS} steps: val loss dense {dense:.4}, MoE {moe:.4}; expert loads {} (least-loaded expert of any layer at {starved:.2} of a fair share)",
        last["expert_load"]
    );
    assert!(moe < dense, "MoE {moe} vs dense {dense}");
    assert!(starved >= 0.25, "an expert starves: {last}");
}
