//! Direct Preference Optimization: the policy starts from a checkpoint, a frozen copy of it
//! is the reference, and the loss is −log σ(β·((π_c − ref_c) − (π_r − ref_r))) over the
//! summed log-probabilities of each reply's tokens.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use lillm_data::dpo::{pair_batch, read_pairs, PreferencePair};
use lillm_data::prepare::split_by_hash;
use lillm_data::sft::batch_indices;
use lillm_model::{weights, LilLM, ModelConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointData, CheckpointState};
use crate::metrics::{MetricsLog, Record};
use crate::optim::{AdamW, AdamWConfig};
use crate::{plot, Error, LoadedModel, Result};

#[derive(Debug, Clone)]
pub struct DpoConfig {
    /// Checkpoint (or run directory) the policy and the reference start from.
    pub init: PathBuf,
    /// Pairs JSONL: `{"prompt", "chosen", "rejected"}`.
    pub data: PathBuf,
    pub out: PathBuf,
    pub beta: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub max_iters: u64,
    /// Pairs per step.
    pub batch_size: usize,
    pub eval_interval: u64,
    pub log_interval: u64,
    pub val_fraction: f64,
    pub seed: u64,
    pub device: Device,
    /// Continue the run in `out` from its latest checkpoint (weights, optimizer state,
    /// step) with the same reference.
    pub resume: bool,
}

/// Preference metrics over a set of pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoScores {
    pub loss: f64,
    /// Fraction of pairs whose chosen reply gets the higher implicit reward.
    pub reward_accuracy: f64,
    /// Mean of reward(chosen) − reward(rejected).
    pub reward_margin: f64,
}

#[derive(Debug, Clone)]
pub struct DpoSummary {
    pub steps: u64,
    pub initial: DpoScores,
    pub last: DpoScores,
    pub train_pairs: usize,
    pub val_pairs: usize,
    pub filtered: usize,
    pub last_checkpoint: PathBuf,
    pub plot: Option<PathBuf>,
}

/// Summed log-probability of each row's target tokens (targets −1 contribute nothing).
fn sequence_logp(model: &LilLM, x: &Tensor, y: &Tensor, train: bool) -> Tensor {
    -model
        .token_losses(x, y, train)
        .sum_dim_intlist(1, false, Kind::Float)
}

/// DPO loss, accuracy and margin tensors for a batch of pairs.
fn score(
    policy: &LilLM,
    reference: &LilLM,
    pairs: &[&PreferencePair],
    beta: f64,
    device: Device,
    train: bool,
) -> (Tensor, Tensor, Tensor) {
    let (inputs, targets, seq) = pair_batch(pairs);
    let rows = 2 * pairs.len() as i64;
    let x = Tensor::from_slice(&inputs)
        .view([rows, seq as i64])
        .to(device);
    let y = Tensor::from_slice(&targets)
        .view([rows, seq as i64])
        .to(device);
    let policy_logp = sequence_logp(policy, &x, &y, train);
    let ref_logp = tch::no_grad(|| sequence_logp(reference, &x, &y, false));
    let rewards = (policy_logp - ref_logp) * beta;
    let chosen = rewards.narrow(0, 0, pairs.len() as i64);
    let rejected = rewards.narrow(0, pairs.len() as i64, pairs.len() as i64);
    let diff = &chosen - &rejected;
    let loss = -diff.log_sigmoid().mean(Kind::Float);
    let accuracy = diff.detach().gt(0.0).to_kind(Kind::Float).mean(Kind::Float);
    let margin = diff.detach().mean(Kind::Float);
    (loss, accuracy, margin)
}

fn evaluate(
    policy: &LilLM,
    reference: &LilLM,
    pairs: &[PreferencePair],
    cfg: &DpoConfig,
) -> DpoScores {
    let _guard = tch::no_grad_guard();
    let (mut loss, mut acc, mut margin) = (0.0, 0.0, 0.0);
    for chunk in pairs.chunks(cfg.batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let (l, a, m) = score(policy, reference, &refs, cfg.beta, cfg.device, false);
        let n = chunk.len() as f64;
        loss += l.double_value(&[]) * n;
        acc += a.double_value(&[]) * n;
        margin += m.double_value(&[]) * n;
    }
    let n = pairs.len().max(1) as f64;
    DpoScores {
        loss: loss / n,
        reward_accuracy: acc / n,
        reward_margin: margin / n,
    }
}

/// Runs DPO; checkpoints at every evaluation (the lowest held-out DPO loss is kept).
pub fn run_dpo(cfg: &DpoConfig, show_progress: bool) -> Result<DpoSummary> {
    let resume_from = match cfg.resume {
        true => checkpoint::latest_valid(&cfg.out),
        false => None,
    };
    if !cfg.resume && !checkpoint::list_checkpoints(&cfg.out).is_empty() {
        return Err(Error::Config(format!(
            "{} already holds checkpoints; pass --resume to continue that run or choose another --out",
            cfg.out.display()
        )));
    }
    for (flag, v) in [
        ("--log-interval", cfg.log_interval),
        ("--eval-interval", cfg.eval_interval),
        ("--max-iters", cfg.max_iters),
        ("--batch-size", cfg.batch_size as u64),
    ] {
        if v == 0 {
            return Err(Error::Config(format!("{flag} must be at least 1, got 0")));
        }
    }
    if cfg.beta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::Config(format!(
            "beta must be positive, got {}",
            cfg.beta
        )));
    }
    let reference = LoadedModel::load(&cfg.init, cfg.device)?;
    let (_, reference_sha256) =
        checkpoint::sha256_file(&reference.dir.join(checkpoint::MODEL_FILE))?;
    let tokenizer = reference.tokenizer()?;
    let model_cfg = ModelConfig {
        dropout: 0.0,
        ..reference.state.model.clone()
    };
    let (pairs, filtered) = read_pairs(tokenizer, &cfg.data, model_cfg.max_seq_len)?;
    let (train, val) = split_by_hash(pairs, cfg.val_fraction, cfg.seed);
    if val.is_empty() {
        return Err(Error::Config(format!(
            "{}: too few pairs to hold any out for evaluation",
            cfg.data.display()
        )));
    }
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let vs = VarStore::new(cfg.device);
    let policy = LilLM::new(&vs.root(), &model_cfg)?;
    weights::load_into(
        &vs,
        &weights::var_store_tensors(&reference.vs),
        &reference.dir,
    )?;
    let adam = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(adam, vs.variables().into_iter().collect());
    let start = match &resume_from {
        Some((dir, state)) => {
            if state.source != "dpo" || state.reference_sha256.as_deref() != Some(&reference_sha256)
            {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "is not a DPO checkpoint against the reference {} (its weights differ); resume with the --init the run started from",
                        reference.dir.display()
                    ),
                ));
            }
            weights::load_var_store(&vs, &dir.join(checkpoint::MODEL_FILE))?;
            let opt_state = weights::read_tensors(&dir.join(checkpoint::OPTIMIZER_FILE))?;
            opt.load_state_tensors(&opt_state, dir)?;
            tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
            state.step
        }
        None => 0,
    };
    let mut log = MetricsLog::open(&cfg.out, resume_from.as_ref().map(|_| start))?;

    let save = |step: u64, scores: &DpoScores, opt: &AdamW| -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(&cfg.out, step);
        let state = CheckpointState {
            step,
            tokens_seen: 0,
            val_loss: Some(scores.loss),
            best_val_loss: None,
            model: model_cfg.clone(),
            train: None,
            world_size: 1,
            seed: cfg.seed,
            generation: 0,
            evaluated_at_step: true,
            dataset_fingerprint: None,
            source: "dpo".into(),
            reference_sha256: Some(reference_sha256.clone()),
        };
        let data = CheckpointData {
            state,
            model: weights::var_store_tensors(&vs),
            optimizer: Some(opt.state_tensors()),
            tokenizer: Some(&reference.dir),
        };
        checkpoint::write_checkpoint(&dir, &data)?;
        checkpoint::apply_retention(&cfg.out, 1)?;
        Ok(dir)
    };
    let record = |step: u64, s: &DpoScores| Record {
        step,
        val_loss: Some(s.loss),
        reward_accuracy: Some(s.reward_accuracy),
        reward_margin: Some(s.reward_margin),
        ..Record::default()
    };

    // The policy starts as the reference: the initial scores are the reference's.
    let initial = evaluate(&reference.model, &reference.model, &val, cfg);
    if start == 0 {
        log.append(&record(0, &initial))?;
    }
    let bar = if show_progress {
        ProgressBar::new(cfg.max_iters)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").expect("valid template"),
    );
    bar.set_position(start);
    let mut last = initial;
    let mut last_ckpt = resume_from.map(|(dir, _)| dir);
    for step in start..cfg.max_iters {
        tch::manual_seed((cfg.seed ^ step.wrapping_mul(0x9E37_79B9)) as i64);
        let idx = batch_indices(train.len(), cfg.seed, step, 0, 1, cfg.batch_size);
        let batch: Vec<&PreferencePair> = idx.iter().map(|&i| &train[i]).collect();
        let (loss, acc, margin) = score(
            &policy,
            &reference.model,
            &batch,
            cfg.beta,
            cfg.device,
            true,
        );
        loss.backward();
        let grad_norm = opt.clip_grad_norm(cfg.grad_clip);
        opt.step(cfg.lr);
        opt.zero_grad();
        let done = step + 1;
        bar.set_position(done);
        if done % cfg.log_interval == 0 {
            let rec = Record {
                step: done,
                loss: Some(loss.double_value(&[])),
                lr: Some(cfg.lr),
                grad_norm: Some(grad_norm.double_value(&[])),
                reward_accuracy: Some(acc.double_value(&[])),
                reward_margin: Some(margin.double_value(&[])),
                ..Record::default()
            };
            bar.set_message(format!(
                "loss {:.4} acc {:.2}",
                rec.loss.unwrap_or(0.0),
                rec.reward_accuracy.unwrap_or(0.0)
            ));
            log.append(&rec)?;
        }
        if done % cfg.eval_interval == 0 || done == cfg.max_iters {
            last = evaluate(&policy, &reference.model, &val, cfg);
            log.append(&record(done, &last))?;
            last_ckpt = Some(save(done, &last, &opt)?);
        }
    }
    bar.finish_and_clear();
    let last_checkpoint = match last_ckpt {
        Some(dir) => dir,
        None => save(0, &last, &opt)?,
    };
    Ok(DpoSummary {
        steps: cfg.max_iters - start.min(cfg.max_iters),
        initial,
        last,
        train_pairs: train.len(),
        val_pairs: val.len(),
        filtered,
        last_checkpoint,
        plot: plot::plot_run(&cfg.out).ok(),
    })
}
