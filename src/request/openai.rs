//! The OpenAI generation APIs: the one place a body is checked and read. A malformed body is
//! answered here with a 400 that names the offending field by its JSON path, and no worker
//! ever receives it. Fields we do not read are never touched.

use minijinja::value::{Value, ValueKind};

use super::{json, template::ChatInput};

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
    /// The chat template refused or failed to render the conversation.
    #[error("{0}")]
    Template(String),
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

/// What a completions `prompt` holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// What the prompt is made of.
#[derive(Clone, Debug)]
pub enum Input {
    Chat(ChatInput),
    /// `/v1/completions`: the first prompt (routing uses it), and whether it is the only one
    /// (only then is `nvext.token_data` injected: it can describe one prompt).
    Completion { first: Prompt, single: bool },
}

/// `nvext.agent_hints` the router may use.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AgentHints {
    /// Dynamo's queue: `priority_jump = max(priority, 0)`.
    pub priority: Option<i32>,
    /// Dynamo's queue: a higher strict priority always goes first.
    pub strict_priority: Option<u32>,
    /// The queue's `priority_jump` when `priority` is absent.
    pub latency_sensitivity: Option<f64>,
    /// Expected output length in tokens.
    pub osl: Option<u32>,
}

/// A checked OpenAI request: what routing and tokenization read from it.
#[derive(Clone, Debug)]
pub struct OpenAiRequest {
    pub model: String,
    pub input: Input,
    /// `nvext.cache_salt`, else the legacy top-level `cache_salt` (a header may override it).
    pub cache_salt: Option<String>,
    pub hints: AgentHints,
    /// The body has a top-level `nvext` member (even `null`): `token_data` must be merged into
    /// it rather than appended.
    pub has_nvext: bool,
}

/// Checks that `body` is a request `api` can serve and reads what routing needs.
pub fn parse(api: Api, body: &[u8]) -> Result<OpenAiRequest, RequestError> {
    let doc = json::parse(body).map_err(|e| RequestError::InvalidJson(e.to_string()))?;
    if doc.kind() != ValueKind::Map {
        return Err(RequestError::NotAnObject);
    }
    let model = match field(&doc, "model") {
        None => return Err(RequestError::Missing("model")),
        Some(v) => v.as_str().ok_or_else(|| wrong("model", "a string"))?.to_string(),
    };
    let input = match api {
        Api::ChatCompletions => Input::Chat(chat_input(&doc)?),
        Api::Completions => completion_input(field(&doc, "prompt"))?,
    };
    let nvext = opt_map(&doc, "nvext", "nvext")?;
    let mut cache_salt = opt_str(&doc, "cache_salt", "cache_salt")?;
    let mut hints = AgentHints::default();
    if let Some(nv) = &nvext {
        if let Some(s) = opt_str(nv, "cache_salt", "nvext.cache_salt")? {
            cache_salt = Some(s);
        }
        if let Some(h) = opt_map(nv, "agent_hints", "nvext.agent_hints")? {
            hints.priority = opt_int(&h, "priority", "nvext.agent_hints.priority", "a 32-bit integer")?;
            hints.osl = opt_int(&h, "osl", "nvext.agent_hints.osl", "a non-negative 32-bit integer")?;
            hints.strict_priority = opt_int(&h, "strict_priority", "nvext.agent_hints.strict_priority", "a non-negative 32-bit integer")?;
            hints.latency_sensitivity = match field(&h, "latency_sensitivity") {
                None => None,
                Some(v) if v.kind() == ValueKind::Number => f64::try_from(v).ok(),
                Some(_) => return Err(wrong("nvext.agent_hints.latency_sensitivity", "a number")),
            };
        }
    }
    let has_nvext = doc.get_attr("nvext").is_ok_and(|v| !v.is_undefined());
    Ok(OpenAiRequest { model, input, cache_salt, hints, has_nvext })
}

/// A present, non-null field.
fn field(obj: &Value, key: &str) -> Option<Value> {
    obj.get_attr(key).ok().filter(|v| !v.is_undefined() && !v.is_none())
}

fn opt_map(obj: &Value, key: &str, path: &str) -> Result<Option<Value>, RequestError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) if v.kind() == ValueKind::Map => Ok(Some(v)),
        Some(_) => Err(wrong(path, "an object")),
    }
}

fn opt_str(obj: &Value, key: &str, path: &str) -> Result<Option<String>, RequestError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| wrong(path, "a string")),
    }
}

fn opt_bool(obj: &Value, key: &str) -> Result<Option<bool>, RequestError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) if v.kind() == ValueKind::Bool => Ok(Some(v.is_true())),
        Some(_) => Err(wrong(key, "a boolean")),
    }
}

fn opt_int<T: TryFrom<i64>>(obj: &Value, key: &str, path: &str, expected: &'static str) -> Result<Option<T>, RequestError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => integer(&v).and_then(|n| T::try_from(n).ok()).map(Some).ok_or_else(|| wrong(path, expected)),
    }
}

fn integer(v: &Value) -> Option<i64> {
    if v.is_integer() {
        i64::try_from(v.clone()).ok()
    } else {
        None
    }
}

fn token_id(v: &Value) -> Option<u32> {
    integer(v).and_then(|n| u32::try_from(n).ok())
}

fn opt_seq_of_maps(obj: &Value, key: &'static str, expected: &'static str) -> Result<Option<Value>, RequestError> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) if v.kind() == ValueKind::Seq => {
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if item.kind() != ValueKind::Map {
                    return Err(wrong(format!("{key}[{i}]"), "an object"));
                }
            }
            Ok(Some(v))
        }
        Some(_) => Err(wrong(key, expected)),
    }
}

fn chat_input(doc: &Value) -> Result<ChatInput, RequestError> {
    let messages = match field(doc, "messages") {
        None => return Err(RequestError::Missing("messages")),
        Some(v) if v.kind() == ValueKind::Seq => v,
        Some(_) => return Err(wrong("messages", "an array of message objects")),
    };
    let messages: Vec<Value> = messages.try_iter().into_iter().flatten().collect();
    for (i, m) in messages.iter().enumerate() {
        check_message(m, i)?;
    }
    let tools = opt_seq_of_maps(doc, "tools", "an array of tool objects")?;
    let documents = opt_seq_of_maps(doc, "documents", "an array of document objects")?;
    match field(doc, "tool_choice") {
        None => {}
        Some(v) if matches!(v.kind(), ValueKind::String | ValueKind::Map) => {}
        Some(_) => return Err(wrong("tool_choice", "a string or an object")),
    }
    let kwargs = match opt_map(doc, "chat_template_kwargs", "chat_template_kwargs")? {
        None => Vec::new(),
        Some(m) => m
            .try_iter()
            .into_iter()
            .flatten()
            .map(|k| {
                let v = m.get_item(&k).unwrap_or_default();
                (k.as_str().unwrap_or_default().to_string(), v)
            })
            .collect(),
    };
    Ok(ChatInput {
        messages,
        tools,
        documents,
        add_generation_prompt: opt_bool(doc, "add_generation_prompt")?.unwrap_or(true),
        continue_final_message: opt_bool(doc, "continue_final_message")?.unwrap_or(false),
        kwargs,
    })
}

fn check_message(m: &Value, i: usize) -> Result<(), RequestError> {
    if m.kind() != ValueKind::Map {
        return Err(wrong(format!("messages[{i}]"), "an object"));
    }
    match field(m, "role") {
        None => return Err(wrong(format!("messages[{i}].role"), "a string")),
        Some(r) if r.as_str().is_none() => return Err(wrong(format!("messages[{i}].role"), "a string")),
        Some(_) => {}
    }
    match field(m, "content") {
        None => {}
        Some(c) if c.kind() == ValueKind::String => {}
        Some(c) if c.kind() == ValueKind::Seq => {
            for (j, part) in c.try_iter().into_iter().flatten().enumerate() {
                let path = format!("messages[{i}].content[{j}]");
                if part.kind() != ValueKind::Map {
                    return Err(wrong(path, "a content part object"));
                }
                let Some(kind) = field(&part, "type") else { return Err(wrong(format!("{path}.type"), "a string")) };
                match kind.as_str() {
                    None => return Err(wrong(format!("{path}.type"), "a string")),
                    Some("text") if field(&part, "text").and_then(|t| t.as_str().map(|_| ())).is_none() => {
                        return Err(wrong(format!("{path}.text"), "a string"));
                    }
                    Some(_) => {}
                }
            }
        }
        Some(_) => return Err(wrong(format!("messages[{i}].content"), "a string or an array of content parts")),
    }
    match field(m, "tool_calls") {
        None => {}
        Some(t) if t.kind() == ValueKind::Seq => {
            for (j, call) in t.try_iter().into_iter().flatten().enumerate() {
                if call.kind() != ValueKind::Map {
                    return Err(wrong(format!("messages[{i}].tool_calls[{j}]"), "an object"));
                }
            }
        }
        Some(_) => return Err(wrong(format!("messages[{i}].tool_calls"), "an array of tool call objects")),
    }
    Ok(())
}

/// `prompt` is a string, an array of strings, an array of token ids, or an array of those arrays.
fn completion_input(p: Option<Value>) -> Result<Input, RequestError> {
    const EXPECTED: &str = "a string, an array of strings, or an array of token ids";
    let p = p.ok_or(RequestError::Missing("prompt"))?;
    if let Some(s) = p.as_str() {
        return Ok(Input::Completion { first: Prompt::Text(s.to_string()), single: true });
    }
    if p.kind() != ValueKind::Seq {
        return Err(wrong("prompt", EXPECTED));
    }
    let items: Vec<Value> = p.try_iter().into_iter().flatten().collect();
    let Some(first) = items.first() else { return Err(wrong("prompt", EXPECTED)) };
    let ids = |v: &Value| -> Option<Vec<u32>> {
        if v.kind() != ValueKind::Seq {
            return None;
        }
        let ids: Option<Vec<u32>> = v.try_iter().ok()?.map(|t| token_id(&t)).collect();
        ids.filter(|i| !i.is_empty())
    };
    match first.kind() {
        ValueKind::String => {
            for (i, it) in items.iter().enumerate() {
                if it.as_str().is_none() {
                    return Err(wrong(format!("prompt[{i}]"), EXPECTED));
                }
            }
            let first = Prompt::Text(first.as_str().unwrap_or_default().to_string());
            Ok(Input::Completion { first, single: items.len() == 1 })
        }
        ValueKind::Number => {
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                out.push(token_id(it).ok_or_else(|| wrong(format!("prompt[{i}]"), EXPECTED))?);
            }
            Ok(Input::Completion { first: Prompt::Tokens(out), single: true })
        }
        ValueKind::Seq => {
            let mut first_ids = None;
            for (i, it) in items.iter().enumerate() {
                let got = ids(it).ok_or_else(|| wrong(format!("prompt[{i}]"), EXPECTED))?;
                first_ids.get_or_insert(got);
            }
            Ok(Input::Completion { first: Prompt::Tokens(first_ids.unwrap_or_default()), single: items.len() == 1 })
        }
        _ => Err(wrong("prompt[0]", EXPECTED)),
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
        parse(Api::ChatCompletions, br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        for p in [r#""hi""#, r#"["a","b"]"#, "[1,2,3]", "[[1,2],[3]]"] {
            parse(Api::Completions, format!(r#"{{"model":"m","prompt":{p}}}"#).as_bytes()).unwrap();
        }
    }

    #[test]
    fn reads_prompts_salt_and_hints() {
        let r = parse(Api::Completions, br#"{"model":"m","prompt":["a","b"],"cache_salt":"top"}"#).unwrap();
        assert!(matches!(r.input, Input::Completion { first: Prompt::Text(ref t), single: false } if t == "a"));
        assert_eq!(r.cache_salt.as_deref(), Some("top"));
        let r = parse(Api::Completions, br#"{"model":"m","prompt":[[5,6]],"nvext":{"cache_salt":"nv","agent_hints":{"priority":-3,"osl":200}}}"#).unwrap();
        assert!(matches!(r.input, Input::Completion { first: Prompt::Tokens(ref t), single: true } if t == &[5, 6]));
        assert_eq!(r.cache_salt.as_deref(), Some("nv"));
        assert_eq!(r.hints, AgentHints { priority: Some(-3), osl: Some(200), ..Default::default() });
        let r = parse(Api::Completions, br#"{"model":"m","prompt":"x","nvext":{"agent_hints":{"strict_priority":2,"latency_sensitivity":0.5}}}"#).unwrap();
        assert_eq!(r.hints, AgentHints { strict_priority: Some(2), latency_sensitivity: Some(0.5), ..Default::default() });
        let r = parse(
            Api::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}],"chat_template_kwargs":{"enable_thinking":false},"add_generation_prompt":false}"#,
        )
        .unwrap();
        let Input::Chat(c) = r.input else { panic!() };
        assert!(!c.add_generation_prompt);
        assert_eq!(c.kwargs.len(), 1);
        assert_eq!(c.kwargs[0].0, "enable_thinking");
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
            (Api::ChatCompletions, r#"{"model":"m","messages":[{},"x"]}"#, Some("messages[0].role")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[{"role":"user"},"x"]}"#, Some("messages[1]")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[{"role":"user","content":5}]}"#, Some("messages[0].content")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":1}]}]}"#, Some("messages[0].content[0].text")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"tools":[1]}"#, Some("tools[0]")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"tool_choice":1}"#, Some("tool_choice")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"chat_template_kwargs":[]}"#, Some("chat_template_kwargs")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"add_generation_prompt":"yes"}"#, Some("add_generation_prompt")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"nvext":{"cache_salt":1}}"#, Some("nvext.cache_salt")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"nvext":{"agent_hints":{"priority":1.5}}}"#, Some("nvext.agent_hints.priority")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"nvext":{"agent_hints":{"osl":-1}}}"#, Some("nvext.agent_hints.osl")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"nvext":{"agent_hints":{"strict_priority":-1}}}"#, Some("nvext.agent_hints.strict_priority")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"nvext":{"agent_hints":{"latency_sensitivity":"hi"}}}"#, Some("nvext.agent_hints.latency_sensitivity")),
            (Api::ChatCompletions, r#"{"model":"m","messages":[],"nvext":[]}"#, Some("nvext")),
            (Api::Completions, r#"{"model":"m"}"#, Some("prompt")),
            (Api::Completions, r#"{"model":"m","prompt":{}}"#, Some("prompt")),
            (Api::Completions, r#"{"model":"m","prompt":["a",1]}"#, Some("prompt[1]")),
            (Api::Completions, r#"{"model":"m","prompt":[1,-2]}"#, Some("prompt[1]")),
            (Api::Completions, r#"{"model":"m","prompt":[1,4294967296]}"#, Some("prompt[1]")),
            (Api::Completions, r#"{"model":"m","prompt":[[1],[]]}"#, Some("prompt[1]")),
        ];
        for (api, body, param) in cases {
            let e = parse(*api, body.as_bytes()).unwrap_err();
            assert_eq!(e.param().as_deref(), *param, "{body}: {e}");
            if let Some(p) = param {
                assert!(e.to_string().contains(p), "{e}");
            }
        }
    }
}
