//! Tokenization speed, ours vs the `tokenizers` crate called directly, same inputs, same run.
//!
//! (0) encode: per fixture, HF `tokenizers`, `fastokens` and our `epp` encoder called directly
//!     (no added-token cut, no cache) vs ours with each backend, over chats, prose, code, mixed scripts and never-seen words; the whole
//!     `prepare` of 32 KB and 400 KB chat bodies with each backend;
//! (a) cold: 32 KB and 400 KB chats, segment cache emptied before every iteration (HF backend);
//! (b) a 20-turn conversation replayed turn by turn: segment cache vs uncached;
//! (c) chat template render time; (d) token_data injection: byte splice vs serde_json round trip;
//! (e) pretokenize: our split-regex scanner vs HF's `Split` pre-tokenizer, each fixture's.
//!
//! `cargo bench --bench tokenize` (`-- encode_` / `prepare_` / `cold` / `pretokenize_` … to pick groups; fixtures:
//! `common::tokenizer_fixtures()`, filled by scripts/setup.sh).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{io::Read, path::PathBuf, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use dynamo_epp::request::{
    inject::inject_token_data,
    json,
    model::Model,
    openai::Api,
    template::{ChatInput, ChatTemplate},
    tokenize::{Backend, BackendChoice},
    Preprocessor,
};
use minijinja::Value;
use rand::{rngs::SmallRng, Rng, SeedableRng};

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

/// The largest char boundary of `s` at or below `i`.
fn floor(s: &str, i: usize) -> usize {
    (0..=i.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap()
}

fn template(m: &Model) -> &ChatTemplate {
    m.template.as_ref().unwrap()
}

fn load(model: &str, backend: BackendChoice) -> Model {
    Model::load(&common::tokenizer_fixtures().join(model), 256 << 20, backend).expect("tokenizer fixture")
}

/// `n` bytes of pseudo-words (3–10 lowercase letters), new each call: words no encoder has seen.
fn novel_words(rng: &mut SmallRng, n: usize) -> String {
    let mut s = String::with_capacity(n + 16);
    while s.len() < n {
        for _ in 0..rng.random_range(3..=10) {
            s.push((b'a' + rng.random_range(0..26u8)) as char);
        }
        s.push(' ');
    }
    s
}

/// Mixed scripts: CJK, Hangul, Arabic, Devanagari, Cyrillic, emoji with ZWJ, combining marks,
/// digits and whitespace runs.
fn mixed_scripts(n: usize) -> String {
    let parts = [
        "漢字とかなカナ交じりの文章です。", "한국어 문장입니다 ", "مرحبا بالعالم، كيف حالك؟ ", "नमस्ते दुनिया, आप कैसे हैं? ",
        "Привет, мир! Как дела? ", "👨\u{200d}👩\u{200d}👧 ❤\u{fe0f} ", "cafe\u{301} nai\u{308}ve ", "12345 ٣٤٥ ", "\t\r\n \u{a0}\u{3000}",
    ];
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(parts[i % parts.len()]);
        i += 7;
    }
    s
}

/// Encode speed, one call = one text: HF `tokenizers` and `fastokens` called directly, and ours
/// (segment cache emptied every iteration) with each backend. fastokens' own word cache keeps
/// the words of earlier iterations (and is pre-filled from the vocabulary); `novel` gives every
/// iteration new words, so nobody's cache has them (each text made and freed outside the timing,
/// as the other cells' texts are; our segment cache emptied as in the other cells, else it would
/// grow by every iteration's ids).
fn encode(c: &mut Criterion, prose: &str) {
    let code: String = ["request/tokenize.rs", "request/inject.rs", "request/template.rs", "request/openai.rs", "config.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src").join(f)).unwrap())
        .collect();
    for name in ["qwen3", "llama3_1"] {
        let (hf_model, fast_model, epp_model) = (load(name, BackendChoice::Default), load(name, BackendChoice::Fastokens), load(name, BackendChoice::Epp));
        assert_eq!(fast_model.tokenizer.selection().backend, Backend::Fastokens);
        assert_eq!(epp_model.tokenizer.selection().backend, Backend::Epp);
        let epp = &epp_model.tokenizer;
        let json = std::fs::read_to_string(common::tokenizer_fixtures().join(name).join("tokenizer.json")).unwrap();
        let fast = fastokens::Tokenizer::from_json(serde_json::from_str(&json).unwrap()).unwrap();
        let _ = fast.encode("warm up"); // its lazily built tables, as our load does
        let hf = hf_model.tokenizer.inner().unwrap();
        let chat = |bytes, turns| template(&hf_model).render(&chat(prose, bytes, turns)).unwrap();
        let texts = [
            ("chat_32KB", chat(32 << 10, 8)),
            ("chat_400KB", chat(400 << 10, 20)),
            ("prose_400KB", prose[..floor(prose, 400 << 10)].to_string()),
            ("code", code.clone()),
            ("mixed_scripts_64KB", mixed_scripts(64 << 10)),
        ];
        let mut g = c.benchmark_group(format!("encode_{name}"));
        g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        for (label, text) in &texts {
            let want = hf.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(fast_model.tokenizer.encode(text, false).unwrap(), want, "{name} {label}");
            assert_eq!(fast.encode(text).unwrap(), want, "{name} {label}");
            assert_eq!(epp.encode(text, false).unwrap(), want, "{name} {label}");
            g.throughput(Throughput::Bytes(text.len() as u64));
            g.bench_with_input(BenchmarkId::new("hf_tokenizers", label), text, |b, t| b.iter(|| hf.encode_fast(t.as_str(), false).unwrap().get_ids().len()));
            g.bench_with_input(BenchmarkId::new("fastokens_direct", label), text, |b, t| b.iter(|| fast.encode(t).unwrap().len()));
            g.bench_with_input(BenchmarkId::new("epp_direct", label), text, |b, t| b.iter(|| epp.encode_ordinary(t).unwrap().len()));
            for (who, m) in [("ours_fastokens", &fast_model), ("ours_epp", &epp_model), ("ours_hf", &hf_model)] {
                g.bench_with_input(BenchmarkId::new(who, label), text, |b, t| {
                    b.iter(|| {
                        m.tokenizer.clear_cache();
                        m.tokenizer.encode(t, false).unwrap().len()
                    })
                });
            }
        }
        // Never-seen words: a new 32 KB text every iteration (made outside the timing).
        let mut rng = SmallRng::seed_from_u64(14);
        g.throughput(Throughput::Bytes(32 << 10));
        let fresh = |rng: &mut SmallRng| novel_words(rng, 32 << 10);
        g.bench_function(BenchmarkId::new("hf_tokenizers", "novel_32KB"), |b| {
            b.iter_batched_ref(|| fresh(&mut rng), |t| hf.encode_fast(t.as_str(), false).unwrap().get_ids().len(), BatchSize::SmallInput)
        });
        g.bench_function(BenchmarkId::new("fastokens_direct", "novel_32KB"), |b| {
            b.iter_batched_ref(|| fresh(&mut rng), |t| fast.encode(t).unwrap().len(), BatchSize::SmallInput)
        });
        g.bench_function(BenchmarkId::new("ours_fastokens", "novel_32KB"), |b| {
            b.iter_batched_ref(
                || fresh(&mut rng),
                |t| {
                    fast_model.tokenizer.clear_cache();
                    fast_model.tokenizer.encode(t, false).unwrap().len()
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function(BenchmarkId::new("epp_direct", "novel_32KB"), |b| {
            b.iter_batched_ref(|| fresh(&mut rng), |t| epp.encode_ordinary(t).unwrap().len(), BatchSize::SmallInput)
        });
        g.bench_function(BenchmarkId::new("ours_epp", "novel_32KB"), |b| {
            b.iter_batched_ref(
                || fresh(&mut rng),
                |t| {
                    epp.clear_cache();
                    epp.encode(t, false).unwrap().len()
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

/// The whole `prepare` (parse + render + encode + inject) of a never-seen chat body, both
/// backends, segment cache emptied every iteration.
fn prepare(c: &mut Criterion, prose: &str) {
    let mut g = c.benchmark_group("prepare_qwen3");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for backend in [BackendChoice::Epp, BackendChoice::Fastokens, BackendChoice::Default] {
        let prep = Preprocessor { model: Some(Arc::new(load("qwen3", backend))), served_model: None, lora_adapters: vec![], inject: true };
        for (label, bytes, turns) in [("32KB", 32 << 10, 8), ("400KB", 400 << 10, 20)] {
            let per = bytes / turns;
            let messages: Vec<serde_json::Value> = (0..turns)
                .map(|i| {
                    let at = floor(prose, i * per);
                    let content = &prose[at..floor(prose, at + per)];
                    serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": content})
                })
                .collect();
            let body = serde_json::json!({"model": "m", "messages": messages, "max_tokens": 16}).to_string().into_bytes();
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_with_input(BenchmarkId::new(backend.name(), label), &body, |b, body| {
                b.iter(|| {
                    prep.model.as_ref().unwrap().tokenizer.clear_cache();
                    prep.prepare(Api::ChatCompletions, None, body.clone()).unwrap().tokens.len()
                })
            });
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let prose = prose();
    encode(c, &prose);
    prepare(c, &prose);
    let model = load("qwen3", BackendChoice::Default);
    let tok = &model.tokenizer;

    let mut g = c.benchmark_group("cold");
    g.sample_size(20);
    for (label, bytes, turns) in [("32KB", 32 << 10, 8), ("400KB", 400 << 10, 20)] {
        let text = template(&model).render(&chat(&prose, bytes, turns)).unwrap();
        assert_eq!(tok.encode(&text, false).unwrap(), tok.inner().unwrap().encode_fast(text.as_str(), false).unwrap().get_ids());
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("tokenizers_encode_fast", label), &text, |b, t| {
            b.iter(|| tok.inner().unwrap().encode_fast(t.as_str(), false).unwrap().get_ids().len())
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
        b.iter(|| turns.iter().map(|t| tok.inner().unwrap().encode_fast(t.as_str(), false).unwrap().get_ids().len()).sum::<usize>())
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
    g.bench_function("splice", |b| b.iter(|| inject_token_data(body.as_bytes(), &ids, false).unwrap().len()));
    g.bench_function("serde_json_roundtrip", |b| {
        b.iter(|| {
            let mut v: serde_json::Value = serde_json::from_slice(body.as_bytes()).unwrap();
            v["nvext"]["token_data"] = serde_json::Value::from(ids.clone());
            serde_json::to_vec(&v).unwrap().len()
        })
    });
    g.bench_function("parse_request_only", |b| b.iter(|| json::parse(body.as_bytes()).unwrap().len()));
    g.finish();

    pretokenize(c, &prose);
}

/// Our pre-tokenizer vs HF's `Split` step (each fixture's own), one thread: prose, the same
/// with only its ASCII characters, mixed scripts.
fn pretokenize(c: &mut Criterion, prose: &str) {
    use dynamo_epp::request::pretokenize::{split, SplitPattern};
    use tokenizers::{pre_tokenizers::split::Split, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let prose = &prose[..floor(prose, 400 << 10)];
    let texts = [("prose_400KB", prose.to_string()), ("ascii_prose", prose.chars().filter(char::is_ascii).collect()), ("mixed_scripts_64KB", mixed_scripts(64 << 10))];
    for (name, pattern) in [("qwen3", SplitPattern::Qwen2), ("llama3_1", SplitPattern::Llama3)] {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::tokenizer_fixtures().join(name).join("tokenizer.json")).unwrap()).unwrap();
        let hf: Split = serde_json::from_value(json["pre_tokenizer"]["pretokenizers"][0].clone()).unwrap();
        let hf_pieces = |t: &str| {
            let mut pre = PreTokenizedString::from(t);
            hf.pre_tokenize(&mut pre).unwrap();
            pre.get_splits(OffsetReferential::Original, OffsetType::Byte).len()
        };
        let ours = |t: &str| {
            let mut n = 0;
            split(pattern, t, |_| n += 1);
            n
        };
        let mut g = c.benchmark_group(format!("pretokenize_{name}"));
        g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        for (label, text) in &texts {
            assert_eq!(ours(text), hf_pieces(text), "{name} {label}");
            g.throughput(Throughput::Bytes(text.len() as u64));
            g.bench_with_input(BenchmarkId::new("hf_split", label), text, |b, t| b.iter(|| hf_pieces(t)));
            g.bench_with_input(BenchmarkId::new("ours", label), text, |b, t| b.iter(|| ours(t)));
        }
        g.finish();
    }
}

criterion_group!(tokenize, benches);
criterion_main!(tokenize);
