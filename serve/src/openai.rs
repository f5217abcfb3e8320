//! The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! non-streaming and streaming (server-sent events ending with `data: [DONE]`).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lillm_data::sft::{render_prompt, Message};
use lillm_model::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::generator::{GenEvent, GenRequest, Refused};
use super::AppState;
use crate::metrics::Outcome;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    /// Seconds a client should wait before trying again (`Retry-After`).
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            retry_after: None,
        }
    }
    fn with(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: Some(code),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// Checks `Authorization: Bearer KEY` when the server was started with an API key.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::with(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        ))
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    stop: Option<Stop>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(flatten)]
    sampling: Sampling,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A validated generation: prompt ids, token budget, sampling, stops.
struct Plan {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stops: Vec<String>,
    stream: bool,
}

fn plan(state: &AppState, prompt_text: &str, s: Sampling) -> Result<Plan, ApiError> {
    if let Some(model) = &s.model {
        if model != &state.model_name {
            return Err(ApiError::with(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "model `{model}` does not exist; this server serves `{}`",
                    state.model_name
                ),
            ));
        }
    }
    let prompt = state
        .generator
        .tokenizer
        .encode(prompt_text)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let context = state.generator.context;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    if prompt.len() >= context {
        return Err(ApiError::with(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "context_length_exceeded",
            format!(
                "the prompt has {} tokens but the model's context is {context}; shorten it",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    let max_tokens = match s.max_completion_tokens.or(s.max_tokens) {
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(format!(
                "max_tokens must be at least 1, got {n}"
            )))
        }
        // Refused before any work, as OpenAI does, rather than cut short silently.
        Some(n) if n as usize > room => {
            return Err(ApiError::with(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens and max_tokens is {n}, but the model's context is {context} tokens; ask for at most {room} tokens or shorten the prompt",
                    prompt.len()
                ),
            ))
        }
        Some(n) => n as usize,
        None => room,
    };
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
    let stops = match s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) if v.len() <= 4 => v,
        Some(Stop::Many(_)) => return Err(ApiError::invalid("stop may hold at most 4 sequences")),
    };
    let seed = s.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    Ok(Plan {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k: s.top_k.unwrap_or(0),
            top_p,
            seed,
        },
        stops,
        stream: s.stream,
    })
}

async fn start(
    state: &AppState,
    plan: &Plan,
) -> Result<mpsc::UnboundedReceiver<GenEvent>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = GenRequest {
        prompt: plan.prompt.clone(),
        max_tokens: plan.max_tokens,
        sampling: plan.sampling.clone(),
        stops: plan.stops.clone(),
        events: tx,
        arrived: std::time::Instant::now(),
    };
    state.generator.submit(req).map_err(|refused| match refused {
        Refused::Full(queued) => ApiError {
            retry_after: Some(1),
            ..ApiError::with(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "server_busy",
                format!(
                    "the server is busy: {queued} requests are already waiting (--max-queue); retry after a second"
                ),
            )
        },
        Refused::Stopped => ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            "the generation thread has stopped",
        ),
    })?;
    Ok(rx)
}

/// Collects a whole reply: (text, finish_reason, completion tokens).
async fn collect(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
) -> Result<(String, &'static str, usize), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Delta(d) => text.push_str(&d),
            GenEvent::Done {
                finish_reason,
                completion_tokens,
            } => return Ok((text, finish_reason, completion_tokens)),
            GenEvent::Failed(e) => {
                return Err(ApiError::with(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "generation_failed",
                    e,
                ))
            }
        }
    }
    Err(ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation_failed",
        "generation ended without a result",
    ))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Streams events as SSE chunks built by `chunk(delta, finish_reason)`, then `[DONE]`.
fn sse(
    rx: mpsc::UnboundedReceiver<GenEvent>,
    first: Option<Value>,
    prompt_tokens: usize,
    chunk: impl Fn(Option<&str>, Option<&str>, Option<Value>) -> Value + Send + 'static,
) -> Response {
    let head = tokio_stream::iter(
        first.map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string()))),
    );
    let body = UnboundedReceiverStream::new(rx).map(move |ev| {
        let value = match ev {
            GenEvent::Delta(d) => chunk(Some(&d), None, None),
            GenEvent::Done {
                finish_reason,
                completion_tokens,
            } => chunk(
                None,
                Some(finish_reason),
                Some(usage(prompt_tokens, completion_tokens)),
            ),
            GenEvent::Failed(e) => json!({"error": {"message": e, "type": "server_error"}}),
        };
        Ok(Event::default().data(value.to_string()))
    });
    let done = tokio_stream::iter([Ok(Event::default().data("[DONE]"))]);
    Sse::new(head.chain(body).chain(done)).into_response()
}

pub async fn models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started, "owned_by": "lillm"}]}),
    ))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    counted(&state, chat(&state, headers, body).await)
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    counted(&state, completion(&state, headers, body).await)
}

/// Counts a request refused before generation (the generator counts the others).
fn counted(state: &AppState, result: Result<Response, ApiError>) -> Result<Response, ApiError> {
    if let Err(e) = &result {
        match e.status {
            StatusCode::TOO_MANY_REQUESTS => state.metrics().count(Outcome::Busy),
            s if s.is_client_error() => state.metrics().count(Outcome::Invalid),
            _ => {}
        }
    }
    result
}

async fn chat(state: &AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(state, &headers)?;
    let req: ChatRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let mut turns = Vec::new();
    for m in req.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::invalid(format!(
                "unsupported role `{}`; use system, user or assistant",
                m.role
            )));
        }
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => parts.into_iter().map(|p| p.text).collect(),
        };
        turns.push(Message {
            role: m.role,
            content,
        });
    }
    let prompt = render_prompt(&turns).map_err(|e| ApiError::invalid(e.to_string()))?;
    let plan = plan(state, &prompt, req.sampling)?;
    let rx = start(state, &plan).await?;
    let id = format!("chatcmpl-{}", state.next_id());
    let (model, created, prompt_tokens) = (state.model_name.clone(), now(), plan.prompt.len());
    if plan.stream {
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
        return Ok(sse(
            rx,
            Some(head),
            prompt_tokens,
            move |delta, finish, usage| {
                let delta = delta.map_or(json!({}), |d| json!({"content": d}));
                let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                if let Some(u) = usage {
                    v["usage"] = u;
                }
                v
            },
        ));
    }
    let (text, finish, completion) = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion),
    }))
    .into_response())
}

async fn completion(
    state: &AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(state, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    let plan = plan(state, &req.prompt, req.sampling)?;
    let rx = start(state, &plan).await?;
    let id = format!("cmpl-{}", state.next_id());
    let (model, created, prompt_tokens) = (state.model_name.clone(), now(), plan.prompt.len());
    if plan.stream {
        return Ok(sse(rx, None, prompt_tokens, move |delta, finish, usage| {
            let mut v = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish}]});
            if let Some(u) = usage {
                v["usage"] = u;
            }
            v
        }));
    }
    let (text, finish, completion) = collect(rx).await?;
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
        "usage": usage(prompt_tokens, completion),
    }))
    .into_response())
}
