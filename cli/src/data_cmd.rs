//! `lillm data prepare|verify`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use lillm_data::manifest::Split;
use lillm_data::prepare::{prepare, PrepareOptions};
use lillm_data::shards::Dataset;

use crate::tokenizer_cmd::CorpusArgs;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Tokenize a corpus into token shards with a manifest (documents end with </s>).
    Prepare {
        /// tokenizer.json or a directory holding one.
        #[arg(long)]
        tokenizer: PathBuf,
        #[command(flatten)]
        corpus: CorpusArgs,
        /// Output dataset directory.
        #[arg(long)]
        out: PathBuf,
        /// Fraction of documents held out for validation.
        #[arg(long, default_value_t = 0.001)]
        val_fraction: f64,
        /// Seed of the train/val split.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Tokens per shard file.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: u64,
        /// Replace an existing dataset prepared from other inputs.
        #[arg(long)]
        force: bool,
    },
    /// Token counts and the unigram baseline: the cross entropy (nats) of predicting every
    /// val token from train-token frequencies alone. A model must beat it to have learned context.
    Stats {
        /// Dataset directory.
        dir: PathBuf,
    },
    /// Print each kept conversation as {"text", "ids", "mask"}: what SFT trains on.
    SftRender(crate::finetune_cmd::SftRenderArgs),
    /// Check a dataset's shards against the checksums in its manifest.
    Verify {
        /// Dataset directory.
        dir: PathBuf,
    },
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Prepare {
            tokenizer,
            corpus,
            out,
            val_fraction,
            seed,
            shard_tokens,
            force,
        } => {
            let opts = PrepareOptions {
                corpus: corpus.spec(),
                tokenizer,
                out: out.clone(),
                val_fraction,
                seed,
                shard_tokens,
                force,
                show_progress: crate::interactive(),
            };
            let report = prepare(&opts)?;
            let m = &report.manifest;
            if report.already_prepared {
                println!(
                    "{} is already prepared from these inputs; nothing to do",
                    out.display()
                );
            } else {
                println!(
                    "prepared {}: {:.1} MB of text in {:.2}s ({:.1} MB/s, {:.0} tokens/s)",
                    out.display(),
                    report.text_bytes as f64 / 1e6,
                    report.seconds,
                    report.mb_per_s(),
                    report.tokens_per_s()
                );
            }
            for split in [Split::Train, Split::Val] {
                let docs: u64 = m.shards(split).iter().map(|s| s.documents).sum();
                println!(
                    "  {:<5} {} tokens, {docs} documents, {} shard(s), dtype {:?}",
                    split.name(),
                    m.tokens(split),
                    m.shards(split).len(),
                    m.dtype
                );
            }
            if m.bad_records_skipped > 0 {
                println!("  skipped {} bad record(s)", m.bad_records_skipped);
            }
        }
        DataCmd::Stats { dir } => {
            let data = Dataset::open(&dir)?;
            let baseline = lillm_data::shards::unigram_baseline(&data)?;
            println!(
                "{}: {} train tokens, {} val tokens, vocab {}; unigram baseline {:.4} nats/token",
                dir.display(),
                data.manifest.tokens(Split::Train),
                data.manifest.tokens(Split::Val),
                data.manifest.vocab_size,
                baseline
            );
        }
        DataCmd::SftRender(args) => crate::finetune_cmd::sft_render(args)?,
        DataCmd::Verify { dir } => {
            let data = Dataset::open(&dir)?;
            data.verify_checksums()?;
            println!("{}: every shard matches its checksum", dir.display());
        }
    }
    Ok(())
}
