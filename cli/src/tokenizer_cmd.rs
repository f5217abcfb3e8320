//! `lillm tokenizer train|encode|render-chat|decode`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lillm_data::tokenizer::Tokenizer;
use lillm_prepare::corpus::{CorpusSpec, TextUnit};
use lillm_prepare::tokenizer_training::{self, TrainOptions};

/// Where documents come from; shared by `tokenizer train` and `data prepare`.
#[derive(Args, Debug, Clone)]
pub struct CorpusArgs {
    /// Corpus files or directories (.txt, .jsonl/.json, .parquet).
    #[arg(long = "input", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// JSONL / Parquet field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// How .txt files split into documents: file, paragraph or line.
    #[arg(long, default_value = "paragraph")]
    pub text_unit: TextUnit,
    /// Skip and count malformed records instead of failing on the first.
    #[arg(long)]
    pub skip_bad: bool,
}

impl CorpusArgs {
    pub fn spec(&self) -> CorpusSpec {
        CorpusSpec {
            inputs: self.inputs.clone(),
            field: self.field.clone(),
            text_unit: self.text_unit,
            skip_bad: self.skip_bad,
        }
    }
}

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer (16 special tokens first) and write tokenizer.json.
    Train {
        #[command(flatten)]
        corpus: CorpusArgs,
        /// Vocabulary size including the 16 special tokens.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Minimum pair frequency for a merge.
        #[arg(long, default_value_t = 0)]
        min_frequency: u64,
        /// Output directory (tokenizer.json, tokenizer_config.json).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the token ids of a text as a JSON array.
    Encode {
        /// tokenizer.json or a directory holding one.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Text to encode.
        #[arg(long, conflicts_with = "input")]
        text: Option<String>,
        /// File whose whole content is encoded.
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Print a conversation (a JSON array of {role, content}) as the chat template renders it
    /// — the text a fine-tuned model reads.
    RenderChat {
        /// JSON file holding the messages.
        #[arg(long)]
        messages: PathBuf,
        /// End with the header of the assistant's next reply (what `chat` and `serve` send).
        #[arg(long)]
        add_generation_prompt: bool,
    },
    /// Print the text of token ids given as a JSON array (argument or stdin).
    Decode {
        #[arg(long)]
        tokenizer: PathBuf,
        /// JSON array of ids, e.g. "[1, 2, 3]"; read from stdin when absent.
        #[arg(long)]
        ids: Option<String>,
    },
}

pub fn run(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train {
            corpus,
            vocab_size,
            min_frequency,
            out,
        } => {
            let started = std::time::Instant::now();
            let opts = TrainOptions {
                vocab_size,
                min_frequency,
                show_progress: crate::interactive(),
            };
            let tok = tokenizer_training::train(&corpus.spec(), &opts, &out)?;
            println!(
                "trained tokenizer: {} tokens in {:.1}s → {}",
                tok.vocab_size(),
                started.elapsed().as_secs_f64(),
                tok.path.display()
            );
        }
        TokenizerCmd::Encode {
            tokenizer,
            text,
            input,
        } => {
            let tok = Tokenizer::load(&tokenizer)?;
            let text = match (text, input) {
                (Some(t), _) => t,
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .with_context(|| format!("{}: cannot read as UTF-8 text", path.display()))?,
                (None, None) => bail!("give the text with --text or a file with --input"),
            };
            println!("{}", serde_json::to_string(&tok.encode(&text)?)?);
        }
        TokenizerCmd::RenderChat {
            messages,
            add_generation_prompt,
        } => {
            let text = std::fs::read_to_string(&messages)
                .with_context(|| format!("{}: cannot read", messages.display()))?;
            let turns: Vec<lillm_data::sft::Message> =
                serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{}: expected a JSON array of {{\"role\": …, \"content\": …}} messages",
                        messages.display()
                    )
                })?;
            print!(
                "{}",
                lillm_data::chat_template::render(&turns, add_generation_prompt)?
            );
        }
        TokenizerCmd::Decode { tokenizer, ids } => {
            let tok = Tokenizer::load(&tokenizer)?;
            let ids = match ids {
                Some(s) => s,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s
                }
            };
            let ids: Vec<u32> = serde_json::from_str(ids.trim())
                .context("--ids must be a JSON array of non-negative integers, e.g. [1, 2, 3]")?;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
                bail!(
                    "id {bad} is outside the vocabulary (size {})",
                    tok.vocab_size()
                );
            }
            println!("{}", tok.decode(&ids)?);
        }
    }
    Ok(())
}
