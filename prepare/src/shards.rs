//! `data prepare`: tokenize a corpus once, in parallel, into token shards plus a manifest.
//!
//! Everything is written into a staging directory beside the output and moved into place
//! only when complete, so an interrupted run never leaves a dataset that looks finished and
//! never damages one that was there before.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use lillm_data::manifest::{Manifest, ShardInfo, Split, TokenDtype, FORMAT, MANIFEST_FILE};
use lillm_data::split::is_val_document;
use lillm_data::tokenizer::{Tokenizer, EOS_ID};
use lillm_data::{Error, Result};

use crate::corpus::{CorpusSpec, CorpusStats};

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub corpus: CorpusSpec,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    /// Fraction of documents held out for validation, chosen by a seeded hash of their index.
    pub val_fraction: f64,
    pub seed: u64,
    /// A shard is closed once it holds at least this many tokens (documents are never split).
    pub shard_tokens: u64,
    /// Replace an existing dataset prepared from other inputs.
    pub force: bool,
    pub show_progress: bool,
}

#[derive(Debug)]
pub struct PrepareReport {
    pub manifest: Manifest,
    /// True when the output already held this exact dataset and nothing was done.
    pub already_prepared: bool,
    pub seconds: f64,
    pub text_bytes: u64,
}

impl PrepareReport {
    pub fn mb_per_s(&self) -> f64 {
        self.text_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
    pub fn tokens_per_s(&self) -> f64 {
        let tokens = self.manifest.tokens(Split::Train) + self.manifest.tokens(Split::Val);
        tokens as f64 / self.seconds.max(1e-9)
    }
}

fn signature(opts: &PrepareOptions, fingerprint: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(fingerprint.as_bytes());
    for file in opts.corpus.files()? {
        let meta = fs::metadata(&file).map_err(|e| Error::io(&file, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let abs = fs::canonicalize(&file).unwrap_or(file);
        h.update(format!("{}|{}|{mtime}\n", abs.display(), meta.len()).as_bytes());
    }
    h.update(
        format!(
            "{}|{:?}|{}|{}|{}|{}",
            opts.corpus.field,
            opts.corpus.text_unit,
            opts.corpus.skip_bad,
            opts.val_fraction,
            opts.seed,
            opts.shard_tokens
        )
        .as_bytes(),
    );
    Ok(hex::encode(h.finalize()))
}

/// Writes one split's shards, rotating files at `shard_tokens`.
struct ShardWriter {
    split: Split,
    dir: PathBuf,
    dtype: TokenDtype,
    shard_tokens: u64,
    done: Vec<ShardInfo>,
    current: Option<OpenShard>,
}

struct OpenShard {
    file: String,
    writer: BufWriter<fs::File>,
    hasher: Sha256,
    tokens: u64,
    documents: u64,
}

impl ShardWriter {
    fn new(split: Split, dir: &Path, dtype: TokenDtype, shard_tokens: u64) -> Self {
        Self {
            split,
            dir: dir.to_path_buf(),
            dtype,
            shard_tokens,
            done: Vec::new(),
            current: None,
        }
    }

    fn push_document(&mut self, ids: &[u32]) -> Result<()> {
        if self.current.is_none() {
            let file = format!("{}-{:05}.bin", self.split.name(), self.done.len());
            let path = self.dir.join(&file);
            let f = fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            self.current = Some(OpenShard {
                file,
                writer: BufWriter::with_capacity(1 << 20, f),
                hasher: Sha256::new(),
                tokens: 0,
                documents: 0,
            });
        }
        let shard = self.current.as_mut().expect("opened above");
        let mut bytes = Vec::with_capacity((ids.len() + 1) * self.dtype.bytes());
        for &id in ids.iter().chain(std::iter::once(&EOS_ID)) {
            match self.dtype {
                TokenDtype::U16 => bytes.extend_from_slice(&(id as u16).to_le_bytes()),
                TokenDtype::U32 => bytes.extend_from_slice(&id.to_le_bytes()),
            }
        }
        shard.hasher.update(&bytes);
        let path = self.dir.join(&shard.file);
        shard
            .writer
            .write_all(&bytes)
            .map_err(|e| Error::io(&path, e))?;
        shard.tokens += ids.len() as u64 + 1;
        shard.documents += 1;
        if shard.tokens >= self.shard_tokens {
            self.close_current()?;
        }
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some(shard) = self.current.take() {
            let path = self.dir.join(&shard.file);
            let file = shard
                .writer
                .into_inner()
                .map_err(|e| Error::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            self.done.push(ShardInfo {
                file: shard.file,
                tokens: shard.tokens,
                documents: shard.documents,
                sha256: hex::encode(shard.hasher.finalize()),
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.close_current()?;
        Ok(self.done)
    }
}

fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map_or("data".into(), |n| n.to_string_lossy().into_owned());
    out.with_file_name(format!(".{name}.partial"))
}

/// Tokenizes the corpus into `opts.out`. See the module doc for the atomicity rules.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let started = Instant::now();
    check_options(opts)?;
    let tokenizer = Tokenizer::load(&opts.tokenizer)?;
    let fingerprint = tokenizer.fingerprint()?;
    let signature = signature(opts, &fingerprint)?;
    if let Output::Reuse(manifest) = output_action(found_at(&opts.out, &signature), opts)? {
        return Ok(PrepareReport {
            manifest,
            already_prepared: true,
            seconds: started.elapsed().as_secs_f64(),
            text_bytes: 0,
        });
    }

    let stage = staging_dir(&opts.out);
    if stage.exists() {
        fs::remove_dir_all(&stage).map_err(|e| Error::io(&stage, e))?;
    }
    fs::create_dir_all(&stage).map_err(|e| Error::io(&stage, e))?;
    let dtype = TokenDtype::for_vocab(tokenizer.vocab_size());
    let tokenized = tokenize_into(opts, &tokenizer, &stage, dtype, started)
        .and_then(|t| check_splits(&t, opts).map(|()| t));
    let tokenized = match tokenized {
        Ok(t) => t,
        Err(e) => {
            // Nothing half-written stays behind; the output was never touched.
            let _ = fs::remove_dir_all(&stage);
            return Err(e);
        }
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        tokenizer_fingerprint: fingerprint,
        vocab_size: tokenizer.vocab_size(),
        dtype,
        eos_id: EOS_ID,
        signature,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        train: tokenized.train,
        val: tokenized.val,
        bad_records_skipped: tokenized.bad_records,
        input_bytes: tokenized.text_bytes,
    };
    tokenizer.save_dir(&stage)?;
    manifest.write(&stage)?;
    if opts.out.exists() {
        fs::remove_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    }
    fs::rename(&stage, &opts.out).map_err(|e| Error::io(&opts.out, e))?;
    Ok(PrepareReport {
        manifest,
        already_prepared: false,
        seconds: started.elapsed().as_secs_f64(),
        text_bytes: tokenized.text_bytes,
    })
}

fn check_options(opts: &PrepareOptions) -> Result<()> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Usage(format!(
            "--val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if opts.shard_tokens == 0 {
        return Err(Error::Usage("--shard-tokens must be positive".into()));
    }
    Ok(())
}

/// What the output directory holds before preparing.
#[derive(Debug)]
enum Found {
    Nothing,
    /// A dataset; `same`: prepared from these inputs and options (its signature).
    Dataset {
        manifest: Manifest,
        same: bool,
    },
    /// Something that is not a dataset.
    Other {
        empty: bool,
    },
}

fn found_at(out: &Path, signature: &str) -> Found {
    if !out.exists() {
        return Found::Nothing;
    }
    match Manifest::read(out) {
        Ok(manifest) => Found::Dataset {
            same: manifest.signature == signature,
            manifest,
        },
        Err(_) => Found::Other {
            empty: is_empty_dir(out),
        },
    }
}

#[derive(Debug)]
enum Output {
    /// The output already holds this dataset: nothing to do.
    Reuse(Manifest),
    /// Prepare, then replace whatever is there.
    Write,
}

/// Whether to prepare: never over a dataset of other inputs or over something that is not a
/// dataset unless `--force` says so; never again when the same dataset is there already.
fn output_action(found: Found, opts: &PrepareOptions) -> Result<Output> {
    match found {
        Found::Dataset {
            manifest,
            same: true,
        } => Ok(Output::Reuse(manifest)),
        Found::Dataset { same: false, .. } if !opts.force => Err(Error::invalid(
            &opts.out,
            "already holds a dataset prepared from other inputs or options; pass --force to replace it or choose another --out",
        )),
        Found::Other { empty: false } if !opts.force => Err(Error::invalid(
            &opts.out,
            "exists and is not a prepared dataset; choose another --out (or --force to replace it)",
        )),
        _ => Ok(Output::Write),
    }
}

/// What tokenizing the corpus wrote and read.
struct Tokenized {
    train: Vec<ShardInfo>,
    val: Vec<ShardInfo>,
    documents: u64,
    text_bytes: u64,
    bad_records: u64,
}

/// Tokenizes the corpus in parallel, a chunk of documents at a time, into `stage`'s train
/// and val shards (each document's split drawn from its index and the seed).
fn tokenize_into(
    opts: &PrepareOptions,
    tokenizer: &Tokenizer,
    stage: &Path,
    dtype: TokenDtype,
    started: Instant,
) -> Result<Tokenized> {
    const CHUNK_BYTES: usize = 8 << 20;
    let mut writers = [
        ShardWriter::new(Split::Train, stage, dtype, opts.shard_tokens),
        ShardWriter::new(Split::Val, stage, dtype, opts.shard_tokens),
    ];
    let stats = Arc::new(CorpusStats::default());
    let bar = progress_bar(opts.show_progress, opts.corpus.total_bytes()?);
    let mut docs = opts.corpus.documents(stats.clone())?;
    let (mut index, mut text_bytes, mut tokens) = (0u64, 0u64, 0u64);
    loop {
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        while chunk_bytes < CHUNK_BYTES {
            match docs.next() {
                Some(doc) => {
                    let doc = doc?;
                    chunk_bytes += doc.len();
                    chunk.push(doc);
                }
                None => break,
            }
        }
        if chunk.is_empty() {
            break;
        }
        let encoded: Vec<Vec<u32>> = chunk
            .par_iter()
            .map(|doc| tokenizer.encode(doc))
            .collect::<Result<_>>()?;
        for ids in &encoded {
            // writers[0] is train, writers[1] is val.
            let is_val = is_val_document(opts.seed, index, opts.val_fraction);
            writers[usize::from(is_val)].push_document(ids)?;
            tokens += ids.len() as u64 + 1;
            index += 1;
        }
        text_bytes += chunk_bytes as u64;
        bar.inc(chunk_bytes as u64);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:.1} MB/s, {:.0} tokens/s, {} docs",
            text_bytes as f64 / 1e6 / secs,
            tokens as f64 / secs,
            index
        ));
    }
    bar.finish_and_clear();
    let [train, val] = writers;
    Ok(Tokenized {
        train: train.finish()?,
        val: val.finish()?,
        documents: index,
        text_bytes,
        bad_records: stats.bad_records.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Refuses a corpus that gave no document, or none to a validation split asked for.
fn check_splits(t: &Tokenized, opts: &PrepareOptions) -> Result<()> {
    if t.documents == 0 {
        return Err(Error::Usage(
            "the corpus holds no documents: every input file is empty".into(),
        ));
    }
    if opts.val_fraction > 0.0 && t.val.is_empty() {
        return Err(Error::Usage(format!(
            "no document fell into the validation split ({} documents × fraction {}); raise --val-fraction or add data",
            t.documents, opts.val_fraction
        )));
    }
    Ok(())
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// The manifest's path inside a dataset directory.
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(MANIFEST_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::TextUnit;

    fn options(force: bool) -> PrepareOptions {
        PrepareOptions {
            corpus: CorpusSpec {
                inputs: vec!["corpus".into()],
                field: "text".into(),
                text_unit: TextUnit::Paragraph,
                skip_bad: false,
            },
            tokenizer: "tokenizer".into(),
            out: "/data/shards".into(),
            val_fraction: 0.1,
            seed: 1,
            shard_tokens: 1000,
            force,
            show_progress: false,
        }
    }

    fn dataset(same: bool) -> Found {
        Found::Dataset {
            manifest: Manifest {
                format: FORMAT.into(),
                tokenizer_fingerprint: "f".into(),
                vocab_size: 6400,
                dtype: TokenDtype::U16,
                eos_id: EOS_ID,
                signature: "s".into(),
                val_fraction: 0.1,
                seed: 1,
                train: Vec::new(),
                val: Vec::new(),
                bad_records_skipped: 0,
                input_bytes: 0,
            },
            same,
        }
    }

    #[test]
    fn the_same_dataset_is_reused_even_with_force() {
        for force in [false, true] {
            let action = output_action(dataset(true), &options(force)).unwrap();
            assert!(matches!(action, Output::Reuse(m) if m.signature == "s"));
        }
    }

    #[test]
    fn only_force_replaces_another_dataset_or_something_that_is_not_one() {
        for found in [dataset(false), Found::Other { empty: false }] {
            let what = format!("{found:?}");
            let refused = output_action(found, &options(false))
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("/data/shards") && refused.contains("--force"),
                "{what}: {refused}"
            );
        }
        for found in [dataset(false), Found::Other { empty: false }] {
            assert!(matches!(
                output_action(found, &options(true)).unwrap(),
                Output::Write
            ));
        }
        // Nothing there, or an empty folder made for it: written without asking.
        for found in [Found::Nothing, Found::Other { empty: true }] {
            assert!(matches!(
                output_action(found, &options(false)).unwrap(),
                Output::Write
            ));
        }
    }

    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let mut opts = options(false);
        assert!(check_options(&opts).is_ok());
        opts.val_fraction = 1.0;
        let refused = check_options(&opts).unwrap_err().to_string();
        assert!(
            refused.contains("--val-fraction") && refused.contains('1'),
            "{refused}"
        );
        opts.val_fraction = 0.0;
        opts.shard_tokens = 0;
        let refused = check_options(&opts).unwrap_err().to_string();
        assert!(refused.contains("--shard-tokens"), "{refused}");
    }

    #[test]
    fn a_corpus_without_documents_or_without_validation_documents_is_refused() {
        let tokenized = |documents, val: Vec<ShardInfo>| Tokenized {
            train: Vec::new(),
            val,
            documents,
            text_bytes: 0,
            bad_records: 0,
        };
        let opts = options(false);
        let empty = check_splits(&tokenized(0, Vec::new()), &opts)
            .unwrap_err()
            .to_string();
        assert!(empty.contains("no documents"), "{empty}");
        let no_val = check_splits(&tokenized(3, Vec::new()), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            no_val.contains("3 documents") && no_val.contains("--val-fraction"),
            "{no_val}"
        );
        let shard = ShardInfo {
            file: "val-00000.bin".into(),
            tokens: 10,
            documents: 1,
            sha256: String::new(),
        };
        assert!(check_splits(&tokenized(3, vec![shard]), &opts).is_ok());
    }
}
