//! Text ↔ token ids for pagemesh, on Hugging Face `tokenizer.json` files and on the vocabulary
//! of GGUF files ([`gguf_vocab`]).
//!
//! * [`TextTokenizer`] encodes prompts (with the model's BOS handling from its post-processor)
//!   and decodes ids.
//! * [`IncrementalDecoder`] turns a growing list of generated ids into text deltas that never
//!   end in half a UTF-8 character, as a streaming detokenizer needs.
//! * [`ChatTemplate`] renders a conversation with the model's Jinja chat template as Hugging Face
//!   `transformers` does; [`TextTokenizer::encode_chat`] tokenizes the result.

use std::path::Path;

use thiserror::Error;

mod chat;
pub mod gguf_vocab;
#[cfg(feature = "service")]
pub mod service;

pub use chat::{ChatMessage, ChatTemplate, RenderOptions, SpecialTokens, TemplateValue};

/// Tokenizer failures.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is missing or cannot be parsed.
    #[error("cannot load tokenizer {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// A chat template failed to compile or to render, or raised an error itself
    /// (`raise_exception`), or its inputs were unusable.
    #[error("chat template: {0}")]
    Template(String),
}

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads the tokenizer of a model: `tokenizer.json` of a Hugging Face directory, or for a
    /// GGUF model (a `.gguf` file, or a directory holding one and no `config.json`) the
    /// `tokenizer.json` beside the file when there is one, else the file's own vocabulary.
    pub fn load(model: &Path) -> Result<Self, TokenizerError> {
        match pagemesh_gguf::model_file(model) {
            Some(file) => match file_beside(&file, "tokenizer.json") {
                Some(json) => Self::from_file(&json),
                None => Self::from_gguf(&file),
            },
            None => Self::from_file(&model.join("tokenizer.json")),
        }
    }

    /// Builds the tokenizer a GGUF file's metadata describes ([`gguf_vocab::from_metadata`]).
    pub fn from_gguf(path: &Path) -> Result<Self, TokenizerError> {
        let load_error = |message: String| TokenizerError::Load { path: path.display().to_string(), message };
        let file = pagemesh_gguf::GgufFile::open(path).map_err(|e| load_error(e.to_string()))?;
        Self::from_gguf_metadata(&file.header.metadata).map_err(|e| load_error(e.to_string()))
    }

    /// Builds the tokenizer that GGUF metadata describes ([`gguf_vocab::from_metadata`]).
    pub fn from_gguf_metadata(
        metadata: &std::collections::BTreeMap<String, pagemesh_gguf::Value>,
    ) -> Result<Self, TokenizerError> {
        Ok(Self { inner: gguf_vocab::from_metadata(metadata)? })
    }

    /// Loads a `tokenizer.json` file.
    ///
    /// Truncation and padding saved in the file are switched off: a prompt is never cut to a
    /// length a training run once left in the file (TinyLlama's saved `tokenizer.json` truncates
    /// at 512 tokens), and encodings are never padded.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let load_error =
            |e: tokenizers::Error| TokenizerError::Load { path: path.display().to_string(), message: e.to_string() };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(load_error)?;
        inner.with_truncation(None).map_err(load_error)?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Token ids of `text`, with the special tokens (e.g. BOS) the tokenizer adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, adding special tokens or not.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a rendered chat prompt ([`ChatTemplate::render`]).
    ///
    /// No special tokens are added: the template already wrote the ones the model expects (BOS
    /// included, when it wants one), and adding them again would duplicate them. This is what
    /// `transformers` does for chat templates (`add_special_tokens=False`). Special tokens in the
    /// text itself (such as `<|im_start|>`) are recognized as such.
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(rendered, false)
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, with special tokens (BOS, EOS, …) unless `skip_special_tokens`.
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a generation: `decode(prompt + generated)` with the decoded prompt cut off,
    /// so that the decoder's context rules (such as a leading space) apply as in one piece.
    pub fn generated_text(&self, prompt: &[u32], generated: &[u32]) -> Result<String, TokenizerError> {
        let mut decoder = IncrementalDecoder::new(self, prompt);
        let mut text = String::new();
        for &t in generated {
            text.push_str(&decoder.push(t)?);
        }
        text.push_str(&decoder.flush()?);
        Ok(text)
    }
}

/// `name` in the directory of `file`, if it is a file.
fn file_beside(file: &Path, name: &str) -> Option<std::path::PathBuf> {
    let path = file.parent()?.join(name);
    path.is_file().then_some(path)
}

/// Turns a growing list of ids into text deltas.
///
/// The text emitted so far always equals `decode(prompt + ids)` minus `decode(prompt)`, except
/// that an incomplete UTF-8 sequence at the end is held back until it completes (or
/// [`flush`](Self::flush) is called).
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    state: DecodeState,
}

impl<'a> IncrementalDecoder<'a> {
    /// A decoder whose context ends with the prompt's ids.
    pub fn new(tokenizer: &'a TextTokenizer, prompt: &[u32]) -> Self {
        Self { tokenizer, state: DecodeState::new(prompt) }
    }

    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.state.push(self.tokenizer, id)
    }

    /// Returns whatever is held back (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self) -> Result<String, TokenizerError> {
        self.state.flush(self.tokenizer)
    }
}

/// Prompt tokens kept as decoding context: enough for the decoder's rules between pieces.
const PROMPT_CONTEXT: usize = 6;

/// The state of an incremental decode, owned (no borrow of the tokenizer), for services that
/// keep one per stream; [`IncrementalDecoder`] wraps it with a tokenizer.
#[derive(Debug, Clone)]
pub struct DecodeState {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl DecodeState {
    /// A state whose context ends with the prompt's ids; special tokens are left out.
    pub fn new(prompt: &[u32]) -> Self {
        Self::new_with(prompt, true)
    }

    /// A state whose context ends with the prompt's ids; special tokens are in the text
    /// unless `skip_special_tokens`.
    pub fn new_with(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let start = prompt.len().saturating_sub(PROMPT_CONTEXT);
        let ids = prompt[start..].to_vec();
        let read_offset = ids.len();
        Self { ids, prefix_offset: 0, read_offset, skip_special_tokens }
    }

    fn decode(&self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        tokenizer.decode_with(ids, self.skip_special_tokens)
    }

    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = self.decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(tokenizer, &self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).unwrap_or("").to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text `id` would add if pushed now, without pushing it: what a token (or an
    /// alternative to it) reads as in context, for log-probabilities. Like [`Self::push`] it
    /// includes held-back bytes that `id` completes into characters; a token that leaves a
    /// character incomplete reads as its text alone (U+FFFD for a lone byte).
    pub fn token_text(&self, tokenizer: &TextTokenizer, id: u32) -> Result<String, TokenizerError> {
        let released = self.decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let mut with = self.ids[self.prefix_offset..].to_vec();
        with.push(id);
        let full = self.decode(tokenizer, &with)?;
        if full.len() > released.len() && !full.ends_with('\u{FFFD}') {
            Ok(full.get(released.len()..).unwrap_or("").to_string())
        } else {
            self.decode(tokenizer, &[id])
        }
    }

    /// Returns whatever is held back (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(tokenizer, &self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or("").to_string())
    }
}
