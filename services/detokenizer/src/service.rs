//! The detokenizer service: turns each request's sampled ids into text deltas (never half a
//! UTF-8 character), finds stop strings (cuts the text before them and tells the scheduler to
//! abort), and publishes the ordered chunks on the request's reply inbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use pagemesh_shared::limits::{self, MAX_OPEN_STREAMS};
use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::protocol::{
    AbortRequest, Chunk, DetokenizerAck, DetokenizerEvent, ErrorKind, ErrorReply, Heartbeat, OpenRequest, ResumePoint,
    StreamAsk, StreamReport, StreamState, TokenEvent, TokenTexts, Usage,
};
use pagemesh_shared::{FinishReason, SampledToken};
use pagemesh_tokenizer::{DecodeState, TextTokenizer};

use crate::recovery::{self, Arrival, ClosedStreams, UnknownStreams};
use pagemesh_bus::bus::{Bus, OrderedPublisher, CLIENT_REJOIN_GRACE};
use pagemesh_bus::listen::{listen, Subscription};
use pagemesh_bus::refusals::refuse;
use pagemesh_shared::wire::Topic;

/// How often a detokenizer announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// One sample's text stream.
struct SampleStream {
    decode: DecodeState,
    /// Decoded text not yet published (it may be the start of a stop string).
    pending: String,
    /// Ids (and logprobs) consumed since the last chunk.
    new_ids: Vec<u32>,
    new_logprobs: Vec<SampledToken>,
    new_texts: Vec<TokenTexts>,
    /// Set once the sample has ended.
    finished: Option<FinishReason>,
    /// Whether its last chunk is out.
    closed: bool,
    tokens: usize,
    /// Every token received, for a scheduler taking over.
    received: Vec<u32>,
    /// Everything, for non-streamed requests.
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<SampledToken>,
    texts: Vec<TokenTexts>,
}

/// One request's stream.
struct RequestStream {
    open: OpenRequest,
    next_index: u64,
    samples: Vec<SampleStream>,
    max_stop_chars: usize,
    /// When an event of it last came.
    last_event: Instant,
    /// When events it missed were last asked for.
    last_ask: Option<Instant>,
}

/// What a batch of events produced for one request.
struct Output {
    reply_to: String,
    chunks: Vec<Chunk>,
    abort: bool,
    ack: DetokenizerAck,
}

impl RequestStream {
    fn new(open: OpenRequest) -> Self {
        let samples = (0..open.n.max(1))
            .map(|_| SampleStream {
                decode: DecodeState::new_with(&open.prompt_token_ids, open.text.skip_special_tokens),
                pending: String::new(),
                new_ids: Vec::new(),
                new_logprobs: Vec::new(),
                new_texts: Vec::new(),
                finished: None,
                closed: false,
                tokens: 0,
                received: Vec::new(),
                text: String::new(),
                ids: Vec::new(),
                logprobs: Vec::new(),
                texts: Vec::new(),
            })
            .collect();
        let max_stop_chars = open.stop.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        Self { open, next_index: 0, samples, max_stop_chars, last_event: Instant::now(), last_ask: None }
    }

    /// Asks for the events after the ones received, if the last ask is `interval` old.
    fn ask(&mut self, detokenizer: &str, now: Instant, interval: Duration) -> Option<StreamAsk> {
        if self.last_ask.is_some_and(|at| now.duration_since(at) < interval) {
            return None;
        }
        self.last_ask = Some(now);
        let received = self.samples.iter().map(|s| s.received.len() as u32).collect();
        Some(StreamAsk { detokenizer: detokenizer.to_string(), received: Some(received) })
    }

    fn done(&self) -> bool {
        self.samples.iter().all(|s| s.finished.is_some())
    }

    /// The request's finish reason: the first of abort, error, stop and length that a sample
    /// ended with.
    fn finish_reason(&self) -> FinishReason {
        [FinishReason::Abort, FinishReason::Error, FinishReason::Stop, FinishReason::Length]
            .into_iter()
            .find(|r| self.samples.iter().any(|s| s.finished == Some(*r)))
            .unwrap_or(FinishReason::Stop)
    }

    /// Rebuilds the state a lost detokenizer had reached: replays the tokens its published
    /// chunks covered without publishing, keeping only the text it still held back.
    fn resume(&mut self, tokenizer: &TextTokenizer, point: &ResumePoint) {
        for (i, tokens) in point.consumed.iter().enumerate() {
            for (position, &token) in tokens.iter().enumerate() {
                let event = TokenEvent {
                    sample_index: i as u32,
                    position: position as u32,
                    token: Some(SampledToken { token, logprob: None, top_logprobs: Vec::new() }),
                    finish: None,
                };
                self.apply(tokenizer, event);
            }
        }
        for (i, s) in self.samples.iter_mut().enumerate() {
            let release = releasable(&s.pending, s.finished.is_some(), self.max_stop_chars);
            let released: String = s.pending.drain(..release).collect();
            if self.open.stream {
                s.new_ids.clear();
                s.new_logprobs.clear();
                s.new_texts.clear();
            } else {
                s.text.push_str(&released);
                s.ids.append(&mut s.new_ids);
                s.logprobs.append(&mut s.new_logprobs);
                s.texts.append(&mut s.new_texts);
            }
            if point.closed.get(i).copied().unwrap_or(false) {
                s.closed = true;
                s.finished.get_or_insert(FinishReason::Stop);
            }
        }
        self.next_index = point.next_index;
    }

    /// The stream as a scheduler taking over needs it.
    fn state(&self) -> StreamState {
        StreamState {
            open: self.open.clone(),
            generated: self.samples.iter().map(|s| s.received.clone()).collect(),
            finished: self.samples.iter().map(|s| s.finished).collect(),
            ack: self.ack(),
        }
    }

    fn ack(&self) -> DetokenizerAck {
        DetokenizerAck {
            request_id: self.open.request_id.clone(),
            next_index: self.next_index,
            consumed: self.samples.iter().map(|s| s.tokens).collect(),
            closed: self.samples.iter().map(|s| s.closed).collect(),
            ask: None,
        }
    }

    /// Applies one token event; returns whether a stop string ended the sample.
    fn apply(&mut self, tokenizer: &TextTokenizer, event: TokenEvent) -> bool {
        let stops = &self.open.stop;
        let Some(sample) = self.samples.get_mut(event.sample_index as usize) else { return false };
        if sample.finished.is_some() {
            return false;
        }
        if let Some(token) = event.token {
            sample.tokens += 1;
            sample.received.push(token.token);
            sample.new_ids.push(token.token);
            if self.open.logprobs {
                let text_of = |id| sample.decode.token_text(tokenizer, id).unwrap_or_default();
                let texts = TokenTexts {
                    text: text_of(token.token),
                    top: token.top_logprobs.iter().map(|&(id, _)| text_of(id)).collect(),
                };
                sample.new_texts.push(texts);
                sample.new_logprobs.push(token.clone());
            }
            if let Ok(delta) = sample.decode.push(tokenizer, token.token) {
                sample.pending.push_str(&delta);
            }
        }
        if event.finish.is_some() {
            if let Ok(rest) = sample.decode.flush(tokenizer) {
                sample.pending.push_str(&rest);
            }
        }
        let include_stop = self.open.text.include_stop_str_in_output;
        if let Some((at, len)) =
            stops.iter().filter_map(|s| sample.pending.find(s.as_str()).map(|at| (at, s.len()))).min()
        {
            sample.pending.truncate(if include_stop { at + len } else { at });
            sample.finished = Some(FinishReason::Stop);
            return true;
        }
        if event.finish.is_some() {
            sample.finished = event.finish;
        }
        false
    }

    /// The chunks for every sample with something new, the request's last one marked done.
    fn chunks(&mut self, force_final: bool) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        let all_done = self.done();
        if !self.open.stream && !all_done {
            // Not streamed: collect, publish at the end.
            for s in &mut self.samples {
                let release = releasable(&s.pending, s.finished.is_some(), self.max_stop_chars);
                let text: String = s.pending.drain(..release).collect();
                s.text.push_str(&text);
                s.ids.append(&mut s.new_ids);
                s.logprobs.append(&mut s.new_logprobs);
                s.texts.append(&mut s.new_texts);
            }
            return chunks;
        }
        let prompt_len = self.open.prompt_token_ids.len();
        for (i, s) in self.samples.iter_mut().enumerate() {
            if s.closed {
                continue;
            }
            let release = releasable(&s.pending, s.finished.is_some(), self.max_stop_chars);
            let mut text: String = s.pending.drain(..release).collect();
            let mut ids = std::mem::take(&mut s.new_ids);
            let mut logprobs = std::mem::take(&mut s.new_logprobs);
            let mut texts = std::mem::take(&mut s.new_texts);
            if !self.open.stream {
                s.text.push_str(&text);
                s.ids.append(&mut ids);
                s.logprobs.append(&mut logprobs);
                s.texts.append(&mut texts);
                text = std::mem::take(&mut s.text);
                ids = std::mem::take(&mut s.ids);
                logprobs = std::mem::take(&mut s.logprobs);
                texts = std::mem::take(&mut s.texts);
            }
            if text.is_empty() && ids.is_empty() && s.finished.is_none() {
                continue;
            }
            s.closed = s.finished.is_some();
            chunks.push(Chunk {
                request_id: self.open.request_id.clone(),
                index: 0,
                sample_index: i as u32,
                text,
                token_ids: ids,
                logprobs: self.open.logprobs.then_some(logprobs),
                logprob_texts: self.open.logprobs.then_some(texts),
                finish_reason: s.finished,
                done: false,
                usage: None,
                prompt_token_ids: None,
            });
        }
        if (all_done || force_final) && chunks.is_empty() {
            chunks.push(Chunk {
                request_id: self.open.request_id.clone(),
                index: 0,
                sample_index: 0,
                text: String::new(),
                token_ids: Vec::new(),
                logprobs: None,
                logprob_texts: None,
                finish_reason: None,
                done: false,
                usage: None,
                prompt_token_ids: None,
            });
        }
        let completion: usize = self.samples.iter().map(|s| s.tokens).sum();
        let count = chunks.len();
        for (k, chunk) in chunks.iter_mut().enumerate() {
            chunk.index = self.next_index;
            if self.next_index == 0 {
                chunk.prompt_token_ids = Some(self.open.prompt_token_ids.clone());
            }
            self.next_index += 1;
            if (all_done || force_final) && k + 1 == count {
                chunk.done = true;
                chunk.usage = Some(Usage::new(prompt_len, completion));
            }
        }
        chunks
    }
}

/// How many bytes of `pending` can be published: all when the sample is over, else all but
/// the last `max_stop_chars - 1` characters (which may begin a stop string).
fn releasable(pending: &str, finished: bool, max_stop_chars: usize) -> usize {
    if finished || max_stop_chars <= 1 {
        return pending.len();
    }
    let keep = max_stop_chars - 1;
    let chars = pending.chars().count();
    if chars <= keep {
        return 0;
    }
    pending.char_indices().nth(chars - keep).map_or(pending.len(), |(i, _)| i)
}

/// The detokenizer service.
pub struct DetokenizerService {
    bus: Bus,
    id: String,
    tokenizer: Arc<TextTokenizer>,
    streams: HashMap<String, RequestStream>,
    model: String,
    /// When an active scheduler was last heard.
    last_scheduler: Instant,
    /// The highest scheduler term heard: events of lower terms come from a scheduler that
    /// was replaced, and are dropped.
    term: u64,
    /// Final acks of streams closed lately.
    closed: ClosedStreams,
    /// Streams not held here that tokens came for.
    unknown: UnknownStreams,
    /// Chunks, errors, aborts and acks, published in order (started with the actor).
    outbox: Option<OrderedPublisher>,
}

/// Most bytes of streams in one page of a report (well under a NATS message).
const REPORT_PAGE_BYTES: usize = 256 * 1024;

/// Longest an open stream waits without hearing an active scheduler before it ends with an
/// error (time this detokenizer's own link to NATS was down does not count).
pub const SCHEDULER_GRACE: Duration = Duration::from_secs(5);

impl DetokenizerService {
    /// A detokenizer with instance id `id` for the model served as `model`.
    pub fn new(bus: Bus, id: String, tokenizer: Arc<TextTokenizer>, model: String) -> Self {
        Self {
            bus,
            id,
            tokenizer,
            streams: HashMap::new(),
            model,
            last_scheduler: Instant::now(),
            term: 0,
            closed: ClosedStreams::default(),
            unknown: UnknownStreams::default(),
            outbox: None,
        }
    }

    fn finished_counter(&self, reason: FinishReason) -> metrics::Counter {
        let series = [(labels::MODEL, self.model.clone()), (labels::FINISH_REASON, reason.as_str().to_string())];
        metrics::counter!(names::REQUESTS_FINISHED, &series)
    }

    /// Counts a request that ended.
    fn record_end(&self, stream: &RequestStream) {
        let reason = stream.finish_reason();
        tracing::debug!(finish = reason.as_str(), chunks = stream.next_index, "detokenizer: stream ended");
        self.finished_counter(reason).increment(1);
        if reason == FinishReason::Abort {
            metrics::counter!(names::REQUESTS_ABORTED, labels::MODEL => self.model.clone()).increment(1);
        }
    }

    /// Refuses to open a stream beyond [`MAX_OPEN_STREAMS`].
    fn check_capacity(&self, event: &DetokenizerEvent) -> Result<(), String> {
        match event {
            DetokenizerEvent::Open(open)
                if self.streams.len() >= MAX_OPEN_STREAMS && !self.streams.contains_key(&open.request_id) =>
            {
                Err(format!("this detokenizer already serves {MAX_OPEN_STREAMS} streams"))
            }
            _ => Ok(()),
        }
    }

    fn handle_event(&mut self, event: DetokenizerEvent) -> Option<Output> {
        let now = Instant::now();
        match event {
            DetokenizerEvent::Open(open) => {
                let further = open.resume.as_ref().map_or(0, |r| r.next_index);
                if self.streams.get(&open.request_id).is_some_and(|held| held.next_index >= further) {
                    // Sent again (its first copy arrived after all): the stream here is as
                    // far. Only a stream that moved away and back resumes further on.
                    return None;
                }
                let resume = open.resume.clone();
                let mut stream = RequestStream::new(*open);
                if let Some(point) = &resume {
                    stream.resume(&self.tokenizer, point);
                }
                self.unknown.opened(&stream.open.request_id);
                tracing::debug!(
                    samples = stream.samples.len(),
                    resumed = resume.is_some(),
                    "detokenizer: stream opened"
                );
                self.streams.insert(stream.open.request_id.clone(), stream);
                None
            }
            DetokenizerEvent::Tokens { request_id, tokens } => {
                let Some(stream) = self.streams.get_mut(&request_id) else {
                    return self.missing_stream(&request_id, now);
                };
                stream.last_event = now;
                let (mut abort, mut gap) = (false, false);
                for event in tokens {
                    let Some(sample) = stream.samples.get(event.sample_index as usize) else { continue };
                    match recovery::arrival(event.position, sample.received.len(), sample.finished.is_some()) {
                        Arrival::Next => abort |= stream.apply(&self.tokenizer, event),
                        Arrival::Repeat => {}
                        Arrival::Gap => gap = true,
                    }
                }
                let chunks = stream.chunks(false);
                let done = stream.done();
                let abort = abort && done;
                let reply_to = stream.open.reply_to.clone();
                let mut ack = stream.ack();
                if gap && !done {
                    ack.ask = stream.ask(&self.id, now, recovery::ASK_INTERVAL);
                }
                if done {
                    if let Some(stream) = self.streams.remove(&request_id) {
                        self.record_end(&stream);
                        self.closed.remember(stream.ack());
                    }
                }
                Some(Output { reply_to, chunks, abort, ack })
            }
            DetokenizerEvent::Finish { request_id, reason, .. } => {
                let Some(mut stream) = self.streams.remove(&request_id) else {
                    return self.missing_stream(&request_id, now);
                };
                for s in &mut stream.samples {
                    s.finished.get_or_insert(reason);
                }
                self.record_end(&stream);
                if reason == FinishReason::Error && stream.next_index == 0 {
                    // No chunk was out: the client hears the error itself (see `process`);
                    // the scheduler hears that the stream is closed.
                    for s in &mut stream.samples {
                        s.closed = true;
                    }
                    let ack = stream.ack();
                    self.closed.remember(ack.clone());
                    return Some(Output {
                        reply_to: stream.open.reply_to.clone(),
                        chunks: Vec::new(),
                        abort: false,
                        ack,
                    });
                }
                let chunks = stream.chunks(true);
                for s in &mut stream.samples {
                    s.closed = true;
                }
                self.closed.remember(stream.ack());
                Some(Output { reply_to: stream.open.reply_to.clone(), chunks, abort: false, ack: stream.ack() })
            }
        }
    }

    /// Tokens or the end of a stream not held here: its final ack again if it closed lately
    /// (the first was lost), else an ask for the stream (its opening was lost).
    fn missing_stream(&mut self, request_id: &str, now: Instant) -> Option<Output> {
        let ack = match self.closed.get(request_id) {
            Some(ack) => ack.clone(),
            None if self.unknown.should_ask(request_id, now) => DetokenizerAck {
                request_id: request_id.to_string(),
                next_index: 0,
                consumed: Vec::new(),
                closed: Vec::new(),
                ask: Some(StreamAsk { detokenizer: self.id.clone(), received: None }),
            },
            None => return None,
        };
        Some(Output { reply_to: String::new(), chunks: Vec::new(), abort: false, ack })
    }

    /// Asks for the events of streams silent for [`recovery::SILENCE_BEFORE_ASKING`]: their
    /// end may have been lost.
    fn ask_for_silent_streams(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut asks = Vec::new();
        for stream in self.streams.values_mut() {
            if now.duration_since(stream.last_event) < recovery::SILENCE_BEFORE_ASKING {
                continue;
            }
            if let Some(ask) = stream.ask(&self.id, now, recovery::SILENCE_BEFORE_ASKING) {
                asks.push(DetokenizerAck { ask: Some(ask), ..stream.ack() });
            }
        }
        if asks.is_empty() {
            return;
        }
        let bus = self.bus.clone();
        ctx.spawn(
            async move {
                for ack in &asks {
                    let _ = bus.publish(&bus.subjects.detokenizer_ack(), ack).await;
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for DetokenizerService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let s = &self.bus.subjects;
        let subscriptions = vec![
            Subscription::new(s.detokenizer_events(&self.id).subject(), Incoming::Event),
            Subscription::new(s.scheduler_heartbeat().subject(), Incoming::SchedulerBeat),
            Subscription::new(s.detokenizer_report(&self.id).subject(), Incoming::Report),
        ];
        listen(self, ctx, self.bus.client.clone(), subscriptions, "detokenizer");
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| {
            act.announce(ctx);
            act.watch_scheduler();
            act.ask_for_silent_streams(ctx);
        });
        self.announce(ctx);
        // Every series from the start, so that rates are defined before the first request.
        for reason in [FinishReason::Stop, FinishReason::Length, FinishReason::Abort, FinishReason::Error] {
            self.finished_counter(reason).absolute(0);
        }
        metrics::counter!(names::REQUESTS_ABORTED, labels::MODEL => self.model.clone()).absolute(0);
        pagemesh_bus::refusals::register("detokenizer", &["event", "scheduler_heartbeat", "stream_report"]);
    }
}

impl DetokenizerService {
    fn announce(&self, ctx: &mut Context<Self>) {
        let bus = self.bus.clone();
        let beat = Heartbeat { id: self.id.clone() };
        ctx.spawn(
            async move {
                let _ = bus.publish(&bus.subjects.detokenizer_heartbeat(), &beat).await;
            }
            .into_actor(self),
        );
    }
}

impl DetokenizerService {
    /// Ends every open stream with an error when no active scheduler has been heard for
    /// [`SCHEDULER_GRACE`]: nobody would send them tokens any more.
    fn watch_scheduler(&mut self) {
        let now = Instant::now();
        if self.streams.is_empty() || !self.bus.link().is_silent(self.last_scheduler, now, SCHEDULER_GRACE) {
            return;
        }
        tracing::warn!(
            "detokenizer: no scheduler heard for {SCHEDULER_GRACE:?}; ending {} streams",
            self.streams.len()
        );
        let ids: Vec<String> = self.streams.keys().cloned().collect();
        for request_id in ids {
            let message = Some("the scheduler serving this request is gone".to_string());
            let event = DetokenizerEvent::Finish { request_id, reason: FinishReason::Error, message, kind: None };
            self.process(event);
        }
    }

    fn on_scheduler_beat(&mut self, msg: &async_nats::Message) {
        match self.bus.subjects.scheduler_heartbeat().decode(&msg.payload) {
            Ok(beat) if beat.active && beat.term >= self.term => {
                self.term = beat.term;
                self.last_scheduler = Instant::now();
            }
            Ok(_) => {}
            Err(e) => refuse("detokenizer", "scheduler_heartbeat", &e.to_string()),
        }
    }

    /// Applies one event and publishes what it produced, in order.
    fn process(&mut self, event: DetokenizerEvent) {
        let error = match &event {
            DetokenizerEvent::Finish { request_id, reason: FinishReason::Error, message, kind } => {
                self.streams.get(request_id).filter(|s| s.next_index == 0).map(|s| {
                    let text = message.clone().unwrap_or_else(|| "the request failed".into());
                    let kind = kind.unwrap_or(ErrorKind::Unavailable);
                    (s.open.reply_to.clone(), ErrorReply::new(Some(request_id.clone()), kind, text))
                })
            }
            _ => None,
        };
        let started = Instant::now();
        let output = self.handle_event(event);
        metrics::histogram!(names::DETOKENIZER_DURATION, labels::MODEL => self.model.clone())
            .record(started.elapsed().as_secs_f64());
        // Everything goes out in order through one queue, which holds it for a while after
        // the link to NATS comes back (the clients may not have subscribed again yet); every
        // message for the client names the request in its headers.
        let outbox = self.outbox();
        if let Some((reply_to, error)) = error {
            let about = error.request_id.clone().unwrap_or_default();
            outbox.publish_about(&Topic::json(reply_to), &error, &about);
        }
        let Some(output) = output else { return };
        let inbox = Topic::json(output.reply_to.clone());
        for chunk in &output.chunks {
            outbox.publish_about(&inbox, chunk, &chunk.request_id);
        }
        let request_id = output.ack.request_id.clone();
        if output.abort {
            let abort = AbortRequest { request_id: request_id.clone() };
            outbox.publish_about(&self.bus.subjects.scheduler_abort(), &abort, &request_id);
        }
        // After the chunks: the scheduler learns how far the stream got.
        outbox.publish(&self.bus.subjects.detokenizer_ack(), &output.ack);
    }

    /// The queue everything about streams is published through, in order.
    fn outbox(&mut self) -> OrderedPublisher {
        let bus = &self.bus;
        self.outbox.get_or_insert_with(|| OrderedPublisher::start_for_clients(bus, CLIENT_REJOIN_GRACE)).clone()
    }

    fn on_event(&mut self, msg: &async_nats::Message) {
        let message =
            self.bus.subjects.detokenizer_events(&self.id).decode(&msg.payload).map_err(|e| e.to_string()).and_then(
                |m| match m.events.len() {
                    0..=limits::MAX_EVENTS_PER_MESSAGE => Ok(m),
                    n => Err(format!("{n} events in one message; at most {}", limits::MAX_EVENTS_PER_MESSAGE)),
                },
            );
        match message {
            // From a scheduler that was replaced: the new one owns the stream now.
            Ok(message) if message.term < self.term => {}
            Ok(message) => {
                self.term = message.term;
                for event in message.events {
                    // Each event is checked on its own: a bad one does not take the others down.
                    match limits::check_detokenizer_event(&event).and_then(|()| self.check_capacity(&event)) {
                        Ok(()) => {
                            let span = pagemesh_bus::request_span!(event.request_id());
                            let _entered = span.enter();
                            self.process(event)
                        }
                        Err(e) => refuse("detokenizer", "event", &e),
                    }
                }
            }
            Err(e) => refuse("detokenizer", "event", &e),
        }
    }

    /// Answers a scheduler taking over with a page of the streams held here; from then on,
    /// events of older terms are dropped.
    fn on_report(&mut self, msg: &async_nats::Message, ctx: &mut Context<Self>) {
        let Some(reply) = msg.reply.as_ref().map(|r| r.to_string()) else { return };
        let endpoint = self.bus.subjects.detokenizer_report(&self.id);
        let request = match endpoint.requests().decode(&msg.payload) {
            Ok(r) => r,
            Err(e) => return refuse("detokenizer", "stream_report", &e.to_string()),
        };
        self.term = self.term.max(request.term);
        self.last_scheduler = Instant::now();
        let mut ids: Vec<&String> =
            self.streams.keys().filter(|id| request.after.as_ref().is_none_or(|after| *id > after)).collect();
        ids.sort();
        let (mut streams, mut bytes, mut more) = (Vec::new(), 0, false);
        for id in ids {
            let Some(stream) = self.streams.get(id) else { continue };
            let state = stream.state();
            bytes += endpoint.encoding().encode(&state).map_or(0, |v| v.len());
            if bytes > REPORT_PAGE_BYTES && !streams.is_empty() {
                more = true;
                break;
            }
            streams.push(state);
        }
        let bus = self.bus.clone();
        let report = StreamReport { streams, more };
        ctx.spawn(
            async move {
                let _ = bus.respond(&endpoint, reply, &report).await;
            }
            .into_actor(self),
        );
    }
}

/// A message on one of the detokenizer's subjects.
enum Incoming {
    Event(async_nats::Message),
    SchedulerBeat(async_nats::Message),
    Report(async_nats::Message),
}

impl StreamHandler<Incoming> for DetokenizerService {
    fn handle(&mut self, item: Incoming, ctx: &mut Self::Context) {
        match item {
            Incoming::Event(msg) => self.on_event(&msg),
            Incoming::SchedulerBeat(msg) => self.on_scheduler_beat(&msg),
            Incoming::Report(msg) => self.on_report(&msg, ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::releasable;

    #[test]
    fn holds_back_what_may_start_a_stop_string() {
        assert_eq!(releasable("hello", false, 3), 3);
        assert_eq!(releasable("hé", false, 3), 0);
        assert_eq!(releasable("héllo", true, 3), "héllo".len());
        assert_eq!(releasable("abc", false, 0), 3);
    }
}
