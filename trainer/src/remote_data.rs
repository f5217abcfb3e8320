//! Training data streamed from a dataloader actor: the same batches, key for key, as
//! reading the dataset locally (the dataloader runs the same sampler), one stream per shape.
//! With the exactly-once order and a coordinator that placed the shards, each micro-batch
//! is read from the dataloaders holding its shards instead.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lillm_data::epochs::{DataOrder, EpochOrder};
use lillm_data::manifest::Split;
use lillm_data::shards::{Batch, BatchKey};
use lillm_dataloader::placed::{PlacedBatches, PlacedReader};
use lillm_dataloader::remote::{Locate, RemoteBatches, StreamShape, StreamSource};
use lillm_proto::v1 as pb;
use tokio::runtime::Handle;

use crate::data::{Draw, MicroBatch};
use crate::{Error, Result};

pub struct RemoteData {
    pub info: pb::DatasetInfo,
    rt: Handle,
    source: StreamSource,
    /// The training micro-batches this rank takes: `start .. start + count` of each step.
    train_micros: (u32, u32),
    streams: Mutex<HashMap<StreamShape, RemoteBatches>>,
    /// Where the coordinator placed the shards (`None`: it placed none; stream instead).
    placed: Option<Arc<PlacedReader>>,
    placed_batches: Mutex<HashMap<StreamShape, PlacedBatches>>,
    tokenizer_dir: Option<PathBuf>,
}

impl RemoteData {
    /// Asks the dataloader what it serves. With `tokenizer_dir`, the dataset's tokenizer is
    /// written there so checkpoints can carry it.
    pub fn connect(
        rt: Handle,
        source: StreamSource,
        train_micros: (u32, u32),
        tokenizer_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let info = rt.block_on(source.describe())?;
        let tokenizer_dir = match (tokenizer_dir, info.tokenizer_json.is_empty()) {
            (Some(dir), false) => {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let file = dir.join("tokenizer.json");
                std::fs::write(&file, &info.tokenizer_json).map_err(|e| Error::io(&file, e))?;
                Some(dir)
            }
            _ => None,
        };
        let placed = match &source.locate {
            Locate::Coordinator {
                client, job_token, ..
            } => rt
                .block_on(PlacedReader::connect(
                    client.clone(),
                    job_token,
                    source.settings.clone(),
                    source.policy,
                    info.train_shard_tokens.len(),
                ))?
                .map(Arc::new),
            Locate::Fixed(_) => None,
        };
        Ok(Self {
            info,
            rt,
            source,
            train_micros,
            streams: Mutex::new(HashMap::new()),
            placed,
            placed_batches: Mutex::new(HashMap::new()),
            tokenizer_dir,
        })
    }

    pub fn tokenizer_dir(&self) -> Option<PathBuf> {
        self.tokenizer_dir.clone()
    }

    /// The micro-batch for `key`: of a training step, from this rank's share of the step's
    /// micro-batches; of an evaluation, the whole.
    pub fn batch(&self, key: BatchKey, draw: Draw, rows: usize, seq: usize) -> Result<MicroBatch> {
        let (micro_start, micro_count, order) = match draw {
            Draw::Train { order, .. } => (self.train_micros.0, self.train_micros.1, order),
            Draw::Eval { order } => (0, 1, order),
        };
        let micros_per_step = draw.micros_per_step();
        let shape = StreamShape {
            seed: key.seed,
            split: key.split,
            micro_start,
            micro_count,
            micros_per_step: micros_per_step as u32,
            rows: rows as u32,
            seq_len: seq as u32,
            prefetch: 0,
            order,
        };
        let windows = match (&self.placed, order, key.split) {
            (Some(reader), DataOrder::Epochs, Split::Train) => {
                let mut batches = self.placed_batches.lock().expect("placed lock");
                let batches = batches.entry(shape).or_insert_with(|| {
                    let window = seq as u64 + 1;
                    let order = EpochOrder::new(key.seed, &self.info.train_shard_tokens, window);
                    PlacedBatches::new(
                        self.rt.clone(),
                        reader.clone(),
                        Arc::new(order),
                        key.seed,
                        (micro_start, micro_count, micros_per_step as u32),
                        rows,
                        window as usize,
                    )
                });
                batches.windows(key.step, key.micro as u32)?
            }
            _ => {
                let mut streams = self.streams.lock().expect("stream lock");
                let stream = streams.entry(shape).or_insert_with(|| {
                    RemoteBatches::new(self.rt.clone(), self.source.clone(), shape)
                });
                stream.windows(key.step, key.micro as u32)?
            }
        };
        let b = Batch::from_windows(&windows, rows, seq);
        Ok(MicroBatch {
            inputs: b.inputs,
            targets: b.targets,
            rows,
            seq,
        })
    }
}
