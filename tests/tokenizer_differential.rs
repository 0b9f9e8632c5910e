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
//! CI: 100,000 strings per fixture for each fast backend (fastokens, epp), 20,000 for our HF
//! path (`cargo test --test tokenizer_differential`, a few minutes on 2 idle cores). Long run:
//! `TOKENIZER_DIFF_STRINGS=10000000 cargo test --release --test tokenizer_differential -- --exact
//! <fixture>_<backend>_equals_hf` (spread over every core; `TOKENIZER_DIFF_SEED` picks another
//! seed).
//!
//! Below the whole pipeline, our BPE model alone (`request::bpe`) is compared word by word with
//! HF's `BPE` model (`Model::tokenize` of the word's byte-level string): random bytes, UTF-8
//! words of 1–64 bytes, vocabulary tokens and their concatenations, long words
//! (`TOKENIZER_BPE_WORDS` words per fixture, 200,000 in CI).

mod common;

use common::textgen::{check_generated, env_or, fragment, shrink};
use dynamo_epp::request::{
    bpe::{Bpe, TokenizerFile},
    tokenize::{Backend, BackendChoice, TextTokenizer},
};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tokenizers::{Model, ModelWrapper, Tokenizer};

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
        Backend::Epp => BackendChoice::Epp,
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
fn qwen3_epp_equals_hf() {
    differential("qwen3", Backend::Epp);
}

#[test]
fn llama3_1_epp_equals_hf() {
    differential("llama3_1", Backend::Epp);
}

#[test]
fn qwen3_default_equals_hf() {
    differential("qwen3", Backend::Hf);
}

#[test]
fn llama3_1_default_equals_hf() {
    differential("llama3_1", Backend::Hf);
}

/// GPT-2's bytes → chars table, written out independently of the code under test.
fn byte_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = char::from_u32(if printable { b } else { 256 + extra }).unwrap();
        extra += u32::from(!printable);
    }
    table
}

/// A word for the BPE-level comparison (raw bytes, as the pre-tokenizer hands them on).
fn bpe_word(rng: &mut SmallRng, tokens: &[Vec<u8>], added: &[String]) -> Vec<u8> {
    match rng.random_range(0..10) {
        // Random bytes, not necessarily UTF-8: the byte-level alphabet covers all 256.
        0 | 1 => (0..rng.random_range(1..=64)).map(|_| rng.random()).collect(),
        // A vocabulary token itself (does it encode to itself?), or two or three run together.
        2 | 3 => tokens[rng.random_range(0..tokens.len())].clone(),
        4 | 5 => (0..rng.random_range(2..=3)).flat_map(|_| tokens[rng.random_range(0..tokens.len())].clone()).collect(),
        // Long words: past the short-word scan, into the heap.
        6 if rng.random_bool(0.2) => {
            let unit = tokens[rng.random_range(0..tokens.len())].clone();
            let n = rng.random_range(65..2000);
            match rng.random_range(0..3) {
                0 => (0..n).map(|_| rng.random()).collect(),
                1 => unit.iter().copied().cycle().take(n).collect(),
                _ => fragment(rng, added).into_bytes().into_iter().cycle().take(n).collect(),
            }
        }
        // Text of every script, cut to 1–64 bytes (maybe mid-char: still just bytes here).
        _ => {
            let mut w = fragment(rng, added).into_bytes();
            w.truncate(rng.random_range(1..=64));
            w
        }
    }
}

fn bpe_words(model: &str) {
    let path = common::tokenizer_fixtures().join(model).join("tokenizer.json");
    let json = std::fs::read_to_string(&path).unwrap();
    let file = TokenizerFile::parse(&json).unwrap();
    let ignore_merges = file.rest["model"]["ignore_merges"].as_bool().unwrap_or(false);
    let ours = Bpe::load(&file, ignore_merges).unwrap();
    let hf = Tokenizer::from_file(&path).unwrap();
    let ModelWrapper::BPE(hf) = hf.get_model() else { panic!("{model}: not BPE") };
    let table = byte_table();
    let inverse: std::collections::HashMap<char, u8> = (0..=255u8).map(|b| (table[b as usize], b)).collect();
    let byte_level = |w: &[u8]| w.iter().map(|&b| table[b as usize]).collect::<String>();
    let tokens: Vec<Vec<u8>> = file.vocab.as_ref().unwrap().iter().map(|(k, _)| k.chars().map(|c| inverse[&c]).collect()).collect();
    let added: Vec<String> = Vec::new();
    let total: usize = env_or("TOKENIZER_BPE_WORDS", 200_000);
    let mut rng = SmallRng::seed_from_u64(env_or("TOKENIZER_DIFF_SEED", 14));
    let hf_ids = |w: &[u8]| hf.tokenize(&byte_level(w)).unwrap().iter().map(|t| t.id).collect::<Vec<u32>>();
    let mut words: Vec<Vec<u8>> = (0..total).map(|_| bpe_word(&mut rng, &tokens, &added)).collect();
    // One 100 KB word without a space: must not be quadratic.
    words.push((0..100_000).map(|i| b"abcdefghij"[i % 7 + (i / 7) % 3]).collect());
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let want = hf_ids(w);
        let show = || format!("{model}: word {i} {:?} ({} bytes)", String::from_utf8_lossy(&w[..w.len().min(200)]), w.len());
        out.clear();
        ours.encode_word(w, &mut out);
        assert_eq!(out, want, "{}", show());
        // Through the word cache: a miss (or a hit from an earlier equal word), then a hit.
        for pass in ["cache", "cache again"] {
            out.clear();
            ours.with_cache(|c| c.encode(w, &mut out));
            assert_eq!(out, want, "{pass}: {}", show());
        }
    }
    eprintln!("{model}: {} words identical to HF's BPE", words.len());
}

#[test]
fn qwen3_bpe_words_equal_hf_bpe() {
    bpe_words("qwen3");
}

#[test]
fn llama3_1_bpe_words_equal_hf_bpe() {
    bpe_words("llama3_1");
}

/// The shrinker finds the shortest failing input, so a real mismatch is reported readably.
#[test]
fn shrink_finds_the_shortest_failing_input() {
    let fails = |t: &str| t.contains("<|") && t.contains('é');
    assert_eq!(shrink("some text <|im_start|> and é then more", fails), "<|é");
    assert_eq!(shrink("xyz", |t| t.len() >= 2).len(), 2);
}

/// A `tokenizer.json` with any ids-relevant part outside the verified forms is encoded by HF,
/// under `auto` and when a fast backend is asked for, with the reason naming the part.
#[test]
fn unproven_tokenizer_files_fall_back_to_hf() {
    let path = common::tokenizer_fixtures().join("qwen3").join("tokenizer.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    type Change = fn(&mut serde_json::Value);
    let variants: [(&str, Change); 11] = [
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
        ("dropout", |j| j["model"]["dropout"] = 0.1.into()),
        ("unk", |j| j["model"]["unk_token"] = "!".into()),
        ("byte fallback", |j| j["model"]["byte_fallback"] = true.into()),
        ("affixes", |j| j["model"]["end_of_word_suffix"] = "</w>".into()),
    ];
    let text = "Hello wörld 12345 <|im_start|>user\nhi<|im_end|> e\u{301}";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenizer.json");
    for (part, change) in variants {
        let mut json = original.clone();
        change(&mut json);
        std::fs::write(&file, json.to_string()).unwrap();
        for choice in [BackendChoice::Auto, BackendChoice::Fastokens, BackendChoice::Epp] {
            let t = TextTokenizer::load(&file, 0, choice).unwrap();
            let s = t.selection();
            assert_eq!(s.backend, Backend::Hf, "{part} {choice:?}: {}", s.reason);
            let key = if part == "byte_fallback" { "new_option" } else { part };
            assert!(s.reason.contains(key), "{part}: the reason should name it: {}", s.reason);
            if part == "dropout" {
                continue; // HF's dropout is random: no fixed ids to compare
            }
            let want = t.inner().unwrap().encode_fast(text, false).unwrap().get_ids().to_vec();
            assert_eq!(t.encode(text, false).unwrap(), want, "{part}");
        }
    }
    std::fs::write(&file, original.to_string()).unwrap();
    let t = TextTokenizer::load(&file, 0, BackendChoice::Auto).unwrap();
    assert_eq!(t.selection().backend, Backend::Epp, "{}", t.selection().reason);
    let t = TextTokenizer::load(&file, 0, BackendChoice::Fastokens).unwrap();
    assert_eq!(t.selection().backend, Backend::Fastokens, "{}", t.selection().reason);
}

/// A vocabulary our BPE is not proven on (a key outside the byte-level alphabet) is encoded by
/// HF under `epp` and `auto`, with the reason; fastokens does not read the keys this way.
#[test]
fn a_vocabulary_that_is_not_byte_level_falls_back_to_hf_under_epp() {
    let path = common::tokenizer_fixtures().join("llama3_1").join("tokenizer.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["model"]["vocab"]["中文"] = 200_000.into();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokenizer.json");
    std::fs::write(&file, json.to_string()).unwrap();
    for choice in [BackendChoice::Auto, BackendChoice::Epp] {
        let t = TextTokenizer::load(&file, 0, choice).unwrap();
        let s = t.selection();
        assert_eq!(s.backend, Backend::Hf, "{choice:?}: {}", s.reason);
        assert!(s.reason.contains("not a byte-level string"), "{}", s.reason);
    }
}
