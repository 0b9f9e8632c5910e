//! Differential test: every encoder backend against Hugging Face `tokenizers` in the same
//! process, over generated text built to break tokenizers: mixed scripts (CJK, Hangul jamo,
//! Arabic, Devanagari, Cyrillic), emoji with ZWJ / skin tones / flags, combining marks
//! (including marks newer than HF's Unicode 9.0 tables) and text NFC changes, digit runs of every
//! script, every whitespace run (`\r\n`, tabs, U+00A0, U+3000, trailing spaces), code, added
//! tokens mid-word and their near misses, very long words, and random code points.
//!
//! The reference is the `tokenizers` crate encoding the whole string (added-token matching,
//! normalizer, pre-tokenizer, BPE, post-processor); ours goes through `TextTokenizer` (cut at
//! added tokens, segment cache, backend), cached and uncached, with and without special tokens.
//! A mismatch is shrunk to the shortest input that still shows it before failing.
//!
//! CI: 100,000 strings per fixture for the fast backend, 20,000 for our HF path
//! (`cargo test --test tokenizer_differential`, ~2 minutes on 2 idle cores). Long run:
//! `TOKENIZER_DIFF_STRINGS=10000000 cargo test --release --test tokenizer_differential`
//! (spread over every core; `TOKENIZER_DIFF_SEED` picks another seed).

mod common;

use dynamo_epp::request::tokenize::{Backend, BackendChoice, TextTokenizer};
use tokenizers::Tokenizer;
use common::textgen::{check_generated, env_or, shrink};

/// Strings per fixture in CI: the fast backend's, and our HF path's (also covered by the parity
/// corpus; HF is the slow side of every comparison).
const CI_STRINGS: usize = 100_000;
const CI_STRINGS_HF: usize = 20_000;

/// The first of our encodings (uncached, cached cold, cached hit) that differs from HF's on
/// `text`, as (what, ours, HF).
fn differs(ours: &TextTokenizer, hf: &Tokenizer, text: &str, special: bool) -> Option<(String, Vec<u32>, Vec<u32>)> {
    let want = hf.encode_fast(text, special).map(|e| e.get_ids().to_vec()).unwrap_or_default();
    let uncached = ours.encode_uncached(text, special).unwrap_or_default();
    if uncached != want {
        return Some(("uncached".into(), uncached, want));
    }
    ours.clear_cache();
    for pass in ["cache cold", "cache hit"] {
        let got = ours.encode(text, special).unwrap_or_default();
        if got != want {
            return Some((pass.into(), got, want));
        }
    }
    None
}

fn load(model: &str, choice: BackendChoice) -> TextTokenizer {
    let path = common::tokenizer_fixtures().join(model).join("tokenizer.json");
    TextTokenizer::load(&path, 1 << 20, choice).unwrap_or_else(|e| panic!("{}: {e} (set TOKENIZER_FIXTURES)", path.display()))
}

fn differential(model: &str, backend: Backend) {
    let choice = match backend {
        Backend::Hf => BackendChoice::Default,
        Backend::Fastokens => BackendChoice::Fastokens,
    };
    let ours = load(model, choice);
    assert_eq!(ours.selection().backend, backend, "{model}: {}", ours.selection().reason);
    // The reference: HF as the file defines it (the fast backend loads no HF tokenizer).
    let reference = load(model, BackendChoice::Default);
    let hf = reference.inner().unwrap();
    assert_eq!(ours.vocab_end(), reference.vocab_end(), "{model}: vocabulary bound");
    let added: Vec<String> = hf.get_added_tokens_decoder().values().map(|t| t.content.clone()).collect();
    let total: usize = env_or("TOKENIZER_DIFF_STRINGS", if backend == Backend::Hf { CI_STRINGS_HF } else { CI_STRINGS });
    let seed: u64 = env_or("TOKENIZER_DIFF_SEED", 14);
    let bytes = check_generated(&format!("{model} {backend:?}"), total, seed, &added, |text, i| {
        let special = i % 8 == 0;
        let (what, got, want) = differs(&ours, hf, text, special)?;
        Some(format!("add_special_tokens {special}: {what} ids differ from HF\n ours {got:?}\n HF   {want:?}"))
    });
    eprintln!("{model} {backend:?}: {total} strings, {bytes} bytes, identical");
}

#[test]
fn qwen3_fastokens_equals_hf() {
    differential("qwen3", Backend::Fastokens);
}

#[test]
fn llama3_1_fastokens_equals_hf() {
    differential("llama3_1", Backend::Fastokens);
}

#[test]
fn qwen3_default_equals_hf() {
    differential("qwen3", Backend::Hf);
}

#[test]
fn llama3_1_default_equals_hf() {
    differential("llama3_1", Backend::Hf);
}

/// The shrinker finds the shortest failing input, so a real mismatch is reported readably.
#[test]
fn shrink_finds_the_shortest_failing_input() {
    let fails = |t: &str| t.contains("<|") && t.contains('é');
    assert_eq!(shrink("some text <|im_start|> and é then more", fails), "<|é");
    assert_eq!(shrink("xyz", |t| t.len() >= 2).len(), 2);
}

/// A `tokenizer.json` with any ids-relevant part outside the verified forms is encoded by HF,
/// under `auto` and when fastokens is asked for, with the reason naming the part.
#[test]
fn unproven_tokenizer_files_fall_back_to_hf() {
    let path = common::tokenizer_fixtures().join("qwen3").join("tokenizer.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let variants: [(&str, fn(&mut serde_json::Value)); 7] = [
        ("normalizer", |j| j["normalizer"] = serde_json::json!({"type": "NFKC"})),
        ("Split", |j| {
            let re = j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].as_str().unwrap().replace(r"\p{N}|", r"\p{N}{1,2}|");
            j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = re.into();
        }),
        ("ByteLevel", |j| j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true.into()),
        ("model", |j| j["model"]["fuse_unk"] = true.into()),
        ("byte_fallback", |j| j["model"]["new_option"] = true.into()),
        ("added tokens", |j| j["added_tokens"][0]["lstrip"] = true.into()),
        ("pre_tokenizer", |j| j["pre_tokenizer"] = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})),
    ];
    let text = "Hello wörld 12345 <|im_start|>user\nhi<|im_end|> e\u{301}";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenizer.json");
    for (part, change) in variants {
        let mut json = original.clone();
        change(&mut json);
        std::fs::write(&file, json.to_string()).unwrap();
        for choice in [BackendChoice::Auto, BackendChoice::Fastokens] {
            let t = TextTokenizer::load(&file, 0, choice).unwrap();
            let s = t.selection();
            assert_eq!(s.backend, Backend::Hf, "{part} {choice:?}: {}", s.reason);
            let key = if part == "byte_fallback" { "new_option" } else { part };
            assert!(s.reason.contains(key), "{part}: the reason should name it: {}", s.reason);
            let want = t.inner().unwrap().encode_fast(text, false).unwrap().get_ids().to_vec();
            assert_eq!(t.encode(text, false).unwrap(), want, "{part}");
        }
    }
    std::fs::write(&file, original.to_string()).unwrap();
    let t = TextTokenizer::load(&file, 0, BackendChoice::Auto).unwrap();
    assert_eq!(t.selection().backend, Backend::Fastokens, "{}", t.selection().reason);
}
