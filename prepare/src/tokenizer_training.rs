//! Training the byte-level BPE tokenizer on a corpus.

use std::path::Path;
use std::sync::{Arc, Mutex};

use lillm_data::tokenizer::{special_tokens, Tokenizer};
use lillm_data::{Error, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::corpus::{CorpusSpec, CorpusStats};

/// Options for training a tokenizer.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub show_progress: bool,
}

/// Trains a byte-level BPE tokenizer on the corpus and writes it to `out`.
pub fn train(corpus: &CorpusSpec, opts: &TrainOptions, out: &Path) -> Result<Tokenizer> {
    let specials = special_tokens();
    if opts.vocab_size < 256 + specials.len() {
        return Err(Error::Usage(format!(
            "--vocab-size {} is too small: it must hold the 256 byte symbols and the {} special tokens",
            opts.vocab_size,
            specials.len()
        )));
    }
    let trainer = BpeTrainerBuilder::new()
        .show_progress(opts.show_progress)
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut builder = TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(
            ByteLevel::default().add_prefix_space(false),
        )))
        .with_post_processor(None::<PostProcessorWrapper>)
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;

    let stats = Arc::new(CorpusStats::default());
    let first_error: Arc<Mutex<Option<Error>>> = Arc::default();
    let mut documents = 0usize;
    let docs = corpus.documents(stats)?.map_while(|doc| match doc {
        Ok(text) => {
            documents += 1;
            Some(text)
        }
        Err(e) => {
            *first_error.lock().expect("not poisoned") = Some(e);
            None
        }
    });
    builder
        .train(&mut trainer, docs)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    if let Some(e) = first_error.lock().expect("not poisoned").take() {
        return Err(e);
    }
    if documents == 0 {
        return Err(Error::Usage(
            "the corpus holds no text: every input file is empty".into(),
        ));
    }
    let tokenizer = Tokenizer::from_inner(builder.into(), out.join("tokenizer.json"));
    tokenizer.save_dir(out)?;
    Ok(tokenizer)
}
