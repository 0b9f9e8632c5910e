//! Tokenization speed, ours vs the `tokenizers` crate called directly, same inputs, same run.
//!
//! (a) cold: 32 KB and 400 KB chats, segment cache emptied before every iteration;
//! (b) a 20-turn conversation replayed turn by turn: segment cache vs uncached;
//! (c) chat template render time; (d) token_data injection: byte splice vs serde_json round trip.
//!
//! `cargo bench --bench tokenize` (fixtures: `common::tokenizer_fixtures()`, filled by scripts/setup.sh).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{io::Read, path::PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dynamo_epp::request::{
    inject::inject_token_data,
    json,
    model::Model,
    template::{ChatInput, ChatTemplate},
};
use minijinja::Value;

/// Varied prose (unicode, digits, whitespace runs) from the parity corpus.
fn prose() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tokenizer_parity.json.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut text).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = doc["cases"].as_array().unwrap().iter().find(|c| c["name"] == "chat_100k_tokens").unwrap();
    let body: serde_json::Value = serde_json::from_str(case["body"].as_str().unwrap()).unwrap();
    body["messages"][1]["content"].as_str().unwrap().to_string()
}

/// A chat of `turns` alternating messages cut from `prose`, about `bytes` in total.
fn chat(prose: &str, bytes: usize, turns: usize) -> ChatInput {
    let per = bytes / turns;
    let mut at = 0;
    let messages = (0..turns)
        .map(|i| {
            let mut end = (at + per).min(prose.len());
            while !prose.is_char_boundary(end) {
                end += 1;
            }
            let content = &prose[at..end];
            at = end;
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            Value::from_pairs(vec![(Value::from("role"), Value::from(role)), (Value::from("content"), Value::from(content))])
        })
        .collect();
    ChatInput { messages, add_generation_prompt: true, ..Default::default() }
}

fn template(m: &Model) -> &ChatTemplate {
    m.template.as_ref().unwrap()
}

fn benches(c: &mut Criterion) {
    let model = Model::load(&common::tokenizer_fixtures().join("qwen3"), 256 << 20).expect("qwen3 fixture");
    let prose = prose();
    let tok = &model.tokenizer;

    let mut g = c.benchmark_group("cold");
    g.sample_size(20);
    for (label, bytes, turns) in [("32KB", 32 << 10, 8), ("400KB", 400 << 10, 20)] {
        let text = template(&model).render(&chat(&prose, bytes, turns)).unwrap();
        assert_eq!(tok.encode(&text, false).unwrap(), tok.inner().encode_fast(text.as_str(), false).unwrap().get_ids());
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("tokenizers_encode_fast", label), &text, |b, t| {
            b.iter(|| tok.inner().encode_fast(t.as_str(), false).unwrap().get_ids().len())
        });
        g.bench_with_input(BenchmarkId::new("ours_cache_emptied", label), &text, |b, t| {
            b.iter(|| {
                tok.clear_cache();
                tok.encode(t, false).unwrap().len()
            })
        });
    }
    g.finish();

    // 20 turns: request t resends the conversation so far (user, assistant, …) and ends with
    // the new user message; messages are ~1 KB, so the last request is ~40 KB.
    let convo = chat(&prose, 40 << 10, 39);
    let turns: Vec<String> = (1..=20)
        .map(|t| {
            let mut upto = convo.clone();
            upto.messages.truncate(2 * t - 1);
            template(&model).render(&upto).unwrap()
        })
        .collect();
    let total: usize = turns.iter().map(String::len).sum();
    let mut g = c.benchmark_group("replay_20_turns");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("tokenizers_encode_fast", |b| {
        b.iter(|| turns.iter().map(|t| tok.inner().encode_fast(t.as_str(), false).unwrap().get_ids().len()).sum::<usize>())
    });
    g.bench_function("ours_uncached", |b| b.iter(|| turns.iter().map(|t| tok.encode_uncached(t, false).unwrap().len()).sum::<usize>()));
    g.bench_function("segment_cache", |b| {
        b.iter(|| {
            tok.clear_cache();
            turns.iter().map(|t| tok.encode(t, false).unwrap().len()).sum::<usize>()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("render");
    for (label, bytes, turns) in [("32KB", 32 << 10, 8), ("400KB", 400 << 10, 20)] {
        let input = chat(&prose, bytes, turns);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new("qwen3_template", label), &input, |b, i| b.iter(|| template(&model).render(i).unwrap().len()));
    }
    g.finish();

    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": &prose[..400 << 10]}], "temperature": 0.7, "nvext": {"cache_salt": "t"}})
        .to_string();
    let ids = tok.encode(&prose[..400 << 10], false).unwrap();
    let mut g = c.benchmark_group("inject_400KB");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("splice", |b| b.iter(|| inject_token_data(body.as_bytes(), &ids).unwrap().len()));
    g.bench_function("serde_json_roundtrip", |b| {
        b.iter(|| {
            let mut v: serde_json::Value = serde_json::from_slice(body.as_bytes()).unwrap();
            v["nvext"]["token_data"] = serde_json::Value::from(ids.clone());
            serde_json::to_vec(&v).unwrap().len()
        })
    });
    g.bench_function("parse_request_only", |b| b.iter(|| json::parse(body.as_bytes()).unwrap().len()));
    g.finish();
}

criterion_group!(tokenize, benches);
criterion_main!(tokenize);
