//! What a run's model is built from and loads: its shape and adapters (from the checkpoint
//! it resumes, else the initial checkpoint, else the config), the initial checkpoint's
//! weights (a fine-tune's start, DPO's frozen reference, LoRA's frozen base), and a resumed
//! checkpoint's weights and optimizer state.

use std::path::{Path, PathBuf};

use lillm_model::{weights, LoraConfig, ModelConfig};
use tch::nn::VarStore;
use tch::Device;

use crate::checkpoint::{self, CheckpointState, LoraBase, MODEL_FILE, OPTIMIZER_FILE};
use crate::config::{Objective, TrainConfig};
use crate::optim::AdamW;
use crate::{Error, LoadedModel, Result};

/// The model a run builds.
pub(crate) struct ModelSource {
    pub model_cfg: ModelConfig,
    pub lora: Option<LoraConfig>,
    /// The initial checkpoint (`init_from`), loaded when the run needs it.
    pub init: Option<LoadedModel>,
    /// A checkpoint directory whose tokenizer the data may fall back on.
    pub checkpoint_tokenizer: Option<PathBuf>,
}

/// Whether a run loads its initial checkpoint: a fresh one starts from its weights; a
/// resumed one has its own weights but DPO keeps the initial model as its reference and
/// LoRA as the base its adapters add to.
pub(crate) fn loads_init(has_init_from: bool, resumed: bool, dpo: bool, lora: bool) -> bool {
    has_init_from && (!resumed || dpo || lora)
}

/// The model `cfg` trains, resuming `resume_from` (already verified).
pub(crate) fn choose(
    cfg: &TrainConfig,
    resume_from: Option<&(PathBuf, CheckpointState)>,
    device: Device,
) -> Result<ModelSource> {
    let lora = lora_config(cfg, resume_from)?;
    let dpo = cfg.job.objective == Objective::Dpo;
    let init = match &cfg.job.init_from {
        Some(path) if loads_init(true, resume_from.is_some(), dpo, lora.is_some()) => {
            // `init_from` may name a bucket; the config keeps the URL (every node's is the same).
            let local = lillm_store::local_checkpoint(path, &cfg.process.store_options()?)?;
            Some(LoadedModel::load(&local, device)?)
        }
        _ => None,
    };
    let model_cfg = match (resume_from, &init) {
        (Some((_, state)), _) => state.model.clone(),
        // Fine-tuning may change the dropout alone.
        (None, Some(loaded)) => ModelConfig {
            dropout: cfg.job.model.dropout.unwrap_or(loaded.state.model.dropout),
            ..loaded.state.model.clone()
        },
        (None, None) => cfg.job.model_config()?,
    };
    cfg.job.check_against_model(&model_cfg)?;
    let checkpoint_tokenizer = match (resume_from, &init) {
        (Some((dir, _)), _) => Some(dir.clone()),
        (None, Some(loaded)) => loaded.tokenizer.is_some().then(|| loaded.dir.clone()),
        (None, None) => None,
    };
    Ok(ModelSource {
        model_cfg,
        lora,
        init,
        checkpoint_tokenizer,
    })
}

/// The adapters a run trains: the config's, or those of the checkpoint it resumes (which
/// the config may not contradict).
pub(crate) fn lora_config(
    cfg: &TrainConfig,
    resume_from: Option<&(PathBuf, CheckpointState)>,
) -> Result<Option<LoraConfig>> {
    let resumed = resume_from.map(|(dir, state)| (dir, state.lora.as_ref().map(|l| &l.config)));
    match (resumed, &cfg.job.lora) {
        (Some((dir, Some(trained))), Some(asked)) if trained != asked => Err(Error::checkpoint(
            dir,
            format!("holds LoRA adapters {trained:?}, not the {asked:?} asked for; resume with the same --lora-* flags"),
        )),
        (Some((dir, None)), Some(_)) => Err(Error::checkpoint(
            dir,
            "was not trained with LoRA; resume it without --lora-rank",
        )),
        (Some((_, trained)), _) => Ok(trained.cloned()),
        (None, asked) => Ok(asked.clone()),
    }
}

/// Loads the resumed checkpoint `dir` into the trained weights and the optimizer, once it
/// is known to come from data of the same tokenizer.
pub(crate) fn load_resumed(
    dir: &Path,
    state: &CheckpointState,
    trained: &VarStore,
    opt: &mut AdamW,
    data_fingerprint: &str,
) -> Result<()> {
    if state.dataset_fingerprint.as_deref() != Some(data_fingerprint) {
        return Err(Error::checkpoint(
            dir,
            "was trained on data from another tokenizer than --data; resume with the same dataset",
        ));
    }
    weights::load_var_store(trained, &dir.join(MODEL_FILE))?;
    let opt_state = weights::read_tensors(&dir.join(OPTIMIZER_FILE))?;
    opt.load_state_tensors(&opt_state, dir)?;
    tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
    Ok(())
}

/// Loads the initial checkpoint `init` where the run keeps it: with LoRA into the frozen
/// base (a resumed run's adapters must have been trained on that very base), else, in a
/// fresh run, into the trained weights. Returns the base a LoRA run records.
pub(crate) fn load_initial(
    lora: Option<&LoraConfig>,
    init: Option<&LoadedModel>,
    frozen_base: Option<&VarStore>,
    trained: &VarStore,
    resume_from: Option<&(PathBuf, CheckpointState)>,
) -> Result<Option<LoraBase>> {
    match (lora, init) {
        (Some(config), Some(base)) => {
            let (_, base_sha256) = checkpoint::sha256_file(&base.dir.join(MODEL_FILE))?;
            let lora_base = LoraBase {
                config: config.clone(),
                base: base
                    .dir
                    .canonicalize()
                    .map_err(|e| Error::io(&base.dir, e))?,
                base_sha256,
            };
            if let Some((dir, state)) = resume_from {
                if let Some(trained_on) = &state.lora {
                    trained_on
                        .check_base_sha(&base.dir, &lora_base.base_sha256)
                        .map_err(|e| Error::checkpoint(dir, format!("resume refused: {e}")))?;
                }
            }
            let frozen = frozen_base.expect("a LoRA run has a frozen base");
            weights::load_into(frozen, &weights::var_store_tensors(&base.vs), &base.dir)?;
            Ok(Some(lora_base))
        }
        (None, Some(loaded)) if resume_from.is_none() => {
            weights::load_into(
                trained,
                &weights::var_store_tensors(&loaded.vs),
                &loaded.dir,
            )?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::loads_init;

    #[test]
    fn a_fresh_run_starts_from_its_initial_checkpoint() {
        assert!(loads_init(true, false, false, false));
        assert!(!loads_init(false, false, false, false));
    }

    #[test]
    fn a_resumed_run_reloads_it_only_as_a_reference_or_a_base() {
        assert!(!loads_init(true, true, false, false), "its own weights");
        assert!(loads_init(true, true, true, false), "DPO's reference");
        assert!(loads_init(true, true, false, true), "LoRA's base");
        assert!(!loads_init(false, true, true, true), "nothing named");
    }
}
