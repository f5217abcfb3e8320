//! What a run trains on: token shards (pretraining), encoded conversations (SFT) or
//! preference pairs (DPO), behind one deterministic batch function.

use std::path::{Path, PathBuf};

use lillm_data::dpo::{self, PairData};
use lillm_data::epochs::{sequences_per_epoch, DataOrder};
use lillm_data::manifest::Split;
use lillm_data::sft::{self, SftData};
use lillm_data::shards::{train_windows, Batch, BatchKey, Dataset};
use lillm_data::tokenizer::Tokenizer;

use crate::config::{Objective, TrainConfig};
use crate::remote_data::RemoteData;
use crate::{Error, Result};

pub enum TrainData {
    Tokens(Box<Dataset>),
    Sft(SftData),
    Pairs(PairData),
    /// Token batches streamed by a dataloader actor.
    Remote(Box<RemoteData>),
}

/// What a micro-batch is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// One of the `micros_per_step` micro-batches of a training step, drawn in `order`; a
    /// rank streaming from a dataloader reads its own share of them.
    Train {
        micros_per_step: u64,
        order: DataOrder,
    },
    /// An evaluation batch (the only micro-batch of its step), which every rank reads whole,
    /// drawn in `order`: the train split's estimate in the job's order (so that with the
    /// exactly-once order it reads placed shards from their holders), the val split's in
    /// random windows.
    Eval { order: DataOrder },
}

impl Draw {
    pub fn micros_per_step(self) -> u64 {
        match self {
            Self::Train {
                micros_per_step, ..
            } => micros_per_step,
            Self::Eval { .. } => 1,
        }
    }
}

/// Inputs and targets (−1 = no loss) of a micro-batch, row-major (batch × seq). A batch of
/// preference pairs has 2 × batch rows: every chosen reply, then every rejected one.
pub struct MicroBatch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub rows: usize,
    pub seq: usize,
}

impl TrainData {
    /// Opens `cfg.data` for the configured objective. SFT encodes with `tokenizer` (the one
    /// the initial checkpoint carries) and keeps conversations shorter than `max_seq_len`.
    pub fn open(cfg: &TrainConfig, tokenizer: Option<&Path>, max_seq_len: usize) -> Result<Self> {
        match cfg.job.objective {
            Objective::Pretrain => {
                let options = cfg.process.store_options()?;
                let dir = lillm_store::local_dataset_blocking(&cfg.process.data, &options)?;
                Ok(Self::Tokens(Box::new(Dataset::open(&dir)?)))
            }
            Objective::Sft | Objective::Dpo => {
                let tok_path = tokenizer.ok_or_else(|| {
                    Error::Config(
                        "fine-tuning needs a tokenizer: start from a checkpoint that carries one (--init)"
                            .into(),
                    )
                })?;
                let tok = Tokenizer::load(tok_path)?;
                // A bucket URL names one JSONL object, fetched into this node's cache.
                let options = cfg.process.store_options()?;
                let data = &lillm_store::local_object_blocking(&cfg.process.data, &options)?;
                let fraction = cfg.job.val_fraction;
                let as_given = |e: lillm_data::Error| e.named_as(data, &cfg.process.data);
                Ok(match cfg.job.objective {
                    Objective::Dpo => Self::Pairs(
                        dpo::build(&tok, data, max_seq_len, fraction, cfg.job.seed)
                            .map_err(as_given)?,
                    ),
                    _ => Self::Sft(
                        sft::build(&tok, data, max_seq_len, fraction, cfg.job.seed)
                            .map_err(as_given)?,
                    ),
                })
            }
        }
    }

    /// Opens the data of a run that reads its own (SFT, DPO) as [`crate::Trainer`] does: with the
    /// initial checkpoint's tokenizer and context length. An evaluator beside the run uses
    /// it to read the same validation batches.
    pub fn open_like_trainer(cfg: &TrainConfig) -> Result<Self> {
        match &cfg.job.init_from {
            Some(init) => {
                let dir = crate::checkpoint::resolve(init)?;
                let state = crate::checkpoint::verify_checkpoint(&dir)?;
                Self::open(cfg, Some(&dir), state.model.max_seq_len)
            }
            None => Self::open(cfg, None, cfg.job.model_config()?.max_seq_len),
        }
    }

    /// Whether a dataloader actor serves this objective's batches; otherwise each trainer
    /// reads the data itself (batches are a pure function of the key either way).
    pub fn streamed(objective: Objective) -> bool {
        objective == Objective::Pretrain
    }

    pub fn tokenizer_fingerprint(&self) -> &str {
        match self {
            Self::Tokens(d) => &d.manifest.tokenizer_fingerprint,
            Self::Sft(d) => &d.tokenizer_fingerprint,
            Self::Pairs(d) => &d.tokenizer_fingerprint,
            Self::Remote(d) => &d.info.tokenizer_fingerprint,
        }
    }

    /// Largest token id + 1 the data can hold.
    pub fn vocab_size(&self) -> Option<usize> {
        match self {
            Self::Tokens(d) => Some(d.manifest.vocab_size),
            Self::Sft(_) | Self::Pairs(_) => None,
            Self::Remote(d) => Some(d.info.vocab_size as usize),
        }
    }

    pub fn has_val(&self) -> bool {
        match self {
            Self::Tokens(d) => !d.manifest.val.is_empty(),
            Self::Sft(d) => !d.val.is_empty(),
            Self::Pairs(d) => !d.val.is_empty(),
            Self::Remote(d) => d.info.val_tokens > 0,
        }
    }

    /// Sequences of `seq + 1` tokens in one epoch of the exactly-once order (token shards
    /// only).
    pub fn epoch_sequences(&self, seq: usize) -> Option<u64> {
        let window = seq as u64 + 1;
        match self {
            Self::Tokens(d) => Some(sequences_per_epoch(
                &d.split(Split::Train).shard_tokens(),
                window,
            )),
            Self::Remote(d) => Some(sequences_per_epoch(&d.info.train_shard_tokens, window)),
            Self::Sft(_) | Self::Pairs(_) => None,
        }
    }

    /// The tokenizer stored with the data (pretraining datasets keep theirs beside the shards).
    pub fn tokenizer_dir(&self) -> Option<PathBuf> {
        match self {
            Self::Tokens(d) => d
                .dir
                .join("tokenizer.json")
                .is_file()
                .then(|| d.dir.clone()),
            Self::Sft(_) | Self::Pairs(_) => None,
            Self::Remote(d) => d.tokenizer_dir(),
        }
    }

    /// The micro-batch for `key`: a pure function of the key and the data.
    pub fn batch(&self, key: BatchKey, draw: Draw, rows: usize, seq: usize) -> Result<MicroBatch> {
        let micros_per_step = draw.micros_per_step();
        let (inputs, targets) = match self {
            Self::Tokens(d) => {
                let (Draw::Train { order, .. } | Draw::Eval { order }) = draw;
                let windows = train_windows(d, order, key, micros_per_step, rows, seq)?;
                let b = Batch::from_windows(&windows, rows, seq);
                (b.inputs, b.targets)
            }
            Self::Sft(d) => {
                let examples = match key.split {
                    Split::Train => &d.train,
                    Split::Val => &d.val,
                };
                let idx = sft::batch_indices(
                    examples.len(),
                    key.seed,
                    key.step,
                    key.micro,
                    micros_per_step,
                    rows,
                );
                sft::sft_batch(examples, &idx, seq)
            }
            Self::Pairs(d) => {
                let pairs = match key.split {
                    Split::Train => &d.train,
                    Split::Val => &d.val,
                };
                let idx = sft::batch_indices(
                    pairs.len(),
                    key.seed,
                    key.step,
                    key.micro,
                    micros_per_step,
                    rows,
                );
                let chosen: Vec<_> = idx.iter().map(|&i| &pairs[i]).collect();
                let (inputs, targets, seq) = dpo::pair_batch(&chosen);
                return Ok(MicroBatch {
                    inputs,
                    targets,
                    rows: 2 * rows,
                    seq,
                });
            }
            Self::Remote(d) => return d.batch(key, draw, rows, seq),
        };
        Ok(MicroBatch {
            inputs,
            targets,
            rows,
            seq,
        })
    }

    /// One line describing the data for the run's start-up banner.
    pub fn describe(&self) -> String {
        match self {
            Self::Tokens(d) => format!(
                "{} train / {} val tokens",
                d.manifest.tokens(Split::Train),
                d.manifest.tokens(Split::Val)
            ),
            Self::Sft(d) => format!(
                "{} train / {} val conversations ({} filtered: ≥ {} tokens)",
                d.train.len(),
                d.val.len(),
                d.filtered_too_long,
                d.max_seq_len
            ),
            Self::Pairs(d) => format!(
                "{} train / {} val preference pairs ({} filtered as too long)",
                d.train.len(),
                d.val.len(),
                d.filtered_too_long
            ),
            Self::Remote(d) => format!(
                "{} train / {} val tokens streamed by a dataloader",
                d.info.train_tokens, d.info.val_tokens
            ),
        }
    }
}
