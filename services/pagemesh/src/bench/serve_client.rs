//! One benchmark request against a running mesh: over HTTP (OpenAI streaming completions)
//! or straight over NATS (`<prefix>.generate`), timed chunk by chunk.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pagemesh_shared::protocol::ReplyMessage;
use serde_json::{json, Value};

/// What one request asks for.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    /// Text, or token ids.
    pub prompt: Value,
    /// Tokens to generate (the sample runs to this length: eos is ignored).
    pub max_tokens: usize,
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Prompt tokens (from the server's usage).
    pub prompt_tokens: usize,
    /// Generated tokens (from the server's usage).
    pub output_tokens: usize,
    /// Seconds to the first chunk with output.
    pub ttft: f64,
    /// Seconds to the last chunk.
    pub e2e: f64,
    /// Seconds between consecutive chunks with output.
    pub itl: Vec<f64>,
}

/// Records chunk arrival times.
struct Timing {
    started: Instant,
    last: Option<f64>,
    outcome: Outcome,
}

impl Timing {
    fn new() -> Self {
        Self { started: Instant::now(), last: None, outcome: Outcome::default() }
    }

    fn output_arrived(&mut self) {
        let now = self.started.elapsed().as_secs_f64();
        match self.last {
            None => self.outcome.ttft = now,
            Some(last) => self.outcome.itl.push(now - last),
        }
        self.last = Some(now);
    }

    fn finish(mut self, usage: Option<(usize, usize)>, error: Option<String>) -> Outcome {
        self.outcome.e2e = self.started.elapsed().as_secs_f64();
        match (usage, error) {
            (_, Some(e)) => self.outcome.error = Some(e),
            (None, None) => self.outcome.error = Some("the stream ended without usage".into()),
            (Some((prompt, output)), None) => {
                self.outcome.prompt_tokens = prompt;
                self.outcome.output_tokens = output;
                if self.last.is_none() {
                    self.outcome.error = Some("no output arrived".into());
                }
            }
        }
        self.outcome
    }
}

/// Sends `req` to an OpenAI-compatible `/v1/completions` at `base_url`, streaming.
pub fn http_request(
    agent: &ureq::Agent,
    base_url: &str,
    api_key: Option<&str>,
    model: &str,
    req: &BenchRequest,
) -> Outcome {
    let body = json!({
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "ignore_eos": true,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut timing = Timing::new();
    let mut call = agent.post(&format!("{}/v1/completions", base_url.trim_end_matches('/')));
    call = call.set("Content-Type", "application/json");
    if let Some(key) = api_key {
        call = call.set("Authorization", &format!("Bearer {key}"));
    }
    let response = match call.send_string(&body.to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            return timing.finish(None, Some(format!("HTTP {code}: {text}")));
        }
        Err(e) => return timing.finish(None, Some(e.to_string())),
    };
    let mut usage = None;
    for line in BufReader::new(response.into_reader()).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return timing.finish(None, Some(format!("reading the stream: {e}"))),
        };
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            break;
        }
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return timing.finish(None, Some(format!("not JSON: {data}")));
        };
        if let Some(e) = event.get("error") {
            return timing.finish(None, Some(e.to_string()));
        }
        // A chunk with a choice carries tokens (its text may be empty while the detokenizer
        // holds back an incomplete character).
        if event["choices"].as_array().is_some_and(|c| !c.is_empty()) {
            timing.output_arrived();
        }
        if let (Some(p), Some(c)) =
            (event["usage"]["prompt_tokens"].as_u64(), event["usage"]["completion_tokens"].as_u64())
        {
            usage = Some((p as usize, c as usize));
        }
    }
    timing.finish(usage, None)
}

/// Sends `req` on `<prefix>.generate` and reads its reply inbox until the last chunk.
pub async fn nats_request(
    client: &async_nats::Client,
    subject: &str,
    req: &BenchRequest,
    timeout: Duration,
) -> Outcome {
    let body = json!({
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "ignore_eos": true,
        "temperature": 0.0,
    });
    let mut timing = Timing::new();
    let inbox = client.new_inbox();
    let mut sub = match client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(e) => return timing.finish(None, Some(e.to_string())),
    };
    if let Err(e) = client.publish_with_reply(subject.to_string(), inbox, body.to_string().into()).await {
        return timing.finish(None, Some(e.to_string()));
    }
    loop {
        let msg = match tokio::time::timeout(timeout, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return timing.finish(None, Some("the reply subscription closed".into())),
            Err(_) => return timing.finish(None, Some(format!("no chunk for {timeout:?}"))),
        };
        match serde_json::from_slice::<ReplyMessage>(&msg.payload) {
            Ok(ReplyMessage::Error(e)) => return timing.finish(None, Some(e.error.message)),
            Ok(ReplyMessage::Chunk(chunk)) => {
                if !chunk.token_ids.is_empty() {
                    timing.output_arrived();
                }
                if chunk.done {
                    let usage = chunk.usage.map(|u| (u.prompt_tokens, u.completion_tokens));
                    return timing.finish(usage, None);
                }
            }
            Err(e) => return timing.finish(None, Some(format!("undecodable reply: {e}"))),
        }
    }
}
