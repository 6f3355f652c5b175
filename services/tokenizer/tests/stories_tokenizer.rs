//! The stories260K tokenizer against llama2.c's encoder on 1,609 strings, and the incremental
//! decoder against whole-text decoding.

use std::path::PathBuf;

use pagemesh_tokenizer::{DecodeState, IncrementalDecoder, TextTokenizer};
use serde_json::Value;

fn model_dir() -> PathBuf {
    std::env::var_os("PAGEMESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260K"))
}

fn cases() -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(model_dir().join("verification/tokenizer_cases.json")).expect("cases");
    let value: Value = serde_json::from_str(&text).expect("json");
    value["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect();
            (c["text"].as_str().expect("text").to_string(), ids)
        })
        .collect()
}

#[test]
fn encodes_like_llama2c_and_round_trips() {
    let tok = TextTokenizer::load(&model_dir()).expect("tokenizer");
    let cases = cases();
    assert!(cases.len() > 1000);
    for (text, ids) in &cases {
        assert_eq!(&tok.encode_with(text, false).expect("encode"), ids, "{text:?}");
        let with_bos = tok.encode(text).expect("encode");
        assert_eq!(with_bos[0], 1, "BOS first");
        assert_eq!(&with_bos[1..], ids.as_slice());
        assert_eq!(&tok.decode(ids).expect("decode"), text, "round trip of {text:?}");
    }
}

#[test]
fn incremental_decoding_equals_whole_decoding_and_never_splits_a_character() {
    let tok = TextTokenizer::load(&model_dir()).expect("tokenizer");
    let prompt = tok.encode("Sam found a café").expect("encode");
    let prompt_text = tok.decode(&prompt).expect("decode");
    let mut checked_multibyte = 0;
    for (text, ids) in cases() {
        let mut decoder = IncrementalDecoder::new(&tok, &prompt);
        let mut streamed = String::new();
        for &id in &ids {
            let delta = decoder.push(id).expect("push");
            assert!(
                !delta.contains('\u{FFFD}') || text.contains('\u{FFFD}'),
                "half a character in {delta:?} of {text:?}"
            );
            streamed.push_str(&delta);
        }
        streamed.push_str(&decoder.flush().expect("flush"));
        let mut all = prompt.clone();
        all.extend(&ids);
        let whole = tok.decode(&all).expect("decode");
        assert_eq!(streamed, whole[prompt_text.len()..], "{text:?}");
        assert_eq!(streamed, tok.generated_text(&prompt, &ids).expect("generated text"));
        if ids.iter().any(|&i| (3..259).contains(&i)) && text.chars().any(|c| c.len_utf8() > 1) {
            checked_multibyte += 1;
        }
    }
    assert!(checked_multibyte > 100, "only {checked_multibyte} byte-fallback strings");
}

#[test]
fn token_texts_in_context_add_up_to_the_streamed_text() {
    let tok = TextTokenizer::load(&model_dir()).expect("tokenizer");
    let prompt = tok.encode("Sam found a café").expect("encode");
    let mut joined_ascii = 0;
    for (text, ids) in cases() {
        let mut state = DecodeState::new(&prompt);
        let mut texts = String::new();
        for &id in &ids {
            let alone = state.token_text(&tok, id).expect("token text");
            // Peeking does not change the state.
            assert_eq!(state.token_text(&tok, id).expect("token text"), alone);
            texts.push_str(&alone);
            state.push(&tok, id).expect("push");
        }
        let generated = tok.generated_text(&prompt, &ids).expect("generated text");
        if text.is_ascii() {
            // Whole-token texts join into exactly the generated text (leading spaces included).
            assert_eq!(texts, generated, "{text:?}");
            joined_ascii += 1;
        } else {
            // A character split over byte tokens reads as U+FFFD until its last byte.
            assert_eq!(texts.replace('\u{FFFD}', ""), generated.replace('\u{FFFD}', ""), "{text:?}");
        }
    }
    assert!(joined_ascii > 1000, "{joined_ascii}");
}

#[test]
fn special_tokens_show_in_the_stream_only_when_asked() {
    let tok = TextTokenizer::load(&model_dir()).expect("tokenizer");
    let prompt = tok.encode("Once upon a time").expect("encode");
    let story_end = tok.encode("The end.").expect("encode");
    // BOS (1) in the middle of the output, as the model emits between stories.
    let ids: Vec<u32> = story_end.iter().skip(1).copied().chain([1]).chain(story_end.iter().skip(1).copied()).collect();
    let stream = |skip: bool| {
        let mut state = DecodeState::new_with(&prompt, skip);
        let mut text: String = ids.iter().map(|&id| state.push(&tok, id).expect("push")).collect();
        text.push_str(&state.flush(&tok).expect("flush"));
        text
    };
    let skipped = stream(true);
    let shown = stream(false);
    assert_eq!(skipped, tok.generated_text(&prompt, &ids).expect("generated text"));
    assert!(!skipped.contains("<s>") && shown.contains("<s>"), "{skipped:?} / {shown:?}");
    assert_eq!(shown.replacen("<s>", "", 1).replace(' ', ""), skipped.replace(' ', ""));
}
