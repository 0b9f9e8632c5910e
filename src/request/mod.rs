//! OpenAI request bodies → what routing needs: checked fields, the prompt's token ids
//! (identical to the engine's, i.e. to Hugging Face `transformers`), and the body to forward
//! with `nvext.token_data` spliced in. This module never sees workers.
//!
//! Map: `openai` checks and reads bodies · `json` keeps Python's view of JSON (key order,
//! `json.dumps`) · `template` renders chat templates · `tokenize` encodes with the segment
//! cache · `pretokenize` cuts text as the verified split regexes do · `model` loads a model directory · `hub` fetches one by repo id · `inject` splices
//! `token_data` · `pool` runs the CPU work off the reactor.

pub mod bpe;
pub mod hub;
pub mod inject;
pub mod json;
pub mod model;
pub mod openai;
pub mod pool;
pub mod pretokenize;
pub mod template;
pub mod tokenize;

use std::sync::Arc;

use model::Model;
use openai::{AgentHints, Api, Input, Prompt, RequestError};

/// What the server configures: which model is served and how its prompts are tokenized.
pub struct Preprocessor {
    /// `None`: no model files configured; bodies are checked but not tokenized or rewritten.
    pub model: Option<Arc<Model>>,
    /// `DYN_MODEL_NAME`: requests naming another model (and no adapter) get 404.
    pub served_model: Option<String>,
    /// LoRA adapters served beside the base model; a body naming one is routed with it.
    pub lora_adapters: Vec<String>,
    /// `DYN_EPP_INJECT_TOKENS`.
    pub inject: bool,
}

/// A request ready to route.
#[derive(Debug)]
pub struct Prepared {
    pub tokens: Vec<u32>,
    pub cache_salt: Option<String>,
    pub lora: Option<String>,
    pub hints: AgentHints,
    /// The body to forward: the original bytes, or them with `nvext.token_data` spliced in.
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    Tokenizer(String),
}

impl Preprocessor {
    /// Checks, tokenizes and rewrites one body. CPU-bound: call it from the work pool.
    /// `tenant` is the `x-tenant-id` header, which overrides the body's cache salt.
    pub fn prepare(&self, api: Api, tenant: Option<String>, body: Vec<u8>) -> Result<Prepared, PrepareError> {
        let req = openai::parse(api, &body)?;
        let lora = self.lora_adapters.iter().find(|a| **a == req.model).cloned();
        if let Some(served) = &self.served_model {
            if lora.is_none() && req.model != *served {
                return Err(PrepareError::ModelNotFound(req.model));
            }
        }
        let cache_salt = tenant.or(req.cache_salt);
        let Some(model) = &self.model else {
            // No model files: nothing is tokenized or rewritten, but a prompt given as token ids
            // needs no tokenizer to route by.
            let tokens = match &req.input {
                Input::Completion { first: Prompt::Tokens(ids), .. } => ids.clone(),
                _ => Vec::new(),
            };
            return Ok(Prepared { tokens, cache_salt, lora, hints: req.hints, body });
        };
        let tok = &model.tokenizer;
        let encode_err = |e: tokenize::EncodeError| PrepareError::Tokenizer(e.to_string());
        let (tokens, single) = match &req.input {
            Input::Chat(chat) => {
                let template = model.template.as_ref().ok_or_else(|| {
                    RequestError::Template("the served model has no chat template; use /v1/completions".into())
                })?;
                let text = template.render(chat).map_err(|e| RequestError::Template(e.0))?;
                (tok.encode(&text, false).map_err(encode_err)?, true)
            }
            Input::Completion { first: Prompt::Text(t), single } => (tok.encode(t, true).map_err(encode_err)?, *single),
            Input::Completion { first: Prompt::Tokens(ids), single } => {
                // The worker trusts these ids as it trusts token_data: one it does not know is
                // the client's error, answered here rather than by a failing engine.
                if ids.iter().any(|&t| t >= tok.vocab_end()) {
                    return Err(RequestError::WrongType { path: "prompt".into(), expected: "token ids of the served model's vocabulary" }.into());
                }
                (ids.clone(), *single)
            }
        };
        let body = if self.inject && single {
            inject::inject_token_data(&body, &tokens, !req.has_nvext).map_err(|e| PrepareError::Tokenizer(e.to_string()))?
        } else {
            body
        };
        Ok(Prepared { tokens, cache_salt, lora, hints: req.hints, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untokenized(served: Option<&str>) -> Preprocessor {
        Preprocessor { model: None, served_model: served.map(str::to_string), lora_adapters: vec!["ad-1".into()], inject: true }
    }

    #[test]
    fn model_name_adapters_and_salt_precedence() {
        let body = |model: &str| {
            format!(r#"{{"model":"{model}","prompt":"x","cache_salt":"top","nvext":{{"cache_salt":"nv","agent_hints":{{"osl":9}}}}}}"#)
                .into_bytes()
        };
        let p = untokenized(Some("base"));
        let e = p.prepare(Api::Completions, None, body("other")).unwrap_err();
        assert!(matches!(e, PrepareError::ModelNotFound(ref m) if m == "other"), "{e}");
        let ok = p.prepare(Api::Completions, None, body("base")).unwrap();
        assert_eq!((ok.cache_salt.as_deref(), ok.lora, ok.hints.osl), (Some("nv"), None, Some(9)));
        assert_eq!(ok.body, body("base"), "without model files the body is forwarded unchanged");
        assert!(ok.tokens.is_empty());
        let lora = p.prepare(Api::Completions, Some("tenant".into()), body("ad-1")).unwrap();
        assert_eq!((lora.cache_salt.as_deref(), lora.lora.as_deref()), (Some("tenant"), Some("ad-1")));
        let ids = p.prepare(Api::Completions, None, br#"{"model":"base","prompt":[7,8,9]}"#.to_vec()).unwrap();
        assert_eq!((ids.tokens, ids.body.as_slice()), (vec![7, 8, 9], &br#"{"model":"base","prompt":[7,8,9]}"#[..]));
        // Any model is accepted when no served name is configured.
        assert!(untokenized(None).prepare(Api::Completions, None, body("whatever")).is_ok());
    }
}
