//! A model directory in Hugging Face layout (mounted, or a Hub snapshot fetched by `hub`):
//! `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template), optional
//! `chat_template.jinja` / `chat_template.json` (which win over the config's template, as in
//! transformers). `generation_config.json` holds sampling defaults only and is not needed to
//! tokenize.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::{
    template::ChatTemplate,
    tokenize::{BackendChoice, TextTokenizer},
};

/// Special-token variables transformers hands every chat template (its `special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Why a model directory cannot be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0} is neither a directory nor a Hugging Face repo id")]
    NotADirectory(PathBuf),
    #[error("{repo} is not in the Hugging Face cache of HF_HOME={home} and cannot be downloaded ({reason})")]
    NotCached { repo: String, home: PathBuf, reason: String },
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("invalid chat template in {path}: {reason}")]
    Template { path: PathBuf, reason: String },
}

/// The tokenizer and chat template of the served model.
pub struct Model {
    pub tokenizer: TextTokenizer,
    /// `None` when the model ships no chat template: chat requests are then refused (400).
    pub template: Option<ChatTemplate>,
}

impl Model {
    /// `backend` is `DYN_TOKENIZER`; the encoder chosen is in `tokenizer.selection()`.
    pub fn load(dir: &Path, cache_bytes: usize, backend: BackendChoice) -> Result<Model, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::NotADirectory(dir.to_path_buf()));
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = TextTokenizer::load(&tok_path, cache_bytes, backend).map_err(|e| unreadable(&tok_path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = match std::fs::read(&cfg_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| unreadable(&cfg_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Null,
            Err(e) => return Err(unreadable(&cfg_path, e)),
        };
        let special: Vec<(String, String)> = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|k| token_text(cfg.get(*k)?).map(|t| (k.to_string(), t)))
            .collect();
        let template = match chat_template_source(dir, &cfg)? {
            None => None,
            Some((path, src)) => Some(
                ChatTemplate::new(&src, special)
                    .map_err(|e| LoadError::Template { path, reason: e.to_string() })?,
            ),
        };
        Ok(Model { tokenizer, template })
    }
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::Unreadable { path: path.to_path_buf(), reason: e.to_string() }
}

/// A special token is written as a string or as an AddedToken object `{"content": …}`.
fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The template text and the file it came from: `chat_template.jinja`, then
/// `chat_template.json`, then `tokenizer_config.json`; a list of named templates yields the
/// one named `default`.
fn chat_template_source(dir: &Path, cfg: &Json) -> Result<Option<(PathBuf, String)>, LoadError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(s) => return Ok(Some((jinja, s))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(unreadable(&jinja, e)),
    }
    let json_path = dir.join("chat_template.json");
    let from_json = match std::fs::read(&json_path) {
        Ok(b) => Some(serde_json::from_slice::<Json>(&b).map_err(|e| unreadable(&json_path, e))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(unreadable(&json_path, e)),
    };
    let (path, value) = match from_json.as_ref().and_then(|j| j.get("chat_template")) {
        Some(v) => (json_path, v),
        None => match cfg.get("chat_template") {
            Some(v) => (dir.join("tokenizer_config.json"), v),
            None => return Ok(None),
        },
    };
    let text = match value {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    };
    Ok(text.map(|t| (path, t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Model::load(dir.path(), 0, BackendChoice::Auto).err().unwrap();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
        let e = Model::load(dir.path(), 0, BackendChoice::Auto).err().unwrap();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
        let e = Model::load(&dir.path().join("missing"), 0, BackendChoice::Auto).err().unwrap();
        assert!(e.to_string().contains("neither a directory"), "{e}");
    }

    #[test]
    fn template_file_precedence_and_named_templates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(chat_template_source(dir.path(), &cfg).unwrap().unwrap().1, "D");
        std::fs::write(dir.path().join("chat_template.json"), r#"{"chat_template":"J"}"#).unwrap();
        assert_eq!(chat_template_source(dir.path(), &cfg).unwrap().unwrap().1, "J");
        std::fs::write(dir.path().join("chat_template.jinja"), "K").unwrap();
        let (path, src) = chat_template_source(dir.path(), &cfg).unwrap().unwrap();
        assert_eq!((path.file_name().unwrap().to_str().unwrap(), src.as_str()), ("chat_template.jinja", "K"));
    }
}
