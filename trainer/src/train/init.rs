//! The model's initial weights: a function of the seed alone, whatever the device.
//!
//! CPU and CUDA generators draw different numbers from the same seed, so a model built on the
//! GPU would start elsewhere than the same run on a CPU: its losses could not be compared with
//! a CPU rehearsal, and a run could not move between device types. The weights are therefore
//! always drawn on the CPU generator and copied to the device.

use lillm_model::{LilLM, LoraConfig, ModelConfig};
use tch::{nn::VarStore, Device};

use crate::Result;

/// A freshly initialised model on its device.
pub(crate) struct Initial {
    pub model: LilLM,
    /// What the optimizer trains: the model's weights, or the LoRA adapters alone.
    pub trained: VarStore,
    /// With LoRA, the model's own weights, frozen.
    pub frozen_base: Option<VarStore>,
}

/// Builds the model (and its LoRA adapters) on `device` with the weights `seed` draws on the
/// CPU generator.
pub(crate) fn initial_model(
    cfg: &ModelConfig,
    lora: Option<&LoraConfig>,
    seed: u64,
    device: Device,
) -> Result<Initial> {
    let mut built = build(cfg, lora, seed, device)?;
    if device != Device::Cpu {
        let drawn = build(cfg, lora, seed, Device::Cpu)?;
        built.trained.copy(&drawn.trained)?;
        if let (Some(base), Some(drawn_base)) = (&mut built.frozen_base, &drawn.frozen_base) {
            base.copy(drawn_base)?;
        }
    }
    Ok(built)
}

fn build(
    cfg: &ModelConfig,
    lora: Option<&LoraConfig>,
    seed: u64,
    device: Device,
) -> Result<Initial> {
    tch::manual_seed(seed as i64);
    let mut weights = VarStore::new(device);
    let mut model = LilLM::new(&weights.root(), cfg)?;
    let Some(lora) = lora else {
        return Ok(Initial {
            model,
            trained: weights,
            frozen_base: None,
        });
    };
    weights.freeze();
    let adapters = VarStore::new(device);
    model.attach_lora(&adapters.root(), lora)?;
    Ok(Initial {
        model,
        trained: adapters,
        frozen_base: Some(weights),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap()
    }

    fn weights(vs: &VarStore) -> Vec<(String, Vec<f32>)> {
        let mut named: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
                (name, values)
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    #[test]
    fn the_seed_alone_decides_the_weights_and_adapters() {
        let lora = LoraConfig::new(4);
        let a = initial_model(&tiny(), Some(&lora), 5, Device::Cpu).unwrap();
        // Other draws in between (a dropout mask, another model) change nothing.
        let _ = tch::Tensor::randn([1000], (tch::Kind::Float, Device::Cpu));
        let b = initial_model(&tiny(), Some(&lora), 5, Device::Cpu).unwrap();
        let c = initial_model(&tiny(), Some(&lora), 6, Device::Cpu).unwrap();
        assert_eq!(weights(&a.trained), weights(&b.trained));
        let (base_a, base_b) = (a.frozen_base.unwrap(), b.frozen_base.unwrap());
        assert_eq!(weights(&base_a), weights(&base_b));
        assert_ne!(weights(&a.trained), weights(&c.trained));
        let frozen = base_a.variables().values().all(|t| !t.requires_grad());
        assert!(frozen, "the base is frozen");
    }
}
