//! `lillm chat`: a multi-turn terminal chat with streaming replies.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lillm_data::sft::{render_prompt, Message};

use crate::infer_cmd::{stream_reply, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    /// Fine-tuned checkpoint (or run directory).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let generator = args.sampling.generator(&args.checkpoint)?;
    let tok = &generator.tokenizer;
    let context = generator.context;
    let mut turn = 0;
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "chatting with {} — /reset clears the history, /quit or Ctrl-D leaves",
        args.checkpoint.display()
    );
    loop {
        write!(out, "you> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clear();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        // Forget the oldest turns when the conversation outgrows the context.
        let mut prompt = tok.encode(&render_prompt(&history)?)?;
        while prompt.len() + 8 >= context && history.len() > 1 {
            history.remove(0);
            prompt = tok.encode(&render_prompt(&history)?)?;
        }
        if prompt.len() >= context {
            eprintln!(
                "(that message alone is longer than the model's context of {context} tokens)"
            );
            history.clear();
            continue;
        }
        write!(out, "lillm> ")?;
        out.flush()?;
        let budget = args.sampling.max_new_tokens.min(context - prompt.len());
        // Each turn samples with its own seed (--seed plus the turn), reproducibly.
        let reply = stream_reply(
            &generator,
            prompt,
            budget,
            args.sampling.params(turn)?,
            &mut out,
        )?;
        turn += 1;
        writeln!(out)?;
        history.push(Message {
            role: "assistant".into(),
            content: reply.text,
        });
    }
    Ok(())
}
