//! Chat templates rendered the way Hugging Face `transformers` renders them (its
//! `apply_chat_template`, whose output is the reference): Jinja with `trim_blocks` and
//! `lstrip_blocks`, loop controls, Python string/dict methods, `namespace`, `raise_exception`,
//! `strftime_now`, and a `tojson` that writes `json.dumps` text.

use minijinja::{
    syntax::SyntaxConfig,
    value::{Kwargs, Value, ValueKind},
    Environment, Error, ErrorKind,
};

use super::json::{dumps, DumpOptions};

const NAME: &str = "chat";
/// Appended to the final message for `continue_final_message`, exactly as transformers does,
/// to find where that message ends in the rendered text.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
/// Names a message's reasoning may come under; transformers copies the first present one to
/// `thinking` (first) and `reasoning_content` (last).
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A chat request, as the template sees it.
#[derive(Clone, Debug, Default)]
pub struct ChatInput {
    /// Message objects, key order as in the body.
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// `chat_template_kwargs`: extra template variables (`enable_thinking`, …).
    pub kwargs: Vec<(String, Value)>,
}

/// Why a chat could not be rendered; the message goes back to the client (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

/// A compiled chat template with the tokenizer's special tokens as variables.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template variables from tokenizer_config.json (`bos_token`, `eos_token`, …).
    special_tokens: Vec<(String, Value)>,
    /// The template walks `message.content` as a list of parts, so parts are passed as they
    /// are; otherwise text parts are joined with "\n" into a string first (what vLLM does for
    /// string-content templates, which cannot render part lists at all).
    takes_content_parts: bool,
    mentions_content: bool,
}

impl ChatTemplate {
    pub fn new(source: &str, special_tokens: Vec<(String, String)>) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_syntax(SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, strip_generation_tags(source))?;
        let takes_content_parts = takes_content_parts(source);
        Ok(ChatTemplate {
            env,
            special_tokens: special_tokens.into_iter().map(|(k, v)| (k, Value::from(v))).collect(),
            takes_content_parts,
            mentions_content: source.contains("content"),
        })
    }

    /// Renders the prompt text; the caller tokenizes it without adding special tokens.
    pub fn render(&self, chat: &ChatInput) -> Result<String, TemplateError> {
        if chat.messages.is_empty() {
            return Err(TemplateError("cannot apply the chat template to an empty conversation".into()));
        }
        if chat.continue_final_message && chat.add_generation_prompt {
            return Err(TemplateError(
                "continue_final_message and add_generation_prompt cannot both be true".into(),
            ));
        }
        let mut messages: Vec<Value> = chat.messages.iter().map(|m| self.normalize(m)).collect::<Result<_, _>>()?;
        let mut final_text = None;
        if chat.continue_final_message {
            let last = messages.last_mut().expect("non-empty");
            let content = last.get_attr("content").ok().filter(|v| !v.is_undefined());
            let Some(text) = content.as_ref().and_then(|c| c.as_str()).map(str::to_string) else {
                return Err(TemplateError(
                    "continue_final_message is set but the final message has no text content to continue".into(),
                ));
            };
            if !self.mentions_content {
                return Err(TemplateError("continue_final_message is set but the chat template never reads `content`".into()));
            }
            *last = with_key(last, "content", Value::from(format!("{text}{CONTINUE_TAG}")));
            final_text = Some(text);
        }
        let mut ctx: Vec<(Value, Value)> =
            self.special_tokens.iter().map(|(k, v)| (Value::from(k.as_str()), v.clone())).collect();
        ctx.extend(chat.kwargs.iter().map(|(k, v)| (Value::from(k.as_str()), v.clone())));
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push(("tools".into(), chat.tools.clone().unwrap_or(Value::from(()))));
        ctx.push(("documents".into(), chat.documents.clone().unwrap_or(Value::from(()))));
        ctx.push(("add_generation_prompt".into(), Value::from(chat.add_generation_prompt)));
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        let rendered = tmpl.render(Value::from_pairs(ctx)).map_err(template_error)?;
        match final_text {
            None => Ok(rendered),
            Some(text) => cut_at_continue_tag(rendered, &text),
        }
    }

    /// What transformers does to each message before rendering: drop keys whose value is null,
    /// alias reasoning fields. Before that, for templates that render `content` as a string, what
    /// the engine (vLLM) does: text parts are joined into one string, null or missing content is "".
    fn normalize(&self, m: &Value) -> Result<Value, TemplateError> {
        let mut pairs: Vec<(Value, Value)> = Vec::new();
        let mut has_content = false;
        for k in m.try_iter().map_err(|e| TemplateError(e.to_string()))? {
            let mut v = m.get_item(&k).unwrap_or_default();
            if k.as_str() == Some("content") && !self.takes_content_parts {
                has_content = true;
                if v.kind() == ValueKind::Seq {
                    v = join_text_parts(&v)?;
                } else if v.is_none() {
                    v = Value::from("");
                }
            }
            if v.is_none() || v.is_undefined() {
                continue;
            }
            pairs.push((k, v));
        }
        if !has_content && !self.takes_content_parts {
            pairs.push((Value::from("content"), Value::from("")));
        }
        let reasoning =
            REASONING_FIELDS.iter().find_map(|f| pairs.iter().find(|(k, _)| k.as_str() == Some(f)).map(|(_, v)| v.clone()));
        if let Some(r) = reasoning {
            // {"thinking": r, **message, "reasoning_content": r}
            let mut aliased = vec![(Value::from("thinking"), r.clone())];
            aliased.extend(pairs);
            aliased.push((Value::from("reasoning_content"), r));
            pairs = aliased;
        }
        Ok(Value::from_pairs(pairs))
    }
}

/// Whether the template walks `message.content` as a list of parts (`{% for p in
/// message['content'] %}`, `content is string` checks), as multimodal templates do.
fn takes_content_parts(source: &str) -> bool {
    let flat: String = source.split_whitespace().collect::<Vec<_>>().join(" ");
    let loops = ["message.content", "message['content']", "message[\"content\"]"].iter().any(|c| {
        let needle = format!(" in {c}");
        flat.match_indices(&needle).any(|(at, _)| {
            // `for <name> in message.content`, not the membership test `'x' in message.content`.
            let mut before = flat[..at].rsplit(' ');
            let name = before.next().unwrap_or_default();
            before.next() == Some("for") && name.chars().all(|ch| ch.is_alphanumeric() || ch == '_')
        })
    });
    loops || ["content is string", "content is not string", "content is iterable", "content is sequence"].iter().any(|p| flat.contains(p))
}

/// A copy of a map value with `key` set.
fn with_key(m: &Value, key: &str, v: Value) -> Value {
    let mut pairs: Vec<(Value, Value)> =
        m.try_iter().into_iter().flatten().map(|k| (k.clone(), m.get_item(&k).unwrap_or_default())).collect();
    pairs.push((Value::from(key), v));
    Value::from_pairs(pairs)
}

fn join_text_parts(parts: &Value) -> Result<Value, TemplateError> {
    let mut texts = Vec::new();
    for p in parts.try_iter().map_err(|e| TemplateError(e.to_string()))? {
        let kind = p.get_attr("type").ok().and_then(|t| t.as_str().map(str::to_string)).unwrap_or_default();
        if kind != "text" {
            return Err(TemplateError(format!(
                "content part type {kind:?} is not supported by this model's chat template (text only)"
            )));
        }
        texts.push(p.get_attr("text").ok().and_then(|t| t.as_str().map(str::to_string)).unwrap_or_default());
    }
    Ok(Value::from(texts.join("\n")))
}

/// transformers' `continue_final_message` cut: keep the text up to where the final message ends.
fn cut_at_continue_tag(rendered: String, final_text: &str) -> Result<String, TemplateError> {
    let tag = CONTINUE_TAG.trim();
    if !rendered.contains(final_text.trim()) || !rendered.contains(tag) {
        return Err(TemplateError(
            "continue_final_message is set but the final message does not appear in the rendered chat".into(),
        ));
    }
    let at = rendered.rfind(tag).expect("checked above");
    if rendered[at..].starts_with(CONTINUE_TAG) {
        Ok(rendered[..at].to_string())
    } else {
        Ok(rendered[..at].trim_end().to_string())
    }
}

fn template_error(e: Error) -> TemplateError {
    let msg = match (e.kind(), e.detail()) {
        // raise_exception(...) text goes back as the template author wrote it.
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => e.to_string(),
    };
    TemplateError(format!("chat template error: {msg}"))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(i) if i.is_none() => None,
        Some(i) if i.is_integer() => Some(" ".repeat(i64::try_from(i)?.max(0) as usize)),
        Some(i) => Some(i.as_str().unwrap_or_default().to_string()),
    };
    let separators = match kwargs.get::<Option<Value>>("separators")? {
        Some(s) if !s.is_none() => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => Some((a.to_string(), b.to_string())),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "separators must be a pair of strings")),
            }
        }
        _ => None,
    };
    let opts = DumpOptions {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        indent,
        separators,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    dumps(&v, &opts).map(Value::from).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
}

/// Python's `datetime.now().strftime(fmt)`; EPP pods run in UTC.
fn strftime_now(fmt: String) -> Result<Value, Error> {
    use std::fmt::Write;
    let mut s = String::new();
    write!(s, "{}", chrono::Utc::now().format(&fmt))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("invalid strftime format {fmt:?}")))?;
    Ok(Value::from(s))
}

/// `{% generation %}` … `{% endgeneration %}` (transformers' assistant-mask extension) render
/// their body unchanged; they become `{% if true %}` … `{% endif %}` with the same whitespace
/// control, since minijinja has no such tag.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 2..];
        let Some(end) = tail.find("%}") else {
            out.push_str(&rest[at..]);
            return out;
        };
        let inner = &tail[..end];
        let body = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        let lead = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
        let trail = &inner[inner.trim_end_matches(['-', '+']).len()..];
        match body {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&rest[at..at + 2 + end + 2]),
        }
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::json::parse;

    fn msgs(json: &str) -> Vec<Value> {
        parse(json.as_bytes()).unwrap().try_iter().unwrap().collect()
    }

    fn render(src: &str, chat: ChatInput) -> Result<String, TemplateError> {
        ChatTemplate::new(src, vec![("bos_token".into(), "<s>".into())]).unwrap().render(&chat)
    }

    #[test]
    fn python_features_render_as_jinja2_does() {
        // Expected strings checked against jinja2 3.1 with transformers' environment.
        let src = "{%- set ns = namespace(n=0) %}\n{% for m in messages %}\n{% if m.role == 'skip' %}{% continue %}{% endif %}\n{%- set ns.n = ns.n + 1 %}\n{{ bos_token }}{{ m.content.strip().upper() }}|{{ m.content.split(',')[-1].lstrip() }}|{{ m | tojson }}\n{% endfor %}{{ ns.n }}";
        let chat = ChatInput {
            messages: msgs(r#"[{"role":"user","content":" a, b ","x":null},{"role":"skip","content":""}]"#),
            ..Default::default()
        };
        assert_eq!(render(src, chat).unwrap(), "<s>A, B|b |{\"role\": \"user\", \"content\": \" a, b \"}\n1");
    }

    #[test]
    fn raise_exception_message_reaches_the_client() {
        let e = render("{{ raise_exception('only user and assistant roles are supported!') }}", ChatInput {
            messages: msgs(r#"[{"role":"x"}]"#),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("only user and assistant roles are supported!"), "{e}");
    }

    #[test]
    fn continue_final_message_cuts_after_the_last_message() {
        let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}";
        let chat = ChatInput {
            messages: msgs(r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"Sure, "}]"#),
            continue_final_message: true,
            ..Default::default()
        };
        assert_eq!(render(src, chat).unwrap(), "<user>hi</user>\n<assistant>Sure, ");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(strip_generation_tags("a {%- generation %}b{% endgeneration -%} c"), "a {%- if true %}b{% endif -%} c");
        let out = render("x {%- generation %}{{ 1 }}{% endgeneration %}", ChatInput {
            messages: msgs(r#"[{}]"#),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(out, "x1");
    }

    #[test]
    fn content_part_templates_are_told_apart_from_membership_tests() {
        assert!(!takes_content_parts("{% if '</think>' in message.content %}x{% endif %}"));
        assert!(takes_content_parts("{%- for part in message['content'] -%}{{ part.text }}{% endfor %}"));
        assert!(takes_content_parts("{% for c in  message.content  %}{% endfor %}"));
        assert!(takes_content_parts("{% if message.content is string %}{% endif %}"));
    }

    #[test]
    fn text_parts_join_and_other_parts_are_refused() {
        let src = "{% for m in messages %}{{ m.content }}{% endfor %}";
        let chat = |c: &str| ChatInput { messages: msgs(&format!(r#"[{{"role":"user","content":{c}}}]"#)), ..Default::default() };
        assert_eq!(render(src, chat(r#"[{"type":"text","text":"a"},{"type":"text","text":"b"}]"#)).unwrap(), "a\nb");
        assert!(render(src, chat(r#"[{"type":"image_url","image_url":{"url":"x"}}]"#)).is_err());
    }
}
