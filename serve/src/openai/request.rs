//! A request's fields checked and turned into what the generator runs ([`Plan`]): each
//! check a small function of the request alone, so that every refusal (its field, its
//! range, OpenAI's error code) is tested on hand-built requests.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use lillm_model::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use super::ApiError;
use crate::AppState;

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
pub(super) struct Sampling {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    /// Token id (as a string, OpenAI's shape) → bias from -100 to 100.
    logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Chat: true/false; completions: how many alternatives (0–5).
    logprobs: Option<Value>,
    /// Chat: how many alternatives (0–20), with `logprobs: true`.
    top_logprobs: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

/// Most choices one request may ask for (`n`): each takes a place in the batch.
const MAX_CHOICES: i64 = 8;

/// Which API a request came through: their `logprobs` fields differ.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Api {
    Chat,
    Completions,
}

/// The log-probabilities a request asks for: `Some(k)` = each token's, with `k`
/// alternatives.
fn logprobs_wanted(s: &Sampling, api: Api) -> Result<Option<usize>, ApiError> {
    let count = |v: &Value, name: &str, max: u64| match v.as_u64() {
        Some(k) if k <= max => Ok(k as usize),
        _ => Err(ApiError::invalid(format!(
            "{name} must be a whole number from 0 to {max}, got {v}"
        ))),
    };
    let top = s.top_logprobs.as_ref().filter(|v| !v.is_null());
    match api {
        Api::Chat => {
            let on = match s.logprobs.as_ref().filter(|v| !v.is_null()) {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ApiError::invalid(format!("logprobs must be true or false, got {v}"))
                })?,
            };
            match (on, top) {
                (false, Some(_)) => Err(ApiError::invalid("top_logprobs needs logprobs: true")),
                (false, None) => Ok(None),
                (true, top) => Ok(Some(
                    top.map(|v| count(v, "top_logprobs", 20))
                        .transpose()?
                        .unwrap_or(0),
                )),
            }
        }
        Api::Completions => {
            if top.is_some() {
                return Err(ApiError::invalid(
                    "top_logprobs is a chat completions field; completions take logprobs: k",
                ));
            }
            s.logprobs
                .as_ref()
                .filter(|v| !v.is_null())
                .map(|v| count(v, "logprobs", 5))
                .transpose()
        }
    }
}

/// A validated generation: prompt ids, token budget, sampling, stops, choices.
pub(super) struct Plan {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stream: bool,
    /// Choices to generate (`n`); choice `i` samples with seed `seed + i`.
    pub choices: usize,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
}

pub(super) fn plan(
    state: &AppState,
    prompt_text: &str,
    s: Sampling,
    api: Api,
) -> Result<Plan, ApiError> {
    let logprobs = logprobs_wanted(&s, api)?;
    check_model(s.model.as_deref(), &state.model_name)?;
    let prompt = state
        .generator
        .tokenizer
        .encode(prompt_text)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let max_tokens = token_budget(
        prompt.len(),
        state.generator.context,
        s.max_completion_tokens.or(s.max_tokens),
    )?;
    let sampling = sampling_params(&s, state.generator.tokenizer.vocab_size())?;
    Ok(Plan {
        prompt,
        max_tokens,
        sampling,
        stops: stops(s.stop)?,
        stream: s.stream,
        choices: choices(s.n)?,
        include_usage: s.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
    })
}

fn check_model(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    match asked {
        Some(model) if model != served => Err(ApiError::with(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("model `{model}` does not exist; this server serves `{served}`"),
        )),
        _ => Ok(()),
    }
}

fn context_exceeded(message: String) -> ApiError {
    ApiError::with(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "context_length_exceeded",
        message,
    )
}

/// The tokens a reply may have: what was asked (`max_tokens`), or by default the rest of
/// the context. Asking for more than fits is refused before any work, as OpenAI does,
/// rather than cut short silently.
fn token_budget(prompt: usize, context: usize, asked: Option<i64>) -> Result<usize, ApiError> {
    if prompt == 0 {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    if prompt >= context {
        return Err(context_exceeded(format!(
            "the prompt has {prompt} tokens but the model's context is {context}; shorten it"
        )));
    }
    let room = context - prompt;
    match asked {
        Some(n) if n < 1 => Err(ApiError::invalid(format!(
            "max_tokens must be at least 1, got {n}"
        ))),
        Some(n) if n as usize > room => Err(context_exceeded(format!(
            "the prompt has {prompt} tokens and max_tokens is {n}, but the model's context is {context} tokens; ask for at most {room} tokens or shorten the prompt"
        ))),
        Some(n) => Ok(n as usize),
        None => Ok(room),
    }
}

/// Temperature, top-k/top-p, penalties, biases and seed, each within OpenAI's range (no
/// seed: one from the clock).
fn sampling_params(s: &Sampling, vocab: usize) -> Result<SamplingParams, ApiError> {
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(format!(
            "temperature must be between 0 and 2, got {temperature}"
        )));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    let penalty = |name: &str, value: Option<f64>| match value.unwrap_or(0.0) {
        v if (-2.0..=2.0).contains(&v) => Ok(v),
        v => Err(ApiError::invalid(format!(
            "{name} must be between -2 and 2, got {v}"
        ))),
    };
    Ok(SamplingParams {
        temperature,
        top_k: s.top_k.unwrap_or(0),
        top_p,
        seed: s.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }),
        presence_penalty: penalty("presence_penalty", s.presence_penalty)?,
        frequency_penalty: penalty("frequency_penalty", s.frequency_penalty)?,
        logit_bias: logit_bias(s.logit_bias.clone().unwrap_or_default(), vocab)?,
    })
}

/// Up to 4 stop sequences, as OpenAI allows.
fn stops(stop: Option<Stop>) -> Result<Vec<String>, ApiError> {
    match stop {
        None => Ok(Vec::new()),
        Some(Stop::One(s)) => Ok(vec![s]),
        Some(Stop::Many(v)) if v.len() <= 4 => Ok(v),
        Some(Stop::Many(_)) => Err(ApiError::invalid("stop may hold at most 4 sequences")),
    }
}

fn choices(n: Option<i64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n if (1..=MAX_CHOICES).contains(&n) => Ok(n as usize),
        n => Err(ApiError::invalid(format!(
            "n must be between 1 and {MAX_CHOICES}, got {n}"
        ))),
    }
}

/// OpenAI's `logit_bias` (`{"token id": bias}`), each id within the vocabulary and each bias
/// from -100 (a ban) to 100.
fn logit_bias(
    given: std::collections::BTreeMap<String, f64>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    given
        .into_iter()
        .map(|(key, bias)| {
            let id = key.parse::<u32>().ok().filter(|&id| (id as usize) < vocab);
            match id {
                None => Err(ApiError::invalid(format!(
                    "logit_bias keys are token ids from 0 to {}, got {key:?}",
                    vocab - 1
                ))),
                Some(_) if !(-100.0..=100.0).contains(&bias) => Err(ApiError::invalid(format!(
                    "logit_bias of token {key} must be between -100 and 100, got {bias}"
                ))),
                Some(id) => Ok((id, bias as f32)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(fields: Value) -> Sampling {
        serde_json::from_value(fields).unwrap()
    }

    /// The refusal's status, OpenAI code and message.
    fn refusal<T>(result: Result<T, ApiError>) -> (StatusCode, Option<&'static str>, String) {
        match result {
            Ok(_) => panic!("accepted"),
            Err(e) => (e.status, e.code, e.message),
        }
    }

    #[test]
    fn the_reply_fills_the_context_unless_max_tokens_says_less() {
        assert_eq!(token_budget(10, 128, None).unwrap(), 118);
        assert_eq!(token_budget(10, 128, Some(118)).unwrap(), 118);
        assert_eq!(token_budget(10, 128, Some(5)).unwrap(), 5);
    }

    #[test]
    fn a_reply_that_cannot_fit_is_refused_before_any_work() {
        let (status, code, message) = refusal(token_budget(10, 128, Some(119)));
        assert_eq!(
            (status, code),
            (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
        );
        assert!(message.contains("at most 118 tokens"), "{message}");
        let (_, code, message) = refusal(token_budget(128, 128, None));
        assert_eq!(code, Some("context_length_exceeded"));
        assert!(message.contains("128 tokens"), "{message}");
        let (_, _, message) = refusal(token_budget(10, 128, Some(0)));
        assert!(
            message.contains("max_tokens must be at least 1"),
            "{message}"
        );
        let (_, _, message) = refusal(token_budget(0, 128, None));
        assert!(message.contains("empty"), "{message}");
    }

    #[test]
    fn another_model_is_not_found() {
        assert!(check_model(None, "lillm").is_ok());
        assert!(check_model(Some("lillm"), "lillm").is_ok());
        let (status, code, message) = refusal(check_model(Some("gpt-4"), "lillm"));
        assert_eq!(
            (status, code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        assert!(
            message.contains("gpt-4") && message.contains("lillm"),
            "{message}"
        );
    }

    #[test]
    fn sampling_takes_openais_defaults_and_the_seed_given() {
        let p = sampling_params(&request(json!({"seed": 7})), 100).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p, p.seed), (1.0, 0, 1.0, 7));
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.0, 0.0));
        assert!(p.logit_bias.is_empty());
        let p = sampling_params(
            &request(json!({"temperature": 0, "top_k": 5, "top_p": 0.5,
                            "presence_penalty": -2, "frequency_penalty": 2,
                            "logit_bias": {"3": -100, "99": 100}})),
            100,
        )
        .unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.0, 5, 0.5));
        assert_eq!((p.presence_penalty, p.frequency_penalty), (-2.0, 2.0));
        assert_eq!(p.logit_bias, [(3, -100.0), (99, 100.0)]);
    }

    #[test]
    fn sampling_out_of_range_is_refused_naming_the_field() {
        for (fields, named) in [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
            (json!({"logit_bias": {"100": 1}}), "token ids from 0 to 99"),
            (json!({"logit_bias": {"x": 1}}), "token ids"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias of token 5"),
        ] {
            let (status, _, message) = refusal(sampling_params(&request(fields.clone()), 100));
            assert_eq!(status, StatusCode::BAD_REQUEST, "{fields}");
            assert!(message.contains(named), "{fields}: {message}");
        }
    }

    #[test]
    fn stops_and_choices_within_openais_limits() {
        let stop = |v: Value| request(json!({ "stop": v })).stop;
        assert_eq!(stops(None).unwrap(), Vec::<String>::new());
        assert_eq!(stops(stop(json!("\n"))).unwrap(), ["\n"]);
        assert_eq!(stops(stop(json!(["a", "b", "c", "d"]))).unwrap().len(), 4);
        let (_, _, message) = refusal(stops(stop(json!(["a", "b", "c", "d", "e"]))));
        assert!(message.contains("at most 4"), "{message}");
        assert_eq!(choices(None).unwrap(), 1);
        assert_eq!(choices(Some(MAX_CHOICES)).unwrap(), MAX_CHOICES as usize);
        for n in [0, MAX_CHOICES + 1] {
            let (_, _, message) = refusal(choices(Some(n)));
            assert!(message.contains(&format!("got {n}")), "{message}");
        }
    }

    #[test]
    fn log_probabilities_are_asked_as_each_api_asks_them() {
        let wanted = |fields: Value, api| logprobs_wanted(&request(fields), api);
        assert_eq!(wanted(json!({}), Api::Chat).unwrap(), None);
        assert_eq!(
            wanted(json!({"logprobs": true}), Api::Chat).unwrap(),
            Some(0)
        );
        assert_eq!(
            wanted(json!({"logprobs": true, "top_logprobs": 20}), Api::Chat).unwrap(),
            Some(20)
        );
        assert_eq!(
            wanted(json!({"logprobs": 5}), Api::Completions).unwrap(),
            Some(5)
        );
        for (fields, api, named) in [
            (
                json!({"top_logprobs": 2}),
                Api::Chat,
                "needs logprobs: true",
            ),
            (json!({"logprobs": 3}), Api::Chat, "true or false"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                Api::Chat,
                "0 to 20",
            ),
            (json!({"logprobs": 6}), Api::Completions, "0 to 5"),
            (
                json!({"top_logprobs": 1}),
                Api::Completions,
                "chat completions field",
            ),
        ] {
            let (_, _, message) = refusal(wanted(fields.clone(), api));
            assert!(message.contains(named), "{fields}: {message}");
        }
    }
}
