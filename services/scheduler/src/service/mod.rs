//! The scheduler service: the pure logic that owns the block tables of every executor of one
//! model and drives one continuous-batching loop per executor ([`mesh`]), the actor that
//! connects it to NATS ([`actor`]), and their parts: round-robin admission across clients
//! ([`fair_queue`]), the standby's terms ([`leadership`]), aborts that arrive before their
//! request ([`early_aborts`]), what a detokenizer that missed events is sent again
//! ([`stream_sync`]) and its Prometheus series ([`metrics`]).

pub mod actor;
pub mod early_aborts;
pub mod fair_queue;
pub mod leadership;
pub mod mesh;
pub mod metrics;
pub mod stream_sync;

pub use actor::SchedulerService;
pub use mesh::SchedulerConfig;
