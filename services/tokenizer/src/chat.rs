//! Chat templates: a model's Jinja chat template rendered the way Hugging Face `transformers`
//! renders it in `apply_chat_template`.
//!
//! `transformers` compiles the template with jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` plus the `loopcontrols` extension, adds the globals `raise_exception(msg)` and
//! `strftime_now(fmt)`, replaces the `tojson` filter with one that calls Python's `json.dumps`
//! (no HTML escaping, `", "` and `": "` separators, non-ASCII kept) and renders with `messages`,
//! `tools`, `documents`, `add_generation_prompt` and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...). [`ChatTemplate`] does the same on MiniJinja, with Python's
//! string methods (`.strip()`, `.split()`, `.startswith()`, `.get()`, ...) and Python's way of
//! printing values (`None`, `True`, `['a', 'b']`) so that templates written for jinja2 give the
//! same text.
//!
//! The rendered text already holds the special tokens the template writes (often BOS), so it is
//! tokenized without adding any: [`TextTokenizer::encode_chat`](crate::TextTokenizer::encode_chat).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, Value};
use serde::{Deserialize, Deserializer, Serialize};

pub use pagemesh_shared::ChatMessage;

use crate::TokenizerError;

/// The name the template is stored under in its environment (no extension: no auto-escaping).
const TEMPLATE_NAME: &str = "chat_template";

/// Variables the renderer sets itself; [`RenderOptions::extra`] may not replace them.
const RESERVED_VARIABLES: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// The tokenizer's special tokens, as the template sees them (`bos_token`, `eos_token`,
/// `unk_token`, `pad_token`). A token that is `None` is left undefined in the template, as in
/// `transformers`, whose `special_tokens_map` leaves out unset tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `unk_token`.
    pub unk: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
}

/// A JSON-like value handed to a template: tools, documents or an extra variable.
///
/// Objects keep their key order when read with [`from_json`](Self::from_json) or deserialized
/// (for example as a field of a request body), which matters because `tojson` prints keys in
/// that order, as Python does.
#[derive(Clone, Debug, PartialEq)]
pub struct TemplateValue(Value);

impl TemplateValue {
    /// Parses JSON text, keeping object key order.
    pub fn from_json(text: &str) -> Result<Self, TokenizerError> {
        serde_json::from_str::<Value>(text)
            .map(Self)
            .map_err(|e| TokenizerError::Template(format!("invalid JSON value: {e}")))
    }

    /// Converts any serializable value. A `serde_json::Value` object has its keys sorted (unless
    /// serde_json's `preserve_order` feature is on); use [`from_json`](Self::from_json) to keep the
    /// order of a JSON text.
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Self {
        Self(Value::from(minijinja::value::Serde(value)))
    }
}

impl<'de> Deserialize<'de> for TemplateValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self)
    }
}

impl From<bool> for TemplateValue {
    fn from(v: bool) -> Self {
        Self(Value::from(v))
    }
}

impl From<i64> for TemplateValue {
    fn from(v: i64) -> Self {
        Self(Value::from(v))
    }
}

impl From<&str> for TemplateValue {
    fn from(v: &str) -> Self {
        Self(Value::from(v))
    }
}

impl From<String> for TemplateValue {
    fn from(v: String) -> Self {
        Self(Value::from(v))
    }
}

/// What a render may pass besides the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// `tools`: a list of JSON tool schemas. `None` renders with `tools` set to none, as
    /// `transformers` does when no tools are given.
    pub tools: Option<TemplateValue>,
    /// `documents` (for retrieval templates). `None` renders with `documents` set to none.
    pub documents: Option<TemplateValue>,
    /// More template variables, such as `enable_thinking`; they override the special tokens of
    /// the same name, as keyword arguments to `apply_chat_template` do. The names `messages`,
    /// `tools`, `documents` and `add_generation_prompt` are refused.
    pub extra: BTreeMap<String, TemplateValue>,
}

/// A compiled chat template with the special tokens it renders with.
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: SpecialTokens,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("tokens", &self.tokens).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Loads the chat template of a Hugging Face model directory.
    ///
    /// The template is `chat_template.jinja` when that file exists (newer `transformers` save it
    /// there, and it takes precedence), else `chat_template` in `tokenizer_config.json`: a string,
    /// or a list of `{"name", "template"}` of which the one named `default` is used (a list
    /// without one is an error, as in `transformers`). The special tokens come from
    /// `tokenizer_config.json` (`bos_token`, ...: strings or `{"content": ...}` objects), with
    /// `special_tokens_map.json` filling the ones it lacks.
    ///
    /// `Ok(None)` when the model has no template (including when it has no
    /// `tokenizer_config.json`).
    ///
    /// For a GGUF model (a `.gguf` file, or a directory holding one and no `config.json`), a
    /// template in the file's directory as above wins; else the file's `tokenizer.chat_template`
    /// is used, with the special tokens its vocabulary names.
    pub fn load(model: &Path) -> Result<Option<Self>, TokenizerError> {
        let Some(file) = pagemesh_gguf::model_file(model) else {
            return Self::load_dir(model);
        };
        if let Some(template) = file.parent().map(Self::load_dir).transpose()?.flatten() {
            return Ok(Some(template));
        }
        let gguf = pagemesh_gguf::GgufFile::open(&file).map_err(|e| load_error(&file, e))?;
        match crate::gguf_vocab::chat_template(&gguf.header.metadata) {
            Some((source, tokens)) => Self::from_source(&source, tokens).map(Some),
            None => Ok(None),
        }
    }

    /// The template `source` (given instead of the model's own, as `--chat-template` does),
    /// with the special tokens of the tokenizer at `model` (a directory or a GGUF file) as
    /// [`Self::load`] finds them.
    pub fn load_with_source(model: &Path, source: &str) -> Result<Self, TokenizerError> {
        let tokens = match pagemesh_gguf::model_file(model) {
            None => Self::special_tokens_of_dir(model)?,
            Some(file) => {
                let gguf = pagemesh_gguf::GgufFile::open(&file).map_err(|e| load_error(&file, e))?;
                crate::gguf_vocab::special_tokens(&gguf.header.metadata)
            }
        };
        Self::from_source(source, tokens)
    }

    /// The template of a Hugging Face model directory ([`Self::load`]).
    fn load_dir(model_dir: &Path) -> Result<Option<Self>, TokenizerError> {
        let config_path = model_dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let jinja_path = model_dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match &config {
                Some(config) => template_from_config(config, &config_path)?,
                None => None,
            },
            Err(e) => return Err(load_error(&jinja_path, e)),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        Self::from_source(&source, Self::special_tokens_of_dir(model_dir)?).map(Some)
    }

    /// The special tokens `tokenizer_config.json` names, `special_tokens_map.json` filling the
    /// ones it lacks.
    fn special_tokens_of_dir(model_dir: &Path) -> Result<SpecialTokens, TokenizerError> {
        let config_path = model_dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let map_path = model_dir.join("special_tokens_map.json");
        let token_map = read_json_if_exists(&map_path)?;
        let token = |name: &str| -> Result<Option<String>, TokenizerError> {
            if let Some(t) = config.as_ref().map(|c| special_token(c, name, &config_path)).transpose()?.flatten() {
                return Ok(Some(t));
            }
            Ok(token_map.as_ref().map(|m| special_token(m, name, &map_path)).transpose()?.flatten())
        };
        Ok(SpecialTokens {
            bos: token("bos_token")?,
            eos: token("eos_token")?,
            unk: token("unk_token")?,
            pad: token("pad_token")?,
        })
    }

    /// Compiles a template's source. Syntax errors are reported here.
    pub fn from_source(template: &str, tokens: SpecialTokens) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(python_methods);
        env.add_filter("tojson", tojson);
        env.add_filter("string", python_str_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(template)).map_err(template_error)?;
        Ok(Self { env, tokens })
    }

    /// The special tokens the template renders with.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Renders a conversation (no tools or extra variables). With `add_generation_prompt` the
    /// text ends with the template's start of an assistant turn.
    ///
    /// Template errors, including a template's own `raise_exception(...)` (for example on
    /// roles that do not alternate), are returned as [`TokenizerError::Template`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        self.render_with(messages, add_generation_prompt, &RenderOptions::default())
    }

    /// Renders a conversation with tools, documents or extra variables.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        options: &RenderOptions,
    ) -> Result<String, TokenizerError> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        let tokens = [
            ("bos_token", &self.tokens.bos),
            ("eos_token", &self.tokens.eos),
            ("unk_token", &self.tokens.unk),
            ("pad_token", &self.tokens.pad),
        ];
        for (name, token) in tokens {
            if let Some(token) = token {
                ctx.insert(name.to_owned(), Value::from(token.as_str()));
            }
        }
        for (name, value) in &options.extra {
            if RESERVED_VARIABLES.contains(&name.as_str()) {
                return Err(TokenizerError::Template(format!("`{name}` cannot be passed as an extra variable")));
            }
            ctx.insert(name.clone(), value.0.clone());
        }
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        ctx.insert("messages".to_owned(), Value::from(messages));
        ctx.insert("add_generation_prompt".to_owned(), Value::from(add_generation_prompt));
        let none = || Value::from(());
        ctx.insert("tools".to_owned(), options.tools.as_ref().map_or_else(none, |t| t.0.clone()));
        ctx.insert("documents".to_owned(), options.documents.as_ref().map_or_else(none, |d| d.0.clone()));

        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(Value::from(ctx)).map_err(template_error)
    }
}

fn load_error(path: &Path, e: impl fmt::Display) -> TokenizerError {
    TokenizerError::Load { path: path.display().to_string(), message: e.to_string() }
}

/// A JSON file's content, `None` when the file does not exist.
fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| load_error(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_error(path, e)),
    }
}

/// `chat_template` of a `tokenizer_config.json`.
fn template_from_config(config: &serde_json::Value, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_owned())),
                    (Some(name), Some(_)) => names.push(name.to_owned()),
                    _ => {
                        return Err(load_error(
                            path,
                            "a `chat_template` list entry without a string `name` and `template`",
                        ))
                    }
                }
            }
            if names.is_empty() {
                Ok(None)
            } else {
                Err(load_error(path, format!("several chat templates ({}) and none named `default`", names.join(", "))))
            }
        }
        Some(_) => Err(load_error(path, "`chat_template` is neither a string nor a list of named templates")),
    }
}

/// A special token of a tokenizer config: a string, `{"content": ...}`, or absent/null.
fn special_token(config: &serde_json::Value, name: &str, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(obj @ serde_json::Value::Object(_)) => match obj.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(load_error(path, format!("`{name}` is an object without a string `content`"))),
        },
        Some(_) => Err(load_error(path, format!("`{name}` is neither a string nor an object"))),
    }
}

/// A MiniJinja error as a [`TokenizerError::Template`], with its causes.
fn template_error(e: Error) -> TokenizerError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    TokenizerError::Template(message)
}

/// Replaces the `{% generation %}` / `{% endgeneration %}` tags of `transformers`'
/// assistant-mask extension with an equivalent always-true `if` block (keeping the whitespace
/// control markers), since they only mark text and do not change it.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match generation_tag(tag) {
            Some((len, open_marker, keyword, close_marker)) => {
                let replacement = if keyword == "generation" { "if true" } else { "endif" };
                out.push_str("{%");
                out.push_str(open_marker);
                out.push(' ');
                out.push_str(replacement);
                out.push(' ');
                out.push_str(close_marker);
                out.push_str("%}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` (starting with `{%`) is a `generation` or `endgeneration` tag: its length, opening
/// marker (`-`, `+` or empty), keyword and closing marker.
fn generation_tag(tag: &str) -> Option<(usize, &str, &str, &str)> {
    let after_open = &tag[2..];
    let open_marker = match after_open.chars().next() {
        Some(c @ ('-' | '+')) => &after_open[..c.len_utf8()],
        _ => "",
    };
    let body = after_open[open_marker.len()..].trim_start();
    let keyword = ["endgeneration", "generation"]
        .into_iter()
        .find(|k| body.starts_with(k) && !body[k.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_'))?;
    let after_keyword = body[keyword.len()..].trim_start();
    let (close_marker, after_marker) = match after_keyword.chars().next() {
        Some(c @ ('-' | '+')) => (&after_keyword[..1], &after_keyword[c.len_utf8()..]),
        _ => ("", after_keyword),
    };
    let remaining = after_marker.strip_prefix("%}")?;
    Some((tag.len() - remaining.len(), open_marker, keyword, close_marker))
}

/// `raise_exception(message)`: fails the render with the message.
fn raise_exception(message: &Value) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, python_str(message)))
}

/// `strftime_now(format)`: the current time (UTC) formatted like Python's `strftime`.
fn strftime_now(format: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    strftime(format, i64::try_from(now.as_secs()).unwrap_or(i64::MAX), now.subsec_micros())
}

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Day of the year (1-366).
fn day_of_year(year: i64, month: u32, day: u32) -> u32 {
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = u32::from(month > 2 && is_leap(year));
    CUMULATIVE[(month - 1) as usize] + day + leap
}

/// Python's (glibc's) `strftime` for a UTC time, with the common directives and the `-` (no
/// padding) flag. Unknown directives are kept as written, as glibc does.
fn strftime(format: &str, unix_secs: i64, micros: u32) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 is Sunday.
    let yday = day_of_year(year, month, day);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.next_if_eq(&'-').is_some();
        let Some(directive) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |n: i64, width: usize| if no_pad { n.to_string() } else { format!("{n:0width$}") };
        let text = match directive {
            'a' => WEEKDAYS[weekday][..3].to_owned(),
            'A' => WEEKDAYS[weekday].to_owned(),
            'w' => weekday.to_string(),
            'u' => (if weekday == 0 { 7 } else { weekday }).to_string(),
            'd' => num(i64::from(day), 2),
            'e' => {
                if no_pad {
                    day.to_string()
                } else {
                    format!("{day:2}")
                }
            }
            'b' | 'h' => month_name[..3].to_owned(),
            'B' => month_name.to_owned(),
            'm' => num(i64::from(month), 2),
            'y' => num(year.rem_euclid(100), 2),
            'Y' => year.to_string(),
            'C' => num(year.div_euclid(100), 2),
            'H' => num(hour, 2),
            'k' => format!("{hour:2}"),
            'I' => num(hour12, 2),
            'l' => format!("{hour12:2}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            'P' => (if hour < 12 { "am" } else { "pm" }).to_owned(),
            'M' => num(minute, 2),
            'S' => num(second, 2),
            'f' => format!("{micros:06}"),
            'j' => num(i64::from(yday), 3),
            'z' => "+0000".to_owned(),
            'Z' => "UTC".to_owned(),
            's' => unix_secs.to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'D' | 'x' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'T' | 'X' => format!("{hour:02}:{minute:02}:{second:02}"),
            'R' => format!("{hour:02}:{minute:02}"),
            'c' => format!(
                "{} {} {day:2} {hour:02}:{minute:02}:{second:02} {year}",
                &WEEKDAYS[weekday][..3],
                &month_name[..3]
            ),
            'n' => "\n".to_owned(),
            't' => "\t".to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{}{other}", if no_pad { "-" } else { "" }),
        };
        out.push_str(&text);
    }
    out
}

/// Prints `{{ value }}` as Python's `str()` does (`None`, `True`, `1.0`, `['a', 1]`).
fn python_formatter(out: &mut minijinja::Output, _state: &mut State, value: &Value) -> Result<(), Error> {
    let write_error = |_| Error::new(ErrorKind::WriteFailure, "cannot write template output");
    match value.as_str() {
        Some(s) => out.write_str(s).map_err(write_error),
        None => out.write_str(&python_str(value)).map_err(write_error),
    }
}

/// The `string` filter: Python's `str()`.
fn python_str_filter(value: &Value) -> Value {
    if value.kind() == ValueKind::String {
        value.clone()
    } else {
        Value::from(python_str(value))
    }
}

/// Python's `str()` of a value.
fn python_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) => s.to_owned(),
        None => {
            let mut out = String::new();
            python_repr(value, &mut out);
            out
        }
    }
}

/// Python's `repr()` of a value (for the items of printed lists and dicts).
fn python_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(f) => out.push_str(&python_float_repr(f)),
            Err(_) => out.push_str(&value.to_string()),
        },
        ValueKind::String => python_string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut count = 0;
            if let Ok(items) = value.try_iter() {
                for item in items {
                    if count > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                    count += 1;
                }
            }
            if tuple && count == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&key, out);
                    out.push_str(": ");
                    python_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr()` of a string: single quotes unless the text has `'` and no `"`.
fn python_string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr()` of a float: the shortest text that reads back as the same number, in
/// positional form for exponents -4..16 (`1.0`, `0.0001`) and scientific otherwise (`1e+16`).
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let sci = format!("{f:e}"); // shortest round-trip digits, e.g. "-1.25e-7"
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let int_len = exponent as usize + 1;
            if digits.len() <= int_len {
                format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exponent - 1) as usize))
        }
    } else {
        let mantissa = if digits.len() == 1 { digits } else { format!("{}.{}", &digits[..1], &digits[1..]) };
        format!("{sign}{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs())
    }
}

/// How `tojson` lays out JSON (Python `json.dumps` options).
struct JsonStyle {
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// The `tojson` filter of `transformers`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` with those keyword arguments accepted.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), v.as_i64()) {
            (Some(s), _) => Some(s.to_owned()),
            (None, Some(n)) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    let (item_separator, key_separator) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] => match (item.as_str(), key.as_str()) {
                    (Some(item), Some(key)) => (item.to_owned(), key.to_owned()),
                    _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be strings")),
                },
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_separator,
        key_separator,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

fn not_serializable(value: &Value) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: a value of type {} is not JSON serializable", value.kind()),
    )
}

/// Writes `value` as Python's `json.dumps` would.
fn write_json(value: &Value, style: &JsonStyle, depth: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let f = f64::try_from(value.clone())?;
            if f.is_nan() {
                out.push_str("NaN");
            } else if f.is_infinite() {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
            } else {
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_json_container(out, style, depth, ('[', ']'), &items, |item, out| {
                write_json(item, style, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(out, style, depth, ('{', '}'), &entries, |(key, item), out| {
                write_json_string(key, style.ensure_ascii, out);
                out.push_str(&style.key_separator);
                write_json(item, style, depth + 1, out)
            })?;
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Writes a JSON array or object with Python's layout for `indent` and separators.
fn write_json_container<T>(
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    (open, close): (char, char),
    items: &[T],
    mut write_item: impl FnMut(&T, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline_indent = style.indent.as_ref().map(|indent| format!("\n{}", indent.repeat(depth + 1)));
    if let Some(n) = &newline_indent {
        out.push_str(n);
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_separator);
            if let Some(n) = &newline_indent {
                out.push_str(n);
            }
        }
        write_item(item, out)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON object key as Python's `json` makes it from a dict key.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_owned()),
        ValueKind::None => Ok("null".to_owned()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::Number => {
            let mut out = String::new();
            write_json(key, &JSON_KEY_STYLE, 0, &mut out)?;
            Ok(out)
        }
        _ => Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: keys must be strings, not {}", key.kind()))),
    }
}

const JSON_KEY_STYLE: JsonStyle = JsonStyle {
    indent: None,
    item_separator: String::new(),
    key_separator: String::new(),
    ensure_ascii: false,
    sort_keys: false,
};

/// A JSON string literal, escaped as Python's `json` does.
fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python methods on template values: first the string methods done here (where MiniJinja's
/// `pycompat` differs from Python or lacks them), then `minijinja_contrib::pycompat`.
fn python_methods(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        if let Some(result) = python_string_method(s, method, args)? {
            return Ok(result);
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The string methods done here; `None` for the others.
fn python_string_method(s: &str, method: &str, args: &[Value]) -> Result<Option<Value>, Error> {
    use minijinja::value::from_args;
    let result = match method {
        "split" | "rsplit" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let maxsplit = maxsplit.and_then(|n| usize::try_from(n).ok());
            let parts = match sep {
                Some("") => return Err(Error::new(ErrorKind::InvalidOperation, "empty separator")),
                Some(sep) => split_on(s, sep, maxsplit, method == "rsplit"),
                None => split_whitespace(s, maxsplit, method == "rsplit"),
            };
            Value::from(parts.into_iter().map(Value::from).collect::<Vec<_>>())
        }
        "index" | "rindex" => {
            let (sub,): (&str,) = from_args(args)?;
            let found = if method == "rindex" { s.rfind(sub) } else { s.find(sub) };
            match found {
                // Python counts characters, not bytes.
                Some(byte) => Value::from(s[..byte].chars().count()),
                None => return Err(Error::new(ErrorKind::InvalidOperation, "substring not found")),
            }
        }
        "removeprefix" => {
            let (prefix,): (&str,) = from_args(args)?;
            Value::from(s.strip_prefix(prefix).unwrap_or(s))
        }
        "removesuffix" => {
            let (suffix,): (&str,) = from_args(args)?;
            Value::from(s.strip_suffix(suffix).unwrap_or(s))
        }
        _ => return Ok(None),
    };
    Ok(Some(result))
}

/// Python's `str.split(sep, maxsplit)` / `str.rsplit` with a separator.
fn split_on<'a>(s: &'a str, sep: &str, maxsplit: Option<usize>, from_right: bool) -> Vec<&'a str> {
    match (maxsplit, from_right) {
        (None, _) => s.split(sep).collect(),
        (Some(n), false) => s.splitn(n + 1, sep).collect(),
        (Some(n), true) => {
            let mut parts: Vec<&str> = s.rsplitn(n + 1, sep).collect();
            parts.reverse();
            parts
        }
    }
}

/// Python's `str.split()` / `str.rsplit()` without a separator: runs of whitespace split, and
/// there are no empty parts; after `maxsplit` splits the rest is kept as it is (less the
/// whitespace at the split end).
fn split_whitespace(s: &str, maxsplit: Option<usize>, from_right: bool) -> Vec<&str> {
    let limit = maxsplit.unwrap_or(usize::MAX);
    let mut parts = Vec::new();
    if from_right {
        let mut rest = s.trim_end();
        while !rest.is_empty() {
            if parts.len() == limit {
                parts.push(rest);
                break;
            }
            match rest.rfind(char::is_whitespace) {
                Some(i) => {
                    let ws_len = rest[i..].chars().next().map_or(1, char::len_utf8);
                    parts.push(&rest[i + ws_len..]);
                    rest = rest[..i].trim_end();
                }
                None => {
                    parts.push(rest);
                    break;
                }
            }
        }
        parts.reverse();
    } else {
        let mut rest = s.trim_start();
        while !rest.is_empty() {
            if parts.len() == limit {
                parts.push(rest);
                break;
            }
            match rest.find(char::is_whitespace) {
                Some(i) => {
                    parts.push(&rest[..i]);
                    rest = rest[i..].trim_start();
                }
                None => {
                    parts.push(rest);
                    break;
                }
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(source: &str) -> Result<String, TokenizerError> {
        ChatTemplate::from_source(source, SpecialTokens::default())?.render(&[], false)
    }

    #[test]
    fn python_float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-0.0, "-0.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.6, "123456789012345.6"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (2.5e-7, "2.5e-07"),
            (100.0, "100.0"),
            (1e22, "1e+22"),
            (f64::INFINITY, "inf"),
        ];
        for (f, expected) in cases {
            assert_eq!(python_float_repr(f), expected, "{f}");
        }
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t, 0), "26 Jul 2024");
        assert_eq!(strftime("%A %B %-d, %Y %H:%M:%S %p %j %%", t, 0), "Friday July 26, 2024 13:05:09 PM 208 %");
        assert_eq!(strftime("%Y-%m-%d %I %y %u %w %Q", 0, 0), "1970-01-01 12 70 4 4 %Q");
        assert_eq!(strftime("%F %a", 951_782_400, 0), "2000-02-29 Tue");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let tools = TemplateValue::from_json(r#"{"name": "f<x>", "n": [1, 2.0, true, null], "é": {}}"#)
            .map(|v| RenderOptions { tools: Some(v), ..Default::default() })
            .expect("json");
        let tpl = ChatTemplate::from_source(
            "{{ tools|tojson }}|{{ tools|tojson(indent=2) }}|{{ tools|tojson(ensure_ascii=true, sort_keys=true) }}",
            SpecialTokens::default(),
        )
        .expect("template");
        let text = tpl.render_with(&[], false, &tools).expect("render");
        assert_eq!(
            text,
            "{\"name\": \"f<x>\", \"n\": [1, 2.0, true, null], \"é\": {}}|\
             {\n  \"name\": \"f<x>\",\n  \"n\": [\n    1,\n    2.0,\n    true,\n    null\n  ],\n  \"é\": {}\n}|\
             {\"n\": [1, 2.0, true, null], \"name\": \"f<x>\", \"\\u00e9\": {}}"
        );
    }

    #[test]
    fn values_print_like_python() {
        let text = render_str(
            "{{ none }} {{ true }} {{ [1, 'a', \"it's\", none, 2.5] }} {{ {'k': false} }} {{ 3 }} {{ undefined_var }}|{{ true|string }} {{ (1, 'x') }} {{ (1,) }}",
        )
        .expect("render");
        assert_eq!(text, "None True [1, 'a', \"it's\", None, 2.5] {'k': False} 3 |True (1, 'x') (1,)");
    }

    #[test]
    fn python_string_methods() {
        let text = render_str(
            "{{ '  a b  c '.split() }} {{ '  a b  c '.split(none, 1) }} {{ 'a,b,,c'.split(',') }} \
             {{ 'a,b,c'.rsplit(',', 1) }} {{ 'héllo'.find('l') }} {{ 'xy'.removeprefix('x') }} \
             {{ {'a': 1}.get('b', 'd') }} {{ {'a': 1}.get('a') }} {{ {'a': 1}.get('b') }} \
             {{ '\\n x \\n'.strip() }}|{{ 'x\\n\\n'.rstrip('\\n') }}|{{ 'Ab'.startswith('A') }} {{ 'Ab'.upper() }}",
        )
        .expect("render");
        assert_eq!(text, "['a', 'b', 'c'] ['a', 'b  c '] ['a', 'b', '', 'c'] ['a,b', 'c'] 2 y d 1 None x|x|True AB");
    }

    #[test]
    fn generation_tags_are_accepted() {
        let source = "{% for m in messages %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}\n{% endfor %}";
        assert_eq!(rewrite_generation_tags(source).matches("if true").count(), 1);
        let tpl = ChatTemplate::from_source(source, SpecialTokens::default()).expect("template");
        let text =
            tpl.render(&[ChatMessage::new("user", "a"), ChatMessage::new("assistant", "b")], false).expect("render");
        assert_eq!(text, "[a][b]");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<{{ m.content }}>\n    {% endif %}\n{% endfor %}\n";
        let tpl = ChatTemplate::from_source(source, SpecialTokens::default()).expect("template");
        let text = tpl.render(&[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")], false).expect("render");
        assert_eq!(text, "<a>\n<b>\n");
    }

    #[test]
    fn loop_controls_namespace_and_reverse_slices() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages[::-1] %}{% if loop.index > 2 %}{% break %}{% endif %}\
                      {% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.content }}{% endfor %}:{{ ns.n }}";
        let tpl = ChatTemplate::from_source(source, SpecialTokens::default()).expect("template");
        let messages = [
            ChatMessage::new("user", "1"),
            ChatMessage::new("system", "2"),
            ChatMessage::new("user", "3"),
            ChatMessage::new("user", "4"),
        ];
        assert_eq!(tpl.render(&messages, false).expect("render"), "43:2");
    }

    #[test]
    fn special_tokens_tools_and_extras_reach_the_template() {
        let tokens = SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), unk: None, pad: None };
        let tpl = ChatTemplate::from_source(
            "{{ bos_token }}{{ eos_token }}|{{ unk_token is defined }}|{{ tools is none }}|{{ documents is none }}|{{ enable_thinking }}",
            tokens,
        )
        .expect("template");
        let mut options = RenderOptions::default();
        options.extra.insert("enable_thinking".into(), false.into());
        assert_eq!(tpl.render_with(&[], false, &options).expect("render"), "<s></s>|False|True|True|False");
        options.extra.insert("messages".into(), "x".into());
        assert!(matches!(tpl.render_with(&[], false, &options), Err(TokenizerError::Template(_))));
    }

    #[test]
    fn templates_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<ChatMessage>();
        assert_send_sync::<RenderOptions>();
    }

    #[test]
    fn syntax_errors_are_reported_when_compiling() {
        let err = ChatTemplate::from_source("{% if %}", SpecialTokens::default()).expect_err("bad template");
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    }
}
