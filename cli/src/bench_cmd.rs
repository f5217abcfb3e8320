//! `lillm bench`: benchmarks of lillm's own parts at sizes this machine cannot run for
//! real — the coordinator of thousands of trainers (`bench_coordinator`), and the
//! exactly-once data order and the shard placement over a corpus of 100,000 shards — and the
//! model's fused kernels against their reference (`bench_kernels`), and a decode step alone
//! (`bench_decode`).

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::bench_coordinator::{self, CoordinatorBenchArgs};
use crate::bench_decode::{self, DecodeBenchArgs};
use crate::bench_kernels::{self, KernelsBenchArgs};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The coordinator at scale: simulated trainers against a real coordinator process.
    Coordinator(CoordinatorBenchArgs),
    /// The exactly-once data order over a dataset of many shards (metadata only): the time
    /// and memory of an epoch's plan and of one step's sequences; and the shards' placement
    /// on dataloaders, before and after some leave.
    Epochs(EpochsBenchArgs),
    /// The fused implementation of the model's layers against the reference on one batch:
    /// how far apart their logits and gradients are, and the time of a forward and
    /// backward with each.
    Kernels(KernelsBenchArgs),
    /// One decode step alone at a few batch sizes: its time launched op by op and, on CUDA,
    /// replayed as a CUDA graph, and what it launches.
    Decode(DecodeBenchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct EpochsBenchArgs {
    /// Shards of the simulated train split.
    #[arg(long, default_value_t = 100_000)]
    shards: usize,
    /// Tokens per shard (100,000 shards of 10M tokens: 1T tokens).
    #[arg(long, default_value_t = 10_000_000)]
    shard_tokens: u64,
    /// Sequence length (block_size + 1).
    #[arg(long, default_value_t = 2_049)]
    window: u64,
    /// Sequences per step (grad_accum × batch_size).
    #[arg(long, default_value_t = 1_024)]
    sequences_per_step: u64,
    /// Dataloaders the shards are placed on.
    #[arg(long, default_value_t = 1_000)]
    dataloaders: usize,
}

impl BenchCmd {
    /// Whether the bench talks to another process (the coordinator under test).
    pub fn opens_connections(&self) -> bool {
        matches!(self, BenchCmd::Coordinator(_))
    }
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Epochs(args) => {
            epochs(&args);
            Ok(())
        }
        BenchCmd::Coordinator(args) => bench_coordinator::run(&args),
        BenchCmd::Kernels(args) => bench_kernels::run(&args),
        BenchCmd::Decode(args) => bench_decode::run(&args),
    }
}

/// A process's (resident, peak resident) memory in MB, from `/proc/PID/status` (`self`: this
/// one).
pub fn memory_mb(pid: &str) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mb = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1e3
    };
    Ok((mb("VmRSS:"), mb("VmHWM:")))
}

/// The exactly-once order at the size of a large corpus: the first step of an epoch pays
/// for its plan (a permutation of the shards), every later step only for its sequences.
fn epochs(args: &EpochsBenchArgs) {
    use lillm_data::epochs::EpochOrder;
    // Shard sizes vary a little, as a real corpus's last shards do.
    let tokens: Vec<u64> = (0..args.shards as u64)
        .map(|i| args.shard_tokens - (i * 7919) % (args.window * 3))
        .collect();
    let rss = || memory_mb("self").map_or(0.0, |(now, _)| now);
    let before = rss();
    let built = Instant::now();
    let order = EpochOrder::new(1337, &tokens, args.window);
    let build_ms = built.elapsed().as_secs_f64() * 1e3;
    let step = |n: u64| {
        let started = Instant::now();
        let first = n * args.sequences_per_step;
        let mut shards: Vec<usize> = (first..first + args.sequences_per_step)
            .map(|p| order.at(p).shard)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        (started.elapsed().as_secs_f64() * 1e3, shards.len())
    };
    let (first_ms, _) = step(0);
    let later: Vec<(f64, usize)> = (1..101).map(step).collect();
    let mean_ms = later.iter().map(|(ms, _)| ms).sum::<f64>() / later.len() as f64;
    let max_shards = later.iter().map(|&(_, n)| n).max().unwrap_or(0);
    println!(
        "exactly-once order over {} shards ({:.2e} tokens, {:.3e} sequences of {} tokens):",
        args.shards,
        tokens.iter().sum::<u64>() as f64,
        order.sequences() as f64,
        args.window
    );
    println!(
        "  order built in {build_ms:.1} ms; an epoch's first step (its plan) {first_ms:.1} ms; \
         each later step of {} sequences {mean_ms:.3} ms, reading at most {max_shards} shards; \
         memory {:.1} MB",
        args.sequences_per_step,
        rss() - before
    );
    placement(args, &tokens);
}

/// The coordinator's shard placement at the same size: every shard on two of
/// `args.dataloaders`, then again after 1% of them leave.
fn placement(args: &EpochsBenchArgs, tokens: &[u64]) {
    use lillm_coordinator::placement::Placement;
    let rss = || memory_mb("self").map_or(0.0, |(now, _)| now);
    let before = rss();
    let started = Instant::now();
    let placed = Placement::new(tokens, args.dataloaders);
    let place_ms = started.elapsed().as_secs_f64() * 1e3;
    let memory = rss() - before;
    let departed: Vec<u32> = (0..(args.dataloaders / 100).max(1) as u32)
        .map(|i| i * 97 % args.dataloaders as u32)
        .collect();
    let started = Instant::now();
    let after = placed.without(tokens, &departed);
    let replace_ms = started.elapsed().as_secs_f64() * 1e3;
    let held: usize = departed.iter().map(|&d| placed.shards_of(d).len()).sum();
    let moved: usize = (0..tokens.len())
        .map(|s| {
            let was = placed.holders(s);
            after.holders(s).iter().filter(|h| !was.contains(h)).count()
        })
        .sum();
    let imbalance = |p: &Placement| {
        let loads: Vec<u64> = p.loads(tokens).into_iter().filter(|&l| l > 0).collect();
        let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
        *loads.iter().max().unwrap_or(&0) as f64 / mean
    };
    println!(
        "shard placement, 2 copies of {} shards on {} dataloaders:",
        tokens.len(),
        args.dataloaders
    );
    println!(
        "  placed in {place_ms:.1} ms (memory {memory:.1} MB), busiest dataloader at {:.4}x the mean; \
         after {} dataloaders leave: re-placed in {replace_ms:.1} ms, {moved} shard copies move \
         (the departed held {held}), busiest at {:.4}x the mean",
        imbalance(&placed),
        departed.len(),
        imbalance(&after)
    );
}
