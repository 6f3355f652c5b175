//! Text ↔ token ids for pagemesh, on Hugging Face `tokenizer.json` files.
//!
//! * [`TextTokenizer`] encodes prompts (with the model's BOS handling from its post-processor)
//!   and decodes ids.
//! * [`IncrementalDecoder`] turns a growing list of generated ids into text deltas that never
//!   end in half a UTF-8 character, as a streaming detokenizer needs.

use std::path::Path;

use thiserror::Error;

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
}

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn load(model_dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&model_dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), message: e.to_string() })?;
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

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Codec(e.to_string()))
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

/// Turns a growing list of ids into text deltas.
///
/// The text emitted so far always equals `decode(prompt + ids)` minus `decode(prompt)`, except
/// that an incomplete UTF-8 sequence at the end is held back until it completes (or
/// [`flush`](Self::flush) is called).
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// Prompt tokens kept as decoding context: enough for the decoder's rules between pieces.
const PROMPT_CONTEXT: usize = 6;

impl<'a> IncrementalDecoder<'a> {
    /// A decoder whose context ends with the prompt's ids.
    pub fn new(tokenizer: &'a TextTokenizer, prompt: &[u32]) -> Self {
        let start = prompt.len().saturating_sub(PROMPT_CONTEXT);
        let ids = prompt[start..].to_vec();
        let read_offset = ids.len();
        Self { tokenizer, ids, prefix_offset: 0, read_offset }
    }

    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).unwrap_or("").to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Returns whatever is held back (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or("").to_string())
    }
}
