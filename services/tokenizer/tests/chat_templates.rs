//! Chat templates of the shared tokenizers against jinja2's renderings (as `transformers` sets
//! jinja2 up) and `tokenizers`' ids for them, plus loading, content parts and template errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pagemesh_tokenizer::{
    ChatMessage, ChatTemplate, RenderOptions, SpecialTokens, TemplateValue, TextTokenizer, TokenizerError,
};
use serde::Deserialize;

fn tokenizers_root() -> PathBuf {
    std::env::var_os("PAGEMESH_TEST_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tokenizers"))
}

fn tokenizer_dir(name: &str) -> PathBuf {
    tokenizers_root().join(name)
}

/// `chat_template_examples.json`.
#[derive(Deserialize)]
struct ExampleFile {
    renderer: String,
    examples: Vec<Example>,
}

/// One rendering. Keys besides the known ones are passed to the template as variables (as
/// keyword arguments to `apply_chat_template` would be).
#[derive(Deserialize)]
struct Example {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
    #[serde(default)]
    tools: Option<TemplateValue>,
    #[serde(default)]
    documents: Option<TemplateValue>,
    #[serde(flatten)]
    extra: BTreeMap<String, TemplateValue>,
}

fn example_dirs() -> Vec<PathBuf> {
    let root = tokenizers_root();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.join("chat_template_examples.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn shared_tokenizers_render_and_tokenize_like_transformers() {
    let dirs = example_dirs();
    assert!(!dirs.is_empty(), "no chat_template_examples.json under {}", tokenizers_root().display());
    let mut report = Vec::new();
    for dir in &dirs {
        let text = std::fs::read_to_string(dir.join("chat_template_examples.json")).expect("examples");
        let file: ExampleFile = serde_json::from_str(&text).expect("examples json");
        assert!(file.renderer.contains("jinja2"), "{}: renderer {}", dir.display(), file.renderer);
        assert!(!file.examples.is_empty(), "{}: no examples", dir.display());
        let template = ChatTemplate::load(dir).expect("load template").expect("the model has a template");
        let tokenizer = TextTokenizer::load(dir).expect("tokenizer");
        for (i, example) in file.examples.iter().enumerate() {
            let options = RenderOptions {
                tools: example.tools.clone(),
                documents: example.documents.clone(),
                extra: example.extra.clone(),
            };
            let rendered = template
                .render_with(&example.messages, example.add_generation_prompt, &options)
                .unwrap_or_else(|e| panic!("{} example {i}: {e}", dir.display()));
            assert_eq!(rendered, example.rendered, "{} example {i}", dir.display());
            let ids = tokenizer.encode_chat(&example.rendered).expect("encode");
            assert_eq!(ids, example.ids, "{} example {i}: ids of {:?}", dir.display(), example.rendered);
            if example.tools.is_none() && example.documents.is_none() && example.extra.is_empty() {
                let plain = template.render(&example.messages, example.add_generation_prompt).expect("render");
                assert_eq!(plain, example.rendered, "{} example {i} via render()", dir.display());
            }
        }
        report.push(format!("{}: {} examples", dir.display(), file.examples.len()));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn chat_encoding_adds_no_special_tokens() {
    let dir = tokenizer_dir("tinyllama-1.1b-chat-v1.0");
    let tokenizer = TextTokenizer::load(&dir).expect("tokenizer");
    let template = ChatTemplate::load(&dir).expect("load").expect("template");
    let rendered = template.render(&[ChatMessage::new("user", "Hi")], true).expect("render");
    let bos = tokenizer.token_to_id("<s>").expect("bos");
    let eos = tokenizer.token_to_id("</s>").expect("eos");
    let chat = tokenizer.encode_chat(&rendered).expect("encode");
    let plain = tokenizer.encode(&rendered).expect("encode");
    assert_eq!(plain[0], bos, "plain encoding adds BOS");
    assert_eq!(&plain[1..], chat.as_slice());
    assert!(!chat.contains(&bos));
    assert_eq!(chat.iter().filter(|&&t| t == eos).count(), 1, "the template's </s> is one special token");

    // MiniMind's template writes <|im_start|> (its BOS) itself: each appears exactly once per turn.
    let dir = tokenizer_dir("minimind");
    let tokenizer = TextTokenizer::load(&dir).expect("tokenizer");
    let template = ChatTemplate::load(&dir).expect("load").expect("template");
    let rendered = template.render(&[ChatMessage::new("user", "Hi")], true).expect("render");
    let im_start = tokenizer.token_to_id("<|im_start|>").expect("im_start");
    let ids = tokenizer.encode_chat(&rendered).expect("encode");
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&t| t == im_start).count(), 2, "{rendered:?} -> {ids:?}");
}

#[test]
fn saved_truncation_does_not_cut_prompts() {
    // This tokenizer.json was saved with truncation at 512 tokens.
    let tokenizer = TextTokenizer::load(&tokenizer_dir("tinyllama-1.1b-chat-v1.0")).expect("tokenizer");
    let text = "one two three four five six seven eight nine ten ".repeat(100);
    let ids = tokenizer.encode_chat(&text).expect("encode");
    assert!(ids.len() > 1000, "{} ids", ids.len());
    assert!(tokenizer.decode(&ids).expect("decode") == text, "the text does not round-trip");
}

#[test]
fn raise_exception_is_an_error_not_a_panic() {
    let template = ChatTemplate::from_source(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}\
         {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
         {% endif %}{{ m.content }}{% endfor %}",
        SpecialTokens::default(),
    )
    .expect("template");
    let good = [ChatMessage::new("user", "a"), ChatMessage::new("assistant", "b")];
    assert_eq!(template.render(&good, false).expect("render"), "ab");
    let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    match template.render(&bad, false) {
        Err(TokenizerError::Template(message)) => {
            assert!(message.contains("Conversation roles must alternate user/assistant"), "{message}")
        }
        other => panic!("expected a template error, got {other:?}"),
    }
}

#[test]
fn other_render_errors_are_errors() {
    let cases = [
        "{{ messages[0].content.nosuchmethod() }}",
        "{{ messages[5].content.strip() }}",
        "{{ nosuchfunction() }}",
        "{{ messages|tojson(bogus=1) }}",
        "{{ messages[0] + 1 }}",
    ];
    for source in cases {
        let template = ChatTemplate::from_source(source, SpecialTokens::default()).expect("template");
        let result = template.render(&[ChatMessage::new("user", "x")], false);
        assert!(matches!(result, Err(TokenizerError::Template(_))), "{source}: {result:?}");
    }
}

#[test]
fn a_model_without_a_template_has_none() {
    // llama2-32k has a tokenizer_config.json without `chat_template`.
    let dir = tokenizer_dir("llama2-32k");
    assert!(dir.join("tokenizer_config.json").is_file());
    assert!(ChatTemplate::load(&dir).expect("load").is_none());
    // A directory without any tokenizer_config.json.
    let empty = TempDir::new("empty");
    assert!(ChatTemplate::load(empty.path()).expect("load").is_none());
}

#[test]
fn list_of_parts_content_is_concatenated() {
    let json = r#"[
        {"role": "system", "content": null},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "café ☕"}]},
        {"role": "assistant", "content": "Hi!", "name": "bot"}
    ]"#;
    let messages: Vec<ChatMessage> = serde_json::from_str(json).expect("messages");
    assert_eq!(
        messages,
        vec![
            ChatMessage::new("system", ""),
            ChatMessage::new("user", "Hello, café ☕"),
            ChatMessage::new("assistant", "Hi!")
        ]
    );
    let template = ChatTemplate::load(&tokenizer_dir("tinyllama-1.1b-chat-v1.0")).expect("load").expect("template");
    let as_string = [ChatMessage::new("user", "Hello, café ☕")];
    assert_eq!(
        template.render(&messages[1..2], true).expect("render"),
        template.render(&as_string, true).expect("render")
    );

    let image = r#"{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}"#;
    let err = serde_json::from_str::<ChatMessage>(image).expect_err("image part");
    assert!(err.to_string().contains("image_url"), "{err}");
    let no_text = r#"{"role": "user", "content": [{"type": "text"}]}"#;
    assert!(serde_json::from_str::<ChatMessage>(no_text).is_err());
    assert!(serde_json::from_str::<ChatMessage>(r#"{"role": "user", "content": 5}"#).is_err());

    // Serialized back, content is a plain string.
    let back = serde_json::to_string(&messages[1]).expect("serialize");
    assert_eq!(back, r#"{"role":"user","content":"Hello, café ☕"}"#);
}

#[test]
fn loads_named_templates_token_objects_and_jinja_files() {
    let dir = TempDir::new("named");
    let config = r#"{
        "bos_token": {"__type": "AddedToken", "content": "<B>", "lstrip": false},
        "eos_token": "<E>",
        "pad_token": null,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}{{ pad_token is defined }}"}
        ]
    }"#;
    dir.write("tokenizer_config.json", config);
    dir.write("special_tokens_map.json", r#"{"unk_token": {"content": "<U>"}, "eos_token": "<ignored>"}"#);
    let template = ChatTemplate::load(dir.path()).expect("load").expect("template");
    assert_eq!(
        template.special_tokens(),
        &SpecialTokens { bos: Some("<B>".into()), eos: Some("<E>".into()), unk: Some("<U>".into()), pad: None }
    );
    assert_eq!(template.render(&[ChatMessage::new("user", "x")], false).expect("render"), "<B>x<E>False");

    // chat_template.jinja takes precedence over the config's template.
    dir.write("chat_template.jinja", "J{{ messages|length }}\n");
    let template = ChatTemplate::load(dir.path()).expect("load").expect("template");
    assert_eq!(template.render(&[ChatMessage::new("user", "x")], false).expect("render"), "J1");

    // A list without a default is an error, as in transformers.
    let dir = TempDir::new("nodefault");
    dir.write("tokenizer_config.json", r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#);
    assert!(ChatTemplate::load(dir.path()).is_err());

    // A syntax error is reported at load.
    let dir = TempDir::new("syntax");
    dir.write("tokenizer_config.json", r#"{"chat_template": "{% for m in messages %}"}"#);
    assert!(matches!(ChatTemplate::load(dir.path()), Err(TokenizerError::Template(_))));
}

#[test]
fn tools_reach_the_template_in_order() {
    let dir = tokenizer_dir("minimind");
    let template = ChatTemplate::load(&dir).expect("load").expect("template");
    let tools = TemplateValue::from_json(
        r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#,
    )
    .expect("tools");
    let options = RenderOptions { tools: Some(tools), ..Default::default() };
    let rendered =
        template.render_with(&[ChatMessage::new("user", "Weather in Paris?")], true, &options).expect("render");
    // As jinja2 renders it with transformers' `tojson` (json.dumps: ", " and ": " separators,
    // keys in the given order).
    let expected = "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n\
{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n\
</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
    assert_eq!(rendered, expected);
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("pagemesh-chat-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).expect("write");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
