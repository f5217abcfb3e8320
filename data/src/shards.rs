//! Reading prepared datasets: memory-mapped shards and deterministic training windows.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::epochs::{DataOrder, EpochOrder, Sequence};
use crate::manifest::{Manifest, Split, TokenDtype};
use crate::split::splitmix64;
use crate::{Error, Result};

/// One split of a dataset as a single virtual token stream over its shards.
#[derive(Debug)]
pub struct TokenStream {
    dtype: TokenDtype,
    /// A shard this node does not hold (see [`Dataset::open_holding`]) is `None`.
    shards: Vec<Option<Mmap>>,
    /// `starts[i]` is the stream offset of shard i's first token; the last entry is the length.
    starts: Vec<u64>,
}

impl TokenStream {
    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether shard `shard` is on this node (always, unless opened with a selection).
    pub fn holds(&self, shard: usize) -> bool {
        self.shards.get(shard).is_some_and(Option::is_some)
    }

    /// Whether every shard is on this node.
    pub fn holds_all(&self) -> bool {
        self.shards.iter().all(Option::is_some)
    }

    /// Tokens per shard, in order.
    pub fn shard_tokens(&self) -> Vec<u64> {
        self.starts.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Sequence `index` of `out.len()` tokens of shard `shard` (sequences never straddle
    /// shards).
    pub fn read_sequence(&self, shard: usize, index: u64, out: &mut [i64]) {
        self.read(self.starts[shard] + index * out.len() as u64, out);
    }

    /// Tokens `start..start + out.len()` of the stream, as i64, crossing shards as needed.
    pub fn read(&self, start: u64, out: &mut [i64]) {
        assert!(
            start + out.len() as u64 <= self.len(),
            "read past the end of the stream"
        );
        let mut pos = start;
        let mut filled = 0;
        while filled < out.len() {
            let shard = self.starts.partition_point(|&s| s <= pos) - 1;
            let local = (pos - self.starts[shard]) as usize;
            let available = (self.starts[shard + 1] - pos) as usize;
            let n = available.min(out.len() - filled);
            let bytes = self.shards[shard]
                .as_ref()
                .expect("a read of a shard this node holds");
            for (k, slot) in out[filled..filled + n].iter_mut().enumerate() {
                let i = local + k;
                *slot = match self.dtype {
                    TokenDtype::U16 => u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as i64,
                    TokenDtype::U32 => {
                        u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
                            as i64
                    }
                };
            }
            filled += n;
            pos += n as u64;
        }
    }
}

/// A prepared dataset opened for reading.
#[derive(Debug)]
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    train: TokenStream,
    val: TokenStream,
    /// Exactly-once orders asked for so far, by (seed, sequence length).
    orders: Mutex<Vec<(u64, u64, Arc<EpochOrder>)>>,
}

impl Dataset {
    /// Opens `dir`, checking every shard is present with the size the manifest records.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_holding(dir, None)
    }

    /// Opens `dir` holding only the train shards in `train` (all when `None`) and every val
    /// shard: a dataloader serves the shards placed on it, and reads of others are refused
    /// before they reach the maps.
    pub fn open_holding(dir: &Path, train: Option<&BTreeSet<usize>>) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let open_split = |split: Split| -> Result<TokenStream> {
            let mut shards = Vec::new();
            let mut starts = vec![0u64];
            for (i, info) in manifest.shards(split).iter().enumerate() {
                starts.push(starts.last().expect("non-empty") + info.tokens);
                if split == Split::Train && train.is_some_and(|t| !t.contains(&i)) {
                    shards.push(None);
                    continue;
                }
                let path = dir.join(&info.file);
                let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                let expected = info.tokens * manifest.dtype.bytes() as u64;
                let actual = file.metadata().map_err(|e| Error::io(&path, e))?.len();
                if actual != expected {
                    return Err(Error::invalid(
                        &path,
                        format!(
                            "holds {actual} bytes but the manifest records {} {:?} tokens ({expected} bytes); the shard is truncated or the dtype differs — re-run `lillm data prepare`",
                            info.tokens, manifest.dtype
                        ),
                    ));
                }
                // SAFETY: shards are immutable once their manifest is written; nothing
                // truncates them while a reader holds the map.
                let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
                shards.push(Some(map));
            }
            Ok(TokenStream {
                dtype: manifest.dtype,
                shards,
                starts,
            })
        };
        let train = open_split(Split::Train)?;
        let val = open_split(Split::Val)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            train,
            val,
            orders: Mutex::default(),
        })
    }

    /// The exactly-once order of the train split for `seed` and sequences of `window`
    /// tokens (built once: it holds a count per shard).
    pub fn epoch_order(&self, seed: u64, window: u64) -> Result<Arc<EpochOrder>> {
        let mut orders = self.orders.lock().expect("epoch orders lock");
        if let Some((_, _, order)) = orders.iter().find(|(s, w, _)| (*s, *w) == (seed, window)) {
            return Ok(order.clone());
        }
        let order = Arc::new(EpochOrder::new(seed, &self.train.shard_tokens(), window));
        if order.sequences() == 0 {
            return Err(Error::Usage(format!(
                "no shard of the train split holds a whole sequence of block_size + 1 = {window} tokens; lower --block-size or use --data-order random"
            )));
        }
        orders.push((seed, window, order.clone()));
        Ok(order)
    }

    pub fn split(&self, split: Split) -> &TokenStream {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Re-hashes every shard against the manifest's checksums.
    pub fn verify_checksums(&self) -> Result<()> {
        use sha2::{Digest, Sha256};
        for split in [Split::Train, Split::Val] {
            for (info, map) in self
                .manifest
                .shards(split)
                .iter()
                .zip(&self.split(split).shards)
            {
                let Some(map) = map else { continue };
                let digest = hex::encode(Sha256::digest(&map[..]));
                if digest != info.sha256 {
                    return Err(Error::invalid(
                        self.dir.join(&info.file),
                        "checksum does not match the manifest; the shard is corrupted — re-run `lillm data prepare --force`",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Where a micro-batch's windows come from: a pure function of these fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchKey {
    pub seed: u64,
    pub split: Split,
    /// Optimizer step (or evaluation round for eval batches).
    pub step: u64,
    /// Micro-batch index within the step, counted over all ranks.
    pub micro: u64,
}

/// Inputs and targets of one micro-batch, row-major (batch × block).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub batch_size: usize,
    pub block_size: usize,
}

/// Random `block_size + 1` windows of a split, row-major ([`Batch::from_windows`] splits
/// them into inputs and targets). Same key, same windows — on any machine, after any
/// resume.
fn sample_windows(
    stream: &TokenStream,
    key: BatchKey,
    batch_size: usize,
    block_size: usize,
) -> Result<Vec<i64>> {
    let window = block_size as u64 + 1;
    if stream.len() < window {
        return Err(Error::Usage(format!(
            "the {} split has {} tokens, fewer than block_size + 1 = {window}; lower --block-size or add data",
            key.split.name(),
            stream.len()
        )));
    }
    let split_tag = match key.split {
        Split::Train => 0x7472_6169_6e00,
        Split::Val => 0x7661_6c00,
    };
    let mixed =
        splitmix64(key.seed ^ splitmix64(split_tag ^ splitmix64(key.step ^ splitmix64(key.micro))));
    let mut rng = StdRng::seed_from_u64(mixed);
    let w = window as usize;
    let mut windows = vec![0i64; batch_size * w];
    for row in windows.chunks_mut(w) {
        let start = rng.random_range(0..=stream.len() - window);
        stream.read(start, row);
    }
    Ok(windows)
}

/// The `batch_size` windows of a training micro-batch in `order`: random windows, or the
/// sequences at positions `(step · micros_per_step + micro) · batch_size + row` of the
/// exactly-once order — a pure function of the key either way, whatever the world size.
pub fn train_windows(
    data: &Dataset,
    order: DataOrder,
    key: BatchKey,
    micros_per_step: u64,
    batch_size: usize,
    block_size: usize,
) -> Result<Vec<i64>> {
    let stream = data.split(key.split);
    if order == DataOrder::Random || key.split != Split::Train {
        return sample_windows(stream, key, batch_size, block_size);
    }
    let window = block_size + 1;
    let epochs = data.epoch_order(key.seed, window as u64)?;
    let mut windows = vec![0i64; batch_size * window];
    let sequences = epoch_sequences(&epochs, key, micros_per_step, batch_size);
    for (at, out) in sequences.iter().zip(windows.chunks_mut(window)) {
        stream.read_sequence(at.shard, at.index, out);
    }
    Ok(windows)
}

/// The sequences of a training micro-batch in the exactly-once order: positions
/// `(step · micros_per_step + micro) · batch_size + row`.
pub fn epoch_sequences(
    order: &EpochOrder,
    key: BatchKey,
    micros_per_step: u64,
    batch_size: usize,
) -> Vec<Sequence> {
    let first = (key.step * micros_per_step + key.micro) * batch_size as u64;
    (0..batch_size as u64)
        .map(|row| order.at(first + row))
        .collect()
}

impl Batch {
    /// Splits windows of `block_size + 1` tokens into inputs and next-token targets.
    pub fn from_windows(windows: &[i64], batch_size: usize, block_size: usize) -> Self {
        let mut inputs = Vec::with_capacity(batch_size * block_size);
        let mut targets = Vec::with_capacity(batch_size * block_size);
        for row in windows.chunks(block_size + 1) {
            inputs.extend_from_slice(&row[..block_size]);
            targets.extend_from_slice(&row[1..]);
        }
        Self {
            inputs,
            targets,
            batch_size,
            block_size,
        }
    }
}

/// Cross entropy (nats/token) of the val split under the train split's unigram distribution
/// (add-one smoothed): the loss of a model that ignores context entirely.
pub fn unigram_baseline(data: &Dataset) -> Result<f64> {
    let vocab = data.manifest.vocab_size;
    let mut counts = vec![1u64; vocab];
    let mut buf = vec![0i64; 1 << 16];
    let count_stream =
        |stream: &TokenStream, buf: &mut Vec<i64>, mut visit: Box<dyn FnMut(usize) + '_>| {
            let mut pos = 0;
            while pos < stream.len() {
                let n = (stream.len() - pos).min(buf.len() as u64) as usize;
                stream.read(pos, &mut buf[..n]);
                buf[..n].iter().for_each(|&t| visit(t as usize));
                pos += n as u64;
            }
        };
    count_stream(
        &data.train,
        &mut buf,
        Box::new(|t| counts[t.min(vocab - 1)] += 1),
    );
    let total: u64 = counts.iter().sum();
    if data.val.is_empty() {
        return Err(Error::invalid(&data.dir, "has no validation split"));
    }
    let (mut nll, mut n) = (0.0f64, 0u64);
    count_stream(
        &data.val,
        &mut buf,
        Box::new(|t| {
            nll -= (counts[t.min(vocab - 1)] as f64 / total as f64).ln();
            n += 1;
        }),
    );
    Ok(nll / n as f64)
}
