//! Preference pairs for DPO: a prompt (text or chat turns) with a chosen and a rejected
//! reply, each rendered with the chat template and encoded with a response mask.

use std::fs;
use std::path::Path;

use serde::Deserialize;

use crate::sft::{render_prompt, Message};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One encoded reply: `ids` = prompt + reply + `</s>`; `mask[j]` = 1 on the reply's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scored {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub chosen: Scored,
    pub rejected: Scored,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Turns(Vec<Message>),
}

#[derive(Deserialize)]
struct PairLine {
    prompt: Prompt,
    chosen: String,
    rejected: String,
}

fn encode_reply(tok: &Tokenizer, prompt: &str, prompt_len: usize, reply: &str) -> Result<Scored> {
    // The prompt ends with the special token `<r1>`, so the reply never merges into it and
    // the prompt's encoding is a prefix of the whole encoding.
    let ids = tok.encode(&format!("{prompt}{reply}</s>"))?;
    let mask = (0..ids.len()).map(|j| u8::from(j >= prompt_len)).collect();
    Ok(Scored { ids, mask })
}

/// Reads and encodes pairs from JSONL lines `{"prompt", "chosen", "rejected"}` where the
/// prompt is a user message or a list of `{role, content}` turns.
pub fn read_pairs(
    tok: &Tokenizer,
    path: &Path,
    max_seq_len: usize,
) -> Result<(Vec<PreferencePair>, usize)> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut pairs, mut filtered) = (Vec::new(), 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: PairLine = serde_json::from_str(line).map_err(|e| {
            Error::bad_record(
                path,
                i + 1,
                format!("expected {{\"prompt\", \"chosen\", \"rejected\"}} ({e})"),
            )
        })?;
        let turns = match parsed.prompt {
            Prompt::Text(t) => vec![Message {
                role: "user".into(),
                content: t,
            }],
            Prompt::Turns(t) => t,
        };
        let prompt = render_prompt(&turns)?;
        let prompt_len = tok.encode(&prompt)?.len();
        let chosen = encode_reply(tok, &prompt, prompt_len, &parsed.chosen)?;
        let rejected = encode_reply(tok, &prompt, prompt_len, &parsed.rejected)?;
        if chosen.ids.len() >= max_seq_len || rejected.ids.len() >= max_seq_len {
            filtered += 1;
            continue;
        }
        pairs.push(PreferencePair { chosen, rejected });
    }
    if pairs.is_empty() {
        return Err(Error::invalid(path, format!("holds no pair shorter than max_seq_len = {max_seq_len} tokens ({filtered} filtered)")));
    }
    Ok((pairs, filtered))
}

/// The encoded pairs of a JSONL file, split, with what was filtered.
#[derive(Debug, Clone)]
pub struct PairData {
    pub train: Vec<PreferencePair>,
    pub val: Vec<PreferencePair>,
    /// Pairs dropped because a reply's encoding has ≥ max_seq_len tokens.
    pub filtered_too_long: usize,
    pub tokenizer_fingerprint: String,
}

/// Reads, encodes and splits `path`, holding out `val_fraction` of the pairs (seeded).
pub fn build(
    tok: &Tokenizer,
    path: &Path,
    max_seq_len: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<PairData> {
    let (pairs, filtered) = read_pairs(tok, path, max_seq_len)?;
    let (train, val) = crate::split::split_by_hash(pairs, val_fraction, seed);
    if val.is_empty() || train.is_empty() {
        return Err(Error::invalid(
            path,
            format!(
                "too few pairs to hold {} out for evaluation ({} train, {} held out); add pairs or change the validation fraction",
                if val.is_empty() { "any" } else { "all" },
                train.len(),
                val.len()
            ),
        ));
    }
    Ok(PairData {
        train,
        val,
        filtered_too_long: filtered,
        tokenizer_fingerprint: tok.fingerprint()?,
    })
}

/// Rows `[chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}]` padded to the longest, as
/// (inputs, targets with −1 outside the replies, row length).
pub fn pair_batch(pairs: &[&PreferencePair]) -> (Vec<i64>, Vec<i64>, usize) {
    let rows: Vec<&Scored> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let seq = rows
        .iter()
        .map(|r| r.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut inputs = vec![0i64; rows.len() * seq];
    let mut targets = vec![-1i64; rows.len() * seq];
    for (r, row) in rows.iter().enumerate() {
        for j in 0..row.ids.len() - 1 {
            inputs[r * seq + j] = row.ids[j] as i64;
            if row.mask[j + 1] == 1 {
                targets[r * seq + j] = row.ids[j + 1] as i64;
            }
        }
    }
    (inputs, targets, seq)
}
