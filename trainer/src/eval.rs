//! `lillm eval`: mean next-token cross entropy of a text under a checkpoint.

use tch::{Kind, Tensor};

use crate::{LoadedModel, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextEval {
    /// Mean cross entropy per predicted token (nats).
    pub loss: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
}

impl TextEval {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Scores `ids` in consecutive windows of `max_seq_len` predictions; each token after the
/// first is predicted exactly once, from up to `max_seq_len` tokens of context.
pub fn eval_ids(loaded: &LoadedModel, ids: &[u32]) -> Result<TextEval> {
    let _guard = tch::no_grad_guard();
    let window = loaded.model.config().max_seq_len;
    let device = loaded.model.device();
    let (mut sum, mut count) = (0.0, 0usize);
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = (start + window + 1).min(ids.len());
        let chunk: Vec<i64> = ids[start..end].iter().map(|&t| t as i64).collect();
        let n = chunk.len() as i64 - 1;
        let x = Tensor::from_slice(&chunk[..n as usize])
            .view([1, n])
            .to(device);
        let y = Tensor::from_slice(&chunk[1..]).view([1, n]).to(device);
        let losses = loaded.model.token_losses(&x, &y, false);
        sum += losses.sum(Kind::Double).double_value(&[]);
        count += n as usize;
        start = end - 1;
    }
    Ok(TextEval {
        loss: if count == 0 {
            f64::NAN
        } else {
            sum / count as f64
        },
        tokens: count,
    })
}
