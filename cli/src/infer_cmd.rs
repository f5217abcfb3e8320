//! `lillm eval` and `lillm generate`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use lillm_checkpoint::LoadedModel;
use lillm_model::eval::eval_ids;
use lillm_model::parse_device;
use lillm_model::SamplingParams;
use lillm_serve::{DecodeMode, GenEvent, GenRequest, Generator, Limits};

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// 0 = no limit.
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bfloat16 on CUDA, float32 on a CPU), float32 or bfloat16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// LoRA adapter checkpoint (`lillm sft --lora-rank`) to merge into --checkpoint, which
    /// must be the base it was trained on.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// How decode steps run, as in `lillm serve`: auto (CUDA graphs on a GPU), eager,
    /// graphs or static.
    #[arg(long, default_value = "auto")]
    pub decode: String,
}

impl SamplingArgs {
    /// The sampling of one reply, seeded with `--seed` plus `offset` (a chat's turn).
    pub fn params(&self, offset: u64) -> Result<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed.wrapping_add(offset),
            ..SamplingParams::default()
        };
        params.validate()?;
        Ok(params)
    }

    /// The checkpoint loaded as [`Self::load`] does, in the generation thread `lillm serve`
    /// decodes with (one sequence at a time).
    pub fn generator(&self, checkpoint: &std::path::Path) -> Result<Generator> {
        let loaded = self.load(checkpoint)?;
        let device = loaded.model.device();
        let decode = DecodeMode::parse(&self.decode, device, &loaded.model)?;
        Generator::new(
            loaded,
            Limits {
                max_batch: 1,
                max_queue: 1,
                threads: None,
                decode,
            },
        )
    }

    /// Loads the checkpoint (with the --lora adapter merged in) on the requested device, to
    /// compute in --dtype as `lillm serve` does.
    pub fn load(&self, checkpoint: &std::path::Path) -> Result<LoadedModel> {
        let device = parse_device(&self.device)?;
        let kind = lillm_serve::inference_kind(&self.dtype, device)?;
        let checkpoint = &crate::local_checkpoint(checkpoint)?;
        let mut loaded = match &self.lora {
            Some(adapter) => LoadedModel::load_adapted(checkpoint, adapter, device)?,
            None => LoadedModel::load(checkpoint, device)?,
        };
        loaded.set_inference_kind(kind);
        Ok(loaded)
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint); either may be a
    /// bucket URL (`s3://…`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text file to score.
    #[arg(long)]
    text_file: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let checkpoint = crate::local_checkpoint(&args.checkpoint)?;
    let loaded = LoadedModel::load(&checkpoint, parse_device(&args.device)?)?;
    let text = std::fs::read_to_string(&args.text_file)
        .with_context(|| format!("{}: cannot read as UTF-8 text", args.text_file.display()))?;
    let ids = loaded.tokenizer()?.encode(&text)?;
    if ids.len() < 2 {
        bail!(
            "{}: needs at least two tokens to score",
            args.text_file.display()
        );
    }
    let result = eval_ids(&loaded.model, &ids);
    println!(
        "loss={:.6} tokens={} perplexity={:.3}",
        result.loss,
        result.tokens,
        result.perplexity()
    );
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    /// The prompt as raw text.
    Pretrain,
    /// The prompt as a user turn in the chat template, answered as the assistant.
    Sft,
}

/// The SFT chat template for a single user turn awaiting the assistant's reply.
pub fn chat_prompt(user: &str) -> String {
    format!("<r0>user<r1>{user}</r2><r0>assistant<r1>")
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, value_enum, default_value = "pretrain")]
    mode: Mode,
    /// Print to stderr how many tokens were generated and the decode speed (tokens per
    /// second after the first token, which the prompt's prefill delays).
    #[arg(long)]
    timing: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let generator = args.sampling.generator(&args.checkpoint)?;
    let text = match args.mode {
        Mode::Pretrain => args.prompt.clone(),
        Mode::Sft => chat_prompt(&args.prompt),
    };
    let prompt = generator.tokenizer.encode(&text)?;
    let mut out = std::io::stdout().lock();
    if matches!(args.mode, Mode::Pretrain) {
        write!(out, "{}", args.prompt)?;
    }
    let budget = args.sampling.max_new_tokens;
    let reply = stream_reply(
        &generator,
        prompt,
        budget,
        args.sampling.params(0)?,
        &mut out,
    )?;
    writeln!(out)?;
    if args.timing {
        eprintln!("{}", reply.timing());
    }
    if reply.context_full(budget) {
        eprintln!(
            "(stopped: the model's context of {} tokens is full)",
            generator.context
        );
    }
    Ok(())
}

/// How a streamed reply ended.
pub struct Reply {
    /// The whole text written.
    pub text: String,
    /// `stop` (`</s>`) or `length` (the token budget or the context).
    pub finish_reason: &'static str,
    pub tokens: usize,
    /// From the first text to the end of the reply.
    pub decoding: std::time::Duration,
}

impl Reply {
    /// The tokens generated and the decode speed, as `--timing` prints them.
    pub fn timing(&self) -> String {
        let secs = self.decoding.as_secs_f64();
        let rate = match self.tokens {
            0 | 1 => "n/a".to_string(),
            n => format!("{:.1}", (n - 1) as f64 / secs.max(1e-9)),
        };
        format!(
            "{} tokens ({}), decoding {:.1} ms after the first: {rate} tokens/s",
            self.tokens,
            self.finish_reason,
            1e3 * secs
        )
    }

    /// Whether the context, not a budget of `budget` tokens, ended the reply.
    pub fn context_full(&self, budget: usize) -> bool {
        self.finish_reason == "length" && self.tokens < budget
    }
}

/// Generates up to `max_tokens` after `prompt` in `generator`, writing the text to `out` as
/// it comes.
///
/// # Errors
/// An empty prompt or one that fills the context, a failed generation, or `out` failing
/// (then the request is abandoned: dropping its events frees its place).
pub fn stream_reply(
    generator: &Generator,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    out: &mut impl Write,
) -> Result<Reply> {
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    if prompt.len() >= generator.context {
        bail!(
            "the prompt has {} tokens but the model's context is {} (max_seq_len); shorten it",
            prompt.len(),
            generator.context
        );
    }
    let (events, mut replies) = tokio::sync::mpsc::unbounded_channel();
    generator
        .submit(GenRequest {
            prompt,
            max_tokens,
            sampling,
            stops: Vec::new(),
            events,
            arrived: std::time::Instant::now(),
            logprobs: None,
        })
        .map_err(|_| anyhow::anyhow!("the generation thread has stopped"))?;
    let mut text = String::new();
    let mut first = None;
    while let Some(event) = replies.blocking_recv() {
        match event {
            GenEvent::Delta { text: delta, .. } => {
                first.get_or_insert_with(std::time::Instant::now);
                out.write_all(delta.as_bytes())?;
                out.flush()?;
                text.push_str(&delta);
            }
            GenEvent::Done {
                finish_reason,
                completion_tokens,
            } => {
                return Ok(Reply {
                    text,
                    finish_reason,
                    tokens: completion_tokens,
                    decoding: first.map_or(Default::default(), |t| t.elapsed()),
                })
            }
            GenEvent::Failed(why) => bail!("generation failed: {why}"),
        }
    }
    bail!("the generation thread stopped before the reply ended")
}
