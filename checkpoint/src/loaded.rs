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
    /// Loads `path` (a checkpoint, or a run directory meaning its latest checkpoint).
    pub fn load(path: &Path, device: tch::Device) -> Result<Self> {
        let dir = crate::resolve(path)?;
        let state = crate::verify_checkpoint(&dir)?;
        let vs = VarStore::new(device);
        let model = LilLM::for_loading(&vs.root(), &state.model)?;
        weights::load_var_store(&vs, &dir.join(MODEL_FILE))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            let tok = Tokenizer::load(&tok_path)?;
            check_vocab(&tok, state.model.vocab_size)?;
            Some(tok)
        } else {
            None
        };
        Ok(Self {
            dir,
            state,
            vs,
            model,
            tokenizer,
        })
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
