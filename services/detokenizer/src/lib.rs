//! The pagemesh detokenizer service: each request's sampled ids become text deltas (never half
//! a UTF-8 character, via `pagemesh_tokenizer`'s incremental decoder), stop strings end the
//! request, and the ordered chunks go to the client's reply inbox. A scheduler taking over
//! rebuilds its state from the streams each detokenizer reports; events lost on the bus are asked
//! for again ([`recovery`]).

pub mod recovery;
pub mod service;

pub use service::DetokenizerService;
