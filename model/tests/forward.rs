//! The forward pass: incremental decoding with the KV cache gives the logits of a full
//! forward pass (dense and Mixture of Experts), attention is causal, and the parameter
//! names mirror the original model.

use lillm_model::{KvCache, LilLM, ModelConfig, MoeConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 97;
    cfg.d_model = 32;
    cfg.n_layers = 2;
    cfg.max_seq_len = 24;
    cfg
}

/// `tiny` with 4 experts of hidden size 48, top-2, on every layer.
fn tiny_moe() -> ModelConfig {
    ModelConfig {
        moe: Some(MoeConfig::new(4, 2, Some(48))),
        ..tiny()
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    kv_cache_decoding_matches_full_forward_of(tiny());
}

#[test]
fn moe_kv_cache_decoding_matches_full_forward() {
    kv_cache_decoding_matches_full_forward_of(tiny_moe());
}

fn kv_cache_decoding_matches_full_forward_of(cfg: ModelConfig) {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let model = LilLM::new(&vs.root(), &cfg).unwrap();
    let ids = Tensor::randint(97, [1, 12], (Kind::Int64, Device::Cpu));
    let full = tch::no_grad(|| model.forward(&ids, false));
    let mut cache = KvCache::new(&cfg, 1, Kind::Float, Device::Cpu);
    tch::no_grad(|| {
        // A 5-token prompt, a 3-token chunk after it, then one token at a time.
        let mut pos = 0;
        for len in [5, 3, 1, 1, 1, 1] {
            let last = model.forward_cached(&ids.narrow(1, pos, len), &mut cache);
            pos += len;
            let want = full.select(1, pos - 1);
            let diff = (last - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "position {pos}: diff {diff}");
        }
    });
    assert_eq!(cache.len(), 12);
}

#[test]
fn attention_is_causal() {
    tch::manual_seed(4);
    let cfg = tiny();
    let vs = VarStore::new(Device::Cpu);
    let model = LilLM::new(&vs.root(), &cfg).unwrap();
    let a = Tensor::randint(97, [1, 10], (Kind::Int64, Device::Cpu));
    let b = a.copy();
    let _ = b.narrow(1, 6, 4).fill_(5);
    let (la, lb) = tch::no_grad(|| (model.forward(&a, false), model.forward(&b, false)));
    let prefix = (la.narrow(1, 0, 6) - lb.narrow(1, 0, 6))
        .abs()
        .max()
        .double_value(&[]);
    assert_eq!(
        prefix, 0.0,
        "changing later tokens leaves earlier logits alone"
    );
    let later = (la.narrow(1, 6, 4) - lb.narrow(1, 6, 4))
        .abs()
        .max()
        .double_value(&[]);
    assert!(later > 0.0);
}

#[test]
fn parameters_are_named_and_initialised_like_the_original() {
    tch::manual_seed(5);
    let cfg = ModelConfig::preset("lillm-39m").unwrap();
    let vs = VarStore::new(Device::Cpu);
    LilLM::new(&vs.root(), &cfg).unwrap();
    let vars = vs.variables();
    let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
    assert_eq!(total as usize, cfg.num_params());
    assert_eq!(total, 39_596_544);
    let shape = |n: &str| vars[n].size();
    assert_eq!(shape("tok_emb.weight"), [8192, 512]);
    assert_eq!(shape("transformer_blocks.0.attn.wk.weight"), [256, 512]);
    assert_eq!(shape("transformer_blocks.11.ffn.w1.weight"), [1408, 512]);
    assert_eq!(shape("norm.gain"), [512]);
    let std = |n: &str| vars[n].std(true).double_value(&[]);
    assert!((std("transformer_blocks.0.attn.wq.weight") - 512f64.powf(-0.5)).abs() < 2e-3);
    let out_std = 0.02 / (24f64).sqrt();
    assert!((std("transformer_blocks.3.ffn.w2.weight") - out_std).abs() < 2e-4);
    assert!((std("transformer_blocks.3.attn.wo.weight") - out_std).abs() < 2e-4);
    assert_eq!(vars["norm.gain"].sum(Kind::Float).double_value(&[]), 512.0);
}
