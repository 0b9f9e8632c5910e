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

use dynamo_epp::request::{
    bpe::{Bpe, TokenizerFile},
    tokenize::{Backend, BackendChoice, TextTokenizer},
};
use tokenizers::{Model, ModelWrapper, Tokenizer};
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Strings per fixture in CI: the fast backend's, and our HF path's (also covered by the parity
/// corpus; HF is the slow side of every comparison).
const CI_STRINGS: usize = 100_000;
const CI_STRINGS_HF: usize = 20_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Random code point from an inclusive range (skipping surrogates).
fn from(rng: &mut SmallRng, lo: u32, hi: u32) -> char {
    loop {
        if let Some(c) = char::from_u32(rng.random_range(lo..=hi)) {
            return c;
        }
    }
}

fn pick<'a>(rng: &mut SmallRng, xs: &[&'a str]) -> &'a str {
    xs[rng.random_range(0..xs.len())]
}

/// Combining marks from both sides of Unicode 9.0 (07FD, 08D3.., 1AC1.. are newer: HF's NFC
/// gives them class 0, current tables do not).
const MARKS: [(u32, u32); 10] = [
    (0x300, 0x36F),
    (0x591, 0x5C7),
    (0x610, 0x61A),
    (0x64B, 0x65F),
    (0x6D6, 0x6ED),
    (0x7EB, 0x7FD),
    (0x898, 0x8FF),
    (0x1AB0, 0x1AFF),
    (0x1DC0, 0x1DFF),
    (0x20D0, 0x20F0),
];

const SPACES: [&str; 16] =
    [" ", "  ", "\t", "\n", "\r\n", "\r", "\u{a0}", "\u{3000}", "\u{2009}", "\u{200b}", "\u{85}", "\u{2028}", "\u{feff}", "\x0b", "\x0c", "\n\n"];

const CODE: [&str; 12] = [
    "fn main() {\n    let x = vec![1, 2, 3];\n}\n",
    "if (a && b) { return -1; } // don't",
    "def f(x):\n\treturn x ** 2  # it's\n",
    "SELECT * FROM t WHERE id='42';",
    "<div class=\"a\">&nbsp;</div>",
    "    ",
    "#[derive(Debug)]",
    "x+=1;y-=2;",
    "```rust\n",
    "'s 't 're 've 'm 'll 'd 'S 'LL 'Re",
    "=> ->> ::<> ...",
    "\\n\\t\\\"",
];

/// One fragment of a test string.
fn fragment(rng: &mut SmallRng, added: &[String]) -> String {
    let mut s = String::new();
    match rng.random_range(0..21) {
        0..=2 => {
            // Latin words, sometimes capitalized or with a contraction.
            for _ in 0..rng.random_range(1..6) {
                let n = rng.random_range(1..12);
                let upper = rng.random_bool(0.2);
                for i in 0..n {
                    let c = (b'a' + rng.random_range(0..26u8)) as char;
                    s.push(if upper && i == 0 { c.to_ascii_uppercase() } else { c });
                }
                if rng.random_bool(0.1) {
                    s.push_str(pick(rng, &["'s", "'LL", "'t", "'Re", "'d"]));
                }
                s.push_str(pick(rng, &[" ", " ", ", ", ". ", ""]));
            }
        }
        3 => {
            // CJK, kana, Hangul syllables and conjoining jamo (NFC composes L V T).
            for _ in 0..rng.random_range(1..20) {
                let c = match rng.random_range(0..6) {
                    0 | 1 => from(rng, 0x4E00, 0x9FFF),
                    2 => from(rng, 0x3040, 0x30FF),
                    3 => from(rng, 0xAC00, 0xD7A3),
                    4 => from(rng, 0x1100, 0x11FF),
                    _ => from(rng, 0xF900, 0xFAFF), // compatibility ideographs: NFC maps them
                };
                s.push(c);
            }
        }
        4 => {
            let (lo, hi) = [(0x600, 0x6FF), (0x900, 0x97F), (0x400, 0x4FF), (0x590, 0x5FF), (0xE00, 0xE7F)][rng.random_range(0..5)];
            for _ in 0..rng.random_range(1..16) {
                s.push(from(rng, lo, hi));
                if rng.random_bool(0.15) {
                    s.push(' ');
                }
            }
        }
        5 => {
            // Emoji: plain, ZWJ families, skin tones, flags, variation selectors.
            for _ in 0..rng.random_range(1..5) {
                match rng.random_range(0..5) {
                    0 => s.push(from(rng, 0x1F300, 0x1FAFF)),
                    1 => s.push_str("👨\u{200d}👩\u{200d}👧\u{200d}👦"),
                    2 => {
                        s.push(from(rng, 0x1F466, 0x1F469));
                        s.push(from(rng, 0x1F3FB, 0x1F3FF));
                    }
                    3 => {
                        s.push(from(rng, 0x1F1E6, 0x1F1FF));
                        s.push(from(rng, 0x1F1E6, 0x1F1FF));
                    }
                    _ => s.push_str("❤\u{fe0f}\u{200d}🔥"),
                }
            }
        }
        6 | 7 => {
            // Combining marks on letters, NFC singletons and decomposed forms.
            for _ in 0..rng.random_range(1..6) {
                match rng.random_range(0..4) {
                    0 => s.push_str(pick(rng, &["\u{212A}", "\u{2126}", "\u{212B}", "\u{1E9B}\u{323}", "\u{0958}", "\u{0915}\u{093C}", "\u{0438}\u{0306}", "A\u{30A}", "e\u{301}", "\u{1100}\u{1161}\u{11A8}"])),
                    _ => {
                        s.push(if rng.random_bool(0.7) { (b'a' + rng.random_range(0..26u8)) as char } else { from(rng, 0x0600, 0x06FF) });
                        for _ in 0..rng.random_range(1..4) {
                            let (lo, hi) = MARKS[rng.random_range(0..MARKS.len())];
                            s.push(from(rng, lo, hi));
                        }
                    }
                }
            }
        }
        8 => {
            // Digit runs: ASCII, Arabic-Indic, fullwidth, superscripts, Roman numerals, fractions.
            for _ in 0..rng.random_range(1..4) {
                let n = rng.random_range(1..24);
                let (lo, hi) = [(0x30, 0x39), (0x30, 0x39), (0x660, 0x669), (0xFF10, 0xFF19), (0x2070, 0x2079), (0x2160, 0x2188), (0xBC, 0xBE)][rng.random_range(0..7)];
                for _ in 0..n {
                    s.push(from(rng, lo, hi));
                }
                s.push_str(pick(rng, &["", " ", ".", ",", "-"]));
            }
        }
        9 | 10 => {
            for _ in 0..rng.random_range(1..6) {
                s.push_str(pick(rng, &SPACES));
            }
        }
        11 | 12 => s.push_str(pick(rng, &CODE)),
        13 | 14 if !added.is_empty() => {
            // An added token mid-word, whole or cut short.
            let t = &added[rng.random_range(0..added.len())];
            s.push_str(pick(rng, &["ab", "", " ", "x1", "漢"]));
            match rng.random_range(0..4) {
                0 => {
                    let cut = t.char_indices().map(|(i, _)| i).nth(rng.random_range(0..t.chars().count())).unwrap_or(0);
                    s.push_str(&t[..cut.max(1).min(t.len())]);
                }
                _ => s.push_str(t),
            }
            s.push_str(pick(rng, &["cd", "", " ", "\n", "<", "|>"]));
        }
        15 if rng.random_bool(0.3) => {
            // A very long word: letters, one repeated letter, digits, punctuation or CJK.
            let n = rng.random_range(100..1500);
            let kind = rng.random_range(0..5);
            for _ in 0..n {
                s.push(match kind {
                    0 => (b'a' + rng.random_range(0..26u8)) as char,
                    1 => 'a',
                    2 => (b'0' + rng.random_range(0..10u8)) as char,
                    3 => pick(rng, &["!", "-", "=", "*", "."]).chars().next().unwrap(),
                    _ => from(rng, 0x4E00, 0x4E0F),
                });
            }
        }
        16 => {
            for _ in 0..rng.random_range(1..8) {
                s.push_str(pick(rng, &["!", "?", "...", "—", "«", "»", "“", "”", "(", ")", "$", "%", "#", "@", "&", "*", "~", "`", "^", "|", "\\"]));
            }
        }
        _ => {
            // Any code point: controls, private use, unassigned, astral.
            for _ in 0..rng.random_range(1..6) {
                s.push(if rng.random_bool(0.5) { from(rng, 0, 0x2FFF) } else { from(rng, 0, 0x10FFFF) });
            }
        }
    }
    s
}

fn generate(rng: &mut SmallRng, added: &[String]) -> String {
    let mut s = String::new();
    for _ in 0..rng.random_range(1..7) {
        s.push_str(&fragment(rng, added));
        if rng.random_bool(0.3) {
            s.push_str(pick(rng, &SPACES));
        }
    }
    if rng.random_bool(0.1) {
        s.push_str(pick(rng, &[" ", "  ", "\n", " \n ", "\t "]));
    }
    s
}

/// The shortest input still failing `fails`, by deleting ever smaller runs of characters.
fn shrink(input: &str, fails: impl Fn(&str) -> bool) -> String {
    let mut cur: Vec<char> = input.chars().collect();
    let mut chunk = cur.len().div_ceil(2).max(1);
    loop {
        let mut progressed = false;
        let mut at = 0;
        while at < cur.len() {
            let end = (at + chunk).min(cur.len());
            let candidate: String = cur[..at].iter().chain(&cur[end..]).collect();
            if fails(&candidate) {
                cur = candidate.chars().collect();
                progressed = true;
            } else {
                at += chunk;
            }
        }
        if chunk == 1 && !progressed {
            return cur.into_iter().collect();
        }
        if !progressed {
            chunk = chunk.div_ceil(2);
        }
    }
}

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
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let found = std::sync::Mutex::new(None::<String>);
    let bytes = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (ours, added, found, bytes) = (&ours, &added, &found, &bytes);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(t as u64));
                for i in (t..total).step_by(threads) {
                    if i % 4096 == 0 && found.lock().unwrap().is_some() {
                        return;
                    }
                    let text = generate(&mut rng, added);
                    bytes.fetch_add(text.len(), std::sync::atomic::Ordering::Relaxed);
                    let special = i % 8 == 0;
                    if differs(ours, hf, &text, special).is_none() {
                        continue;
                    }
                    let small = shrink(&text, |t| differs(ours, hf, t, special).is_some());
                    let (what, got, want) = differs(ours, hf, &small, special).unwrap();
                    let msg = format!(
                        "{model} {backend:?} (seed {seed}, string {i}, add_special_tokens {special}): {what} ids differ from HF on {small:?} (shrunk from {} chars)\n ours {got:?}\n HF   {want:?}",
                        text.chars().count()
                    );
                    found.lock().unwrap().get_or_insert(msg);
                    return;
                }
            });
        }
    });
    if let Some(msg) = found.into_inner().unwrap() {
        panic!("{msg}");
    }
    eprintln!("{model} {backend:?}: {total} strings, {} bytes, identical", bytes.into_inner());
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
    let variants: [(&str, fn(&mut serde_json::Value)); 11] = [
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
