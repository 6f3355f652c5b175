//! Tests of the mesh scheduler in a simulated mesh ([`World`]): placement, migration off lost
//! executors, late and repeated answers, failed steps, aborts, lost detokenizers, waiting for
//! an executor, takeover by a standby, and a property test of all of them at random.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use pagemesh_shared::link::LinkState;
use pagemesh_shared::protocol::{DetokenizerAck, DetokenizerEvent, SchedulerHeartbeat, StreamState, SubmitRequest};
use pagemesh_shared::FinishReason;

use super::world::{self, expected_tokens, submit, World, HEARTBEAT_TIMEOUT};
use super::{Effect, Event, Identity, MeshScheduler};

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + salt) % 40 + 10).collect()
}

/// A mesh with one detokenizer and the given executors (device blocks each).
fn mesh(executors: &[usize]) -> World {
    let mut w = World::new();
    w.start_detokenizer("d1");
    for (i, &blocks) in executors.iter().enumerate() {
        w.start_executor(&format!("e{i}"), blocks);
    }
    w
}

#[test]
fn requests_run_to_their_end_with_the_model_s_tokens_and_every_block_is_freed() {
    let mut w = mesh(&[32, 32]);
    for i in 0..6 {
        w.submit(submit(&format!("r{i}"), prompt(5 + i, i as u32), 1 + i % 2, 6 + i, i as u64));
    }
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert!(w.refusals.is_empty(), "{:?}", w.refusals);
    // Both executors served.
    assert!(w.sched.executors.values().all(|slot| slot.core.stats().steps > 0));
}

#[test]
fn requests_of_a_silent_executor_move_to_another_and_go_on_with_the_same_tokens() {
    let mut w = mesh(&[32, 32]);
    for i in 0..4 {
        w.submit(submit(&format!("r{i}"), prompt(6, i), 1, 12, u64::from(i)));
    }
    for _ in 0..6 {
        if !w.pending.is_empty() {
            w.answer(0);
        }
    }
    let on_e0 = w.sched.requests_on("e0").len();
    assert!(on_e0 > 0, "e0 serves some requests");
    w.executors.get_mut("e0").expect("e0").alive = false;
    w.advance(HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    assert!(!w.sched.executors.contains_key("e0"), "e0 was dropped");
    w.settle(200);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert!(w.sched.recoveries.migrated >= on_e0 as u64);
    assert!(w.clients.values().all(|v| v.errors == 0), "no request failed");
}

#[test]
fn a_late_answer_from_a_lost_executor_is_dropped_and_counted_even_after_it_registers_again() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(6, 1), 1, 10, 3));
    w.answer(0);
    // The next step takes longer than its deadline: the executor is lost, its request waits.
    w.answer_late(0);
    assert!(w.sched.executors.is_empty());
    assert_eq!(w.held.len(), 1);
    // It keeps heartbeating: after the quarantine it registers again, under a new slot.
    w.advance(2 * HEARTBEAT_TIMEOUT + Duration::from_millis(100));
    assert!(w.sched.executors.contains_key("e0"), "registered again");
    let before = w.sched.recoveries.stale_replies;
    w.deliver_held(0);
    assert_eq!(w.sched.recoveries.stale_replies, before + 1);
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert_eq!(w.clients["r0"].errors, 0);
}

#[test]
fn an_answer_delivered_twice_is_stale_the_second_time() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(6, 1), 1, 10, 3));
    let first = w.pending[0].clone();
    w.answer(0);
    // The same step sent again (as after a lost answer): the executor gives the same answer.
    w.pending.push(first);
    w.answer(w.pending.len() - 1);
    assert_eq!(w.sched.recoveries.stale_replies, 1);
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
}

#[test]
fn a_restarted_executor_s_answer_to_its_old_life_s_step_is_stale_and_its_requests_move() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(6, 1), 1, 10, 5));
    w.answer(0);
    // It restarts (new incarnation) with a step in flight, and heartbeats at once.
    w.start_executor("e0", 32);
    let stale = w.sched.recoveries.stale_replies;
    w.answer(0);
    assert_eq!(w.sched.recoveries.stale_replies, stale + 1, "the old step's answer is stale");
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert_eq!(w.clients["r0"].errors, 0);
}

#[test]
fn a_failed_step_ends_its_requests_with_an_error_and_the_executor_goes_on_afresh() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(6, 1), 1, 10, 5));
    w.fail(0);
    assert_eq!(w.clients["r0"].errors, 1);
    assert!(w.sched.executors.contains_key("e0"), "the executor stays");
    w.submit(submit("r1", prompt(6, 2), 1, 10, 6));
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert_eq!(w.clients["r1"].errors, 0);
}

#[test]
fn aborts_end_requests_running_or_not_yet_arrived() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(6, 1), 2, 30, 5));
    w.answer(0);
    w.answer(0);
    w.send(Event::Abort { request_id: "r0".into(), from: None });
    // An abort for a request that has not arrived yet ends it when it comes.
    w.send(Event::Abort { request_id: "r1".into(), from: None });
    w.submit(submit("r1", prompt(6, 2), 1, 10, 6));
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    let r0 = &w.clients["r0"];
    assert!(r0.finishes.iter().all(|f| f == &[pagemesh_shared::FinishReason::Abort]), "{r0:?}");
    assert_eq!(w.clients["r1"].errors, 1);
    assert!(w.clients["r1"].tokens.is_empty(), "r1 never ran");
}

#[test]
fn an_abort_from_another_client_is_refused() {
    let mut w = mesh(&[32]);
    let mut request = submit("r0", prompt(6, 1), 1, 8, 5);
    request.owner = Some("ALICE".into());
    w.submit(request);
    w.send(Event::Abort { request_id: "r0".into(), from: Some(Some("MALLORY".into())) });
    assert_eq!(w.refusals.len(), 1, "{:?}", w.refusals);
    w.settle(100);
    w.assert_every_request_ended_once();
    assert_eq!(w.clients["r0"].finishes, vec![vec![pagemesh_shared::FinishReason::Length]]);
}

#[test]
fn streams_of_a_lost_detokenizer_go_on_on_another_from_where_they_were() {
    let mut w = mesh(&[64]);
    w.start_detokenizer("d2");
    for i in 0..4 {
        w.submit(submit(&format!("r{i}"), prompt(5, i), 1, 14, u64::from(i)));
    }
    for _ in 0..4 {
        w.answer(0);
    }
    w.kill_detokenizer("d1");
    w.advance(HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    w.settle(200);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert!(w.clients.values().all(|v| v.errors == 0));
    assert!(w.sched.recoveries.stream_resends > 0);
}

#[test]
fn requests_wait_for_an_executor_and_fail_after_the_unplaced_timeout() {
    let mut w = World::new();
    w.start_detokenizer("d1");
    w.submit(submit("early", prompt(4, 1), 1, 4, 1));
    w.advance(Duration::from_secs(1));
    w.start_executor("e0", 16);
    w.settle(50);
    assert_eq!(w.clients["early"].errors, 0, "it waited and ran");
    w.executors.get_mut("e0").expect("e0").alive = false;
    w.advance(HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    w.submit(submit("late", prompt(4, 2), 1, 4, 2));
    for _ in 0..30 {
        w.advance(Duration::from_millis(300));
    }
    assert_eq!(w.clients["late"].errors, 1, "it failed after waiting");
    w.assert_every_request_ended_once();
    assert!(w.sched.requests.is_empty());
}

#[test]
fn a_standby_that_takes_over_fails_adopted_requests_aborted_while_it_stood_by() {
    let t0 = Instant::now();
    let identity = Identity { id: "standby".into(), started_ms: 2, first_session: 1 };
    let mut standby = MeshScheduler::new(identity, world::config(), t0);
    let beat = SchedulerHeartbeat { id: "active".into(), active: true, term: 1, started_ms: 1 };
    standby.handle(t0, Event::SchedulerBeat(beat));
    standby.handle(t0, Event::DetokenizerBeat(pagemesh_shared::protocol::Heartbeat { id: "d1".into() }));
    // A client's abort arrives while the active scheduler still lives.
    let alice = Some(Some("ALICE".to_string()));
    assert!(standby.handle(t0, Event::Abort { request_id: "r0".into(), from: alice }).is_empty());
    // The active scheduler goes silent: the standby takes over and asks for the streams.
    let later = t0 + HEARTBEAT_TIMEOUT + Duration::from_millis(100);
    let link = LinkState { connected: true, since: t0 };
    let effects = standby.handle(later, Event::Tick(link));
    assert!(standby.is_active());
    assert!(effects.contains(&Effect::AskStreams { detokenizer: "d1".into(), term: 2 }), "{effects:?}");
    let mut request = submit("r0", prompt(4, 1), 1, 8, 1);
    request.owner = Some("ALICE".into());
    let open = pagemesh_shared::protocol::OpenRequest {
        request_id: "r0".into(),
        reply_to: request.reply_to.clone(),
        prompt_token_ids: request.prompt_token_ids.clone(),
        n: 1,
        stop: vec![],
        stream: true,
        logprobs: false,
        text: request.text,
        resume: None,
        params: request.params.clone(),
        seed: request.seed,
        owner: request.owner.clone(),
    };
    let ack =
        DetokenizerAck { request_id: "r0".into(), next_index: 1, consumed: vec![2], closed: vec![false], ask: None };
    let stream = StreamState { open, generated: vec![vec![11, 12]], finished: vec![None], ack };
    let effects = standby.handle(later, Event::StreamsReported { detokenizer: "d1".into(), streams: Ok(vec![stream]) });
    let aborted = effects.iter().any(|e| match e {
        Effect::Events { message, .. } => message.events.iter().any(|ev| {
            matches!(ev, DetokenizerEvent::Finish { request_id, message: Some(m), .. } if request_id == "r0" && m == "aborted")
        }),
        _ => false,
    });
    assert!(aborted, "the adopted request ends as aborted: {effects:?}");
}

#[test]
fn a_submit_sent_twice_is_acknowledged_twice_and_runs_once() {
    let mut w = mesh(&[32]);
    let request = submit("r0", prompt(6, 1), 1, 6, 5);
    w.submit(request.clone());
    w.send(Event::Submit { submit: Box::new(request), ack_to: Some("_INBOX.again".into()) });
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
}

#[test]
fn a_request_no_executor_can_hold_fails_alone_and_the_running_ones_keep_their_tokens() {
    // r0 runs (the first id of the executor's core); r1 needs more blocks than the pool has.
    let mut w = mesh(&[12]);
    w.submit(submit("r0", prompt(1, 0), 2, 3, 0));
    w.answer(0);
    w.submit(submit("r1", prompt(10, 1), 2, 15, 1));
    assert_eq!(w.clients["r1"].errors, 1, "r1 cannot fit");
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert_eq!(w.clients["r0"].errors, 0);
}

#[test]
fn a_default_length_the_pool_cannot_hold_is_lowered_to_what_it_holds_and_a_chosen_one_is_refused() {
    // 12 blocks of 4 tokens: 48 positions, less than the 64-token context a default fills.
    let mut w = mesh(&[12]);
    let chosen = submit("chosen", prompt(10, 1), 1, 54, 1);
    w.submit(chosen);
    assert_eq!(w.clients["chosen"].errors, 1, "a length the client chose is refused when it cannot fit");
    let defaulted = SubmitRequest { max_tokens_is_default: true, ..submit("default", prompt(10, 2), 1, 54, 2) };
    w.submit(defaulted);
    w.settle(200);
    let view = &w.clients["default"];
    assert_eq!(view.errors, 0);
    let expected = expected_tokens(2, 0, 38);
    assert_eq!(view.tokens[0], expected, "the default ran to the 38 tokens the pool holds after the prompt");
    if expected.len() == 38 {
        assert_eq!(view.finishes[0], [FinishReason::Length]);
    }
    w.assert_all_free();
}

#[test]
fn a_request_that_fails_while_it_waits_leaves_no_place_in_the_queue() {
    let mut w = mesh(&[]);
    w.submit(submit("r0", prompt(2, 0), 1, 2, 0));
    assert_eq!(w.sched.unplaced.len(), 1);
    // Its detokenizer is lost with no other running: the request ends while it waits.
    w.kill_detokenizer("d1");
    w.advance(HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    assert_eq!(w.clients["r0"].errors, 1);
    assert!(w.sched.requests.is_empty());
    assert_eq!(w.sched.unplaced.len(), 0, "no stale queue entry");
}

#[test]
fn the_end_of_a_failed_stream_reaches_a_restarted_detokenizer() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(2, 0), 2, 4, 0));
    // The detokenizer restarts at once (it is never missed): the stream's opening and first
    // tokens are lost with it.
    w.kill_detokenizer("d1");
    w.answer(0);
    w.start_detokenizer("d1");
    // The executor restarts too: a request with n > 1 cannot move and fails.
    w.start_executor("e0", 32);
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert_eq!(w.clients["r0"].errors, 1);
}

#[test]
fn a_late_step_of_a_session_the_executor_left_does_not_run_over_the_new_one() {
    let mut w = mesh(&[32]);
    w.submit(submit("r0", prompt(1, 0), 1, 1, 0));
    // The executor is silent long enough for the step to be sent again.
    w.advance(Duration::from_millis(2500));
    w.submit(submit("r1", prompt(1, 1), 1, 1, 1));
    assert_eq!(w.pending.len(), 2, "the step went twice");
    // The first copy fails: the scheduler starts a new session on the executor.
    w.fail(0);
    w.answer(1);
    for i in 2..5 {
        w.submit(submit(&format!("r{i}"), prompt(1, i % 3), 1, 1, u64::from(i)));
    }
    // The second copy of the old session's step arrives now: it must not run.
    w.settle(100);
    w.assert_every_request_ended_once();
    w.assert_all_free();
}

/// One thing that happens in the mesh.
#[derive(Debug, Clone)]
enum Op {
    Submit { prompt_len: usize, n: usize, max_tokens: usize },
    Answer(usize),
    AnswerLate(usize),
    FailStep(usize),
    DeliverHeld(usize),
    Redeliver(usize),
    Abort(usize),
    StartExecutor { id: usize, blocks: usize },
    KillExecutor(usize),
    StartDetokenizer(usize),
    KillDetokenizer(usize),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..20usize, 1..3usize, 1..16usize).prop_map(|(prompt_len, n, max_tokens)| Op::Submit { prompt_len, n, max_tokens }),
        10 => (0..8usize).prop_map(Op::Answer),
        1 => (0..8usize).prop_map(Op::AnswerLate),
        1 => (0..8usize).prop_map(Op::FailStep),
        1 => (0..4usize).prop_map(Op::DeliverHeld),
        1 => (0..8usize).prop_map(Op::Redeliver),
        1 => (0..40usize).prop_map(Op::Abort),
        1 => (0..3usize, 12..40usize).prop_map(|(id, blocks)| Op::StartExecutor { id, blocks }),
        1 => (0..3usize).prop_map(Op::KillExecutor),
        1 => (0..2usize).prop_map(Op::StartDetokenizer),
        1 => (0..2usize).prop_map(Op::KillDetokenizer),
        3 => prop_oneof![Just(100u64), Just(600), Just(2_500)].prop_map(Op::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Under random submits, answers, late and repeated answers, failed steps, aborts,
    /// executors and detokenizers joining, dying and restarting: every request ends exactly
    /// once for its client, with the model's tokens (whichever executors ran it), nothing is
    /// left held, and every block is freed.
    #[test]
    fn no_request_is_lost_duplicated_or_stuck_and_every_block_is_freed(ops in prop::collection::vec(op(), 1..120)) {
        play(&ops);
    }
}

/// Plays `ops` in a mesh of one executor and one detokenizer, then lets a healthy mesh finish:
/// every request must end exactly once, with the model's tokens unless it failed, and
/// nothing may be left held.
fn play(ops: &[Op]) {
    let mut w = mesh(&[24]);
    let mut answered: Vec<world::PendingStep> = Vec::new();
    for op in ops.iter().cloned() {
        match op {
            Op::Submit { prompt_len, n, max_tokens } => {
                let i = w.submitted.len();
                w.submit(submit(&format!("r{i}"), prompt(prompt_len, i as u32 % 3), n, max_tokens, i as u64));
            }
            Op::Answer(i) if i < w.pending.len() => {
                answered.push(w.pending[i].clone());
                w.answer(i);
            }
            Op::AnswerLate(i) if i < w.pending.len() => w.answer_late(i),
            Op::FailStep(i) if i < w.pending.len() => w.fail(i),
            Op::DeliverHeld(i) if i < w.held.len() => w.deliver_held(i),
            Op::Redeliver(i) if i < answered.len() => {
                w.pending.push(answered[i].clone());
                w.answer(w.pending.len() - 1);
            }
            Op::Abort(i) => w.send(Event::Abort { request_id: format!("r{i}"), from: None }),
            Op::StartExecutor { id, blocks } => w.start_executor(&format!("e{id}"), blocks),
            Op::KillExecutor(id) => {
                if let Some(e) = w.executors.get_mut(&format!("e{id}")) {
                    e.alive = false;
                }
            }
            Op::StartDetokenizer(id) => w.start_detokenizer(&format!("d{id}")),
            Op::KillDetokenizer(id) => w.kill_detokenizer(&format!("d{id}")),
            Op::Wait(ms) => w.advance(Duration::from_millis(ms)),
            _ => {}
        }
    }
    // Whatever happened, a healthy mesh finishes everything.
    if !w.executors.values().any(|e| e.alive) {
        w.start_executor("e9", 32);
    }
    if !w.has_detokenizer() {
        w.start_detokenizer("d9");
    }
    while !w.held.is_empty() {
        w.deliver_held(0);
    }
    w.settle(400);
    w.assert_every_request_ended_once();
    w.assert_all_free();
    assert!(w.refusals.is_empty(), "{:?}", w.refusals);
    for request in &w.submitted {
        let view = &w.clients[&request.request_id];
        if view.errors == 0 && view.finishes.iter().all(|f| f != &[pagemesh_shared::FinishReason::Abort]) {
            for (s, tokens) in view.tokens.iter().enumerate() {
                assert_eq!(tokens, &expected_tokens(request.seed, s as u32, request.params.max_tokens));
            }
        }
    }
}
