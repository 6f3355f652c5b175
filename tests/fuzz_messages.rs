//! Fuzzing every message a service receives over NATS: arbitrary bytes, and valid messages
//! with fields replaced by hostile values (huge, negative, wrong-typed, long), go through the
//! receiver's decoder, its validation, and the pure handler behind it (scheduler admission
//! and stepping, pool creation from a registration, an executor's plan check). Nothing may
//! panic, and nothing may allocate a size a message declares.
//!
//! Runs for `PAGEMESH_FUZZ_SECONDS` (default 4) and prints how many messages it tried; set
//! `PAGEMESH_FUZZ_SEED` to replay a run.

use std::time::{Duration, Instant};

use pagemesh_executor::executor::{validate_plan, PlanLimits};
use pagemesh_scheduler::{NewRequest, Scheduler};
use pagemesh_shared::limits::{self, ModelLimits};
use pagemesh_shared::protocol::{
    AbortRequest, DetokenizerAck, DetokenizerMessage, ExecutorRegistration, GenerateRequest, Heartbeat,
    SchedulerHeartbeat, StepReply, StepRequest, StepResponse, StreamReport, StreamReportRequest, SubmitAck,
    SubmitRequest,
};
use pagemesh_shared::step_delta::PlanMirror;
use pagemesh_shared::wire::Encoding;
use pagemesh_shared::{EngineConfig, StepOutput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MODEL: ModelLimits = ModelLimits { vocab_size: 512, max_model_len: 256 };
/// The scheduler's cap on a pool in this harness (the service's default is larger).
const MAX_BLOCKS: usize = 1 << 14;

/// Valid messages of every internal kind, the starting points of mutation.
fn templates() -> Vec<(&'static str, Value)> {
    let params = json!({"max_tokens": 4, "temperature": 0.7, "top_k": 5, "seed": 3, "n": 2,
                        "logit_bias": {"5": 1.5}, "stop_token_ids": [7], "logprobs": 2});
    vec![
        (
            "submit",
            json!({"request_id": "r1", "reply_to": "_INBOX.a.b", "prompt_token_ids": [1, 2, 3, 4, 5],
                          "params": params, "seed": 9, "stop": ["x"], "stream": true, "owner": "CLIENT_A", "user": "u1",
                          "text": {"skip_special_tokens": true, "include_stop_str_in_output": false}}),
        ),
        (
            "registration",
            json!({"executor_id": "e1", "model": "m", "block_size": 4, "num_device_blocks": 64,
                                "num_host_blocks": 16, "incarnation": 9,
                                "protocol_version": pagemesh_shared::protocol::INTERNAL_PROTOCOL_VERSION,
                                "step_taken": [1, 4], "step_answered": [1, 3]}),
        ),
        ("abort", json!({"request_id": "r1"})),
        ("heartbeat", json!({"id": "d1"})),
        ("scheduler_heartbeat", json!({"id": "s1", "active": true, "term": 4, "started_ms": 17})),
        (
            "ack",
            json!({"request_id": "r1", "next_index": 3, "consumed": [2, 1], "closed": [false, true],
                   "ask": {"detokenizer": "d1", "received": [3, 1]}}),
        ),
        ("submit_ack", json!({"request_id": "r1"})),
        (
            "event",
            json!({"term": 1, "events": [{"Open": {"request_id": "r1", "reply_to": "_INBOX.a",
            "prompt_token_ids": [1, 2], "n": 2, "stop": ["s"], "stream": true, "logprobs": false,
            "resume": {"next_index": 1, "consumed": [[4], []], "closed": [false, false]},
            "params": params, "seed": 4}}]}),
        ),
        (
            "event",
            json!({"term": 2, "events": [{"Tokens": {"request_id": "r1", "tokens": [{"sample_index": 1, "position": 0,
            "token": {"token": 4, "logprob": -0.5, "top_logprobs": [[4, -0.5]]}, "finish": "length"}]}},
            {"Finish": {"request_id": "r1", "reason": "error", "message": "m"}}]}),
        ),
        ("report_request", json!({"term": 3, "after": "r0"})),
        (
            "report",
            json!({"more": false, "streams": [{"open": {"request_id": "r1", "reply_to": "_INBOX.a",
            "prompt_token_ids": [1, 2], "n": 2, "stop": ["s"], "stream": true, "logprobs": false,
            "params": params, "seed": 4, "owner": "CLIENT_A"},
            "generated": [[4, 5], [6]], "finished": [null, "length"],
            "ack": {"request_id": "r1", "next_index": 2, "consumed": [1, 1], "closed": [false, true]}}]}),
        ),
        (
            "step",
            json!({"incarnation": 9, "step": 4, "session": 1, "plan": {"step_id": 1, "swap_out": [[1, 0]],
                                 "swap_in": [[0, 2]], "copy": [[3, 4]],
                                 "released": [9], "seqs": [{"seq_id": 1, "tokens": [5, 6], "start_pos": 2,
                                 "block_table": [0, 1], "new_blocks": [2], "history": [1, 2],
                                 "sample": {"params": params, "seed": 1, "sample_index": 0, "num_samples": 2,
                                            "prompt_len": 3, "output_len": 1, "banned_tokens": [2]}}]}}),
        ),
        (
            "step_reply",
            json!({"incarnation": 9, "step": 4, "reply": {"Done": {"step_id": 1, "results": [{"seq_id": 1,
            "samples": [{"token": 3, "logprob": null, "top_logprobs": []}]}]}}}),
        ),
        ("generate", json!({"prompt": [1, 2, 3], "max_tokens": 4, "n": 1, "stop": ["a"], "stream": false})),
    ]
}

/// A hostile JSON value.
fn hostile_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.gen_range(0..14) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(u64::MAX - rng.gen_range(0..3)),
        3 => json!(4_294_967_294u64 + rng.gen_range(0..3)),
        4 => json!(-(rng.gen_range(1..1_000_000_i64))),
        5 => json!(rng.gen::<f64>() * 1e300),
        6 => json!(rng.gen_range(0..10_u32)),
        7 => json!("x".repeat(rng.gen_range(0..5000))),
        8 => json!(["*", ">", "a.>", "", " ", "\u{0}"][rng.gen_range(0..6)]),
        9 if depth < 3 => Value::Array((0..rng.gen_range(0..6)).map(|_| hostile_value(rng, depth + 1)).collect()),
        10 if depth < 3 => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..4) {
                map.insert(format!("k{}", rng.gen_range(0..5)), hostile_value(rng, depth + 1));
            }
            Value::Object(map)
        }
        11 => json!(vec![rng.gen_range(0..600_u32); rng.gen_range(0..300)]),
        12 => json!(1e15),
        _ => json!(rng.gen::<u32>()),
    }
}

/// Replaces one value somewhere inside `value` (or the whole of it) by a hostile one.
fn mutate(value: &mut Value, rng: &mut StdRng) {
    let descend = rng.gen_bool(0.75);
    match value {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map.keys().nth(rng.gen_range(0..map.len())).cloned().unwrap_or_default();
            if let Some(inner) = map.get_mut(&key) {
                mutate(inner, rng);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.gen_range(0..items.len());
            mutate(&mut items[i], rng);
        }
        _ if rng.gen_bool(0.6) => *value = same_kind(value, rng),
        _ => *value = hostile_value(rng, 0),
    }
}

/// A hostile value of the same JSON kind as `value`, so that the message still decodes and
/// the receiver's validation and handler are reached.
fn same_kind(value: &Value, rng: &mut StdRng) -> Value {
    match value {
        Value::Number(_) => match rng.gen_range(0..6) {
            0 => json!(0),
            1 => json!(u32::MAX),
            2 => json!(u64::MAX),
            3 => json!(rng.gen_range(0..1024_u32)),
            4 => json!(4_294_967_294u64),
            _ => json!(rng.gen_range(0..8_u32)),
        },
        Value::String(_) => match rng.gen_range(0..4) {
            0 => json!(""),
            1 => json!("y".repeat(rng.gen_range(100..3000))),
            2 => json!(["*", ">", "a.>", "a b", "_INBOX.>", "e2"][rng.gen_range(0..6)]),
            _ => json!(format!("id{}", rng.gen_range(0..4))),
        },
        Value::Array(items) => {
            let mut items = items.clone();
            match rng.gen_range(0..3) {
                0 => items.clear(),
                1 if !items.is_empty() => {
                    let copy = items[rng.gen_range(0..items.len())].clone();
                    items.extend(std::iter::repeat_n(copy, rng.gen_range(1..300)));
                }
                _ => items.truncate(rng.gen_range(0..=items.len())),
            }
            Value::Array(items)
        }
        Value::Bool(b) => json!(!b),
        _ => hostile_value(rng, 0),
    }
}

/// A scheduler core with a small pool, as the service makes one per executor.
fn core() -> Scheduler {
    let config = EngineConfig {
        block_size: 4,
        num_device_blocks: 64,
        num_host_blocks: 16,
        max_model_len: MODEL.max_model_len,
        ..EngineConfig::default()
    };
    Scheduler::new(config, vec![2])
}

fn plan_limits() -> PlanLimits {
    PlanLimits {
        device_blocks: 64,
        host_blocks: 16,
        block_size: 4,
        vocab_size: MODEL.vocab_size,
        max_model_len: MODEL.max_model_len,
    }
}

/// What the scheduler does with a submit: validate, then admit and run a few steps, each
/// plan checked as an executor would.
fn handle_submit(submit: SubmitRequest) -> bool {
    if MODEL.check_submit(&submit).is_err() {
        return false;
    }
    let mut core = core();
    let new = NewRequest {
        request_id: 1,
        prompt_token_ids: submit.prompt_token_ids,
        params: submit.params,
        seed: submit.seed,
        resumed_output: Vec::new(),
    };
    if core.add_request(new).is_err() {
        return true;
    }
    for step in 0..3 {
        let Some(plan) = core.schedule() else { break };
        assert!(validate_plan(&plan, &plan_limits()).is_ok(), "the scheduler made a plan its executor refuses");
        let results = plan
            .seqs
            .iter()
            .filter_map(|seq| {
                let spec = seq.sample.as_ref()?;
                let token = (step * 7 + 3) as u32 % MODEL.vocab_size as u32;
                let samples = (0..spec.num_samples)
                    .map(|_| pagemesh_shared::SampledToken { token, logprob: None, top_logprobs: Vec::new() })
                    .collect();
                Some(pagemesh_shared::SeqResult { seq_id: seq.seq_id, samples })
            })
            .collect();
        core.process_output(&StepOutput { step_id: plan.step_id, results });
    }
    true
}

/// What the scheduler does with an executor's registration: validate, then make its pools.
fn handle_registration(registration: ExecutorRegistration) -> bool {
    if limits::check_registration(&registration, MAX_BLOCKS).is_err() {
        return false;
    }
    let config = EngineConfig {
        block_size: registration.block_size,
        num_device_blocks: registration.num_device_blocks,
        num_host_blocks: registration.num_host_blocks,
        ..EngineConfig::default()
    };
    let valid = pagemesh_scheduler::validate_config(&config).is_ok();
    if valid {
        let _ = Scheduler::new(config, vec![2]);
    }
    valid
}

/// How far a message got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Not a message of its kind.
    Undecodable,
    /// Decoded, refused by validation.
    Refused,
    /// Decoded, validated and handled.
    Handled,
}

fn depth(decoded: bool, valid: bool) -> Depth {
    match (decoded, valid) {
        (false, _) => Depth::Undecodable,
        (true, false) => Depth::Refused,
        (true, true) => Depth::Handled,
    }
}

/// How messages of `kind` travel: JSON on the public subjects, MessagePack on internal ones.
fn encoding(kind: &str) -> Encoding {
    if kind == "generate" {
        Encoding::Json
    } else {
        Encoding::MessagePack
    }
}

fn wire_encode(kind: &str, value: &Value) -> Vec<u8> {
    encoding(kind).encode(value).expect("a value encodes")
}

fn wire_decode<T: serde::de::DeserializeOwned>(kind: &str, bytes: &[u8]) -> Result<T, String> {
    encoding(kind).decode(bytes)
}

/// Decodes `bytes` as the message of kind `kind` and hands it to its receiver's checks and
/// pure handler.
fn receive(kind: &str, bytes: &[u8]) -> Depth {
    match kind {
        "submit" => match wire_decode::<SubmitRequest>(kind, bytes) {
            Ok(submit) => depth(true, handle_submit(submit)),
            Err(_) => Depth::Undecodable,
        },
        "registration" => match wire_decode::<ExecutorRegistration>(kind, bytes) {
            Ok(registration) => depth(true, handle_registration(registration)),
            Err(_) => Depth::Undecodable,
        },
        "abort" => match wire_decode::<AbortRequest>(kind, bytes) {
            Ok(abort) => depth(true, limits::check_request_id(&abort.request_id).is_ok()),
            Err(_) => Depth::Undecodable,
        },
        "heartbeat" => match wire_decode::<Heartbeat>(kind, bytes) {
            Ok(beat) => depth(true, limits::check_instance_id(&beat.id).is_ok()),
            Err(_) => Depth::Undecodable,
        },
        "scheduler_heartbeat" => depth(wire_decode::<SchedulerHeartbeat>(kind, bytes).is_ok(), true),
        "submit_ack" => depth(wire_decode::<SubmitAck>(kind, bytes).is_ok(), true),
        "ack" => match wire_decode::<DetokenizerAck>(kind, bytes) {
            Ok(ack) => depth(true, limits::check_ack(&ack).is_ok()),
            Err(_) => Depth::Undecodable,
        },
        "event" => match wire_decode::<DetokenizerMessage>(kind, bytes) {
            Ok(message) => depth(
                true,
                message.events.len() <= limits::MAX_EVENTS_PER_MESSAGE
                    && message.events.iter().all(|e| limits::check_detokenizer_event(e).is_ok()),
            ),
            Err(_) => Depth::Undecodable,
        },
        "report_request" => depth(wire_decode::<StreamReportRequest>(kind, bytes).is_ok(), true),
        // What a scheduler taking over keeps of a report: the streams that pass the check.
        "report" => match wire_decode::<StreamReport>(kind, bytes) {
            Ok(report) => depth(true, report.streams.iter().all(|s| MODEL.check_stream(s).is_ok())),
            Err(_) => Depth::Undecodable,
        },
        // The executor's side of a step: the delta against a fresh session, then the plan check.
        "step" => match wire_decode::<StepRequest>(kind, bytes) {
            Ok(step) => match PlanMirror::new().decode(step.plan, limits::MAX_EXECUTOR_SEQUENCES) {
                Ok(plan) => depth(true, validate_plan(&plan, &plan_limits()).is_ok()),
                Err(_) => Depth::Refused,
            },
            Err(_) => Depth::Undecodable,
        },
        "step_reply" => match wire_decode::<StepResponse>(kind, bytes).map(|r| r.reply) {
            Ok(StepReply::Done(output)) => {
                // A reply naming sequences the core never scheduled changes nothing.
                core().process_output(&output);
                Depth::Handled
            }
            Ok(_) => Depth::Handled,
            Err(_) => Depth::Undecodable,
        },
        "generate" => match wire_decode::<GenerateRequest>(kind, bytes) {
            Ok(request) => {
                let params = request.sampling.over(pagemesh_shared::SamplingParams::default());
                depth(true, params.validate().and_then(|()| params.check_vocab(MODEL.vocab_size)).is_ok())
            }
            Err(_) => Depth::Undecodable,
        },
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn every_internal_message_survives_arbitrary_and_hostile_input() {
    let seconds: u64 = std::env::var("PAGEMESH_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let seed: u64 = std::env::var("PAGEMESH_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("fuzz seed {seed} (PAGEMESH_FUZZ_SEED replays it), {seconds} s");
    let mut rng = StdRng::seed_from_u64(seed);
    let templates = templates();
    for (kind, value) in &templates {
        // The templates themselves are accepted: mutation starts from messages that get deep.
        let bytes = wire_encode(kind, value);
        assert_eq!(receive(kind, &bytes), Depth::Handled, "the {kind} template must be valid");
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs: u64 = 0;
    let mut reached = [0u64; 3];
    while Instant::now() < deadline {
        for _ in 0..64 {
            let (kind, template) = &templates[rng.gen_range(0..templates.len())];
            let bytes = match rng.gen_range(0..8) {
                0 => (0..rng.gen_range(0..512)).map(|_| rng.gen::<u8>()).collect(),
                1 => {
                    let mut bytes = wire_encode(kind, template);
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..bytes.len());
                        bytes[i] = rng.gen();
                    }
                    bytes
                }
                _ => {
                    let mut value = template.clone();
                    for _ in 0..rng.gen_range(1..4) {
                        mutate(&mut value, &mut rng);
                    }
                    wire_encode(kind, &value)
                }
            };
            reached[receive(kind, &bytes) as usize] += 1;
            runs += 1;
        }
    }
    println!(
        "fuzz: {runs} messages, no panic ({} undecodable, {} refused by validation, {} validated and handled)",
        reached[0], reached[1], reached[2]
    );
    assert!(reached[1] > 0 && reached[2] > 0, "mutation must reach both validation outcomes");
}
