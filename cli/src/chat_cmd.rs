//! `lillm chat`: a multi-turn terminal chat with streaming replies.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lillm_data::sft::{render_prompt, Message};
use lillm_data::tokenizer::EOS_ID;
use lillm_model::generate;

use crate::infer_cmd::SamplingArgs;
use lillm_serve::text_stream::{IncrementalText, Step};

#[derive(Args)]
pub struct ChatArgs {
    /// Fine-tuned checkpoint (or run directory).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn chat(args: ChatArgs) -> Result<()> {
    let loaded = args.sampling.load(&args.checkpoint)?;
    let tok = loaded.tokenizer()?;
    let context = loaded.model.config().max_seq_len;
    let mut sampler = args.sampling.sampler()?;
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "chatting with {} — /reset clears the history, /quit or Ctrl-D leaves",
        loaded.dir.display()
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
        let mut text = IncrementalText::new(tok, Vec::new());
        let mut reply = String::new();
        let budget = args.sampling.max_new_tokens.min(context - prompt.len());
        generate(
            &loaded.model,
            &prompt,
            budget,
            &mut sampler,
            &[EOS_ID],
            |id| match text.push(id) {
                Ok(Step::Continue(delta)) | Ok(Step::Stop(delta)) => {
                    reply.push_str(&delta);
                    write!(out, "{delta}").and_then(|_| out.flush()).is_ok()
                }
                Err(_) => false,
            },
        )?;
        let rest = text.finish()?;
        reply.push_str(&rest);
        writeln!(out, "{rest}")?;
        history.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}
