//! OpenAI request bodies through `Preprocessor::prepare` (parse, chat template, tokenize, inject)
//! with the Qwen3 tokenizer and template, seeded with the golden corpus bodies.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use dynamo_epp::{
    request::{
        model::Model,
        openai::{self, Api, Input},
        tokenize::BackendChoice,
        PrepareError, Prepared, Preprocessor,
    },
    server::error::EppError,
};
use proptest::{prelude::*, test_runner::TestCaseError};
use serde_json::{json, Value};

use crate::{common, gen_json::{generated, J}, run, Tally};

/// Generated bodies stay under this (the corpus' 500 KB bodies are tried once each, below).
const MAX_GENERATED: usize = 256 * 1024;

pub fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Model::load(&common::tokenizer_fixtures().join("qwen3"), 64 << 20, BackendChoice::Auto).expect("the Qwen3 fixture")))
        .clone()
}

pub fn preprocessor() -> Preprocessor {
    Preprocessor { model: Some(model()), served_model: Some("m".into()), lora_adapters: vec!["lora-a".into()], inject: true }
}

/// The corpus bodies (chat and completions) plus hand-made shapes the corpus lacks.
pub fn seeds() -> &'static [(Api, J)] {
    static S: OnceLock<Vec<(Api, J)>> = OnceLock::new();
    S.get_or_init(|| {
        let mut out = Vec::new();
        for case in common::golden_corpus()["cases"].as_array().unwrap() {
            let body = common::golden_body(case);
            if body.len() > MAX_GENERATED {
                continue;
            }
            let api = if case["api"] == "chat" { Api::ChatCompletions } else { Api::Completions };
            out.push((api, J::from_value(&serde_json::from_str(body).unwrap())));
        }
        let extra = [
            (Api::ChatCompletions, json!({"model": "m", "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:,"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
                "tool_choice": "auto", "chat_template_kwargs": {"enable_thinking": false}, "stream": true,
                "nvext": {"cache_salt": "t", "agent_hints": {"priority": 1, "osl": 10}}})),
            (Api::Completions, json!({"model": "lora-a", "prompt": [[1, 2, 3], [4]], "cache_salt": "x", "unknown": {"a": [1]}})),
            (Api::Completions, json!({"model": "m", "prompt": [151643, 0, 7], "nvext": null})),
        ];
        out.extend(extra.iter().map(|(a, v)| (*a, J::from_value(v))));
        out
    })
}

/// What `path` (`a.b[2].c`) names in `v`, if present.
fn resolve<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        let (key, idx) = match part.find('[') {
            Some(i) => (&part[..i], Some(&part[i..])),
            None => (part, None),
        };
        cur = cur.get(key)?;
        for i in idx.into_iter().flat_map(|s| s.split(['[', ']']).filter(|x| !x.is_empty())) {
            cur = cur.get(i.parse::<usize>().ok()?)?;
        }
    }
    Some(cur)
}

/// One body through `prepare`, checked against an independent reading of the same bytes.
pub fn check(p: &Preprocessor, api: Api, body: &[u8], tally: &mut Tally) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let got = p.prepare(api, None, body.to_vec());
    verify(api, body, got, started.elapsed(), tally)
}

fn verify(api: Api, body: &[u8], got: Result<Prepared, PrepareError>, took: Duration, tally: &mut Tally) -> Result<(), TestCaseError> {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    match got {
        Err(e) => {
            let e = EppError::from(e);
            tally.record(e.code(), took)?;
            prop_assert!(matches!(e.status(), 400 | 404), "a bad body is the client's fault: {} {e}", e.status());
            let err: Value = serde_json::from_slice(&e.body()).expect("error bodies are JSON");
            let want_type = if e.status() == 404 { "NotFoundError" } else { "invalid_request_error" };
            prop_assert_eq!(&err["error"]["type"], want_type);
            prop_assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            prop_assert_eq!(&err["error"]["code"], e.code());
            match parsed {
                Err(_) => prop_assert_eq!(e.code(), "invalid_json"),
                Ok(v) => {
                    prop_assert_ne!(e.code(), "invalid_json", "serde_json reads it: {}", e);
                    // The error names a field that is there, or whose parent is.
                    if let Some(param) = err["error"]["param"].as_str() {
                        if e.code() == "model_not_found" {
                            prop_assert!(v["model"].is_string());
                        } else if let Some(parent) = param.rsplit_once(['.', '[']).map(|(p, _)| p) {
                            prop_assert!(resolve(&v, parent).is_some(), "{param} has no parent in the body");
                        } else {
                            prop_assert!(v.is_object());
                        }
                    }
                }
            }
        }
        Ok(prep) => {
            tally.record("ok", took)?;
            let v = parsed.map_err(|e| TestCaseError::fail(format!("accepted a body serde_json refuses: {e}")))?;
            prop_assert!(prep.tokens.iter().all(|&t| (t as usize) < 151_669), "token id beyond the vocabulary");
            // Forwarded: the body as sent, or with exactly `nvext.token_data` set to the prompt's ids.
            let out: Value = serde_json::from_slice(&prep.body).map_err(|e| TestCaseError::fail(format!("forwarded body is not JSON: {e}")))?;
            let mut want = v.clone();
            if prep.body != body {
                if !want["nvext"].is_object() {
                    want["nvext"] = json!({});
                }
                want["nvext"]["token_data"] = json!(prep.tokens);
            }
            prop_assert_eq!(out, want);
            prop_assert!(prep.body.len() <= body.len() + 32 + prep.tokens.len() * 11);
            // Template syntax in a user's text is data: the rendered prompt holds it verbatim.
            if let Input::Chat(chat) = openai::parse(api, body).expect("prepared, so it parses").input {
                let rendered = model().template.as_ref().unwrap().render(&chat).expect("prepared, so it renders");
                for m in v["messages"].as_array().into_iter().flatten() {
                    if let (Some("user"), Some(text)) = (m["role"].as_str(), m["content"].as_str()) {
                        prop_assert!(rendered.contains(text), "user content not verbatim in the prompt: {text:?}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn generated_request_bodies() {
    let p = preprocessor();
    let seeds = seeds();
    let js: Vec<J> = seeds.iter().map(|(_, j)| j.clone()).collect();
    run("request bodies (prepare)", file!(), generated(seeds.len()), |g, tally| {
        let body = g.build(&js, MAX_GENERATED);
        check(&p, seeds[g.seed].0, &body, tally)
    });
}

/// The huge cases, once each: 16 MB strings, 10k messages, 10k-deep nesting, the corpus'
/// 500 KB bodies. Checked in full, so without the server's tokenization deadline (which answers
/// 504 past `DYN_EPP_TOKENIZATION_TIMEOUT_MS`); a generous bound still catches a hang.
#[test]
fn huge_bodies() {
    let p = preprocessor();
    let mut tally = Tally::new("request bodies (huge)");
    let mut big_content = String::with_capacity(16 << 20);
    while big_content.len() < 16_000_000 {
        big_content.push_str("lorem ipsum {{ dolor }} sit amet, ");
    }
    let msgs: Vec<Value> = (0..10_000).map(|i| json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": format!("m{i} {{% x %}}")})).collect();
    let deep = format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\",\"y\":{}1{}}}]}}", "[".repeat(10_000), "]".repeat(10_000));
    let mut cases: Vec<(Api, Vec<u8>)> = vec![
        (Api::ChatCompletions, json!({"model": "m", "messages": [{"role": "user", "content": big_content}]}).to_string().into_bytes()),
        (Api::ChatCompletions, json!({"model": "m", "messages": msgs}).to_string().into_bytes()),
        (Api::ChatCompletions, deep.into_bytes()),
        (Api::Completions, json!({"model": "m", "prompt": vec![7u32; 2_000_000]}).to_string().into_bytes()),
    ];
    for case in common::golden_corpus()["cases"].as_array().unwrap() {
        let body = common::golden_body(case);
        if body.len() > MAX_GENERATED {
            cases.push((if case["api"] == "chat" { Api::ChatCompletions } else { Api::Completions }, body.as_bytes().to_vec()));
        }
    }
    for (api, body) in cases {
        let started = Instant::now();
        let got = p.prepare(api, None, body.clone());
        let took = started.elapsed();
        assert!(took < HUGE_DEADLINE, "{took:?} on a {} B body", body.len());
        verify(api, &body, got, Duration::ZERO, &mut tally).unwrap_or_else(|e| panic!("{e} on a {} B body", body.len()));
    }
    tally.report();
}

const HUGE_DEADLINE: Duration = Duration::from_secs(300);

/// Inputs that once failed, kept as explicit cases.
#[test]
fn regressions() {
    let p = preprocessor();
    let mut tally = Tally::new("request bodies (regressions)");
    let cases: &[(Api, &[u8])] = &[];
    for (api, body) in cases {
        check(&p, *api, body, &mut tally).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    }
}
