//! The generation actor: one thread owns the model and serves requests in arrival order, so
//! concurrent HTTP requests never share mutable model state; each streams its events back.

use std::sync::Arc;

use lillm_checkpoint::LoadedModel;
use lillm_data::tokenizer::{Tokenizer, EOS_ID};
use lillm_model::{generate, Sampler, SamplingParams, StopReason};
use tokio::sync::mpsc;

use crate::text_stream::{IncrementalText, Step};

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub events: mpsc::Sender<GenEvent>,
}

#[derive(Debug)]
pub enum GenEvent {
    Delta(String),
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Handle to the generation thread. Cloneable; the thread ends when the last handle drops.
#[derive(Clone)]
pub struct Generator {
    jobs: mpsc::Sender<GenRequest>,
    pub tokenizer: Arc<Tokenizer>,
    /// The model's context length in tokens.
    pub context: usize,
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum Refused {
    /// `max_queue` requests already wait: come back later.
    Full(usize),
    /// The generation thread is gone.
    Stopped,
}

impl Generator {
    /// Starts the generation thread; at most `max_queue` requests wait behind the one it
    /// runs, and further ones are refused at once (the HTTP layer answers 429).
    pub fn new(mut loaded: LoadedModel, max_queue: usize) -> anyhow::Result<Self> {
        let tokenizer = Arc::new(loaded.tokenizer.take().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: has no tokenizer.json to serve with",
                loaded.dir.display()
            )
        })?);
        let context = loaded.model.config().max_seq_len;
        // Bounded: a burst past the queue is refused, never held in memory.
        let (jobs, mut rx) = mpsc::channel::<GenRequest>(max_queue);
        let tok = tokenizer.clone();
        std::thread::Builder::new()
            .name("lillm-generator".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    run_job(&loaded, &tok, job);
                }
            })?;
        Ok(Self {
            jobs,
            tokenizer,
            context,
        })
    }

    /// Queues a request unless the queue is full; its events arrive on `req.events`.
    pub fn submit(&self, req: GenRequest) -> Result<(), Refused> {
        self.jobs.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Refused::Full(self.jobs.max_capacity()),
            mpsc::error::TrySendError::Closed(_) => Refused::Stopped,
        })
    }
}

fn run_job(loaded: &LoadedModel, tok: &Tokenizer, job: GenRequest) {
    let events = job.events;
    let mut text = IncrementalText::new(tok, job.stops);
    let mut finish = "length";
    let mut failure = None;
    let result = Sampler::new(job.sampling)
        .map_err(anyhow::Error::from)
        .and_then(|mut sampler| {
            Ok(generate(
                &loaded.model,
                &job.prompt,
                job.max_tokens,
                &mut sampler,
                &[EOS_ID],
                |id| match text.push(id) {
                    Ok(Step::Continue(delta)) => {
                        delta.is_empty() || events.blocking_send(GenEvent::Delta(delta)).is_ok()
                    }
                    Ok(Step::Stop(delta)) => {
                        finish = "stop";
                        if !delta.is_empty() {
                            let _ = events.blocking_send(GenEvent::Delta(delta));
                        }
                        false
                    }
                    Err(e) => {
                        failure = Some(e.to_string());
                        false
                    }
                },
            )?)
        });
    let reason = match result {
        Ok(reason) => reason,
        Err(e) => {
            let _ = events.blocking_send(GenEvent::Failed(e.to_string()));
            return;
        }
    };
    if let Some(e) = failure {
        let _ = events.blocking_send(GenEvent::Failed(e));
        return;
    }
    let stopped_by_string = finish == "stop";
    if reason == StopReason::StopToken {
        finish = "stop";
    }
    // Text held back as a possible stop-sequence prefix is real output unless a stop
    // sequence actually ended the reply.
    if !stopped_by_string {
        if let Ok(rest) = text.finish() {
            if !rest.is_empty() {
                let _ = events.blocking_send(GenEvent::Delta(rest));
            }
        }
    }
    let _ = events.blocking_send(GenEvent::Done {
        finish_reason: finish,
        completion_tokens: text.tokens(),
    });
}
