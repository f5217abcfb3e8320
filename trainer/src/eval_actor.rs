//! The evaluation actor: scores committed checkpoints — validation loss and a short greedy
//! sample — on its own thread, beside training, and reports each score. It loads the
//! checkpoint from disk (what was committed, not the live weights) and reads its own batches.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

use lillm_data::epochs::DataOrder;
use lillm_data::manifest::Split;
use lillm_data::shards::BatchKey;
use lillm_data::tokenizer::BOS_ID;
use lillm_model::{generate, Sampler, SamplingParams};
use tch::{Device, Tensor};

use crate::data::{Draw, TrainData};
use crate::{LoadedModel, Result};

/// Receives (step, validation loss, sample) for each scored checkpoint.
pub type ScoreSink = Box<dyn Fn(u64, f64, &str) + Send>;

/// What to score each checkpoint on.
pub struct EvalPlan {
    pub data: TrainData,
    pub seed: u64,
    /// Validation batches per checkpoint.
    pub batches: u64,
    pub rows: usize,
    pub seq: usize,
    /// Tokens of the greedy sample.
    pub sample_tokens: usize,
}

pub struct EvalActor {
    tx: Option<SyncSender<(u64, PathBuf)>>,
    worker: Option<JoinHandle<()>>,
}

/// Mean validation loss and a greedy sample of the checkpoint in `dir`.
pub fn score(plan: &EvalPlan, dir: &std::path::Path) -> Result<(f64, String)> {
    let loaded = LoadedModel::load(dir, Device::Cpu)?;
    let _guard = tch::no_grad_guard();
    let mut total = 0.0;
    for i in 0..plan.batches {
        let key = BatchKey {
            seed: plan.seed ^ 0x5C0E,
            split: Split::Val,
            step: i,
            micro: 0,
        };
        let b = plan.data.batch(
            key,
            Draw::Eval {
                order: DataOrder::Random,
            },
            plan.rows,
            plan.seq,
        )?;
        let shape = [b.rows as i64, b.seq as i64];
        let x = Tensor::from_slice(&b.inputs).view(shape);
        let y = Tensor::from_slice(&b.targets).view(shape);
        total += loaded.model.loss(&x, &y, false).double_value(&[]);
    }
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    })?;
    let mut ids = Vec::new();
    generate(
        &loaded.model,
        &[BOS_ID],
        plan.sample_tokens,
        &mut sampler,
        &[],
        |id| {
            ids.push(id);
            true
        },
    )?;
    let sample = match &loaded.tokenizer {
        Some(tok) => tok.decode(&ids)?,
        None => format!("{ids:?}"),
    };
    Ok((total / plan.batches.max(1) as f64, sample))
}

impl EvalActor {
    pub fn start(plan: EvalPlan, sink: ScoreSink) -> Self {
        // One waiting checkpoint at most: when scoring falls behind, newer checkpoints are
        // skipped rather than queued without bound.
        let (tx, rx) = sync_channel::<(u64, PathBuf)>(1);
        let span = tracing::Span::current();
        let worker = std::thread::Builder::new()
            .name("evaluator".into())
            .spawn(move || {
                let _logs_as_the_trainer = span.enter();
                for (step, dir) in rx {
                    match score(&plan, &dir) {
                        Ok((loss, sample)) => sink(step, loss, &sample),
                        Err(e) => tracing::warn!(step, checkpoint = %dir.display(), cause = %e, "evaluation failed"),
                    }
                }
            })
            .expect("spawn the evaluator");
        Self {
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    /// Queues the checkpoint of `step`; skipped (with a note) if one is already waiting.
    pub fn submit(&self, step: u64, dir: PathBuf) {
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full((step, _))) = tx.try_send((step, dir)) {
                tracing::info!("evaluator busy: the checkpoint of step {step} is not scored");
            }
        }
    }

    /// Scores what is queued, then stops.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for EvalActor {
    fn drop(&mut self) {
        self.finish();
    }
}
