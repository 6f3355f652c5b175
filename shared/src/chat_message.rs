//! One message of a chat conversation: the one type the gateway reads from OpenAI requests,
//! the public `generate` subject carries, and the tokenizer renders with a chat template.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
///
/// Deserializes from `{"role": ..., "content": ...}` where `content` is a string, `null` (read as
/// an empty string), or the OpenAI list of parts `[{"type": "text", "text": "..."}, ...]`, whose
/// text parts are concatenated in order with nothing between them. A part of any other type
/// (such as `image_url`) is an error: this server is text-only. Other fields of the message
/// (`name`, `tool_calls`, ...) are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ... (passed to the template as is).
    pub role: String,
    /// The message text.
    #[serde(default, deserialize_with = "deserialize_content")]
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

fn deserialize_content<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserializer.deserialize_any(ContentVisitor)
}

/// Reads message content: a string, null, or a list of text parts.
struct ContentVisitor;

/// One element of the OpenAI list-of-parts content form.
#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a string, null, or a list of {"type": "text", "text": "..."} parts"#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_any(ContentVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        let mut text = String::new();
        while let Some(part) = seq.next_element::<ContentPart>()? {
            match (part.kind.as_str(), part.text) {
                ("text", Some(t)) => text.push_str(&t),
                ("text", None) => return Err(de::Error::custom("a content part of type `text` without `text`")),
                (other, _) => {
                    return Err(de::Error::custom(format!(
                        "content parts of type `{other}` are not supported (only `text`)"
                    )))
                }
            }
        }
        Ok(text)
    }
}
