//! Shape checks for the OpenAI generation APIs, so a malformed body is answered here with a
//! 400 that names the offending field, and no worker ever receives it.

use serde_json::Value;

/// The OpenAI APIs the picker understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Completions,
}

impl Api {
    /// The API a request path names (query string ignored).
    pub fn from_path(path: &str) -> Option<Api> {
        match path.split(['?', '#']).next().unwrap_or(path).trim_end_matches('/') {
            "/v1/chat/completions" => Some(Api::ChatCompletions),
            "/v1/completions" => Some(Api::Completions),
            _ => None,
        }
    }
}

/// A body the picker refuses, with the JSON path of the culprit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("field `{path}` must be {expected}")]
    WrongType { path: String, expected: &'static str },
}

impl RequestError {
    /// The OpenAI `param` the error refers to, if any.
    pub fn param(&self) -> Option<String> {
        match self {
            RequestError::Missing(p) => Some((*p).to_string()),
            RequestError::WrongType { path, .. } => Some(path.clone()),
            _ => None,
        }
    }
}

fn wrong(path: impl Into<String>, expected: &'static str) -> RequestError {
    RequestError::WrongType { path: path.into(), expected }
}

/// Checks that `body` is a request `api` can serve; returns the parsed document.
pub fn check_shape(api: Api, body: &[u8]) -> Result<Value, RequestError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    let obj = doc.as_object().ok_or(RequestError::NotAnObject)?;
    match obj.get("model") {
        None => return Err(RequestError::Missing("model")),
        Some(Value::String(_)) => {}
        Some(_) => return Err(wrong("model", "a string")),
    }
    match api {
        Api::ChatCompletions => match obj.get("messages") {
            None => return Err(RequestError::Missing("messages")),
            Some(Value::Array(msgs)) => {
                for (i, m) in msgs.iter().enumerate() {
                    if !m.is_object() {
                        return Err(wrong(format!("messages[{i}]"), "an object"));
                    }
                }
            }
            Some(_) => return Err(wrong("messages", "an array of message objects")),
        },
        Api::Completions => check_prompt(obj.get("prompt"))?,
    }
    Ok(doc)
}

/// `prompt` is a string, an array of strings, an array of token ids, or an array of those arrays.
fn check_prompt(p: Option<&Value>) -> Result<(), RequestError> {
    const EXPECTED: &str = "a string, an array of strings, or an array of token ids";
    let is_token = |v: &Value| v.as_u64().is_some_and(|n| n <= u32::MAX as u64);
    match p {
        None => Err(RequestError::Missing("prompt")),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) if items.is_empty() => Err(wrong("prompt", EXPECTED)),
        Some(Value::Array(items)) => {
            let first = &items[0];
            for (i, it) in items.iter().enumerate() {
                let ok = match first {
                    Value::String(_) => it.is_string(),
                    Value::Number(_) => is_token(it),
                    Value::Array(_) => it.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(is_token)),
                    _ => false,
                };
                if !ok {
                    return Err(wrong(format!("prompt[{i}]"), EXPECTED));
                }
            }
            Ok(())
        }
        Some(_) => Err(wrong("prompt", EXPECTED)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(Api::from_path("/v1/chat/completions"), Some(Api::ChatCompletions));
        assert_eq!(Api::from_path("/v1/completions?x=1"), Some(Api::Completions));
        assert_eq!(Api::from_path("/v1/models"), None);
    }

    #[test]
    fn accepts_valid_bodies() {
        check_shape(Api::ChatCompletions, br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        for p in [r#""hi""#, r#"["a","b"]"#, "[1,2,3]", "[[1,2],[3]]"] {
            check_shape(Api::Completions, format!(r#"{{"model":"m","prompt":{p}}}"#).as_bytes()).unwrap();
        }
    }

    #[test]
    fn names_the_bad_field() {
        let cases: &[(Api, &str, Option<&str>)] = &[
            (Api::ChatCompletions, "{not json", None),
            (Api::ChatCompletions, "[1]", None),
            (Api::ChatCompletions, r#"{"messages":[]}"#, Some("model")),
            (Api::ChatCompletions, r#"{"model":3,"messages":[]}"#, Some("model")),
            (Api::ChatCompletions, r#"{"model":"m"}"#, Some("messages")),
            (Api::ChatCompletions, r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[{},"x"]}"#, Some("messages[1]")),
            (Api::Completions, r#"{"model":"m"}"#, Some("prompt")),
            (Api::Completions, r#"{"model":"m","prompt":{}}"#, Some("prompt")),
            (Api::Completions, r#"{"model":"m","prompt":["a",1]}"#, Some("prompt[1]")),
            (Api::Completions, r#"{"model":"m","prompt":[1,-2]}"#, Some("prompt[1]")),
            (Api::Completions, r#"{"model":"m","prompt":[1,4294967296]}"#, Some("prompt[1]")),
        ];
        for (api, body, param) in cases {
            let e = check_shape(*api, body.as_bytes()).unwrap_err();
            assert_eq!(e.param().as_deref(), *param, "{body}: {e}");
            if let Some(p) = param {
                assert!(e.to_string().contains(p), "{e}");
            }
        }
    }
}
