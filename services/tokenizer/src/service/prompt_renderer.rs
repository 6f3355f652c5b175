//! Chat prompts: the model's chat template (if it has one) rendered and tokenized.

use std::path::Path;

use crate::{ChatMessage, ChatTemplate, RenderOptions, TemplateValue, TextTokenizer};

/// Most extra template variables one request may pass.
pub const MAX_TEMPLATE_KWARGS: usize = 32;

/// Renders chat messages with the model's template.
pub struct PromptRenderer {
    template: Option<ChatTemplate>,
}

impl PromptRenderer {
    /// Loads the template from a model directory's `tokenizer_config.json` (none is fine).
    pub fn load(model_dir: &Path) -> Result<Self, String> {
        Ok(Self { template: ChatTemplate::load(model_dir).map_err(|e| e.to_string())? })
    }

    /// A renderer of the template `source`, with the special tokens of the tokenizer at `model`.
    pub fn with_template(model: &Path, source: &str) -> Result<Self, String> {
        Ok(Self { template: Some(ChatTemplate::load_with_source(model, source).map_err(|e| e.to_string())?) })
    }

    /// The rendered prompt text; `kwargs` are more template variables (`chat_template_kwargs`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, String> {
        let template = self.template.as_ref().ok_or_else(|| {
            "this model has no chat template: use `prompt` (completions) instead of `messages`".to_string()
        })?;
        let mut options = RenderOptions::default();
        if let Some(kwargs) = kwargs {
            if kwargs.len() > MAX_TEMPLATE_KWARGS {
                return Err(format!(
                    "`chat_template_kwargs` has {} entries; at most {MAX_TEMPLATE_KWARGS}",
                    kwargs.len()
                ));
            }
            options.extra =
                kwargs.iter().map(|(name, value)| (name.clone(), TemplateValue::from_serialize(value))).collect();
        }
        template.render_with(messages, add_generation_prompt, &options).map_err(|e| format!("chat template: {e}"))
    }

    /// The rendered prompt's token ids (special tokens come from the template itself).
    pub fn tokenize(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Vec<u32>, String> {
        let text = self.render(messages, add_generation_prompt, kwargs)?;
        tokenizer.encode_chat(&text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_kwargs_are_bounded_and_reserved_names_refused() {
        let model = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stories260K"));
        let renderer = PromptRenderer::with_template(model, "{{ x }}").expect("template");
        let messages = [ChatMessage::new("user", "hi")];
        let many: serde_json::Map<String, serde_json::Value> =
            (0..=MAX_TEMPLATE_KWARGS).map(|i| (format!("k{i}"), serde_json::json!(i))).collect();
        let error = renderer.render(&messages, true, Some(&many)).expect_err("too many");
        assert!(error.contains("at most 32"), "{error}");
        let reserved = serde_json::json!({"messages": []}).as_object().cloned().expect("object");
        assert!(renderer.render(&messages, true, Some(&reserved)).is_err());
        let one = serde_json::json!({"x": "ok"}).as_object().cloned().expect("object");
        assert_eq!(renderer.render(&messages, true, Some(&one)).expect("rendered"), "ok");
    }
}
