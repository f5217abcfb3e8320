//! Supervised fine-tuning examples: conversations rendered with the chat template, encoded,
//! filtered by length, with the assistant-only loss mask of SPEC §6.
//!
//! Template ([`crate::chat_template`], no spaces added): user and system turns
//! `<r0>ROLE<r1>{content}</r2>`, assistant turns `<r0>assistant<r1>{content}</s>`. `mask[j] = 1` exactly when `ids[j]` is a loss
//! target: the tokens of an assistant's content and its closing `</s>`. Because `<r1>` and
//! `</s>` are special tokens, assistant content never shares a token with the tags around it.

use std::fs;
use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::split::{split_by_hash, splitmix64};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The template's text for a whole conversation, and the byte ranges that carry loss.
pub fn render(messages: &[Message]) -> Result<(String, Vec<std::ops::Range<usize>>)> {
    crate::chat_template::render_with_targets(messages)
}

/// The prompt for the model's next reply: the conversation so far plus `<r0>assistant<r1>`.
pub fn render_prompt(messages: &[Message]) -> Result<String> {
    crate::chat_template::render(messages, true)
}

/// One encoded conversation: `ids` unpadded, `mask[j]` = 1 when `ids[j]` is a loss target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

/// Encodes a conversation and derives its mask from token offsets.
pub fn encode_conversation(tok: &Tokenizer, messages: &[Message]) -> Result<(String, SftExample)> {
    let (text, targets) = render(messages)?;
    let (ids, offsets) = tok.encode_with_offsets(&text)?;
    let mask = offsets
        .iter()
        .map(|&(start, end)| {
            let inside = targets
                .iter()
                .any(|r| start >= r.start && end <= r.end && end > start);
            u8::from(inside)
        })
        .collect();
    Ok((text, SftExample { ids, mask }))
}

/// Reads conversations from JSONL: each line an object whose `conversation` or `messages`
/// field is a list of `{role, content}`; roles are `system`, `user` or `assistant`.
pub fn read_conversations(path: &Path) -> Result<Vec<Vec<Message>>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| Error::bad_record(path, i + 1, m);
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let turns = value
            .get("conversation")
            .or_else(|| value.get("messages"))
            .ok_or_else(|| bad("no `conversation` or `messages` field".into()))?;
        let messages: Vec<Message> = serde_json::from_value(turns.clone()).map_err(|e| {
            bad(format!(
                "turns must be a list of {{role, content}} strings ({e})"
            ))
        })?;
        if let Some(m) = messages
            .iter()
            .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
        {
            return Err(bad(format!(
                "unknown role `{}`; use system, user or assistant",
                m.role
            )));
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(bad("no assistant turn: nothing to learn from".into()));
        }
        out.push(messages);
    }
    Ok(out)
}

/// Encoded examples, split, with what was filtered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftData {
    pub max_seq_len: usize,
    pub train: Vec<SftExample>,
    pub val: Vec<SftExample>,
    /// Conversations dropped because their encoding has ≥ max_seq_len tokens.
    pub filtered_too_long: usize,
    pub tokenizer_fingerprint: String,
    pub source: PathBuf,
}

/// Builds the SFT dataset of a JSONL file: encode, drop those ≥ `max_seq_len` tokens, and hold
/// out `val_fraction` of conversations (seeded, at least one when there are several).
pub fn build(
    tok: &Tokenizer,
    path: &Path,
    max_seq_len: usize,
    val_fraction: f64,
    seed: u64,
) -> Result<SftData> {
    let conversations = read_conversations(path)?;
    if conversations.is_empty() {
        return Err(Error::invalid(path, "holds no conversations"));
    }
    let mut kept = Vec::new();
    for conv in &conversations {
        let (_, example) = encode_conversation(tok, conv)?;
        if example.ids.len() < max_seq_len {
            kept.push(example);
        }
    }
    let filtered = conversations.len() - kept.len();
    let (train, val) = split_by_hash(kept, val_fraction, seed);
    if train.is_empty() {
        return Err(Error::invalid(
            path,
            format!("no conversation is shorter than max_seq_len = {max_seq_len} tokens ({filtered} filtered)"),
        ));
    }
    Ok(SftData {
        max_seq_len,
        train,
        val,
        filtered_too_long: filtered,
        tokenizer_fingerprint: tok.fingerprint()?,
        source: path.to_path_buf(),
    })
}

/// A padded micro-batch: inputs `ids[..n-1]`, targets `ids[1..]` with −1 where the mask is 0.
pub fn sft_batch(
    examples: &[SftExample],
    indices: &[usize],
    block_size: usize,
) -> (Vec<i64>, Vec<i64>) {
    let mut inputs = vec![0i64; indices.len() * block_size];
    let mut targets = vec![-1i64; indices.len() * block_size];
    for (row, &i) in indices.iter().enumerate() {
        let ex = &examples[i];
        let n = (ex.ids.len() - 1).min(block_size);
        for j in 0..n {
            inputs[row * block_size + j] = ex.ids[j] as i64;
            if ex.mask[j + 1] == 1 {
                targets[row * block_size + j] = ex.ids[j + 1] as i64;
            }
        }
    }
    (inputs, targets)
}

/// Example indices of micro-batch `micro` of `step`: epochs of a seeded shuffle, so the order
/// is a pure function of (seed, step, micro) and a resume continues it exactly.
pub fn batch_indices(
    n: usize,
    seed: u64,
    step: u64,
    micro: u64,
    micros_per_step: u64,
    batch_size: usize,
) -> Vec<usize> {
    let first = ((step * micros_per_step + micro) as usize) * batch_size;
    let mut order: (usize, Vec<usize>) = (usize::MAX, Vec::new());
    (first..first + batch_size)
        .map(|k| {
            let (epoch, pos) = (k / n, k % n);
            if order.0 != epoch {
                let mut perm: Vec<usize> = (0..n).collect();
                perm.shuffle(&mut StdRng::seed_from_u64(splitmix64(
                    seed ^ splitmix64(epoch as u64),
                )));
                order = (epoch, perm);
            }
            order.1[pos]
        })
        .collect()
}
