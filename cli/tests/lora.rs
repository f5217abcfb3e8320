//! LoRA fine-tuning: only the adapters train and are checkpointed, tied to their base by
//! SHA-256; `peft` loads the exported adapter onto our exported base with our logits; the
//! merged export equals base + adapter; generate takes `--lora`.

mod common;
use common::*;
use std::fs;
use std::path::Path;

const IDS: &str = "[1, 17, 42, 99, 5, 250, 3, 4, 77, 123, 200, 2, 64, 8]";

fn sft<'a>(
    pre: &'a Path,
    data: &'a Path,
    out: &'a Path,
    iters: &'a str,
    extra: &[&'a str],
) -> String {
    let mut args = vec![
        "sft",
        "--init",
        s(pre),
        "--data",
        s(data),
        "--out",
        s(out),
        "--max-iters",
        iters,
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--dropout",
        "0",
        "--eval-interval",
        "6",
        "--eval-iters",
        "2",
        "--log-interval",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ];
    args.extend(extra);
    lillm_ok(&args)
}

fn last_checkpoint(run: &Path) -> std::path::PathBuf {
    let mut dirs: Vec<_> = fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs.pop().unwrap()
}

#[test]
fn lora_trains_adapters_only_and_matches_peft() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pre) = tiny_pretrained(dir.path(), "64", "10");
    let base = last_checkpoint(&pre);
    let base_weights = fs::read(base.join("model.safetensors")).unwrap();
    let chat = dir.path().join("chat.jsonl");
    fs::write(&chat, conversations(60)).unwrap();

    let full = dir.path().join("full");
    let full_out = sft(&pre, &chat, &full, "12", &[]);
    let lora = dir.path().join("lora");
    let lora_out = sft(
        &pre,
        &chat,
        &lora,
        "12",
        &["--lora-rank", "4", "--lora-targets", "wq,wk,wv,wo,w2"],
    );
    println!("full SFT: {full_out}\nLoRA: {lora_out}");
    let adapter = last_checkpoint(&lora);

    // The checkpoint holds the adapters alone, and names its base by path and SHA-256.
    let names = python(
        "import sys, json\nfrom safetensors.torch import load_file\nt = load_file(sys.argv[1])\nprint(json.dumps({k: [list(v.shape), v.abs().max().item()] for k, v in t.items()}))",
        &[s(&adapter.join("model.safetensors"))],
    );
    let tensors: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(names.trim()).unwrap();
    assert_eq!(tensors.len(), 2 * 5 * 2, "{tensors:?}");
    assert!(tensors
        .keys()
        .all(|k| k.ends_with("lora_A") || k.ends_with("lora_B")));
    assert!(
        tensors["transformer_blocks.1.attn.wk.lora_B"][1]
            .as_f64()
            .unwrap()
            > 0.0,
        "B moved away from zero: the adapters trained"
    );
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(adapter.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["lora"]["config"]["rank"], 4);
    assert_eq!(
        Path::new(state["lora"]["base"].as_str().unwrap()),
        base.canonicalize().unwrap()
    );
    assert_eq!(
        fs::read(base.join("model.safetensors")).unwrap(),
        base_weights,
        "the base is bitwise unchanged"
    );
    let size = |run: &Path| {
        fs::metadata(last_checkpoint(run).join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&lora) * 5 < size(&full),
        "{} vs {}",
        size(&lora),
        size(&full)
    );
    let trained = |out: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with("trained parameters: "))
            .unwrap_or_default();
        line.split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (full_n, lora_n) = (trained(&full_out), trained(&lora_out));
    assert!(lora_n > 0 && lora_n * 5 < full_n, "{lora_n} vs {full_n}");

    // Our logits of base + adapter, by the recorded base and by --lora on top of the base.
    let ours = dir.path().join("ours.safetensors");
    model_logits(&adapter, IDS, &ours);
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--prompt",
            "who is the king?",
            "--mode",
            "sft",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ];
        args.extend(extra);
        lillm_ok(&args)
    };
    assert_eq!(
        gen(&["--checkpoint", s(&base), "--lora", s(&adapter)]),
        gen(&["--checkpoint", s(&adapter)])
    );

    // PEFT loads our exported adapter onto our exported base with our logits; merging it
    // (PEFT's merge_and_unload) gives our merged export's weights.
    let (hf_base, peft, merged) = (
        dir.path().join("hf-base"),
        dir.path().join("peft"),
        dir.path().join("hf-merged"),
    );
    lillm_ok(&[
        "export",
        "hf",
        "--checkpoint",
        s(&base),
        "--out",
        s(&hf_base),
    ]);
    lillm_ok(&[
        "export",
        "peft",
        "--checkpoint",
        s(&adapter),
        "--out",
        s(&peft),
    ]);
    let mut merge = vec![
        "export",
        "hf",
        "--checkpoint",
        s(&adapter),
        "--out",
        s(&merged),
    ];
    let err = lillm_err(&merge);
    assert!(err.contains("--merge-lora"), "{err}");
    merge.push("--merge-lora");
    lillm_ok(&merge);
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from peft import PeftModel
base = LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32, attn_implementation="eager")
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    theirs = model(torch.tensor([json.loads(sys.argv[3])])).logits
diff = (theirs - load_file(sys.argv[4])["logits"]).abs().max().item()
merged = model.merge_and_unload().state_dict()
ours = load_file(sys.argv[5] + "/model.safetensors")
merge_diff = max((merged[k] - ours[k]).abs().max().item() for k in ours)
print(json.dumps({"logits": diff, "merged": merge_diff}))
"#;
    let out: serde_json::Value = serde_json::from_str(
        python(script, &[s(&hf_base), s(&peft), IDS, s(&ours), s(&merged)])
            .trim()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(out["logits"].as_f64().unwrap() <= 1e-4, "{out}");
    assert!(out["merged"].as_f64().unwrap() <= 1e-6, "{out}");
}

#[test]
fn lora_resumes_exactly_and_refuses_another_base() {
    let dir = tempfile::tempdir().unwrap();
    let (tiny, pre) = tiny_pretrained(dir.path(), "64", "10");
    let chat = dir.path().join("chat.jsonl");
    fs::write(&chat, conversations(60)).unwrap();
    let lora = ["--lora-rank", "4"];
    let whole = dir.path().join("whole");
    sft(&pre, &chat, &whole, "12", &lora);
    let halves = dir.path().join("halves");
    sft(&pre, &chat, &halves, "6", &lora);
    sft(
        &pre,
        &chat,
        &halves,
        "12",
        &["--lora-rank", "4", "--resume"],
    );
    assert_eq!(losses(&whole), losses(&halves));
    assert_same_run(&whole, &halves, 12, 0.0);

    // Another base (same data and shape, another seed) is refused for these adapters.
    let other = dir.path().join("other");
    let mut args = tiny_train_args(s(&tiny.data), s(&other), "300", "10");
    set_flag(&mut args, "--max-seq-len", "64");
    args.extend(["--seed", "7"]);
    lillm_ok(&args);
    let adapter = last_checkpoint(&whole);
    let err = lillm_err(&[
        "generate",
        "--checkpoint",
        s(&other),
        "--lora",
        s(&adapter),
        "--prompt",
        "hi",
        "--device",
        "cpu",
    ]);
    assert!(
        err.contains("is not the base these LoRA adapters were trained on"),
        "{err}"
    );
    let err = lillm_err(&[
        "sft",
        "--init",
        s(&other),
        "--data",
        s(&chat),
        "--out",
        s(&halves),
        "--resume",
        "--lora-rank",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(err.contains("resume refused"), "{err}");
}
