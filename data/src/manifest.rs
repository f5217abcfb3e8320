//! `manifest.json` of a prepared dataset: what the shards hold and how to check them.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "lillm-tokens/v1";

/// Token width on disk, recorded so that a reader never guesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// u16 while every id fits, u32 above.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
    pub documents: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub tokenizer_fingerprint: String,
    pub vocab_size: usize,
    pub dtype: TokenDtype,
    pub eos_id: u32,
    /// Identifies the inputs and options; a rerun with the same signature has nothing to do.
    pub signature: String,
    pub val_fraction: f64,
    pub seed: u64,
    pub train: Vec<ShardInfo>,
    pub val: Vec<ShardInfo>,
    pub bad_records_skipped: u64,
    pub input_bytes: u64,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::invalid(
                &path,
                "no manifest: this is not a prepared dataset (run `lillm data prepare`), or its preparation did not finish",
            ),
            _ => Error::io(&path, e),
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(&path, format!("malformed manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(Error::invalid(
                &path,
                format!(
                    "format `{}` is not `{FORMAT}`; re-run `lillm data prepare`",
                    manifest.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// Writes the manifest atomically (temp file + rename), so it is whole or absent.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    /// Names the train split's content: a hash of its shards' checksums and sizes in order,
    /// so two copies of one dataset (a directory, its bucket) share it and nothing else does.
    pub fn train_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for shard in &self.train {
            hash.update(shard.sha256.as_bytes());
            hash.update(shard.tokens.to_le_bytes());
        }
        hex::encode(&hash.finalize()[..8])
    }

    pub fn tokens(&self, split: Split) -> u64 {
        self.shards(split).iter().map(|s| s.tokens).sum()
    }

    pub fn shards(&self, split: Split) -> &[ShardInfo] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}
