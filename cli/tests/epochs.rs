//! The exactly-once data order (`--data-order epochs`): served by a real dataloader over
//! gRPC, every `block_size + 1` sequence of the train split appears exactly once per epoch,
//! in one order whatever the world size and across a reconnect at any step; training reads
//! it the same way in one process and as a `--nproc 2` job, and logs its epoch.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::job::*;
use common::*;
use lillm_data::epochs::DataOrder;
use lillm_data::manifest::Split;
use lillm_data::shards::Dataset;
use lillm_dataloader::remote::{Locate, RemoteBatches, StreamShape, StreamSource};
use lillm_proto::net::{ConnectSettings, RetryPolicy};

const SEQ: u32 = 32;
const ROWS: u32 = 4;
const MICROS: u32 = 6;

/// Every window the dataloader streams for `steps` steps, in (step, micro) order, read by
/// `world` ranks each taking its share of the micro-batches; the ranks' streams start at
/// step `from` (a resume).
fn served(address: &str, world: u32, from: u64, steps: u64) -> Vec<Vec<i64>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut by_key = BTreeMap::new();
    for rank in 0..world {
        let share = MICROS / world;
        let shape = StreamShape {
            seed: 1337,
            split: Split::Train,
            micro_start: rank * share,
            micro_count: share,
            micros_per_step: MICROS,
            rows: ROWS,
            seq_len: SEQ,
            prefetch: 0,
            order: DataOrder::Epochs,
        };
        let source = StreamSource {
            locate: Locate::Fixed(address.to_string()),
            settings: ConnectSettings::default(),
            policy: RetryPolicy {
                patience: Duration::from_secs(30),
                ..RetryPolicy::default()
            },
        };
        let mut stream = RemoteBatches::new(rt.handle().clone(), source, shape);
        for step in from..from + steps {
            for micro in rank * share..(rank + 1) * share {
                let windows = stream.windows(step, micro).unwrap();
                by_key.insert((step, micro), windows);
            }
        }
    }
    by_key
        .into_values()
        .flat_map(|w| {
            w.chunks(SEQ as usize + 1)
                .map(<[i64]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How often each window of tokens occurs.
fn counts(windows: &[Vec<i64>]) -> BTreeMap<Vec<i64>, usize> {
    let mut out = BTreeMap::new();
    for w in windows {
        *out.entry(w.clone()).or_default() += 1;
    }
    out
}

#[test]
fn every_sequence_once_per_epoch_in_one_order_for_any_world_size_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = sharded_data(dir.path());
    let dataset = Dataset::open(&data).unwrap();
    let train = dataset.split(Split::Train);
    let shard_tokens = train.shard_tokens();
    assert!(shard_tokens.len() >= 4, "several shards: {shard_tokens:?}");
    // Every sequence of the split: each shard cut into SEQ + 1 tokens, its tail left out.
    let window = SEQ as usize + 1;
    let mut all = Vec::new();
    for (shard, tokens) in shard_tokens.iter().enumerate() {
        for index in 0..tokens / window as u64 {
            let mut out = vec![0i64; window];
            train.read_sequence(shard, index, &mut out);
            all.push(out);
        }
    }
    let per_epoch = all.len();
    let per_step = (ROWS * MICROS) as usize;
    let steps = (2 * per_epoch).div_ceil(per_step) as u64 + 1;

    let job = Job::new(dir.path(), 1, 1, &[]);
    let _coordinator = job.start_coordinator();
    let listen = format!("127.0.0.1:{}", free_port());
    let _loader = Actor::lillm(
        &job.dataloader_args(&data, "local", &listen),
        dir.path().join("loader.log"),
    );
    wait_until(Duration::from_secs(60), "the dataloader", || {
        std::net::TcpStream::connect(&listen).is_ok()
    });

    let one = served(&listen, 1, 0, steps);
    for epoch in 0..2 {
        let seen = &one[epoch * per_epoch..(epoch + 1) * per_epoch];
        assert_eq!(
            counts(seen),
            counts(&all),
            "epoch {epoch}: every sequence exactly once"
        );
    }
    assert_ne!(
        one[..per_epoch],
        one[per_epoch..2 * per_epoch],
        "each epoch has its own order"
    );
    for world in [2, 3] {
        assert!(
            served(&listen, world, 0, steps) == one,
            "world size {world} reads the same order"
        );
    }
    // Streams opened mid-run (a resume at step 7) continue the same order.
    let resumed = served(&listen, 2, 7, steps - 7);
    assert!(
        resumed == one[7 * per_step..],
        "a resume continues the order"
    );
}

#[test]
fn training_reads_the_order_alike_in_one_process_and_a_job_and_logs_its_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = sharded_data(dir.path());
    let run = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = tiny_train_args(s(&data), s(&out), "300", "40");
        set_flag(&mut args, "--grad-accum", "2");
        args.extend(["--data-order", "epochs"]);
        args.extend(extra);
        lillm_ok(&args);
        out
    };
    let alone = run("alone", &[]);
    let job = run("job", &["--nproc", "2"]);
    assert_same_losses(&losses(&alone), &losses(&job));
    let records: Vec<serde_json::Value> = std::fs::read_to_string(alone.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r.get("loss").is_some())
        .collect();
    let epochs: Vec<f64> = records
        .iter()
        .map(|r| r["epochs"].as_f64().expect("epochs in every step record"))
        .collect();
    assert!(epochs.windows(2).all(|w| w[1] > w[0]), "{epochs:?}");
    // 40 steps of 2 × 4 sequences over the split's sequences.
    let dataset = Dataset::open(&data).unwrap();
    let per_epoch: u64 = dataset
        .split(Split::Train)
        .shard_tokens()
        .iter()
        .map(|t| t / 33)
        .sum();
    let last = *epochs.last().unwrap();
    assert!(
        (last - 320.0 / per_epoch as f64).abs() < 1e-9,
        "{last} vs 320 / {per_epoch}"
    );
    // A random-order run logs no epoch.
    let random = dir.path().join("random");
    lillm_ok(&tiny_train_args(s(&data), s(&random), "300", "5"));
    assert!(!std::fs::read_to_string(random.join("metrics.jsonl"))
        .unwrap()
        .contains("epochs"));
}
