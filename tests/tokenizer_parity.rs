//! Token-id parity with Python `transformers` (the engine's reference) on the committed corpus
//! tests/golden/tokenizer_parity.json.gz, written by scripts/gen_tokenizer_golden.py.
//!
//! Fixtures: `common::tokenizer_fixtures()` (`$TOKENIZER_FIXTURES`, else `data/tokenizers`, which
//! scripts/setup.sh fetches).

mod common;

use std::sync::Arc;

use dynamo_epp::config::Config;
use dynamo_epp::request::{
    hub,
    model::Model,
    openai::{parse, Api, Input},
    tokenize::{Backend, BackendChoice},
    Preprocessor,
};
use serde_json::Value;

const MODELS: [&str; 2] = ["qwen3", "llama3_1"];

struct Case {
    name: &'static str,
    api: Api,
    body: Vec<u8>,
    provenance_only: bool,
    /// model → expected result (`ids` + `rendered`, or `error`).
    expected: &'static serde_json::Map<String, Value>,
}

fn golden() -> &'static (&'static Value, Vec<Case>) {
    static G: std::sync::OnceLock<(&'static Value, Vec<Case>)> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        let doc = common::golden_corpus();
        let cases = doc["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Case {
                name: c["name"].as_str().unwrap(),
                api: if c["api"] == "chat" { Api::ChatCompletions } else { Api::Completions },
                body: c["body"].as_str().unwrap().as_bytes().to_vec(),
                provenance_only: c["provenance_only"].as_bool().unwrap_or(false),
                expected: c["expected"].as_object().unwrap(),
            })
            .collect();
        (doc, cases)
    })
}

fn model(name: &str, cache_bytes: usize, backend: BackendChoice) -> Arc<Model> {
    let dir = common::tokenizer_fixtures().join(name);
    Arc::new(Model::load(&dir, cache_bytes, backend).unwrap_or_else(|e| {
        panic!("{e} (set TOKENIZER_FIXTURES or run scripts/setup.sh)")
    }))
}

/// One loaded model per fixture for the tests that do not measure the cache (loading parses
/// ~10 MB of tokenizer.json).
fn shared_model(name: &str) -> Arc<Model> {
    static M: std::sync::OnceLock<Vec<(&'static str, Arc<Model>)>> = std::sync::OnceLock::new();
    let all = M.get_or_init(|| MODELS.iter().map(|n| (*n, model(n, 64 << 20, BackendChoice::Default))).collect());
    all.iter().find(|(n, _)| *n == name).unwrap().1.clone()
}

fn prep(m: Arc<Model>) -> Preprocessor {
    Preprocessor { model: Some(m), served_model: None, lora_adapters: vec![], inject: true }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Whether `hay` holds `needle`, which starts with `"token_data":[` (found once, then compared).
fn memmem(hay: &[u8], needle: &[u8]) -> bool {
    let head = &needle[..14];
    hay.windows(head.len()).position(|w| w == head).is_some_and(|at| hay[at..].starts_with(needle))
}

/// Where two id lists first differ, with a little context, for a readable failure.
fn first_diff(got: &[u32], want: &[u32]) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b).or((got.len() != want.len()).then(|| got.len().min(want.len())))?;
    let lo = i.saturating_sub(3);
    Some(format!(
        "first difference at id {i} (got {} ids, want {}): got {:?} want {:?}",
        got.len(),
        want.len(),
        &got[lo..(i + 4).min(got.len())],
        &want[lo..(i + 4).min(want.len())]
    ))
}

/// Every id of every corpus request equals transformers', through the whole request path
/// (parse, template, segment-cached tokenization, injection) with the given encoder — run
/// without the segment cache, then twice with it, so the last pass is served from the cache and
/// must give the same ids.
fn parity(name: &str, backend: Backend) {
    let (_, cases) = golden();
    let choice = match backend {
        Backend::Hf => BackendChoice::Default,
        Backend::Fastokens => BackendChoice::Fastokens,
        Backend::Epp => BackendChoice::Epp,
    };
    let cached = prep(model(name, 64 << 20, choice));
    let uncached = prep(model(name, 0, choice));
    for p in [&cached, &uncached] {
        let s = p.model.as_ref().unwrap().tokenizer.selection();
        assert_eq!(s.backend, backend, "{name}: {backend:?} not chosen: {}", s.reason);
    }
    let mut failures = Vec::new();
    let mut compared = 0usize;
    for (pass, p) in [("uncached", &uncached), ("cold", &cached), ("cached", &cached)] {
        for c in cases.iter().filter(|c| !c.provenance_only) {
            let want = &c.expected[name];
            let got = p.prepare(c.api, None, c.body.clone());
            match (want.get("ids"), got) {
                (Some(w), Ok(got)) => {
                    let w = ids(w);
                    compared += w.len();
                    if let Some(d) = first_diff(&got.tokens, &w) {
                        failures.push(format!("{pass} {}: {d}", c.name));
                    }
                    // Injected exactly these ids, for single prompts only (JSON-level checks of the
                    // forwarded body are in inject's unit tests and tests/e2e_tokens.rs).
                    let single = !matches!(parse(c.api, &c.body).unwrap().input, Input::Completion { single: false, .. });
                    let list: Vec<String> = w.iter().map(u32::to_string).collect();
                    let want_text = format!("\"token_data\":[{}]", list.join(","));
                    let injected = memmem(&got.body, want_text.as_bytes());
                    if injected != single || (!single && got.body != c.body) {
                        failures.push(format!("{pass} {}: token_data injected {injected}, single prompt {single}", c.name));
                    }
                }
                (None, Err(_)) => {}
                (Some(_), Err(e)) => failures.push(format!("{pass} {}: transformers accepts it, we refused: {e}", c.name)),
                (None, Ok(_)) => failures.push(format!("{pass} {}: transformers refused it ({}), we accepted", c.name, want["error"])),
            }
        }
    }
    assert!(failures.is_empty(), "{name} {backend:?}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
    assert!(compared > 600_000, "{name}: only {compared} ids compared");
    let (entries, bytes) = cached.model.as_ref().unwrap().tokenizer.cache_usage();
    assert!(entries > 0 && bytes <= 64 << 20);
    assert_eq!(uncached.model.as_ref().unwrap().tokenizer.cache_usage(), (0, 0));
}

#[test]
fn qwen3_ids_equal_transformers() {
    parity("qwen3", Backend::Hf);
}

#[test]
fn llama3_1_ids_equal_transformers() {
    parity("llama3_1", Backend::Hf);
}

#[test]
fn qwen3_ids_equal_transformers_with_fastokens() {
    parity("qwen3", Backend::Fastokens);
}

#[test]
fn llama3_1_ids_equal_transformers_with_fastokens() {
    parity("llama3_1", Backend::Fastokens);
}

#[test]
fn qwen3_ids_equal_transformers_with_epp() {
    parity("qwen3", Backend::Epp);
}

#[test]
fn llama3_1_ids_equal_transformers_with_epp() {
    parity("llama3_1", Backend::Epp);
}

/// `DYN_MODEL_PATH` as a repo id, served offline from a Hugging Face cache laid out as
/// `huggingface_hub` writes it (blobs, snapshot symlinks, `refs/main`): the same files, so every
/// corpus body gets the same ids and body as from the mounted directory.
#[test]
fn a_repo_id_in_an_offline_hf_cache_tokenizes_like_the_directory() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--Qwen--Qwen3-0.6B");
    let commit = "c1899de289a04d12100db370d81485cdf75e47ca";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, file) in ["tokenizer.json", "tokenizer_config.json"].into_iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{i:040x}"));
        std::fs::copy(common::tokenizer_fixtures().join("qwen3").join(file), &blob).unwrap();
        // The HF cache's relative link from a snapshot to its blob.
        std::os::unix::fs::symlink(format!("../../blobs/{i:040x}"), snapshot.join(file)).unwrap(); // repo-path-check: ignore
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let home_arg = home.path().to_str().unwrap();
    let args = ["dynamo-epp", "--model-path", "Qwen/Qwen3-0.6B", "--hf-home", home_arg, "--hf-hub-offline", "true"];
    let cfg = Config::from_args(args).unwrap();
    let dir = hub::model_dir(cfg.model_path.as_ref().unwrap(), &cfg.hub_settings()).unwrap();
    assert_eq!(dir, snapshot);
    let (from_cache, local) = (prep(Arc::new(Model::load(&dir, 0, BackendChoice::Auto).unwrap())), prep(shared_model("qwen3")));
    assert!(from_cache.model.as_ref().unwrap().template.is_some());
    let (_, cases) = golden();
    for c in cases {
        let (a, b) = (from_cache.prepare(c.api, None, c.body.clone()), local.prepare(c.api, None, c.body.clone()));
        match (a, b) {
            (Ok(a), Ok(b)) => assert!(a.tokens == b.tokens && a.body == b.body, "{}: ids differ", c.name),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{}", c.name),
            (a, b) => panic!("{}: {a:?} vs {b:?}", c.name),
        }
    }
}

/// Our renderer reproduces jinja2's text byte for byte, and cached, uncached and the raw
/// `tokenizers` crate agree on it.
#[test]
fn renders_equal_jinja2_and_cache_never_changes_ids() {
    let (_, cases) = golden();
    for name in MODELS {
        let m = shared_model(name);
        let tmpl = m.template.as_ref().unwrap();
        for c in cases.iter().filter(|c| c.api == Api::ChatCompletions && !c.provenance_only) {
            let Some(rendered) = c.expected[name].get("rendered").and_then(Value::as_str) else { continue };
            let Input::Chat(chat) = parse(c.api, &c.body).unwrap().input else { unreachable!() };
            let ours = tmpl.render(&chat).unwrap();
            assert!(ours == rendered, "{name} {}: rendering differs from jinja2\nours: {ours:?}\nwant: {rendered:?}", c.name);
            let cold = m.tokenizer.encode(&ours, false).unwrap();
            let warm = m.tokenizer.encode(&ours, false).unwrap();
            let uncached = m.tokenizer.encode_uncached(&ours, false).unwrap();
            let raw = m.tokenizer.inner().unwrap().encode_fast(ours.as_str(), false).unwrap().get_ids().to_vec();
            assert!(cold == uncached && warm == uncached && raw == uncached, "{name} {}: cache changed ids", c.name);
        }
    }
}

/// The golden file is transformers' work, not ours: (1) its ids are what the raw `tokenizers`
/// crate makes of the text jinja2 rendered (no code of ours involved); (2) the provenance canary
/// holds Python's repr of a part list, which our pipeline never renders (it joins parts), so a
/// file written from our output would fail here; (3) anchor ids below were copied from
/// transformers 5.24 by hand and must match the file.
#[test]
fn golden_file_comes_from_transformers() {
    let (doc, cases) = golden();
    assert_eq!(doc["generator"]["script"], "scripts/gen_tokenizer_golden.py");
    assert!(doc["generator"]["transformers"].as_str().is_some_and(|v| !v.is_empty()));
    for name in MODELS {
        let m = shared_model(name);
        let raw = |text: &str, special: bool| m.tokenizer.inner().unwrap().encode_fast(text, special).unwrap().get_ids().to_vec();
        for c in cases {
            let want = &c.expected[name];
            let Some(w) = want.get("ids") else { continue };
            let from_text = match want.get("rendered") {
                Some(r) => raw(r.as_str().unwrap(), false),
                None => {
                    let Input::Completion { first: dynamo_epp::request::openai::Prompt::Text(t), .. } = parse(c.api, &c.body).unwrap().input else {
                        unreachable!()
                    };
                    raw(&t, true)
                }
            };
            assert!(from_text == ids(w), "{name} {}: golden ids are not the tokenization of its text", c.name);
        }
    }
    let canary = cases.iter().find(|c| c.provenance_only).expect("provenance canary in the corpus");
    let llama = &canary.expected["llama3_1"];
    assert!(llama["rendered"].as_str().unwrap().contains("[{'type': 'text', 'text': 'canary'}]"), "{llama}");
    let ours = prep(shared_model("llama3_1")).prepare(canary.api, None, canary.body.clone()).unwrap();
    assert_ne!(ours.tokens, ids(&llama["ids"]), "our pipeline must not be able to produce the canary");

    let hello = cases.iter().find(|c| c.name == "hello").unwrap();
    assert_eq!(ids(&hello.expected["qwen3"]["ids"]), [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]);
    assert_eq!(
        ids(&hello.expected["llama3_1"]["ids"]),
        [128000, 128006, 882, 128007, 271, 6151, 128009, 128006, 78191, 128007, 271]
    );
}

/// The corpus covers what the issue lists, at the sizes it asks for.
#[test]
fn corpus_is_broad_enough() {
    let (_, cases) = golden();
    assert!(cases.len() >= 200, "{} requests", cases.len());
    let names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    for needed in [
        "system_user", "tools", "tool_call_roundtrip", "content_parts", "unicode_mix", "whitespace_runs",
        "special_lookalikes_in_user", "empty_content", "replay_turn_19", "enable_thinking_false", "continue_final_message",
    ] {
        assert!(names.contains(&needed), "corpus lacks {needed}");
    }
    for name in MODELS {
        let longest = cases.iter().filter_map(|c| c.expected[name].get("ids")).map(|v| v.as_array().unwrap().len()).max().unwrap();
        assert!(longest >= 100_000, "{name}: longest prompt is {longest} tokens");
    }
}
