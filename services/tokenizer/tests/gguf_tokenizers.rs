//! Tokenizers built from GGUF metadata give the ids llama.cpp's own tokenizer gives, on the
//! fixture `tests/fixtures/gguf_tokenizers/ids.json` (made by `make_fixtures.py` there with
//! llama-cpp-python): > 1,000 strings of ASCII, code, CJK, emoji, whitespace runs and special
//! tokens inside text, for SmolLM2's byte-level BPE vocabulary (its own pre-tokenizer `smollm`
//! and, on the same vocabulary, `llama-bpe`, `qwen2` and `gpt-2`) and Llama 2's SentencePiece
//! vocabulary.

use std::path::{Path, PathBuf};

use pagemesh_gguf::{GgufFile, Value};
use pagemesh_tokenizer::{ChatTemplate, TextTokenizer};
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf_tokenizers")
}

fn fixture() -> Json {
    let text = std::fs::read_to_string(fixtures().join("ids.json")).expect("the fixture");
    serde_json::from_str(&text).expect("JSON")
}

/// The tokenizer of a fixture case: its vocabulary file, with `tokenizer.ggml.pre` replaced
/// for the cases that reuse SmolLM2's vocabulary under another pre-tokenizer.
fn tokenizer(case: &str) -> TextTokenizer {
    let (file, pre) = match case {
        "llama2" => ("llama2-vocab.gguf", None),
        "smollm" => ("smollm2-vocab.gguf", None),
        other => ("smollm2-vocab.gguf", Some(other)),
    };
    let mut metadata = GgufFile::open(&fixtures().join(file)).expect("opens").header.metadata;
    if let Some(pre) = pre {
        metadata.insert("tokenizer.ggml.pre".into(), Value::Str(pre.into()));
    }
    TextTokenizer::from_gguf_metadata(&metadata).expect("builds")
}

fn ids(value: &Json) -> Vec<u32> {
    value.as_array().expect("a list").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}

/// Every string of the fixture, for every vocabulary, encodes to llama.cpp's ids (without and
/// with the BOS/EOS the vocabulary adds).
#[test]
fn every_string_gets_the_ids_llama_cpp_gives() {
    let fixture = fixture();
    let strings: Vec<&str> =
        fixture["strings"].as_array().expect("strings").iter().map(|s| s.as_str().unwrap()).collect();
    assert!(strings.len() >= 1000, "{} strings", strings.len());
    let cases = fixture["ids"].as_object().expect("cases");
    assert_eq!(cases.len(), 5);
    for (case, expected) in cases {
        let tokenizer = tokenizer(case);
        let expected = expected.as_array().expect("lists");
        let mut wrong = Vec::new();
        for (text, want) in strings.iter().zip(expected) {
            let got = tokenizer.encode_with(text, false).expect("encodes");
            if got != ids(want) {
                wrong.push(format!("{text:?}: {got:?} != llama.cpp {:?}", ids(want)));
            }
        }
        let with_special = fixture["ids_with_special_tokens"][case].as_array().expect("lists");
        for (text, want) in strings.iter().zip(with_special) {
            let got = tokenizer.encode(text).expect("encodes");
            if got != ids(want) {
                wrong.push(format!("with special tokens {text:?}: {got:?} != llama.cpp {:?}", ids(want)));
            }
        }
        assert!(
            wrong.is_empty(),
            "{case}: {} of {} differ, first: {:#?}",
            wrong.len(),
            strings.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

/// Byte-level BPE is lossless: llama.cpp's ids decode back to the string they came from.
#[test]
fn byte_level_ids_decode_to_the_original_text() {
    let fixture = fixture();
    let tokenizer = tokenizer("smollm");
    for (text, want) in fixture["strings"].as_array().unwrap().iter().zip(fixture["ids"]["smollm"].as_array().unwrap())
    {
        let text = text.as_str().unwrap();
        assert_eq!(tokenizer.decode_with(&ids(want), false).expect("decodes"), text);
    }
}

/// A GGUF model with no files beside it: the tokenizer and the chat template both come from the
/// file, and the template renders with the file's special tokens.
#[test]
fn a_lone_gguf_file_brings_its_tokenizer_and_chat_template() {
    let dir = tempfile_dir("lone");
    let file = dir.join("model.gguf");
    std::fs::copy(fixtures().join("smollm2-vocab.gguf"), &file).expect("copied");
    for path in [&file, &dir] {
        let tokenizer = TextTokenizer::load(path).expect("tokenizer from the GGUF");
        let template = ChatTemplate::load(path).expect("loads").expect("the GGUF's template");
        let messages = [pagemesh_tokenizer::ChatMessage { role: "user".into(), content: "Hi".into() }];
        let text = template.render(&messages, true).expect("renders");
        assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{text:?}");
        let ids = tokenizer.encode_chat(&text).expect("encodes");
        assert_eq!(ids[0], tokenizer.token_to_id("<|im_start|>").expect("a control token"));
        assert_eq!(template.special_tokens().eos.as_deref(), Some("<|im_end|>"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A `tokenizer.json` beside the GGUF wins over the file's own vocabulary.
#[test]
fn a_tokenizer_json_beside_the_gguf_wins() {
    let dir = tempfile_dir("beside");
    std::fs::copy(fixtures().join("smollm2-vocab.gguf"), dir.join("model.gguf")).expect("copied");
    let stories = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260K/tokenizer.json");
    std::fs::copy(stories, dir.join("tokenizer.json")).expect("copied");
    let tokenizer = TextTokenizer::load(&dir.join("model.gguf")).expect("loads");
    assert_eq!(tokenizer.vocab_size(), 512, "stories260K's 512 tokens, not SmolLM2's 49,152");
    std::fs::remove_dir_all(&dir).ok();
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagemesh-gguf-tok-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    dir
}
