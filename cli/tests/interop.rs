//! Interop: our exported model gives transformers' LlamaForCausalLM logits; HF import is the
//! exact inverse; an original lilLM .pt checkpoint imports with identical logits.

mod common;
use common::*;
use std::path::Path;

const IDS: &str = "[1, 17, 42, 99, 5, 250, 3, 4, 77, 123, 200, 2, 64, 8]";

/// Our logits for IDS from a checkpoint, via `lillm model logits`.
fn our_logits(checkpoint: &Path, out: &Path) {
    model_logits(checkpoint, IDS, out);
}

fn trained_run(dir: &Path) -> std::path::PathBuf {
    let tiny = tiny_data(dir, 300);
    let run = dir.join("run");
    lillm_ok(&tiny_train_args(s(&tiny.data), s(&run), "300", "5"));
    run
}

#[test]
fn exported_model_matches_transformers_llama_logits() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let hf_dir = dir.path().join("hf");
    lillm_ok(&["export", "hf", "--checkpoint", s(&run), "--out", s(&hf_dir)]);
    let ours = dir.path().join("ours.safetensors");
    our_logits(&run, &ours);
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, AutoTokenizer
model = LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32, attn_implementation="eager").eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    theirs = model(ids).logits
ours = load_file(sys.argv[3])["logits"]
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"max_abs_diff": (theirs - ours).abs().max().item(), "shape": list(theirs.shape),
                  "eos": tok.eos_token_id, "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}))
"#;
    let out: serde_json::Value =
        serde_json::from_str(python(script, &[s(&hf_dir), IDS, s(&ours)]).trim()).unwrap();
    assert_eq!(out["shape"], serde_json::json!([1, 14, 300]));
    let diff = out["max_abs_diff"].as_f64().unwrap();
    assert!(diff <= 1e-4, "max |logits diff| = {diff}");
    assert_eq!(out["eos"], 2);
    assert_eq!(out["tied"], true);

    // Importing the export gives back the same model: identical logits.
    let back = dir.path().join("back");
    lillm_ok(&["import", "hf", s(&hf_dir), "--out", s(&back)]);
    let again = dir.path().join("again.safetensors");
    our_logits(&back, &again);
    let same = python(
        "import sys\nfrom safetensors.torch import load_file\na=load_file(sys.argv[1])['logits'];b=load_file(sys.argv[2])['logits']\nprint((a-b).abs().max().item())",
        &[s(&ours), s(&again)],
    );
    assert_eq!(same.trim().parse::<f64>().unwrap(), 0.0);
    let err = lillm_err(&["export", "hf", "--checkpoint", s(&run), "--out", s(&hf_dir)]);
    assert!(
        err.contains("not empty"),
        "an existing export is never overwritten: {err}"
    );

    // Weights that do not fit the config are refused by tensor name and shape.
    let config_path = hf_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(256);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let bad = dir.path().join("bad");
    let err = lillm_err(&["import", "hf", s(&hf_dir), "--out", s(&bad)]);
    assert!(
        err.contains("transformer_blocks.0.ffn.w")
            && err.contains("has shape")
            && err.contains("another config"),
        "{err}"
    );
    assert!(!bad.exists(), "nothing is written for a refused import");
}

/// The original lilLM forward pass (complex-number RoPE, repeated K/V, explicit mask) in
/// PyTorch, written from its documented semantics, as an independent reference.
const ORIGINAL_LILLM: &str = r#"
import json, math, sys, torch
import torch.nn.functional as F
from dataclasses import dataclass

@dataclass
class Config:
    vocab_size: int = 300
    d_model: int = 32
    n_layers: int = 2
    max_seq_len: int = 32
    q_heads: int = 4
    kv_heads: int = 2
    dropout: float = 0.0
    max_batch_size: int = 4
    hidden_dim: int = None
    multiple_of: int = 128
    eps: float = 1e-6

def rms(x, g, eps):
    return g * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

def forward(sd, c, ids):
    hd = c.d_model // c.q_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    cis = torch.polar(torch.ones(c.max_seq_len, hd // 2), torch.outer(torch.arange(c.max_seq_len).float(), freqs))
    B, T = ids.shape
    x = sd["tok_emb.weight"][ids]
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    def rope(t):
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(tc * cis[:T].view(1, T, 1, hd // 2)).flatten(3).type_as(t)
    for i in range(c.n_layers):
        p = f"transformer_blocks.{i}."
        h = rms(x, sd[p + "attn_norm.gain"], c.eps)
        q = (h @ sd[p + "attn.wq.weight"].T).view(B, T, c.q_heads, hd)
        k = (h @ sd[p + "attn.wk.weight"].T).view(B, T, c.kv_heads, hd)
        v = (h @ sd[p + "attn.wv.weight"].T).view(B, T, c.kv_heads, hd)
        q, k = rope(q), rope(k)
        rep = c.q_heads // c.kv_heads
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
        x = x + a.transpose(1, 2).reshape(B, T, -1) @ sd[p + "attn.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.gain"], c.eps)
        x = x + (F.silu(h @ sd[p + "ffn.w1.weight"].T) * (h @ sd[p + "ffn.w3.weight"].T)) @ sd[p + "ffn.w2.weight"].T
    x = rms(x, sd["norm.gain"], c.eps)
    return x @ sd["tok_emb.weight"].T
"#;

#[test]
fn original_lillm_checkpoint_imports_with_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let pt = dir.path().join("best_model.pt");
    let make = format!(
        "{ORIGINAL_LILLM}
torch.manual_seed(0)
c = Config()
hd = c.d_model // c.q_heads
hidden = 128  # 4*32 -> int(2/3*128)=85 -> rounded up to 128
sd = {{'tok_emb.weight': torch.randn(c.vocab_size, c.d_model) * 0.2}}
for i in range(c.n_layers):
    p = f'transformer_blocks.{{i}}.'
    sd[p + 'attn.wq.weight'] = torch.randn(c.q_heads * hd, c.d_model) * 0.2
    sd[p + 'attn.wk.weight'] = torch.randn(c.kv_heads * hd, c.d_model) * 0.2
    sd[p + 'attn.wv.weight'] = torch.randn(c.kv_heads * hd, c.d_model) * 0.2
    sd[p + 'attn.wo.weight'] = torch.randn(c.d_model, c.q_heads * hd) * 0.2
    sd[p + 'ffn.w1.weight'] = torch.randn(hidden, c.d_model) * 0.2
    sd[p + 'ffn.w2.weight'] = torch.randn(c.d_model, hidden) * 0.2
    sd[p + 'ffn.w3.weight'] = torch.randn(hidden, c.d_model) * 0.2
    sd[p + 'attn_norm.gain'] = 1 + 0.1 * torch.randn(c.d_model)
    sd[p + 'ffn_norm.gain'] = 1 + 0.1 * torch.randn(c.d_model)
sd['norm.gain'] = 1 + 0.1 * torch.randn(c.d_model)
sd['lm_head.weight'] = sd['tok_emb.weight']
compiled = {{'_orig_mod.' + k: v for k, v in sd.items()}}
torch.save({{'model': compiled, 'config': c, 'num_iter': 15000, 'best_val_loss': 3.1, 'optimizer': {{}}}}, sys.argv[1])
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    torch.save(forward(sd, c, ids), sys.argv[3])
"
    );
    let reference = dir.path().join("reference_logits.pt");
    python(&make, &[s(&pt), IDS, s(&reference)]);
    let ckpt = dir.path().join("imported");
    // As a user runs it from a plain shell: no LILLM_PYTHON, no .venv on PATH; the binary
    // finds the project's Python itself.
    let plain_path: Vec<_> = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .filter(|p| !p.starts_with(repo_root().join(".venv")))
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args([
            "import",
            "lillm-pt",
            s(&pt),
            "--out",
            s(&ckpt),
            "--tokenizer",
            s(&tiny.tokenizer),
        ])
        .env_remove("LILLM_PYTHON")
        .env("PATH", std::env::join_paths(plain_path).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = dir.path().join("ours.safetensors");
    our_logits(&ckpt, &ours);
    let diff = python(
        "import sys, torch\nfrom safetensors.torch import load_file\nprint((torch.load(sys.argv[1]) - load_file(sys.argv[2])['logits']).abs().max().item())",
        &[s(&reference), s(&ours)],
    );
    let diff: f64 = diff.trim().parse().unwrap();
    assert!(
        diff <= 1e-4,
        "max |logits diff| against the original semantics = {diff}"
    );
    // The imported checkpoint carries the tokenizer, so generation works from it directly.
    let text = lillm_ok(&[
        "generate",
        "--checkpoint",
        s(&ckpt),
        "--prompt",
        "the king",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    ]);
    assert!(text.starts_with("the king"), "{text}");

    let err = lillm_err(&[
        "import",
        "lillm-pt",
        s(&dir.path().join("missing.pt")),
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert!(err.contains("missing.pt"), "{err}");
}
