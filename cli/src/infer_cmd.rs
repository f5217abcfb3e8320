//! `lillm eval` and `lillm generate`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use lillm_checkpoint::LoadedModel;
use lillm_data::tokenizer::EOS_ID;
use lillm_model::eval::eval_ids;
use lillm_model::parse_device;
use lillm_model::{generate as generate_tokens, Sampler, SamplingParams, StopReason};

use lillm_serve::text_stream::{IncrementalText, Step};

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
}

impl SamplingArgs {
    pub fn sampler(&self) -> Result<Sampler> {
        Ok(Sampler::new(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            ..SamplingParams::default()
        })?)
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
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let loaded = args.sampling.load(&args.checkpoint)?;
    let tok = loaded.tokenizer()?;
    let text = match args.mode {
        Mode::Pretrain => args.prompt.clone(),
        Mode::Sft => chat_prompt(&args.prompt),
    };
    let prompt = tok.encode(&text)?;
    let mut sampler = args.sampling.sampler()?;
    let mut out = std::io::stdout().lock();
    if matches!(args.mode, Mode::Pretrain) {
        write!(out, "{}", args.prompt)?;
    }
    let mut text = IncrementalText::new(tok, Vec::new());
    let mut io_error = None;
    let reason = generate_tokens(
        &loaded.model,
        &prompt,
        args.sampling.max_new_tokens,
        &mut sampler,
        &[EOS_ID],
        |id| {
            let delta = match text.push(id) {
                Ok(Step::Continue(delta)) | Ok(Step::Stop(delta)) => delta,
                Err(_) => return false,
            };
            match out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    io_error = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = io_error {
        return Err(e.into());
    }
    writeln!(out, "{}", text.finish()?)?;
    if reason == StopReason::Context {
        eprintln!(
            "(stopped: the model's context of {} tokens is full)",
            loaded.model.config().max_seq_len
        );
    }
    Ok(())
}
