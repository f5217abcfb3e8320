//! Loading a checkpoint for inference, evaluation or export.

use std::path::{Path, PathBuf};

use lillm_data::tokenizer::Tokenizer;
use lillm_model::{weights, LilLM};
use tch::nn::VarStore;

use crate::{CheckpointState, Error, Result, MODEL_FILE};

/// A verified checkpoint with its model built and weights loaded.
pub struct LoadedModel {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub vs: VarStore,
    pub model: LilLM,
    pub tokenizer: Option<Tokenizer>,
}

impl LoadedModel {
    /// Loads `path` (a checkpoint, or a run directory meaning its latest checkpoint). A
    /// LoRA checkpoint loads its base (by the path it records) with the adapters merged in.
    pub fn load(path: &Path, device: tch::Device) -> Result<Self> {
        let dir = crate::resolve(path)?;
        let state = crate::verify_checkpoint(&dir)?;
        if let Some(lora) = &state.lora {
            if !lora.base.exists() {
                return Err(Error::checkpoint(
                    &dir,
                    format!(
                        "holds LoRA adapters for the base checkpoint {}, which is gone; pass the base with --checkpoint and this adapter with --lora",
                        lora.base.display()
                    ),
                ));
            }
            return Self::adapted(&lora.base.clone(), dir, state, device);
        }
        let vs = VarStore::new(device);
        let model = LilLM::for_loading(&vs.root(), &state.model)?;
        weights::load_var_store(&vs, &dir.join(MODEL_FILE))?;
        let tokenizer = tokenizer_in(&dir, state.model.vocab_size)?;
        Ok(Self {
            dir,
            state,
            vs,
            model,
            tokenizer,
        })
    }

    /// The base checkpoint `base` with the LoRA adapters of checkpoint `adapter` merged into
    /// its weights; refused unless the adapters were trained on exactly this base.
    pub fn load_adapted(base: &Path, adapter: &Path, device: tch::Device) -> Result<Self> {
        let dir = crate::resolve(adapter)?;
        let state = crate::verify_checkpoint(&dir)?;
        Self::adapted(base, dir, state, device)
    }

    /// [`Self::load_adapted`] of an adapter checkpoint already verified.
    fn adapted(
        base: &Path,
        adapter_dir: PathBuf,
        state: CheckpointState,
        device: tch::Device,
    ) -> Result<Self> {
        let Some(lora) = &state.lora else {
            return Err(Error::checkpoint(
                &adapter_dir,
                "holds a whole model, not LoRA adapters; load it with --checkpoint",
            ));
        };
        let mut loaded = Self::load(base, device)?;
        lora.check_base(&loaded.dir)?;
        let adapters = VarStore::new(device);
        loaded.model.attach_lora(&adapters.root(), &lora.config)?;
        weights::load_var_store(&adapters, &adapter_dir.join(MODEL_FILE))?;
        loaded.model.merge_lora();
        if let Some(tok) = tokenizer_in(&adapter_dir, state.model.vocab_size)? {
            loaded.tokenizer = Some(tok);
        }
        loaded.dir = adapter_dir;
        loaded.state = state;
        Ok(loaded)
    }

    /// Computes in `kind` for inference, the weights stored in it (the same logits as
    /// casting them at each use) and each layer's projections joined
    /// ([`LilLM::hold_for_inference`]).
    pub fn set_inference_kind(&mut self, kind: tch::Kind) {
        self.model.hold_for_inference(&mut self.vs, kind);
    }

    /// The checkpoint's tokenizer, or an error saying how to attach one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::checkpoint(
                &self.dir,
                "has no tokenizer.json; re-import it with --tokenizer PATH",
            )
        })
    }
}

/// The checkpoint's `tokenizer.json`, if it has one, checked against the model's vocabulary.
fn tokenizer_in(dir: &Path, model_vocab: usize) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    let tok = Tokenizer::load(&path)?;
    check_vocab(&tok, model_vocab)?;
    Ok(Some(tok))
}

/// A tokenizer can drive a model only if all its ids are rows of the embedding.
pub fn check_vocab(tok: &Tokenizer, model_vocab: usize) -> Result<()> {
    if tok.vocab_size() > model_vocab {
        return Err(Error::TokenizerMismatch(format!(
            "tokenizer {} has {} tokens but the model's vocab_size is {model_vocab}; use the tokenizer the model was trained with",
            tok.path.display(),
            tok.vocab_size()
        )));
    }
    Ok(())
}
