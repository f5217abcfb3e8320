//! Next-token sampling (temperature, top-k, top-p) and the generation loop.

use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::{Error, KvCache, LilLM, Result};

/// How to pick the next token from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = no limit).
    pub top_p: f64,
    pub seed: u64,
    /// Subtracted from the logit of every token already sampled (OpenAI's semantics).
    pub presence_penalty: f64,
    /// Subtracted from a token's logit once per time it was already sampled.
    pub frequency_penalty: f64,
    /// Added to the logits of the named token ids (OpenAI's `logit_bias`, -100 to 100);
    /// a bias of -100 bans the token outright.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            seed: 1337,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Generation(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Generation(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() {
                return Err(Error::Generation(format!("{name} must be finite, got {v}")));
            }
        }
        if let Some((id, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-BAN..=BAN).contains(b))
        {
            return Err(Error::Generation(format!(
                "the logit bias of token {id} must be between -100 and 100, got {bias}"
            )));
        }
        Ok(())
    }
}

/// The largest logit bias; -BAN bans a token (OpenAI's convention).
const BAN: f32 = 100.0;

/// A seeded sampler: the same seed and logits give the same tokens.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was sampled so far (for the penalties).
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            counts: Default::default(),
        })
    }

    /// Picks a token id from float logits of shape (vocab,).
    pub fn sample(&mut self, logits: &Tensor) -> u32 {
        let logits = self.adjusted(logits.to_kind(Kind::Float).to_device(tch::Device::Cpu));
        let id = self.pick(logits);
        *self.counts.entry(id).or_default() += 1;
        id
    }

    /// `logits` with the request's biases added and the presence and frequency penalties
    /// of the tokens sampled so far subtracted.
    fn adjusted(&self, logits: Tensor) -> Tensor {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        let penalties = !self.counts.is_empty() && (presence != 0.0 || frequency != 0.0);
        if !penalties && self.params.logit_bias.is_empty() {
            return logits;
        }
        let mut values = Vec::<f32>::try_from(&logits).expect("logits are float32");
        if penalties {
            for (&id, &n) in &self.counts {
                if let Some(v) = values.get_mut(id as usize) {
                    *v -= (presence + frequency * f64::from(n)) as f32;
                }
            }
        }
        for &(id, bias) in &self.params.logit_bias {
            if let Some(v) = values.get_mut(id as usize) {
                // -100 is a ban, whatever the temperature and however likely the token was.
                *v = if bias <= -BAN {
                    f32::NEG_INFINITY
                } else {
                    *v + bias
                };
            }
        }
        Tensor::from_slice(&values)
    }

    fn pick(&mut self, logits: Tensor) -> u32 {
        if self.params.temperature == 0.0 {
            return logits.argmax(0, false).int64_value(&[]) as u32;
        }
        let probs = (logits / self.params.temperature).softmax(0, Kind::Float);
        let probs: Vec<f32> = Vec::try_from(&probs).expect("probabilities are float32");
        let mut ranked: Vec<(u32, f32)> = probs
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as u32, p))
            .collect();
        // Only a top-k or top-p cut needs the tokens in order of probability; a plain draw
        // walks them as they are (a sort of the whole vocabulary per token is the costliest
        // part of sampling a batch).
        let by_probability =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.params.top_k > 0 && self.params.top_k < ranked.len() {
            ranked.select_nth_unstable_by(self.params.top_k - 1, by_probability);
            ranked.truncate(self.params.top_k);
        }
        if self.params.top_k > 0 || self.params.top_p < 1.0 {
            ranked.sort_unstable_by(by_probability);
        }
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = ranked
                .iter()
                .position(|&(_, p)| {
                    cumulative += p as f64;
                    cumulative >= self.params.top_p
                })
                .map_or(ranked.len(), |i| i + 1);
            ranked.truncate(keep);
        }
        let total: f64 = ranked.iter().map(|&(_, p)| p as f64).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for &(id, p) in &ranked {
            draw -= p as f64;
            if draw <= 0.0 {
                return id;
            }
        }
        ranked.last().map_or(0, |&(id, _)| id)
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (`</s>`) was produced; it is not passed to the callback.
    StopToken,
    /// `max_new_tokens` were produced.
    Length,
    /// The model's context (`max_seq_len`) is full.
    Context,
    /// The callback asked to stop.
    Caller,
}

/// Generates after `prompt` with a KV cache, calling `on_token` with each new id as soon as it
/// is sampled; `on_token` returns false to stop early.
pub fn generate(
    model: &LilLM,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<StopReason> {
    let cfg = model.config();
    if prompt.is_empty() {
        return Err(Error::Generation("the prompt encodes to no tokens".into()));
    }
    if prompt.len() >= cfg.max_seq_len {
        return Err(Error::Generation(format!(
            "the prompt has {} tokens but the model's context is {} (max_seq_len); shorten it",
            prompt.len(),
            cfg.max_seq_len
        )));
    }
    let device = model.device();
    let _guard = tch::no_grad_guard();
    let mut cache = KvCache::new(cfg, 1, model.compute_kind(), device);
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut logits = model.forward_cached(
        &Tensor::from_slice(&ids).view([1, -1]).to(device),
        &mut cache,
    );
    for _ in 0..max_new_tokens {
        let next = sampler.sample(&logits.get(0));
        if stop_ids.contains(&next) {
            return Ok(StopReason::StopToken);
        }
        if !on_token(next) {
            return Ok(StopReason::Caller);
        }
        if cache.remaining() == 0 {
            return Ok(StopReason::Context);
        }
        let input = Tensor::from_slice(&[next as i64]).view([1, 1]).to(device);
        logits = model.forward_cached(&input, &mut cache);
    }
    Ok(StopReason::Length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, logit_bias: Vec<(u32, f32)>) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            logit_bias,
            ..SamplingParams::default()
        })
        .unwrap()
    }

    #[test]
    fn a_bias_of_minus_100_bans_even_the_most_likely_token() {
        // Token 2 holds nearly all the probability; banned, it is never drawn.
        let logits = Tensor::from_slice(&[0.0f32, 0.0, 30.0, 0.0]);
        for temperature in [0.0, 1.0, 2.0] {
            let mut s = sampler(temperature, vec![(2, -100.0)]);
            for _ in 0..200 {
                assert_ne!(s.sample(&logits), 2, "temperature {temperature}");
            }
        }
        assert_eq!(sampler(0.0, vec![]).sample(&logits), 2);
    }

    #[test]
    fn a_bias_moves_the_greedy_choice_and_out_of_range_biases_are_refused() {
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert_eq!(sampler(0.0, vec![(0, 2.5)]).sample(&logits), 0);
        assert_eq!(sampler(0.0, vec![(0, 1.5)]).sample(&logits), 2);
        // An id past the vocabulary changes nothing.
        assert_eq!(sampler(0.0, vec![(7, 50.0)]).sample(&logits), 2);
        let err = Sampler::new(SamplingParams {
            logit_bias: vec![(5, 101.0)],
            ..SamplingParams::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("token 5"), "{err}");
    }
}
