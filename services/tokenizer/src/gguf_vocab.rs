//! Tokenizers from a GGUF file's metadata, built as the `tokenizer.json` a Hugging Face
//! conversion of the same model would hold, so that one `tokenizers::Tokenizer` serves both
//! kinds of model files.
//!
//! The metadata (`tokenizer.ggml.*`, as llama.cpp's converter writes it) names the model:
//!
//! * `gpt2`: byte-level BPE. Tokens are already in the byte-to-unicode alphabet, merges are
//!   `"left right"` strings in rank order. The text is first cut into words by the regexes that
//!   `tokenizer.ggml.pre` names (the ones llama.cpp applies for that name), each match kept as
//!   its own word, then mapped to the byte alphabet.
//! * `llama`: SentencePiece BPE with scores. Merges are derived from the scores (a pair merges
//!   when its concatenation is a token; the higher that token's score, the earlier), characters
//!   outside the vocabulary fall back to `<0xXX>` byte tokens, and a space is put before the text
//!   (`tokenizer.ggml.add_space_prefix`, default on) and after every special token.
//!
//! Control and user-defined tokens (token types 3 and 4, and the unknown token, type 2) are
//! matched as whole tokens anywhere in the text, as llama.cpp does with `parse_special`. BOS and
//! EOS are added as `tokenizer.ggml.add_bos_token` / `add_eos_token` say, with llama.cpp's
//! defaults when absent.

use std::collections::{BTreeMap, HashMap};

use pagemesh_gguf::Value;
use serde_json::{json, Map, Value as Json};

use crate::chat::SpecialTokens;
use crate::TokenizerError;

/// A GGUF token type: `CONTROL` (BOS, EOS, `<|im_start|>`, ...).
const TYPE_CONTROL: i64 = 3;
/// A GGUF token type: `USER_DEFINED` (added tokens that are not special).
const TYPE_USER_DEFINED: i64 = 4;
/// A GGUF token type: `UNKNOWN` (`<unk>`).
const TYPE_UNKNOWN: i64 = 2;
/// A GGUF token type: `BYTE` (`<0x0A>`, SentencePiece byte fallback).
const TYPE_BYTE: i64 = 6;

/// The most tokens a vocabulary may have (the largest real ones have ~260k).
const MAX_TOKENS: usize = 1 << 21;

/// GPT-2's word regex, as llama.cpp writes it (its trailing-whitespace alternative is implied:
/// every span a regex leaves unmatched is a word of its own).
const GPT2_WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's word regex (case-insensitive contractions spelled out, numbers in threes).
const LLAMA3_WORDS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's word regex (as Llama 3's, with single digits).
const QWEN2_WORDS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level BPE vocabulary cuts text into words, by `tokenizer.ggml.pre`.
struct PreTokenizer {
    /// Regexes applied in turn; each match becomes a word, and so does each span between.
    regexes: &'static [&'static str],
    /// Words that are tokens themselves are taken whole, without merging (Llama 3).
    ignore_merges: bool,
    /// Whether BOS is added when the metadata does not say.
    add_bos: bool,
}

/// `tokenizer.ggml.pre` values and their pre-tokenizers (the groups llama.cpp uses).
const PRE_TOKENIZERS: &[(&[&str], PreTokenizer)] = &[
    (
        &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
        PreTokenizer { regexes: &[r"\p{N}", GPT2_WORDS], ignore_merges: false, add_bos: false },
    ),
    (
        &["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion"],
        PreTokenizer { regexes: &[GPT2_WORDS], ignore_merges: false, add_bos: false },
    ),
    (
        &["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"],
        PreTokenizer { regexes: &[LLAMA3_WORDS], ignore_merges: true, add_bos: true },
    ),
    (
        &["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"],
        PreTokenizer { regexes: &[QWEN2_WORDS], ignore_merges: false, add_bos: false },
    ),
    (
        &["default"],
        PreTokenizer {
            regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_WORDS, r"\p{N}+", "[0-9][0-9][0-9]"],
            ignore_merges: false,
            add_bos: false,
        },
    ),
];

/// The vocabulary arrays of the metadata.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i64>,
    scores: Vec<f32>,
}

impl Vocabulary {
    fn read(metadata: &BTreeMap<String, Value>) -> Result<Self, TokenizerError> {
        let tokens = match metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    // llama.cpp names empty tokens so that every id has a distinct text.
                    Some("") => Ok(format!("[EMPTY_{i}]")),
                    Some(s) => Ok(s.to_owned()),
                    None => Err(codec(format!("tokenizer.ggml.tokens[{i}] is not a string"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(codec("tokenizer.ggml.tokens is not an array")),
            None => return Err(codec("the file has no tokenizer.ggml.tokens (no vocabulary)")),
        };
        if tokens.is_empty() || tokens.len() > MAX_TOKENS {
            return Err(codec(format!("tokenizer.ggml.tokens has {} entries (1 to {MAX_TOKENS})", tokens.len())));
        }
        let per_token = |key: &str| -> Result<Option<&Vec<Value>>, TokenizerError> {
            match metadata.get(key) {
                None => Ok(None),
                Some(Value::Array(items)) if items.len() == tokens.len() => Ok(Some(items)),
                Some(Value::Array(items)) => {
                    Err(codec(format!("{key} has {} entries for {} tokens", items.len(), tokens.len())))
                }
                Some(_) => Err(codec(format!("{key} is not an array"))),
            }
        };
        let types = match per_token("tokenizer.ggml.token_type")? {
            None => vec![1; tokens.len()],
            Some(items) => items
                .iter()
                .map(|v| integer(v).ok_or_else(|| codec("tokenizer.ggml.token_type holds a non-integer")))
                .collect::<Result<_, _>>()?,
        };
        let scores = match per_token("tokenizer.ggml.scores")? {
            None => vec![0.0; tokens.len()],
            Some(items) => items
                .iter()
                .map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| codec("tokenizer.ggml.scores holds a non-number")))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { tokens, types, scores })
    }

    /// Token text → id; a text that appears twice maps to its last id, as in llama.cpp.
    fn ids(&self) -> HashMap<&str, u32> {
        self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect()
    }

    fn vocab_json(&self) -> Json {
        let mut vocab = Map::new();
        for (id, text) in self.tokens.iter().enumerate() {
            vocab.insert(text.clone(), id.into());
        }
        Json::Object(vocab)
    }

    /// Control, unknown and user-defined tokens, matched whole in any text.
    fn added_tokens(&self) -> Vec<Json> {
        self.types
            .iter()
            .enumerate()
            .filter(|(_, &t)| matches!(t, TYPE_CONTROL | TYPE_UNKNOWN | TYPE_USER_DEFINED))
            .map(|(id, &t)| {
                json!({
                    "id": id, "content": self.tokens[id], "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": t != TYPE_USER_DEFINED,
                })
            })
            .collect()
    }
}

/// The chat template of a GGUF file's metadata (`tokenizer.chat_template`), with the texts of
/// the BOS, EOS, unknown and padding tokens it renders with; `None` when the file has none.
pub fn chat_template(metadata: &BTreeMap<String, Value>) -> Option<(String, SpecialTokens)> {
    let template = metadata.get("tokenizer.chat_template").and_then(Value::as_str)?;
    Some((template.to_owned(), special_tokens(metadata)))
}

/// The texts of the special tokens a GGUF vocabulary names (bos, eos, unk, pad).
pub fn special_tokens(metadata: &BTreeMap<String, Value>) -> SpecialTokens {
    let text_of = |key: &str| -> Option<String> {
        let id = usize::try_from(metadata.get(key).and_then(Value::as_u64)?).ok()?;
        match metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.get(id).and_then(Value::as_str).map(str::to_owned),
            _ => None,
        }
    };
    SpecialTokens {
        bos: text_of("tokenizer.ggml.bos_token_id"),
        eos: text_of("tokenizer.ggml.eos_token_id"),
        unk: text_of("tokenizer.ggml.unknown_token_id"),
        pad: text_of("tokenizer.ggml.padding_token_id"),
    }
}

/// Builds the tokenizer a GGUF file's metadata describes.
pub fn from_metadata(metadata: &BTreeMap<String, Value>) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab = Vocabulary::read(metadata)?;
    let model = metadata.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
    let flag = |key: &str| metadata.get(key).and_then(|v| if let Value::Bool(b) = v { Some(*b) } else { None });
    let (mut spec, default_add_bos) = match model {
        "gpt2" => byte_level_bpe(metadata, &vocab)?,
        "llama" => sentencepiece_bpe(&vocab, flag("tokenizer.ggml.add_space_prefix").unwrap_or(true)),
        other => {
            return Err(codec(format!("tokenizer.ggml.model `{other}` is not supported (supported: gpt2, llama)")))
        }
    };
    let bos = metadata.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let eos = metadata.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64);
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos);
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
    spec["post_processor"] =
        post_processor(&vocab, add_bos.then_some(bos).flatten(), add_eos.then_some(eos).flatten())?;
    spec["added_tokens"] = vocab.added_tokens().into();
    spec["version"] = "1.0".into();
    spec.to_string().parse().map_err(|e| codec(format!("the vocabulary does not make a tokenizer: {e}")))
}

/// The `gpt2` model: byte-level BPE with the merges of the file and the pre-tokenizer its
/// `tokenizer.ggml.pre` names. Returns the tokenizer spec and the default for adding BOS.
fn byte_level_bpe(metadata: &BTreeMap<String, Value>, vocab: &Vocabulary) -> Result<(Json, bool), TokenizerError> {
    let pre_name = metadata.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let pre = PRE_TOKENIZERS.iter().find(|(names, _)| names.contains(&pre_name)).map(|(_, p)| p).ok_or_else(|| {
        let known: Vec<&str> = PRE_TOKENIZERS.iter().flat_map(|(names, _)| names.iter().copied()).collect();
        codec(format!("tokenizer.ggml.pre `{pre_name}` is not supported (supported: {})", known.join(", ")))
    })?;
    let merges = match metadata.get("tokenizer.ggml.merges") {
        Some(Value::Array(items)) => items,
        _ => return Err(codec("a gpt2 tokenizer needs tokenizer.ggml.merges (an array of strings)")),
    };
    let ids = vocab.ids();
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        let merge = merge.as_str().ok_or_else(|| codec(format!("tokenizer.ggml.merges[{i}] is not a string")))?;
        // Split at the first space after the first character, as llama.cpp does.
        // (a byte offset: the first character may be longer than a byte).
        let Some(at) = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else { continue };
        let (left, right) = (&merge[..at], &merge[at + 1..]);
        // A merge whose parts or result are not tokens can never give a token: left out.
        let result = format!("{left}{right}");
        if ids.contains_key(left) && ids.contains_key(right) && ids.contains_key(result.as_str()) {
            pairs.push(json!([left, right]));
        }
    }
    let mut steps: Vec<Json> = pre
        .regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
    let spec = json!({
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": pre.ignore_merges, "vocab": vocab.vocab_json(), "merges": pairs,
        },
    });
    Ok((spec, pre.add_bos))
}

/// The `llama` model: SentencePiece BPE, merges ranked by the score of what they make, byte
/// fallback, spaces as `▁`. Returns the tokenizer spec and the default for adding BOS.
fn sentencepiece_bpe(vocab: &Vocabulary, add_space_prefix: bool) -> (Json, bool) {
    let ids = vocab.ids();
    // Every split of a token into two tokens is a merge; the higher the whole's score, the
    // earlier it applies (ties: the earlier whole, then the earlier left part).
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (id, text) in vocab.tokens.iter().enumerate() {
        if vocab.types[id] == TYPE_BYTE || ids.get(text.as_str()) != Some(&(id as u32)) {
            continue;
        }
        for (at, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(at);
            if let (Some(&l), Some(_)) = (ids.get(left), ids.get(right)) {
                merges.push((vocab.scores[id], id as u32, l, left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let pairs: Vec<Json> = merges.iter().map(|m| json!([m.3, m.4])).collect();
    let unk = vocab.types.iter().position(|&t| t == TYPE_UNKNOWN).map(|i| vocab.tokens[i].clone());
    let mut normalizers = Vec::new();
    let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "})];
    decoders.push(json!({"type": "ByteFallback"}));
    decoders.push(json!({"type": "Fuse"}));
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let spec = json!({
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab.vocab_json(), "merges": pairs,
        },
    });
    (spec, true)
}

/// A post-processor adding BOS in front and EOS behind, when asked.
fn post_processor(vocab: &Vocabulary, bos: Option<u64>, eos: Option<u64>) -> Result<Json, TokenizerError> {
    let mut single = Vec::new();
    let mut special = Map::new();
    let mut piece = |id: u64, role: &str| -> Result<Json, TokenizerError> {
        let text = usize::try_from(id)
            .ok()
            .and_then(|i| vocab.tokens.get(i))
            .ok_or_else(|| codec(format!("the {role} token id {id} is not in the vocabulary")))?;
        special.insert(text.clone(), json!({"id": text, "ids": [id], "tokens": [text]}));
        Ok(json!({"SpecialToken": {"id": text, "type_id": 0}}))
    };
    if let Some(id) = bos {
        single.push(piece(id, "BOS")?);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(id) = eos {
        single.push(piece(id, "EOS")?);
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|p| match p.get("Sequence") {
        Some(_) => json!({"Sequence": {"id": "B", "type_id": 1}}),
        None => p.clone(),
    }));
    Ok(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}))
}

fn integer(v: &Value) -> Option<i64> {
    match *v {
        Value::I32(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::I64(x) => Some(x),
        _ => v.as_u64().and_then(|x| i64::try_from(x).ok()),
    }
}

fn codec(message: impl Into<String>) -> TokenizerError {
    TokenizerError::Codec(format!("GGUF tokenizer: {}", message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::Str((*s).to_owned())).collect())
    }

    /// A byte-level vocabulary: the letters, `Ġ` (space), two merges and two control tokens.
    fn byte_level() -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::Str("gpt2".into()));
        m.insert("tokenizer.ggml.pre".into(), Value::Str("smollm".into()));
        m.insert("tokenizer.ggml.tokens".into(), strings(&["<|s|>", "<|e|>", "a", "b", "Ġ", "1", "2", "ab", "Ġab"]));
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array([3, 3, 1, 1, 1, 1, 1, 1, 1].into_iter().map(Value::I32).collect()),
        );
        m.insert("tokenizer.ggml.merges".into(), strings(&["a b", "Ġ ab", "x y"]));
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
        m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        m
    }

    fn encode(t: &tokenizers::Tokenizer, text: &str, special: bool) -> Vec<u32> {
        t.encode(text, special).expect("encodes").get_ids().to_vec()
    }

    #[test]
    fn byte_level_bpe_merges_splits_digits_and_matches_control_tokens() {
        let t = from_metadata(&byte_level()).expect("builds");
        assert_eq!(encode(&t, "ab ab", false), vec![7, 8]);
        assert_eq!(encode(&t, "12", false), vec![5, 6], "smollm splits digits one by one");
        assert_eq!(encode(&t, "a<|e|>b", false), vec![2, 1, 3]);
        assert_eq!(encode(&t, "ab", true), vec![7], "no BOS unless the metadata asks");
        let mut with_bos = byte_level();
        with_bos.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        let t = from_metadata(&with_bos).expect("builds");
        assert_eq!(encode(&t, "ab", true), vec![0, 7]);
        assert_eq!(t.decode(&[0, 8, 7], true).expect("decodes"), " abab");
        assert_eq!(t.decode(&[0, 8], false).expect("decodes"), "<|s|> ab");
    }

    #[test]
    fn chat_template_and_special_token_texts_come_from_the_metadata() {
        let mut m = byte_level();
        assert!(chat_template(&m).is_none());
        m.insert("tokenizer.chat_template".into(), Value::Str("{{ bos_token }}".into()));
        let (source, tokens) = chat_template(&m).expect("a template");
        assert_eq!(source, "{{ bos_token }}");
        assert_eq!((tokens.bos.as_deref(), tokens.eos.as_deref(), tokens.unk), (Some("<|s|>"), Some("<|e|>"), None));
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let mut m = BTreeMap::new();
        m.insert("tokenizer.ggml.model".into(), Value::Str("llama".into()));
        m.insert(
            "tokenizer.ggml.tokens".into(),
            strings(&["<unk>", "<s>", "</s>", "<0x41>", "▁", "h", "i", "hi", "▁h", "▁hi"]),
        );
        m.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array([2, 3, 3, 6, 1, 1, 1, 1, 1, 1].into_iter().map(Value::I32).collect()),
        );
        // `hi` outscores `▁h`: " hi" merges h+i first, then ▁+hi.
        m.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(
                [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -9.0, -5.0].into_iter().map(Value::F32).collect(),
            ),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        let t = from_metadata(&m).expect("builds");
        assert_eq!(encode(&t, "hi", true), vec![1, 9], "BOS by default, and a space in front");
        assert_eq!(encode(&t, "hiA", false), vec![9, 3], "A is not a token: its byte");
        assert_eq!(t.decode(&[1, 9, 9], true).expect("decodes"), "hi hi");
    }

    #[test]
    fn malformed_vocabularies_are_errors_naming_the_key() {
        let cases: [(&str, Option<Value>, &str); 7] = [
            ("tokenizer.ggml.tokens", None, "no tokenizer.ggml.tokens"),
            ("tokenizer.ggml.tokens", Some(Value::U32(3)), "tokenizer.ggml.tokens is not an array"),
            ("tokenizer.ggml.model", Some(Value::Str("bert".into())), "`bert` is not supported"),
            ("tokenizer.ggml.pre", Some(Value::Str("klingon".into())), "`klingon` is not supported"),
            ("tokenizer.ggml.token_type", Some(Value::Array(vec![Value::I32(1)])), "has 1 entries for 9 tokens"),
            ("tokenizer.ggml.merges", None, "needs tokenizer.ggml.merges"),
            ("tokenizer.ggml.tokens", Some(strings(&["a", "b"])), "has 9 entries for 2 tokens"),
        ];
        for (key, value, expected) in cases {
            let mut m = byte_level();
            match value {
                Some(v) => m.insert(key.into(), v),
                None => m.remove(key),
            };
            let err = from_metadata(&m).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(expected), "{key}: `{err}` does not say `{expected}`");
        }
        let mut m = byte_level();
        m.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        m.insert("tokenizer.ggml.bos_token_id".into(), Value::U64(1 << 40));
        let err = from_metadata(&m).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("BOS token id 1099511627776 is not in the vocabulary"), "{err}");
    }
}
