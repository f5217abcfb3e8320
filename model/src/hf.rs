//! Hugging Face interop — `LlamaForCausalLM` for dense models, `MixtralForCausalLM` for
//! Mixture-of-Experts ones: tensor renaming, the RoPE row permutation and `config.json`.
//!
//! lilLM rotates adjacent pairs (x[2i], x[2i+1]); Hugging Face Llama rotates x[i] with
//! x[i + hd/2]. Permuting the output rows of `wq` and `wk` inside each head maps one onto the
//! other, so attention scores — and logits — are identical.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tch::Tensor;

use crate::{Error, LoraConfig, ModelConfig, MoeConfig, Result};

/// Rows of a (heads·hd, d) projection from adjacent-pair order to half-split order.
fn pairs_to_halves(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.size2().expect("projection is 2-d");
    let hd = rows / heads as i64;
    w.view([heads as i64, hd / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}

/// The inverse of [`pairs_to_halves`].
fn halves_to_pairs(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.size2().expect("projection is 2-d");
    let hd = rows / heads as i64;
    w.view([heads as i64, 2, hd / 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}

/// (lilLM suffix, HF suffix) of each per-layer tensor every layer has.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("attn_norm.gain", "input_layernorm.weight"),
    ("ffn_norm.gain", "post_attention_layernorm.weight"),
];

/// (lilLM suffix, HF suffix) of a dense layer's feed-forward.
const DENSE_FFN_NAMES: &[(&str, &str)] = &[
    ("ffn.w1.weight", "mlp.gate_proj.weight"),
    ("ffn.w3.weight", "mlp.up_proj.weight"),
    ("ffn.w2.weight", "mlp.down_proj.weight"),
];

/// Our stacked experts (`moe.experts.wN`, (experts, out, in)) and Mixtral's per-expert
/// checkpoint names (`block_sparse_moe.experts.{j}.wN.weight`), the layout Mixtral
/// checkpoints are published in and every loader reads.
const EXPERT_WEIGHTS: &[&str] = &["w1", "w2", "w3"];

/// Refuses MoE shapes Mixtral cannot express.
fn check_mixtral(cfg: &ModelConfig) -> Result<()> {
    let Some(moe) = &cfg.moe else { return Ok(()) };
    if moe.shared_expert || moe.every != 1 {
        return Err(Error::Config(format!(
            "MixtralForCausalLM has no shared expert and a sparse feed-forward on every layer; this model has shared_expert = {} and moe.every = {}, so it cannot be exported",
            moe.shared_expert, moe.every
        )));
    }
    Ok(())
}

fn take(map: &mut BTreeMap<String, Tensor>, name: &str) -> Result<Tensor> {
    map.remove(name).ok_or_else(|| {
        Error::Config(format!(
            "tensor `{name}` is missing from the weights being converted"
        ))
    })
}

/// lilLM tensors → Hugging Face `LlamaForCausalLM` tensors (tied head, so no `lm_head.weight`).
pub fn to_hf(
    cfg: &ModelConfig,
    mut src: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    out.insert(
        "model.embed_tokens.weight".into(),
        take(&mut src, "tok_emb.weight")?,
    );
    out.insert("model.norm.weight".into(), take(&mut src, "norm.gain")?);
    check_mixtral(cfg)?;
    for i in 0..cfg.n_layers {
        let dense = if cfg.is_moe_layer(i) {
            &[][..]
        } else {
            DENSE_FFN_NAMES
        };
        for (ours, theirs) in LAYER_NAMES.iter().chain(dense) {
            let mut t = take(&mut src, &format!("transformer_blocks.{i}.{ours}"))?;
            if *ours == "attn.wq.weight" {
                t = pairs_to_halves(&t, cfg.q_heads);
            } else if *ours == "attn.wk.weight" {
                t = pairs_to_halves(&t, cfg.kv_heads);
            }
            out.insert(format!("model.layers.{i}.{theirs}"), t);
        }
        if cfg.is_moe_layer(i) {
            let ours = format!("transformer_blocks.{i}.moe");
            let theirs = format!("model.layers.{i}.block_sparse_moe");
            let router = take(&mut src, &format!("{ours}.router.weight"))?;
            out.insert(format!("{theirs}.gate.weight"), router);
            for w in EXPERT_WEIGHTS {
                let stacked = take(&mut src, &format!("{ours}.experts.{w}"))?;
                for (j, expert) in stacked.unbind(0).into_iter().enumerate() {
                    out.insert(format!("{theirs}.experts.{j}.{w}.weight"), expert);
                }
            }
        }
    }
    if let Some(extra) = src.keys().next() {
        return Err(Error::Config(format!(
            "unexpected tensor `{extra}` in a lilLM model"
        )));
    }
    Ok(out)
}

/// Hugging Face Llama tensors → lilLM tensors. The output head must be tied to the embedding.
pub fn from_hf(
    cfg: &ModelConfig,
    mut src: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let emb = take(&mut src, "model.embed_tokens.weight")?;
    if let Some(head) = src.remove("lm_head.weight") {
        let same = head.size() == emb.size() && head.allclose(&emb, 0.0, 0.0, false);
        if !same {
            return Err(Error::Config(
                "lm_head.weight differs from model.embed_tokens.weight; lilLM ties them, so an untied model cannot be imported".into(),
            ));
        }
    }
    out.insert("tok_emb.weight".into(), emb);
    out.insert("norm.gain".into(), take(&mut src, "model.norm.weight")?);
    check_mixtral(cfg)?;
    for i in 0..cfg.n_layers {
        let dense = if cfg.is_moe_layer(i) {
            &[][..]
        } else {
            DENSE_FFN_NAMES
        };
        for (ours, theirs) in LAYER_NAMES.iter().chain(dense) {
            let mut t = take(&mut src, &format!("model.layers.{i}.{theirs}"))?;
            if *ours == "attn.wq.weight" {
                t = halves_to_pairs(&t, cfg.q_heads);
            } else if *ours == "attn.wk.weight" {
                t = halves_to_pairs(&t, cfg.kv_heads);
            }
            out.insert(format!("transformer_blocks.{i}.{ours}"), t);
        }
        if let Some(moe) = cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(i)) {
            let experts = mixtral_experts(&mut src, i, moe.experts)?;
            let ours = format!("transformer_blocks.{i}.moe");
            out.insert(format!("{ours}.router.weight"), experts.router);
            for (w, stacked) in EXPERT_WEIGHTS.iter().zip(experts.stacked) {
                out.insert(format!("{ours}.experts.{w}"), stacked);
            }
        }
    }
    // Rotary tables are recomputed from the config; anything else is a different model.
    src.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if let Some(extra) = src.keys().next() {
        return Err(Error::Config(format!(
            "tensor `{extra}` has no lilLM counterpart (biases or another architecture?)"
        )));
    }
    Ok(out)
}

/// The Hugging Face module of our projection `{group}.{target}` (`attn.wq` →
/// `self_attn.q_proj`).
fn hf_module(group: &str, target: &str) -> Option<&'static str> {
    let ours = format!("{group}.{target}.weight");
    LAYER_NAMES
        .iter()
        .chain(DENSE_FFN_NAMES)
        .find(|(o, _)| *o == ours)
        .map(|(_, theirs)| theirs.trim_end_matches(".weight"))
}

/// Our LoRA adapter tensors (`transformer_blocks.{i}.attn.wq.lora_A` …) → PEFT's
/// `adapter_model.safetensors` for our Hugging Face export
/// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` …). B's rows of `wq`
/// and `wk` get the export's RoPE permutation, so B·A is the exported weight's update.
pub fn to_peft(
    cfg: &ModelConfig,
    src: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, t) in src {
        let unexpected = || Error::Config(format!("`{name}` is not a LoRA adapter tensor"));
        let parts: Vec<&str> = name.split('.').collect();
        let [_, layer, group, target, matrix] = parts[..] else {
            return Err(unexpected());
        };
        let module = hf_module(group, target).ok_or_else(unexpected)?;
        let t = match (target, matrix) {
            ("wq", "lora_B") => pairs_to_halves(&t, cfg.q_heads),
            ("wk", "lora_B") => pairs_to_halves(&t, cfg.kv_heads),
            (_, "lora_A" | "lora_B") => t,
            _ => return Err(unexpected()),
        };
        out.insert(
            format!("base_model.model.model.layers.{layer}.{module}.{matrix}.weight"),
            t,
        );
    }
    Ok(out)
}

/// PEFT's `adapter_config.json` for [`to_peft`]'s tensors.
pub fn peft_config(lora: &LoraConfig, base: &str) -> Value {
    // PEFT matches the module's last name: `q_proj`, `gate_proj` …
    let targets: Vec<&str> = lora
        .targets
        .iter()
        .filter_map(|t| hf_module("attn", t).or_else(|| hf_module("ffn", t)))
        .filter_map(|module| module.split('.').nth(1))
        .collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
    })
}

/// One Mixtral layer's router and its experts' w1, w2, w3, each stacked (experts, out, in).
struct MixtralExperts {
    router: Tensor,
    stacked: Vec<Tensor>,
}

/// Layer `i`'s experts, from the published per-expert layout
/// (`block_sparse_moe.experts.{j}.w1.weight` …) or from the fused one transformers 5 keeps
/// in memory (`mlp.experts.gate_up_proj`, (experts, 2·hidden, d), and `mlp.experts.down_proj`).
fn mixtral_experts(
    src: &mut BTreeMap<String, Tensor>,
    i: usize,
    experts: usize,
) -> Result<MixtralExperts> {
    let fused = format!("model.layers.{i}.mlp");
    if src.contains_key(&format!("{fused}.experts.gate_up_proj")) {
        let gate_up = take(src, &format!("{fused}.experts.gate_up_proj"))?;
        let hidden = gate_up.size()[1] / 2;
        return Ok(MixtralExperts {
            router: take(src, &format!("{fused}.gate.weight"))?,
            stacked: vec![
                gate_up.narrow(1, 0, hidden).contiguous(),
                take(src, &format!("{fused}.experts.down_proj"))?,
                gate_up.narrow(1, hidden, hidden).contiguous(),
            ],
        });
    }
    let theirs = format!("model.layers.{i}.block_sparse_moe");
    let router = take(src, &format!("{theirs}.gate.weight"))?;
    let stacked = EXPERT_WEIGHTS
        .iter()
        .map(|w| {
            let each = (0..experts)
                .map(|j| take(src, &format!("{theirs}.experts.{j}.{w}.weight")))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&each, 0))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MixtralExperts { router, stacked })
}

/// The `config.json` of an exported model: Llama's, or Mixtral's for an MoE model.
pub fn hf_config(cfg: &ModelConfig, bos_id: u32, eos_id: u32) -> Value {
    let mut v = llama_config(cfg, bos_id, eos_id);
    if let Some(moe) = &cfg.moe {
        let fields = json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": cfg.expert_hidden_dim(),
            "num_local_experts": moe.experts,
            "num_experts_per_tok": moe.experts_per_token,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": false,
            "router_jitter_noise": 0.0,
            "sliding_window": null,
        });
        let map = v.as_object_mut().expect("config is an object");
        for (k, val) in fields.as_object().expect("an object") {
            map.insert(k.clone(), val.clone());
        }
        for llama_only in ["attention_bias", "mlp_bias"] {
            map.remove(llama_only);
        }
    }
    v
}

fn llama_config(cfg: &ModelConfig, bos_id: u32, eos_id: u32) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden_dim(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.q_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": true,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    })
}

/// Reads a Hugging Face Llama or Mixtral `config.json` into a lilLM config, refusing what
/// lilLM lacks.
pub fn config_from_hf(v: &Value) -> Result<ModelConfig> {
    let get = |field: &str| -> Result<usize> {
        v.get(field)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| {
                Error::Config(format!(
                    "config.json: field `{field}` is missing or not an integer"
                ))
            })
    };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "llama" && model_type != "mixtral" {
        return Err(Error::Config(format!(
            "config.json: model_type is `{model_type}`; `llama` and `mixtral` can be imported"
        )));
    }
    if model_type == "mixtral" && v.get("sliding_window").is_some_and(|w| !w.is_null()) {
        return Err(Error::Config(
            "config.json: sliding_window is set; lilLM attends to the whole context".into(),
        ));
    }
    if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
        return Err(Error::Config(
            "config.json: rope_scaling is set; lilLM has plain RoPE only".into(),
        ));
    }
    let d_model = get("hidden_size")?;
    let q_heads = get("num_attention_heads")?;
    if let Ok(hd) = get("head_dim") {
        if hd * q_heads != d_model {
            return Err(Error::Config(format!(
                "config.json: head_dim {hd} × heads {q_heads} != hidden_size {d_model}; lilLM needs head_dim = hidden_size / heads"
            )));
        }
    }
    let moe = match model_type {
        "mixtral" => {
            let mut moe = MoeConfig::new(
                get("num_local_experts")?,
                get("num_experts_per_tok")?,
                Some(get("intermediate_size")?),
            );
            if let Some(coef) = v.get("router_aux_loss_coef").and_then(Value::as_f64) {
                moe.aux_loss_coef = coef;
            }
            Some(moe)
        }
        _ => None,
    };
    let cfg = ModelConfig {
        vocab_size: get("vocab_size")?,
        d_model,
        n_layers: get("num_hidden_layers")?,
        max_seq_len: get("max_position_embeddings")?,
        q_heads,
        kv_heads: get("num_key_value_heads").unwrap_or(q_heads),
        hidden_dim: moe
            .is_none()
            .then(|| get("intermediate_size"))
            .transpose()?,
        multiple_of: 128,
        eps: v
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6),
        rope_theta: v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0),
        dropout: 0.0,
        moe,
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_round_trips() {
        let w = Tensor::randn([4 * 8, 6], (tch::Kind::Float, tch::Device::Cpu));
        let back = halves_to_pairs(&pairs_to_halves(&w, 4), 4);
        assert!(back.equal(&w));
        // Row 1 of a head (the odd element of pair 0) moves to position hd/2 = 4.
        let moved = pairs_to_halves(&w, 4);
        assert!(moved.get(4).equal(&w.get(1)));
    }
}
