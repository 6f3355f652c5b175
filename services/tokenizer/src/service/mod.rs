//! The tokenizer service: the actor in the NATS queue group on the public request subjects
//! ([`actor`]), and the chat prompts it renders ([`prompt_renderer`]).

pub mod actor;
pub mod prompt_renderer;

pub use actor::{ModelInfo, TokenizerService};
