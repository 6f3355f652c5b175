//! Bounds on what arrives over NATS, checked by every receiver before it allocates or acts.
//!
//! Every message on the bus is untrusted, internal subjects included: a receiver checks ids,
//! subjects, counts and token ids against these bounds (and the model's vocabulary and context
//! length) first, and answers a message that breaks one with an error instead of acting on it.

use crate::protocol::{DetokenizerAck, DetokenizerEvent, ExecutorRegistration, StreamState, SubmitRequest};
use crate::sampling::{SamplingParams, MAX_N};

/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest instance id (executor, detokenizer), in bytes; instance ids are subject tokens.
pub const MAX_INSTANCE_ID_LEN: usize = 64;
/// Longest model name, in bytes.
pub const MAX_MODEL_NAME_LEN: usize = 256;
/// Longest reply subject, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;
/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_LEN: usize = 1024;
/// Largest KV block, in tokens, an executor may declare.
pub const MAX_BLOCK_SIZE: usize = 1024;
/// Longest token list (prompt, or a sample's tokens so far) any internal message may carry.
pub const MAX_SEQUENCE_TOKENS: usize = 1 << 20;

/// Most sequences an executor keeps what it was told of (parameters, block table) at once.
pub const MAX_EXECUTOR_SEQUENCES: usize = 1 << 16;

/// Most request streams one detokenizer serves at once (and a scheduler taking over adopts
/// from one detokenizer's report).
pub const MAX_OPEN_STREAMS: usize = 1 << 16;

/// The most KV blocks the scheduler accepts in one executor's pool unless
/// `--max-executor-blocks` says otherwise; an executor sizing its pools from free GPU memory
/// stops here (a tiny model on a large GPU would otherwise declare millions more).
pub const DEFAULT_MAX_EXECUTOR_BLOCKS: u32 = 1 << 22;

/// Checks a request id: 1 to [`MAX_REQUEST_ID_LEN`] bytes, no control characters.
pub fn check_request_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN {
        return Err(format!("request_id must be 1 to {MAX_REQUEST_ID_LEN} bytes long, got {}", id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err("request_id must not contain control characters".into());
    }
    Ok(())
}

/// Checks an instance id, which becomes one token of a subject: 1 to
/// [`MAX_INSTANCE_ID_LEN`] ASCII letters, digits, `-` or `_`.
pub fn check_instance_id(id: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.is_empty() || id.len() > MAX_INSTANCE_ID_LEN || !id.chars().all(allowed) {
        return Err(format!("instance ids are 1 to {MAX_INSTANCE_ID_LEN} characters of [A-Za-z0-9_-], got {id:?}"));
    }
    Ok(())
}

/// Checks a subject a message will be published to: at most [`MAX_SUBJECT_LEN`] bytes of
/// non-empty dot-separated tokens, no wildcard, no white space or control character.
pub fn check_reply_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(format!("reply subjects must be 1 to {MAX_SUBJECT_LEN} bytes long, got {}", subject.len()));
    }
    let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '*' || c == '>';
    if subject.split('.').any(|token| token.is_empty() || token.chars().any(bad_char)) {
        return Err(format!("{subject:?} is not a valid reply subject"));
    }
    Ok(())
}

/// Checks stop strings: at most [`MAX_STOP_STRINGS`], each 1 to [`MAX_STOP_STRING_LEN`] bytes.
pub fn check_stop_strings(stop: &[String]) -> Result<(), String> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len()));
    }
    if stop.iter().any(String::is_empty) {
        return Err("stop strings must not be empty".into());
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_LEN) {
        return Err(format!("stop strings must be at most {MAX_STOP_STRING_LEN} bytes long, got {}", long.len()));
    }
    Ok(())
}

/// Checks that every token id is in a vocabulary of `vocab_size` tokens.
pub fn check_token_ids(field: &str, tokens: &[u32], vocab_size: usize) -> Result<(), String> {
    match tokens.iter().find(|&&t| t as usize >= vocab_size) {
        Some(t) => Err(format!("{field}: token id {t} is outside the vocabulary (size {vocab_size})")),
        None => Ok(()),
    }
}

/// What the served model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Longest prompt + output.
    pub max_model_len: usize,
}

impl ModelLimits {
    /// Checks a tokenized request in full: ids, reply subject, prompt (length and vocabulary),
    /// sampling parameters, stop strings.
    pub fn check_submit(&self, submit: &SubmitRequest) -> Result<(), String> {
        check_request_id(&submit.request_id)?;
        check_reply_subject(&submit.reply_to)?;
        if submit.owner.as_ref().is_some_and(|o| o.len() > MAX_MODEL_NAME_LEN) {
            return Err("owner accounts are at most 256 bytes long".into());
        }
        if submit.user.as_ref().is_some_and(|u| u.len() > MAX_REQUEST_ID_LEN) {
            return Err(format!("user must be at most {MAX_REQUEST_ID_LEN} bytes long"));
        }
        self.check_request(&submit.prompt_token_ids, &submit.params, &submit.stop)
    }

    /// Checks what a request asks of the model: its prompt, sampling parameters (with the
    /// token ids they name), stop strings, and prompt + `max_tokens` within the context.
    fn check_request(&self, prompt: &[u32], params: &SamplingParams, stop: &[String]) -> Result<(), String> {
        self.check_prompt(prompt)?;
        params.validate()?;
        params.check_vocab(self.vocab_size)?;
        check_stop_strings(stop)?;
        let total = prompt.len().saturating_add(params.max_tokens);
        if total > self.max_model_len {
            return Err(format!(
                "this model's maximum context length is {} tokens; the prompt has {} tokens and max_tokens is {} ({total} in all)",
                self.max_model_len,
                prompt.len(),
                params.max_tokens
            ));
        }
        Ok(())
    }

    /// Checks a stream a detokenizer reports to a scheduler taking over: its request as a
    /// submit is checked, one entry per sample everywhere, and each sample's tokens within
    /// `max_tokens` and the vocabulary.
    pub fn check_stream(&self, stream: &StreamState) -> Result<(), String> {
        let open = &stream.open;
        check_request_id(&open.request_id)?;
        check_reply_subject(&open.reply_to)?;
        if open.owner.as_ref().is_some_and(|o| o.len() > MAX_MODEL_NAME_LEN) {
            return Err("owner accounts are at most 256 bytes long".into());
        }
        self.check_request(&open.prompt_token_ids, &open.params, &open.stop)?;
        let n = open.params.n;
        let per_sample =
            [stream.generated.len(), stream.finished.len(), stream.ack.consumed.len(), stream.ack.closed.len()];
        if open.n != n || per_sample.iter().any(|&len| len != n) || stream.ack.request_id != open.request_id {
            return Err(format!("stream {}: its samples do not add up", open.request_id));
        }
        for tokens in &stream.generated {
            if tokens.len() > open.params.max_tokens {
                return Err(format!("stream {}: more tokens than max_tokens", open.request_id));
            }
            check_token_ids("generated", tokens, self.vocab_size)?;
        }
        Ok(())
    }

    /// Checks a prompt's token ids: 1 to `max_model_len` of them, each in the vocabulary.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<(), String> {
        if prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if prompt.len() > self.max_model_len {
            return Err(format!(
                "the prompt has {} tokens; this model's maximum context length is {} tokens",
                prompt.len(),
                self.max_model_len
            ));
        }
        check_token_ids("prompt", prompt, self.vocab_size)
    }
}

/// Checks an executor's registration: its id, model name, block size, and pool sizes against
/// `max_blocks` (the scheduler's cap on one pool).
pub fn check_registration(registration: &ExecutorRegistration, max_blocks: usize) -> Result<(), String> {
    check_instance_id(&registration.executor_id)?;
    if registration.protocol_version != crate::protocol::INTERNAL_PROTOCOL_VERSION {
        return Err(format!(
            "executor {} speaks internal protocol version {}; this scheduler speaks {} (run the same pagemesh release everywhere)",
            registration.executor_id,
            registration.protocol_version,
            crate::protocol::INTERNAL_PROTOCOL_VERSION
        ));
    }
    if registration.model.len() > MAX_MODEL_NAME_LEN {
        return Err(format!("model names are at most {MAX_MODEL_NAME_LEN} bytes long"));
    }
    if registration.block_size == 0 || registration.block_size > MAX_BLOCK_SIZE {
        return Err(format!("block_size must be in 1..={MAX_BLOCK_SIZE}, got {}", registration.block_size));
    }
    for (pool, blocks) in [("device", registration.num_device_blocks), ("host", registration.num_host_blocks)] {
        if blocks > max_blocks {
            return Err(format!(
                "the {pool} pool declares {blocks} blocks; this scheduler accepts at most {max_blocks}"
            ));
        }
    }
    Ok(())
}

/// Checks a detokenizer's progress report: its id and per-sample vectors of at most
/// [`MAX_N`] entries.
pub fn check_ack(ack: &DetokenizerAck) -> Result<(), String> {
    check_request_id(&ack.request_id)?;
    if ack.consumed.len() > MAX_N || ack.closed.len() > MAX_N {
        return Err(format!("an ack names at most {MAX_N} samples"));
    }
    if let Some(ask) = &ack.ask {
        check_instance_id(&ask.detokenizer)?;
        if ask.received.as_ref().is_some_and(|r| r.len() > MAX_N) {
            return Err(format!("an ask names at most {MAX_N} samples"));
        }
    }
    Ok(())
}

/// Most events in one message to a detokenizer (a step's tokens for every request it serves).
pub const MAX_EVENTS_PER_MESSAGE: usize = MAX_OPEN_STREAMS;

/// Checks what a detokenizer is sent: ids, reply subject, sample counts and indices, and
/// token lists of at most [`MAX_SEQUENCE_TOKENS`].
pub fn check_detokenizer_event(event: &DetokenizerEvent) -> Result<(), String> {
    match event {
        DetokenizerEvent::Open(open) => {
            check_request_id(&open.request_id)?;
            open.params.validate()?;
            check_reply_subject(&open.reply_to)?;
            check_stop_strings(&open.stop)?;
            if open.n == 0 || open.n > MAX_N {
                return Err(format!("n must be in 1..={MAX_N}, got {}", open.n));
            }
            if open.prompt_token_ids.len() > MAX_SEQUENCE_TOKENS {
                return Err(format!("a prompt has at most {MAX_SEQUENCE_TOKENS} tokens"));
            }
            if let Some(resume) = &open.resume {
                if resume.consumed.len() > open.n || resume.closed.len() > open.n {
                    return Err("a resume point names more samples than the request has".into());
                }
                if resume.consumed.iter().map(Vec::len).sum::<usize>() > MAX_SEQUENCE_TOKENS {
                    return Err(format!("a resume point replays at most {MAX_SEQUENCE_TOKENS} tokens"));
                }
            }
            Ok(())
        }
        DetokenizerEvent::Tokens { request_id, tokens } => {
            check_request_id(request_id)?;
            if tokens.iter().any(|t| t.sample_index as usize >= MAX_N) {
                return Err(format!("sample indices are below {MAX_N}"));
            }
            Ok(())
        }
        DetokenizerEvent::Finish { request_id, message, .. } => {
            check_request_id(request_id)?;
            match message {
                Some(m) if m.len() > 4096 => Err("finish messages are at most 4096 bytes long".into()),
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{OpenRequest, TextOptions};

    fn submit(prompt: Vec<u32>, params: SamplingParams) -> SubmitRequest {
        SubmitRequest {
            request_id: "r1".into(),
            reply_to: "_INBOX.abc.1".into(),
            prompt_token_ids: prompt,
            params,
            seed: 0,
            stop: Vec::new(),
            stream: true,
            text: TextOptions::default(),
            owner: None,
            user: None,
            max_tokens_is_default: false,
        }
    }

    const LIMITS: ModelLimits = ModelLimits { vocab_size: 512, max_model_len: 64 };

    #[test]
    fn a_valid_submit_passes_and_each_hostile_field_is_refused_by_name() {
        assert_eq!(LIMITS.check_submit(&submit(vec![1, 2, 3], SamplingParams::greedy(8))), Ok(()));
        let huge_n = SamplingParams { n: 1_000_000_000_000, ..SamplingParams::greedy(8) };
        assert!(LIMITS.check_submit(&submit(vec![1], huge_n)).unwrap_err().contains("n must be"));
        let out_of_vocab = LIMITS.check_submit(&submit(vec![1, 100_000], SamplingParams::greedy(8))).unwrap_err();
        assert!(out_of_vocab.contains("token id 100000"), "{out_of_vocab}");
        let too_long = LIMITS.check_submit(&submit(vec![1; 60], SamplingParams::greedy(8))).unwrap_err();
        assert!(too_long.contains("maximum context length"), "{too_long}");
        let huge_max_tokens = SamplingParams::greedy(usize::MAX);
        assert!(LIMITS.check_submit(&submit(vec![1], huge_max_tokens)).is_err());
        assert!(LIMITS.check_submit(&submit(Vec::new(), SamplingParams::greedy(8))).is_err());
        let mut long_id = submit(vec![1], SamplingParams::greedy(8));
        long_id.request_id = "x".repeat(1 << 20);
        assert!(LIMITS.check_submit(&long_id).unwrap_err().contains("request_id"));
        let mut wildcard = submit(vec![1], SamplingParams::greedy(8));
        wildcard.reply_to = "pagemesh.v1.>".into();
        assert!(LIMITS.check_submit(&wildcard).unwrap_err().contains("reply subject"));
        let mut stops = submit(vec![1], SamplingParams::greedy(8));
        stops.stop = vec!["a".into(); MAX_STOP_STRINGS + 1];
        assert!(LIMITS.check_submit(&stops).unwrap_err().contains("stop strings"));
    }

    #[test]
    fn subjects_and_instance_ids_refuse_wildcards_spaces_and_empty_tokens() {
        assert_eq!(check_reply_subject("_INBOX.a1b2.3"), Ok(()));
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a.", "a\nb"] {
            assert!(check_reply_subject(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(check_instance_id("e1-A_9"), Ok(()));
        for bad in ["", "a.b", "*", ">", "a b", &"x".repeat(MAX_INSTANCE_ID_LEN + 1)] {
            assert!(check_instance_id(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn acks_and_their_asks_are_bounded() {
        let ack = DetokenizerAck {
            request_id: "r1".into(),
            next_index: 0,
            consumed: vec![0],
            closed: vec![false],
            ask: Some(crate::protocol::StreamAsk { detokenizer: "d1".into(), received: Some(vec![3]) }),
        };
        assert_eq!(check_ack(&ack), Ok(()));
        let unknown = DetokenizerAck {
            ask: Some(crate::protocol::StreamAsk { detokenizer: "d1".into(), received: None }),
            ..ack.clone()
        };
        assert_eq!(check_ack(&unknown), Ok(()));
        let many = DetokenizerAck {
            ask: Some(crate::protocol::StreamAsk { detokenizer: "d1".into(), received: Some(vec![0; MAX_N + 1]) }),
            ..ack.clone()
        };
        assert!(check_ack(&many).unwrap_err().contains("at most"));
        let subject = DetokenizerAck {
            ask: Some(crate::protocol::StreamAsk { detokenizer: "d.>".into(), received: None }),
            ..ack
        };
        assert!(check_ack(&subject).unwrap_err().contains("instance ids"));
    }

    #[test]
    fn registrations_over_the_block_cap_or_with_odd_block_sizes_are_refused() {
        let ok = ExecutorRegistration {
            executor_id: "e1".into(),
            model: "m".into(),
            block_size: 16,
            num_device_blocks: 1024,
            num_host_blocks: 0,
            incarnation: 7,
            protocol_version: crate::protocol::INTERNAL_PROTOCOL_VERSION,
            step_taken: None,
            step_answered: None,
        };
        assert_eq!(check_registration(&ok, 1 << 20), Ok(()));
        let old = ExecutorRegistration { protocol_version: 1, ..ok.clone() };
        assert!(check_registration(&old, 1 << 20).unwrap_err().contains("protocol version 1"));
        let huge = ExecutorRegistration { num_device_blocks: 4_294_967_294, ..ok.clone() };
        assert!(check_registration(&huge, 1 << 20).unwrap_err().contains("at most 1048576"));
        let zero = ExecutorRegistration { block_size: 0, ..ok.clone() };
        assert!(check_registration(&zero, 1 << 20).is_err());
        let id = ExecutorRegistration { executor_id: "a.>".into(), ..ok };
        assert!(check_registration(&id, 1 << 20).is_err());
    }

    #[test]
    fn a_reported_stream_must_add_up_and_stay_within_its_request() {
        let params = SamplingParams { n: 2, ..SamplingParams::greedy(4) };
        let stream = StreamState {
            open: OpenRequest {
                request_id: "r1".into(),
                reply_to: "_INBOX.a".into(),
                prompt_token_ids: vec![1, 2],
                n: 2,
                stop: Vec::new(),
                stream: true,
                logprobs: false,
                text: TextOptions::default(),
                resume: None,
                params,
                seed: 0,
                owner: None,
            },
            generated: vec![vec![5, 6], vec![7]],
            finished: vec![None, None],
            ack: DetokenizerAck {
                request_id: "r1".into(),
                next_index: 1,
                consumed: vec![1, 1],
                closed: vec![false; 2],
                ask: None,
            },
        };
        assert_eq!(LIMITS.check_stream(&stream), Ok(()));
        let mut long = stream.clone();
        long.generated[0] = vec![5; 5];
        assert!(LIMITS.check_stream(&long).unwrap_err().contains("max_tokens"));
        let mut outside = stream.clone();
        outside.generated[1] = vec![100_000];
        assert!(LIMITS.check_stream(&outside).unwrap_err().contains("vocabulary"));
        let mut short = stream.clone();
        short.finished.pop();
        assert!(LIMITS.check_stream(&short).unwrap_err().contains("add up"));
        let mut other = stream;
        other.ack.request_id = "r2".into();
        assert!(LIMITS.check_stream(&other).is_err());
    }
}
