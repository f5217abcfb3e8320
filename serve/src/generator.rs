//! The generation actor: one thread owns the model and decodes every running request
//! together (continuous batching). Each step runs one forward for all decoding sequences.
//! Every request that arrived meanwhile is admitted at once: the short prompts are
//! prefilled together in one forward, a long one in chunks (one chunk per step, so running
//! streams keep flowing); each joins the decoding at the next step, and a finished, failed
//! or abandoned one leaves at once. Each request keeps its own sampler, stop strings and
//! token budget, so its output does not depend on what else runs beside it.

use std::sync::Arc;
use std::time::Instant;

use lillm_checkpoint::LoadedModel;
use lillm_data::tokenizer::{Tokenizer, EOS_ID};
use lillm_model::{sample_rows, KvCache, LilLM, Sampler, SamplingParams, SlotCache};
use tch::Tensor;
use tokio::sync::mpsc;

use crate::decode::{DecodeMode, Decoder};
use crate::full_batch::FullBatchNotice;
use crate::long_prefill::exact_chunk;
use crate::metrics::{Memory, Metrics, Outcome as Ended};
use crate::text_stream::{IncrementalText, Step};

/// Prompt tokens prefilled per step: bounds how long a long prompt holds up running streams.
const PREFILL_CHUNK: usize = 128;

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    /// Unbounded, so that one slow reader never stalls the batch; a reply holds at most
    /// `max_tokens` events.
    pub events: mpsc::UnboundedSender<GenEvent>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

/// A generated token's log-probability under the model (its distribution before
/// temperature and penalties), with the most likely alternatives when asked for.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug)]
pub enum GenEvent {
    /// New text, with the log-probabilities of the tokens it completes (when asked for).
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
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
    pub metrics: Arc<Metrics>,
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum Refused {
    /// `max_queue` requests already wait: come back later.
    Full(usize),
    /// The generation thread is gone.
    Stopped,
}

/// Batching limits, and the CPU the generator may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; past that, requests are refused.
    pub max_queue: usize,
    /// libtorch CPU threads for the forward passes (`None`: libtorch's default).
    pub threads: Option<usize>,
    /// How decode steps run.
    pub decode: DecodeMode,
}

impl Generator {
    /// Starts the generation thread.
    pub fn new(mut loaded: LoadedModel, limits: Limits) -> anyhow::Result<Self> {
        let tokenizer = Arc::new(loaded.tokenizer.take().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: has no tokenizer.json (it encodes the prompts and decodes the replies)",
                loaded.dir.display()
            )
        })?);
        let context = loaded.model.config().max_seq_len;
        // Bounded: a burst past the queue is refused, never held in memory.
        let (jobs, rx) = mpsc::channel::<GenRequest>(limits.max_queue);
        let (tok, metrics) = (tokenizer.clone(), Arc::new(Metrics::default()));
        let _ = metrics.memory.set(Memory::of(
            &loaded,
            limits.max_batch,
            limits.decode,
            PREFILL_CHUNK,
        ));
        let figures = metrics.clone();
        std::thread::Builder::new()
            .name("lillm-generator".into())
            .spawn(move || {
                // Set on the thread that runs the forwards: OpenMP keeps it per thread.
                if let Some(n) = limits.threads {
                    tch::set_num_threads(n as i32);
                }
                let _guard = tch::no_grad_guard();
                Batch::new(&loaded.model, &tok, &figures, limits).run(rx);
            })?;
        Ok(Self {
            jobs,
            tokenizer,
            context,
            metrics,
        })
    }

    /// Requests waiting for a place in the batch.
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Queues a request unless the queue is full; its events arrive on `req.events`.
    pub fn submit(&self, req: GenRequest) -> Result<(), Refused> {
        self.jobs.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Refused::Full(self.jobs.max_capacity()),
            mpsc::error::TrySendError::Closed(_) => Refused::Stopped,
        })
    }
}

/// One request being answered.
struct Sequence<'t> {
    sampler: Sampler,
    text: IncrementalText<'t>,
    max_tokens: usize,
    events: mpsc::UnboundedSender<GenEvent>,
    /// The token to feed at the next decode step.
    next: u32,
    metrics: &'t Metrics,
    arrived: Instant,
    last_token: Option<Instant>,
    tok: &'t Tokenizer,
    logprobs: Option<usize>,
    /// Log-probabilities of tokens whose text is still held back.
    pending: Vec<TokenLogprob>,
}

/// A request admitted but not yet prefilled.
struct Arrival<'t> {
    sequence: Sequence<'t>,
    prompt: Vec<u32>,
}

/// A long request whose prompt is being prefilled, chunk by chunk: into its own cache when
/// decoding eagerly, else into the fixed-shape decoder's ([`Decoder::prefill_long`]).
struct Prefill<'t> {
    sequence: Sequence<'t>,
    prompt: Vec<u32>,
    /// Prompt positions prefilled so far.
    done: usize,
    own_cache: Option<KvCache>,
}

/// What a sampled token did to its sequence.
enum Outcome {
    Continue,
    Finished,
}

/// The running batch: the sequences decoding in `slots` (sequence `i` in slot `i`), those
/// admitted since the last step, and the long one being prefilled.
struct Batch<'a> {
    model: &'a LilLM,
    tok: &'a Tokenizer,
    metrics: &'a Metrics,
    slots: SlotCache,
    decoder: Decoder,
    max_batch: usize,
    decoding: Vec<Sequence<'a>>,
    arrivals: Vec<Arrival<'a>>,
    prefill: Option<Prefill<'a>>,
    full: FullBatchNotice,
}

impl<'a> Batch<'a> {
    /// The batch, its decoder set up (graphs captured) before the first request is read.
    fn new(model: &'a LilLM, tok: &'a Tokenizer, metrics: &'a Metrics, limits: Limits) -> Self {
        let cfg = model.config();
        let max_batch = limits.max_batch;
        let mut slots = SlotCache::new(cfg, max_batch, model.compute_kind(), model.device());
        let (decoder, captured) = Decoder::new(limits.decode, model, &mut slots, PREFILL_CHUNK);
        match captured {
            Ok(c) if c.graphs > 0 => {
                metrics.note_graphs(c);
                eprintln!(
                    "decode: {} CUDA graphs captured (decode steps of up to {max_batch} sequences, prompts by length up to {PREFILL_CHUNK} tokens, longer ones a chunk of {PREFILL_CHUNK} at a time), {:.1} MiB",
                    c.graphs,
                    c.bytes as f64 / (1u64 << 20) as f64
                );
            }
            Ok(_) => {}
            Err(e) => eprintln!("decode: {e}; decoding without CUDA graphs"),
        }
        Self {
            model,
            tok,
            metrics,
            slots,
            decoder,
            max_batch,
            decoding: Vec::new(),
            arrivals: Vec::new(),
            prefill: None,
            full: FullBatchNotice::default(),
        }
    }

    /// Requests holding a place in the batch.
    fn placed(&self) -> usize {
        self.decoding.len() + self.arrivals.len() + usize::from(self.prefill.is_some())
    }

    /// Serves until every handle is dropped and the last request is answered.
    fn run(mut self, mut jobs: mpsc::Receiver<GenRequest>) {
        loop {
            // Admit every waiting request there is a place for, so a burst starts together.
            while self.placed() < self.max_batch {
                let job = match self.placed() {
                    // Nothing running: wait for work.
                    0 => match jobs.blocking_recv() {
                        Some(job) => job,
                        None => return,
                    },
                    _ => match jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    },
                };
                self.start(job);
            }
            if self.placed() == self.max_batch {
                let waiting = jobs.len();
                if let Some(line) = self.full.check(waiting, self.max_batch, Instant::now()) {
                    eprintln!("{line}");
                }
            }
            self.drop_abandoned();
            self.prefill_arrivals();
            self.prefill_chunk();
            self.decode_step();
        }
    }

    fn start(&mut self, job: GenRequest) {
        let sampler = match (job.prompt.is_empty(), Sampler::new(job.sampling)) {
            (false, Ok(s)) => s,
            (empty, sampler) => {
                let why = match sampler {
                    Err(e) if !empty => e.to_string(),
                    _ => "the prompt is empty: there is no token to continue".into(),
                };
                self.metrics.count(Ended::Failed);
                let _ = job.events.send(GenEvent::Failed(why));
                return;
            }
        };
        self.arrivals.push(Arrival {
            sequence: Sequence {
                sampler,
                text: IncrementalText::new(self.tok, job.stops),
                max_tokens: job.max_tokens,
                events: job.events,
                next: 0,
                metrics: self.metrics,
                arrived: job.arrived,
                last_token: None,
                tok: self.tok,
                logprobs: job.logprobs,
                pending: Vec::new(),
            },
            prompt: job.prompt,
        });
    }

    /// Clients that went away (a closed stream or an abandoned request) free their place.
    fn drop_abandoned(&mut self) {
        if self
            .prefill
            .as_ref()
            .is_some_and(|p| p.sequence.events.is_closed())
        {
            self.prefill = None;
            self.metrics.count(Ended::Cancelled);
        }
        let before = self.arrivals.len();
        self.arrivals.retain(|a| !a.sequence.events.is_closed());
        for _ in self.arrivals.len()..before {
            self.metrics.count(Ended::Cancelled);
        }
        for i in (0..self.decoding.len()).rev() {
            if self.decoding[i].events.is_closed() {
                self.remove(i);
                self.metrics.count(Ended::Cancelled);
            }
        }
    }

    /// Prefills every short arrival together in one forward (see
    /// [`LilLM::prefill_rows`]); a long one becomes the chunked prefill when that is free.
    fn prefill_arrivals(&mut self) {
        let (mut short, long): (Vec<_>, Vec<_>) = std::mem::take(&mut self.arrivals)
            .into_iter()
            .partition(|a| a.prompt.len() <= PREFILL_CHUNK);
        let mut long = long.into_iter();
        if self.prefill.is_none() {
            let (model, fixed) = (self.model, self.decoder.prefills());
            self.prefill = long.next().map(|a| Prefill {
                sequence: a.sequence,
                prompt: a.prompt,
                done: 0,
                own_cache: (!fixed)
                    .then(|| KvCache::new(model.config(), 1, model.compute_kind(), model.device())),
            });
        }
        self.arrivals.extend(long);
        if short.is_empty() {
            return;
        }
        if self.decoder.prefills() {
            for arrival in short {
                self.prefill_alone(arrival);
            }
            self.metrics.set_batch(self.decoding.len());
            return;
        }
        let prompts: Vec<&[u32]> = short.iter().map(|a| a.prompt.as_slice()).collect();
        self.metrics
            .prefill_peak
            .fetch_max(prompts.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let mut cache = KvCache::with_capacity(
            self.model.config(),
            prompts.len(),
            longest,
            self.model.compute_kind(),
            self.model.device(),
        );
        let logits = self.model.prefill_rows(&prompts, &mut cache);
        let mut samplers: Vec<&mut Sampler> =
            short.iter_mut().map(|a| &mut a.sequence.sampler).collect();
        let ids = sample_rows(&mut samplers, &logits);
        let context = self.model.config().max_seq_len;
        for (row, (arrival, id)) in short.into_iter().zip(ids).enumerate() {
            let Arrival {
                mut sequence,
                prompt,
            } = arrival;
            let room = context - prompt.len();
            if let Outcome::Continue = sequence.take(id, (&logits, row as i64), room) {
                self.slots.admit(&cache, row, prompt.len());
                self.decoding.push(sequence);
            }
        }
        self.metrics.set_batch(self.decoding.len());
    }

    /// Prefills one short prompt in the decoder's bucket for its length; it samples its
    /// first token and joins the batch.
    fn prefill_alone(&mut self, arrival: Arrival<'a>) {
        let Arrival {
            mut sequence,
            prompt,
        } = arrival;
        let (logits, cache) = match self.decoder.prefill(self.model, &prompt) {
            Ok(done) => done,
            Err(e) => {
                self.metrics.count(Ended::Failed);
                let _ = sequence.events.send(GenEvent::Failed(e.to_string()));
                return;
            }
        };
        let id = sequence.sampler.sample(&logits.get(0));
        let room = self.model.config().max_seq_len - prompt.len();
        if let Outcome::Continue = sequence.take(id, (&logits, 0), room) {
            self.slots.admit(cache, 0, prompt.len());
            self.decoding.push(sequence);
        }
    }

    /// Prefills the next chunk of the waiting prompt; a finished prompt samples its first
    /// token and joins the batch.
    fn prefill_chunk(&mut self) {
        let Some(p) = self.prefill.as_mut() else {
            return;
        };
        let chunk = match &mut p.own_cache {
            Some(cache) => Ok(exact_chunk(
                self.model,
                &p.prompt,
                p.done,
                PREFILL_CHUNK,
                cache,
            )),
            None => self.decoder.prefill_long(self.model, &p.prompt, p.done),
        };
        let logits = match chunk {
            Ok((logits, end)) => {
                p.done = end;
                if end < p.prompt.len() {
                    return;
                }
                logits
            }
            Err(e) => {
                let p = self.prefill.take().expect("a prefill");
                self.metrics.count(Ended::Failed);
                let _ = p.sequence.events.send(GenEvent::Failed(e.to_string()));
                return;
            }
        };
        let Prefill {
            mut sequence,
            prompt,
            own_cache,
            ..
        } = self.prefill.take().expect("a prefill");
        // The last position's logits; sampling runs where they are (the GPU, on a GPU).
        let id = sequence.sampler.sample(&logits.get(0));
        let room = self.model.config().max_seq_len - prompt.len();
        if let Outcome::Continue = sequence.take(id, (&logits, 0), room) {
            let cache = match &own_cache {
                Some(cache) => cache,
                None => self.decoder.long_cache(),
            };
            self.slots.admit(cache, 0, prompt.len());
            self.decoding.push(sequence);
            self.metrics.set_batch(self.decoding.len());
        }
    }

    /// One forward for every decoding sequence, then one sampled token each.
    fn decode_step(&mut self) {
        if self.decoding.is_empty() {
            return;
        }
        let tokens: Vec<u32> = self.decoding.iter().map(|s| s.next).collect();
        let logits = match self.decoder.step(self.model, &tokens, &mut self.slots) {
            Ok(logits) => logits,
            Err(e) => {
                // The device failed mid-step: every running reply ends with the reason.
                for i in (0..self.decoding.len()).rev() {
                    let _ = self.decoding[i]
                        .events
                        .send(GenEvent::Failed(e.to_string()));
                    self.metrics.count(Ended::Failed);
                    self.remove(i);
                }
                return;
            }
        };
        // One batched draw where the logits are; only the token ids come back.
        let mut samplers: Vec<&mut Sampler> =
            self.decoding.iter_mut().map(|s| &mut s.sampler).collect();
        let ids = sample_rows(&mut samplers, &logits);
        let mut finished = Vec::new();
        for (i, (sequence, id)) in self.decoding.iter_mut().zip(ids).enumerate() {
            let room = self.slots.remaining(i);
            if let Outcome::Finished = sequence.take(id, (&logits, i as i64), room) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            self.remove(i);
        }
    }

    /// Removes sequence `i`; the last one moves into its slot (see [`SlotCache::release`]).
    fn remove(&mut self, i: usize) {
        self.slots.release(i);
        self.decoding.swap_remove(i);
        self.metrics.set_batch(self.decoding.len());
    }
}

impl Sequence<'_> {
    /// Takes token `id`, sampled from row `row` of `logits`, and sends what it adds to the
    /// reply; `room` is the context left for feeding it back.
    fn take(&mut self, id: u32, logits: (&Tensor, i64), room: usize) -> Outcome {
        if id != EOS_ID {
            self.note_logprob(logits, id);
        }
        let now = Instant::now();
        match self.last_token.replace(now) {
            None => self.metrics.time_to_first_token.observe(now - self.arrived),
            Some(last) => self.metrics.inter_token_latency.observe(now - last),
        }
        if id == EOS_ID {
            return self.finish("stop", true);
        }
        match self.text.push(id) {
            Ok(Step::Continue(delta)) => {
                if !delta.is_empty() {
                    self.send_delta(delta);
                }
            }
            Ok(Step::Stop(delta)) => {
                if !delta.is_empty() {
                    self.send_delta(delta);
                }
                // A stop sequence ended the reply: what it held back is not output.
                return self.finish("stop", false);
            }
            Err(e) => {
                self.metrics.count(Ended::Failed);
                let _ = self.events.send(GenEvent::Failed(e.to_string()));
                return Outcome::Finished;
            }
        }
        self.metrics
            .generated_tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.text.tokens() >= self.max_tokens || room == 0 {
            return self.finish("length", true);
        }
        self.next = id;
        Outcome::Continue
    }

    fn send_delta(&mut self, text: String) {
        let logprobs = std::mem::take(&mut self.pending);
        let _ = self.events.send(GenEvent::Delta { text, logprobs });
    }

    /// Records token `id`'s log-probability (and the top alternatives) under row `row` of
    /// `logits`, when the request asked for them. Only then is the row taken out: at a GPU's
    /// pace even a view per token and step is host time the decoder waits for.
    fn note_logprob(&mut self, (logits, row): (&Tensor, i64), id: u32) {
        let Some(top) = self.logprobs else {
            return;
        };
        let logprobs = logits.get(row).log_softmax(0, tch::Kind::Float);
        let text = |id: i64| self.tok.decode(&[id as u32]).unwrap_or_default();
        let alternatives = match top {
            0 => Vec::new(),
            k => {
                let (values, ids) = logprobs.topk(k as i64, 0, true, true);
                let values = Vec::<f32>::try_from(&values).unwrap_or_default();
                let ids = Vec::<i64>::try_from(&ids).unwrap_or_default();
                ids.into_iter().map(text).zip(values).collect()
            }
        };
        self.pending.push(TokenLogprob {
            token: text(id as i64),
            logprob: logprobs.double_value(&[id as i64]) as f32,
            top: alternatives,
        });
    }

    /// Ends the reply: text held back as a possible stop-string prefix is real output
    /// unless a stop string ended it (`flush`).
    fn finish(&mut self, finish_reason: &'static str, flush: bool) -> Outcome {
        if flush {
            if let Ok(rest) = self.text.finish() {
                if !rest.is_empty() || !self.pending.is_empty() {
                    self.send_delta(rest);
                }
            }
        }
        let _ = self.events.send(GenEvent::Done {
            finish_reason,
            completion_tokens: self.text.tokens(),
        });
        self.metrics.count(Ended::Completed);
        Outcome::Finished
    }
}
