//! The sampling defaults a model ships in its `generation_config.json`, applied to what a
//! request leaves out, as vLLM does with `--generation-config auto` (its default):
//! `temperature`, `top_p`, `top_k`, `min_p` and `repetition_penalty` become the defaults, and
//! `max_new_tokens` caps every request's output (a server-wide limit, as in vLLM). Other keys
//! (`do_sample`, token ids, beam settings) are not sampling defaults and are left alone, as
//! vLLM leaves them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::sampling::SamplingParams;

/// Largest `generation_config.json` read (real ones are a few hundred bytes).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Where the defaults come from (`--generation-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationConfigSource {
    /// `auto`: the model directory's `generation_config.json`, when there is one.
    Auto,
    /// `vllm` (or `none`): no file; the server's own defaults.
    Builtin,
    /// A folder holding a `generation_config.json`.
    Folder(PathBuf),
}

impl std::str::FromStr for GenerationConfigSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "vllm" | "none" => Ok(Self::Builtin),
            "" => Err("--generation-config needs `auto`, `vllm` or a folder".into()),
            folder => Ok(Self::Folder(PathBuf::from(folder))),
        }
    }
}

/// The defaults read from a model's generation config; unset fields leave the server's own.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationDefaults {
    /// Default `temperature`.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Default `top_p`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Default `top_k`.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Default `min_p`.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Default `repetition_penalty`.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Most tokens any request may generate (and the default where the request says nothing).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    /// Reads the defaults `source` names for the model at `model` (a directory, or a file whose
    /// folder is looked in). `Auto` without a file, and `Builtin`, give no defaults; a folder
    /// named explicitly must hold the file.
    pub fn load(source: &GenerationConfigSource, model: &Path) -> Result<Self, String> {
        let (folder, required) = match source {
            GenerationConfigSource::Builtin => return Ok(Self::default()),
            GenerationConfigSource::Auto if model.is_dir() => (model.to_path_buf(), false),
            GenerationConfigSource::Auto => match model.parent() {
                Some(parent) => (parent.to_path_buf(), false),
                None => return Ok(Self::default()),
            },
            GenerationConfigSource::Folder(folder) => (folder.clone(), true),
        };
        let path = folder.join("generation_config.json");
        if !path.is_file() {
            return match required {
                true => Err(format!("--generation-config: no generation_config.json in {}", folder.display())),
                false => Ok(Self::default()),
            };
        }
        let size = std::fs::metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?.len();
        if size > MAX_FILE_BYTES {
            return Err(format!("{} has {size} bytes, more than {MAX_FILE_BYTES}", path.display()));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads the defaults from the text of a `generation_config.json`, checking that they are
    /// valid sampling parameters (so a bad file stops the server at start-up rather than
    /// failing every request).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !value.is_object() {
            return Err("invalid type: a generation config is a JSON object".into());
        }
        let defaults = Self::deserialize(value).map_err(|e| e.to_string())?;
        if defaults.max_new_tokens == Some(0) {
            return Err("max_new_tokens must be at least 1".into());
        }
        let mut params = SamplingParams { max_tokens: 1, ..SamplingParams::default() };
        defaults.lay_under(&mut params);
        params.validate()?;
        Ok(defaults)
    }

    /// Whether the file set nothing this server uses.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Replaces the server's defaults in `params` with the model's (before the request's own
    /// fields are laid over them).
    pub fn lay_under(&self, params: &mut SamplingParams) {
        if let Some(v) = self.temperature {
            params.temperature = v;
        }
        if let Some(v) = self.top_p {
            params.top_p = v;
        }
        if let Some(v) = self.top_k {
            params.top_k = v;
        }
        if let Some(v) = self.min_p {
            params.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            params.repetition_penalty = v;
        }
        self.cap(params);
    }

    /// Holds `params.max_tokens` (and `min_tokens` with it) to `max_new_tokens`.
    pub fn cap(&self, params: &mut SamplingParams) {
        if let Some(limit) = self.max_new_tokens {
            params.max_tokens = params.max_tokens.min(limit);
            params.min_tokens = params.min_tokens.min(params.max_tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_values_become_the_defaults_and_max_new_tokens_caps() {
        let defaults = GenerationDefaults::from_json(
            r#"{"bos_token_id": 1, "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 50,
                "repetition_penalty": 1.1, "max_new_tokens": 40, "transformers_version": "4.40.0"}"#,
        )
        .expect("valid");
        let mut params = SamplingParams { max_tokens: 100, ..SamplingParams::default() };
        defaults.lay_under(&mut params);
        assert_eq!((params.temperature, params.top_p, params.top_k), (0.6, 0.9, 50));
        assert_eq!(params.repetition_penalty, 1.1);
        assert_eq!(params.max_tokens, 40);
        assert_eq!(params.min_p, SamplingParams::default().min_p);
    }

    #[test]
    fn a_file_with_no_sampling_keys_changes_nothing() {
        let defaults =
            GenerationDefaults::from_json(r#"{"_from_model_config": true, "eos_token_id": [2, 3]}"#).expect("valid");
        assert!(defaults.is_empty());
        let mut params = SamplingParams::default();
        defaults.lay_under(&mut params);
        assert_eq!(params, SamplingParams::default());
    }

    #[test]
    fn invalid_values_are_refused_naming_them() {
        for (text, word) in [
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"max_new_tokens": 0}"#, "max_new_tokens"),
            (r#"{"top_k": "many"}"#, "invalid type"),
            (r#"[1, 2]"#, "invalid type"),
        ] {
            let error = GenerationDefaults::from_json(text).expect_err(text);
            assert!(error.contains(word), "{text}: {error}");
        }
    }

    #[test]
    fn sources_read_as_vllm_spells_them() {
        assert_eq!("auto".parse::<GenerationConfigSource>(), Ok(GenerationConfigSource::Auto));
        assert_eq!("vllm".parse::<GenerationConfigSource>(), Ok(GenerationConfigSource::Builtin));
        assert_eq!("/m".parse::<GenerationConfigSource>(), Ok(GenerationConfigSource::Folder("/m".into())));
    }

    #[test]
    fn auto_without_a_file_gives_no_defaults_but_a_named_folder_must_have_one() {
        let dir = std::env::temp_dir().join(format!("pagemesh-generation-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        assert_eq!(GenerationDefaults::load(&GenerationConfigSource::Auto, &dir), Ok(GenerationDefaults::default()));
        let named = GenerationConfigSource::Folder(dir.clone());
        assert!(GenerationDefaults::load(&named, Path::new("/nowhere")).is_err());
        std::fs::write(dir.join("generation_config.json"), r#"{"temperature": 0.25}"#).expect("write");
        let read = GenerationDefaults::load(&named, Path::new("/nowhere")).expect("read");
        assert_eq!(read.temperature, Some(0.25));
        let beside_a_file = GenerationDefaults::load(&GenerationConfigSource::Auto, &dir.join("model.gguf"));
        assert_eq!(beside_a_file.expect("read").temperature, Some(0.25));
        std::fs::remove_dir_all(&dir).ok();
    }
}
