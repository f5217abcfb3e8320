//! The byte-level BPE tokenizer: loading, encoding, fingerprinting, Hugging Face config
//! files. Training one is offline preparation (`lillm-prepare`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The 16 special tokens, ids 0..16 in this order.
pub fn special_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend((0..13).map(|i| format!("<r{i}>")));
    tokens
}

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// The chat template of SPEC §6 in Jinja, as `transformers` applies it. System turns render
/// like user turns with the role name `system`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<r0>assistant<r1>' + message['content'] + '</s>' }}{% else %}{{ '<r0>' + message['role'] + '<r1>' + message['content'] + '</r2>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<r0>assistant<r1>' }}{% endif %}";

/// A token's `(start, end)` byte offsets in the encoded text.
pub type ByteRange = (usize, usize);

/// A loaded tokenizer and where it came from.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` it was read from.
    pub path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

/// `DIR/tokenizer.json` for a directory, the path itself for a file.
pub fn tokenizer_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

impl Tokenizer {
    /// A tokenizer built in memory (a freshly trained one), to be saved at `path`.
    pub fn from_inner(inner: tokenizers::Tokenizer, path: PathBuf) -> Self {
        Self { inner, path }
    }

    /// Loads a `tokenizer.json`, or the one inside a directory.
    pub fn load(path: &Path) -> Result<Self> {
        let file = tokenizer_file(path);
        if !file.is_file() {
            return Err(Error::invalid(
                &file,
                "tokenizer not found; pass a tokenizer.json or a directory holding one (train one with `lillm tokenizer train`)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::invalid(&file, format!("not a valid tokenizer.json: {e}")))?;
        Ok(Self { inner, path: file })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text; special tokens written in the text (`</s>`, `<r0>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text, returning ids and each token's byte range `(start, end)` in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Decodes ids, keeping special tokens in the text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// SHA-256 of the canonical serialisation: equal for equal tokenizers wherever they live.
    pub fn fingerprint(&self) -> Result<String> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(hex::encode(Sha256::digest(json.as_bytes())))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = dir.join("tokenizer.json");
        self.inner
            .save(&file, true)
            .map_err(|e| Error::invalid(&file, e.to_string()))?;
        write_tokenizer_config(dir)
    }
}

/// `tokenizer_config.json` for `transformers.AutoTokenizer` (a `PreTrainedTokenizerFast`).
pub fn write_tokenizer_config(dir: &Path) -> Result<()> {
    let specials = special_tokens();
    let decoder: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, content)| {
            (
                id.to_string(),
                json!({"content": content, "lstrip": false, "normalized": false,
                       "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    let config = json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000_i64,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    });
    let path = dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&config).expect("static json");
    fs::write(&path, text).map_err(|e| Error::io(&path, e))
}
