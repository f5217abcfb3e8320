//! `lillm eval`: mean next-token cross entropy of a text's tokens under a model.

use tch::{Kind, Tensor};

use crate::LilLM;

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
pub fn eval_ids(model: &LilLM, ids: &[u32]) -> TextEval {
    let _guard = tch::no_grad_guard();
    let window = model.config().max_seq_len;
    let device = model.device();
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
        let losses = model.token_losses(&x, &y, false);
        sum += losses.sum(Kind::Double).double_value(&[]);
        count += n as usize;
        start = end - 1;
    }
    TextEval {
        loss: if count == 0 {
            f64::NAN
        } else {
            sum / count as f64
        },
        tokens: count,
    }
}
