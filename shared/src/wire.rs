//! The wire: every subject declared once ([`crate::subjects::Subjects`]) with the types that
//! travel on it and their encoding.
//!
//! A [`Topic<M>`] is a subject messages of type `M` are published on; an
//! [`Endpoint<Req, Resp>`] is a request/reply subject. Public subjects (any NATS client may use
//! them) carry JSON; internal subjects carry MessagePack with field names (self-describing,
//! about half JSON's size), the subjects every step crosses (steps, their answers, token
//! events) MessagePack with fields by position (a fraction of that: a decode step costs about
//! 20 bytes per sequence), and an executor's
//! registration names the internal protocol version it speaks
//! ([`crate::protocol::INTERNAL_PROTOCOL_VERSION`]).

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// How a subject's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JSON (public subjects).
    Json,
    /// MessagePack, structs as maps with field names (internal subjects).
    MessagePack,
    /// MessagePack, structs as arrays of their fields in declaration order (the hot internal
    /// subject: steps and their answers, several per millisecond). Decoding takes either form.
    MessagePackCompact,
}

impl Encoding {
    /// `value` encoded.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, String> {
        match self {
            Encoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
            Encoding::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
            Encoding::MessagePackCompact => rmp_serde::to_vec(value).map_err(|e| e.to_string()),
        }
    }

    /// A value decoded from `bytes`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            Encoding::MessagePack | Encoding::MessagePackCompact => {
                rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
            }
        }
    }
}

/// A message that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("bad message on {subject}: {message}")]
pub struct WireError {
    /// The subject.
    pub subject: String,
    /// Why.
    pub message: String,
}

/// A subject on which messages of type `M` are published.
pub struct Topic<M> {
    subject: String,
    encoding: Encoding,
    message: PhantomData<fn() -> M>,
}

impl<M> Clone for Topic<M> {
    fn clone(&self) -> Self {
        Self { subject: self.subject.clone(), encoding: self.encoding, message: PhantomData }
    }
}

impl<M> std::fmt::Debug for Topic<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Topic({}, {:?})", self.subject, self.encoding)
    }
}

impl<M: Serialize + DeserializeOwned> Topic<M> {
    /// A subject with its encoding.
    pub fn new(subject: String, encoding: Encoding) -> Self {
        Self { subject, encoding, message: PhantomData }
    }

    /// A public JSON subject, such as a client's reply inbox.
    pub fn json(subject: impl Into<String>) -> Self {
        Self::new(subject.into(), Encoding::Json)
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Its encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// `message` encoded for this subject.
    pub fn encode(&self, message: &M) -> Result<Vec<u8>, WireError> {
        self.encoding.encode(message).map_err(|message| self.error(message))
    }

    /// A message of this subject decoded.
    pub fn decode(&self, bytes: &[u8]) -> Result<M, WireError> {
        self.encoding.decode(bytes).map_err(|message| self.error(message))
    }

    fn error(&self, message: String) -> WireError {
        WireError { subject: self.subject.clone(), message }
    }
}

/// A request/reply subject: requests of type `Req`, each answered with one `Resp`.
pub struct Endpoint<Req, Resp> {
    requests: Topic<Req>,
    response: PhantomData<fn() -> Resp>,
}

impl<Req, Resp> Clone for Endpoint<Req, Resp> {
    fn clone(&self) -> Self {
        Self { requests: self.requests.clone(), response: PhantomData }
    }
}

impl<Req, Resp> std::fmt::Debug for Endpoint<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint({}, {:?})", self.requests.subject, self.requests.encoding)
    }
}

impl<Req: Serialize + DeserializeOwned, Resp: Serialize + DeserializeOwned> Endpoint<Req, Resp> {
    /// A request subject with its encoding (requests and answers alike).
    pub fn new(subject: String, encoding: Encoding) -> Self {
        Self { requests: Topic::new(subject, encoding), response: PhantomData }
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        self.requests.subject()
    }

    /// Its encoding.
    pub fn encoding(&self) -> Encoding {
        self.requests.encoding()
    }

    /// The requests, as a topic.
    pub fn requests(&self) -> &Topic<Req> {
        &self.requests
    }

    /// An answer encoded.
    pub fn encode_response(&self, response: &Resp) -> Result<Vec<u8>, WireError> {
        self.encoding().encode(response).map_err(|message| self.requests.error(message))
    }

    /// An answer decoded.
    pub fn decode_response(&self, bytes: &[u8]) -> Result<Resp, WireError> {
        self.encoding().decode(bytes).map_err(|message| self.requests.error(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ExecutorRegistration, StepReply, StepResponse, INTERNAL_PROTOCOL_VERSION};
    use crate::sampling::SamplingParams;
    use crate::step::{SampleSpec, ScheduledSeq, StepPlan};

    fn plan() -> StepPlan {
        let params = SamplingParams {
            logit_bias: (0..64).map(|t| (t * 3, -1.5)).collect(),
            stop_token_ids: vec![2, 7],
            seed: Some(5),
            ..SamplingParams::greedy(40)
        };
        StepPlan {
            step_id: 9,
            swap_out: vec![(1, 2)],
            swap_in: vec![],
            copy: vec![(3, 4)],
            released: vec![8],
            seqs: vec![ScheduledSeq {
                seq_id: 4,
                tokens: vec![1, 2, 3],
                start_pos: 0,
                block_table: vec![5, 6],
                history: Some(vec![]),
                sample: Some(SampleSpec {
                    params: params.into(),
                    seed: u64::MAX,
                    sample_index: 0,
                    num_samples: 2,
                    prompt_len: 3,
                    output_len: 0,
                    banned_tokens: vec![2],
                }),
            }],
        }
    }

    #[test]
    fn internal_messages_survive_message_pack_and_are_smaller_than_json() {
        let plan = plan();
        let packed = Encoding::MessagePack.encode(&plan).unwrap();
        assert_eq!(Encoding::MessagePack.decode::<StepPlan>(&packed).unwrap(), plan);
        let json = Encoding::Json.encode(&plan).unwrap();
        assert!(packed.len() < json.len(), "{} bytes packed, {} as JSON", packed.len(), json.len());
        let reply = StepResponse {
            incarnation: 1,
            step: 2,
            reply: StepReply::Refused { message: "m".into(), seq_ids: vec![4] },
        };
        assert_eq!(
            Encoding::MessagePack.decode::<StepResponse>(&Encoding::MessagePack.encode(&reply).unwrap()).unwrap(),
            reply
        );
    }

    #[test]
    fn a_topic_names_its_subject_when_a_message_does_not_decode() {
        let topic: Topic<ExecutorRegistration> = Topic::new("p.v1.executor.heartbeat".into(), Encoding::MessagePack);
        let err = topic.decode(b"{\"executor_id\": \"e\"}").unwrap_err();
        assert_eq!(err.subject, "p.v1.executor.heartbeat");
        let registration = ExecutorRegistration {
            executor_id: "e".into(),
            model: "m".into(),
            block_size: 16,
            num_device_blocks: 1,
            num_host_blocks: 0,
            incarnation: 3,
            protocol_version: INTERNAL_PROTOCOL_VERSION,
            step_taken: Some((2, 9)),
            step_answered: Some((2, 8)),
        };
        assert_eq!(topic.decode(&topic.encode(&registration).unwrap()).unwrap(), registration);
    }
}
