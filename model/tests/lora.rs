//! LoRA adapters: a fresh adapter leaves the model unchanged, gradients reach only the
//! adapters of a frozen base, and merging gives the adapted model's logits.

use lillm_model::{LilLM, LoraConfig, ModelConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 97;
    cfg.d_model = 32;
    cfg.n_layers = 2;
    cfg.max_seq_len = 24;
    cfg
}

#[test]
fn adapters_start_as_the_base_train_alone_and_merge_exactly() {
    tch::manual_seed(5);
    let cfg = tiny();
    let mut base_vs = VarStore::new(Device::Cpu);
    let mut model = LilLM::new(&base_vs.root(), &cfg).unwrap();
    base_vs.freeze();
    let ids = Tensor::randint(97, [2, 10], (Kind::Int64, Device::Cpu));
    let before = tch::no_grad(|| model.forward(&ids, false));
    let lora_vs = VarStore::new(Device::Cpu);
    let mut lora = LoraConfig::new(4);
    lora.targets = vec!["wq".into(), "wv".into(), "w2".into()];
    model.attach_lora(&lora_vs.root(), &lora).unwrap();
    let names: Vec<String> = lora_vs.variables().into_keys().collect();
    assert_eq!(names.len(), 2 * 3 * 2, "{names:?}");
    assert!(names.contains(&"transformer_blocks.1.attn.wv.lora_B".to_string()));
    assert!(names.contains(&"transformer_blocks.0.ffn.w2.lora_A".to_string()));
    let fresh = tch::no_grad(|| model.forward(&ids, false));
    assert!(
        fresh.equal(&before),
        "B starts at zero: the base model exactly"
    );

    // A backward pass reaches the adapters only.
    model.forward(&ids, false).sum(Kind::Float).backward();
    assert!(base_vs
        .variables()
        .values()
        .all(|v| !v.grad().defined() || v.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0));
    let b = &lora_vs.variables()["transformer_blocks.0.attn.wq.lora_B"];
    assert!(b.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);

    // Trained adapters (here: random B) change the logits; merging keeps them.
    tch::no_grad(|| {
        for (name, mut v) in lora_vs.variables() {
            if name.ends_with("lora_B") {
                let _ = v.normal_(0.0, 0.05);
            }
        }
    });
    let adapted = tch::no_grad(|| model.forward(&ids, false));
    assert!((&adapted - &before).abs().max().double_value(&[]) > 1e-3);
    model.merge_lora();
    let merged = tch::no_grad(|| model.forward(&ids, false));
    let diff = (&merged - &adapted).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "merged differs by {diff}");

    let mut bad = LoraConfig::new(4);
    bad.targets = vec!["wz".into()];
    let err = model
        .attach_lora(&lora_vs.root(), &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown lora target `wz`"), "{err}");
}
