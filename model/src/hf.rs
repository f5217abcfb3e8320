//! Hugging Face Llama interop: tensor renaming, the RoPE row permutation and `config.json`.
//!
//! lilLM rotates adjacent pairs (x[2i], x[2i+1]); Hugging Face Llama rotates x[i] with
//! x[i + hd/2]. Permuting the output rows of `wq` and `wk` inside each head maps one onto the
//! other, so attention scores — and logits — are identical.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tch::Tensor;

use crate::{Error, ModelConfig, Result};

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

/// (lilLM suffix, HF suffix) of each per-layer tensor.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("ffn.w1.weight", "mlp.gate_proj.weight"),
    ("ffn.w3.weight", "mlp.up_proj.weight"),
    ("ffn.w2.weight", "mlp.down_proj.weight"),
    ("attn_norm.gain", "input_layernorm.weight"),
    ("ffn_norm.gain", "post_attention_layernorm.weight"),
];

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
    for i in 0..cfg.n_layers {
        for (ours, theirs) in LAYER_NAMES {
            let mut t = take(&mut src, &format!("transformer_blocks.{i}.{ours}"))?;
            if *ours == "attn.wq.weight" {
                t = pairs_to_halves(&t, cfg.q_heads);
            } else if *ours == "attn.wk.weight" {
                t = pairs_to_halves(&t, cfg.kv_heads);
            }
            out.insert(format!("model.layers.{i}.{theirs}"), t);
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
    for i in 0..cfg.n_layers {
        for (ours, theirs) in LAYER_NAMES {
            let mut t = take(&mut src, &format!("model.layers.{i}.{theirs}"))?;
            if *ours == "attn.wq.weight" {
                t = halves_to_pairs(&t, cfg.q_heads);
            } else if *ours == "attn.wk.weight" {
                t = halves_to_pairs(&t, cfg.kv_heads);
            }
            out.insert(format!("transformer_blocks.{i}.{ours}"), t);
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

/// The `config.json` of an exported model.
pub fn hf_config(cfg: &ModelConfig, bos_id: u32, eos_id: u32) -> Value {
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

/// Reads a Hugging Face Llama `config.json` into a lilLM config, refusing what lilLM lacks.
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
    if model_type != "llama" {
        return Err(Error::Config(format!(
            "config.json: model_type is `{model_type}`, only `llama` can be imported"
        )));
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
    let cfg = ModelConfig {
        vocab_size: get("vocab_size")?,
        d_model,
        n_layers: get("num_hidden_layers")?,
        max_seq_len: get("max_position_embeddings")?,
        q_heads,
        kv_heads: get("num_key_value_heads").unwrap_or(q_heads),
        hidden_dim: Some(get("intermediate_size")?),
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
