//! `lillm data prepare|verify`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use lillm_data::manifest::Split;
use lillm_data::shards::Dataset;
use lillm_prepare::shards::{prepare, PrepareOptions, PrepareReport};

use crate::tokenizer_cmd::CorpusArgs;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Tokenize a corpus into token shards with a manifest (documents end with </s>).
    Prepare(PrepareArgs),
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
    /// Pull training batches from a running dataloader as a trainer does and print the rate
    /// (JSON: batches/s, tokens/s).
    StreamBench {
        /// The dataloader's address (host:port).
        #[arg(long)]
        dataloader: String,
        #[arg(long, default_value_t = 2000)]
        batches: u64,
        #[arg(long, default_value_t = 16)]
        batch_size: u32,
        #[arg(long, default_value_t = 128)]
        block_size: u32,
        /// CA certificate (PEM) of the dataloader's TLS certificate: dial it over TLS.
        #[arg(long, env = "LILLM_TLS_CA")]
        tls_ca: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// tokenizer.json or a directory holding one.
    #[arg(long)]
    tokenizer: PathBuf,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Output dataset directory, or a bucket (`s3://bucket/prefix/`, `gs://…`, `az://…`):
    /// prepared in this node's cache, then uploaded, the manifest last.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    store: lillm_store::StoreArgs,
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
}

/// The bucket a dataset is prepared into, checked before any work: a missing bucket, wrong
/// credentials or an unreachable endpoint fail here, not after an hour of tokenizing.
fn prepare_bucket(url: &str, options: &lillm_store::StoreOptions) -> Result<lillm_store::Bucket> {
    let bucket = options.bucket(url)?;
    runtime()?.block_on(bucket.probe())?;
    Ok(bucket)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn upload_prepared(
    local: &std::path::Path,
    bucket: &lillm_store::Bucket,
    force: bool,
) -> Result<()> {
    let done = runtime()?.block_on(lillm_store::dataset::upload(local, bucket, force))?;
    println!(
        "uploaded to {}: {} shard(s), {} already there, {:.1} MB sent; the manifest last",
        bucket.url(),
        done.shards,
        done.skipped,
        done.bytes as f64 / 1e6
    );
    Ok(())
}

impl DataCmd {
    /// Whether the command may talk to a bucket (`prepare`) or a dataloader.
    pub fn opens_connections(&self) -> bool {
        matches!(self, DataCmd::Prepare(_) | DataCmd::StreamBench { .. })
    }
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Prepare(args) => prepare_data(args)?,
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
        DataCmd::StreamBench {
            dataloader,
            batches,
            batch_size,
            block_size,
            tls_ca,
        } => stream_bench(dataloader, batches, batch_size, block_size, tls_ca)?,
        DataCmd::Verify { dir } => {
            let data = Dataset::open(&dir)?;
            data.verify_checksums()?;
            println!("{}: every shard matches its checksum", dir.display());
        }
    }
    Ok(())
}

/// `lillm data prepare`: into a directory, or into this node's cache and then a bucket.
fn prepare_data(args: PrepareArgs) -> Result<()> {
    let target = args.out.to_string_lossy().into_owned();
    let bucket = match lillm_store::is_url(&target) {
        true => Some(prepare_bucket(&target, &args.store.options())?),
        false => None,
    };
    let local = match &bucket {
        Some(_) => args.store.options().cache().data_path(&target),
        None => args.out.clone(),
    };
    let opts = PrepareOptions {
        corpus: args.corpus.spec(),
        tokenizer: args.tokenizer,
        out: local.clone(),
        val_fraction: args.val_fraction,
        seed: args.seed,
        shard_tokens: args.shard_tokens,
        force: args.force,
        show_progress: crate::interactive(),
    };
    print_prepared(&args.out, &prepare(&opts)?);
    if let Some(bucket) = bucket {
        upload_prepared(&local, &bucket, args.force)?;
    }
    Ok(())
}

/// What a preparation did (or that it found the dataset already prepared), and each split.
fn print_prepared(out: &std::path::Path, report: &PrepareReport) {
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

fn stream_bench(
    address: String,
    batches: u64,
    rows: u32,
    seq: u32,
    tls_ca: Option<PathBuf>,
) -> Result<()> {
    use lillm_dataloader::remote::{Locate, RemoteBatches, StreamShape, StreamSource};
    use lillm_proto::net::{ConnectSettings, RetryPolicy};
    let rt = tokio::runtime::Runtime::new()?;
    let shape = StreamShape {
        seed: 1337,
        split: Split::Train,
        micro_start: 0,
        micro_count: 1,
        micros_per_step: 1,
        rows,
        seq_len: seq,
        prefetch: 0,
        order: lillm_data::epochs::DataOrder::Random,
    };
    let source = StreamSource {
        locate: Locate::Fixed(address),
        settings: ConnectSettings::with_tls_ca(tls_ca),
        policy: RetryPolicy {
            patience: std::time::Duration::from_secs(30),
            ..RetryPolicy::default()
        },
    };
    let mut stream = RemoteBatches::new(rt.handle().clone(), source, shape);
    stream.windows(0, 0)?; // connect and warm up
    let started = std::time::Instant::now();
    for step in 1..=batches {
        stream.windows(step, 0)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = batches as f64 * rows as f64 * seq as f64;
    println!(
        "{}",
        serde_json::json!({
            "batches_per_s": batches as f64 / secs,
            "tokens_per_s": tokens / secs,
        })
    );
    Ok(())
}
