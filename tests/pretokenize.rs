//! Our pre-tokenizer (`request::pretokenize::split`) against HF's: the `Split` step each
//! fixture's `tokenizer.json` configures (Qwen3's `\p{N}` regex, Llama 3.1's `\p{N}{1,3}`),
//! deserialized and run by `tokenizers` (Oniguruma) in the same process; pieces compared as
//! byte ranges of the text.
//!
//! - Every Unicode scalar value, each in probe strings that show its class (letter, digit,
//!   whitespace, CR/LF, other) and whether it case-folds into a contraction: our tables are
//!   Oniguruma's, whatever its Unicode version.
//! - Generated text (tests/common/textgen.rs: mixed scripts, emoji/ZWJ, combining marks, digit
//!   runs, every whitespace run, code, contractions in all cases, very long runs), 100,000
//!   strings per fixture; a mismatch is shrunk to the shortest input showing it. Long run:
//!   `TOKENIZER_DIFF_STRINGS=10000000 cargo test --release --test pretokenize`.

mod common;

use common::textgen::{check_generated, env_or, shrink};
use dynamo_epp::request::pretokenize::{split, SplitPattern, UNICODE_VERSION};
use tokenizers::{pattern::Pattern, pre_tokenizers::split::Split, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

/// Generated strings per fixture in CI.
const CI_STRINGS: usize = 100_000;

/// A fixture's split regex, as ours and as HF's pre-tokenizer step.
struct Fixture {
    pattern: SplitPattern,
    hf: Split,
    added: Vec<String>,
}

fn fixture(model: &str, want: SplitPattern) -> Fixture {
    let path = common::tokenizer_fixtures().join(model).join("tokenizer.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let step = &json["pre_tokenizer"]["pretokenizers"][0];
    let regex = step["pattern"]["Regex"].as_str().unwrap_or_else(|| panic!("{model}: no Split regex: {step}"));
    assert_eq!(SplitPattern::from_regex(regex), Some(want), "{model}: {regex}");
    assert_eq!((&step["behavior"], &step["invert"]), (&"Isolated".into(), &false.into()), "{model}: {step}");
    let hf: Split = serde_json::from_value(step.clone()).unwrap();
    let added = json["added_tokens"].as_array().unwrap().iter().map(|t| t["content"].as_str().unwrap().to_string()).collect();
    Fixture { pattern: want, hf, added }
}

/// HF's pieces of `text` as byte ranges.
fn hf_pieces(hf: &Split, text: &str) -> Vec<(usize, usize)> {
    let mut pre = PreTokenizedString::from(text);
    hf.pre_tokenize(&mut pre).unwrap();
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(_, range, _)| range).collect()
}

/// Ours, checked to be non-empty consecutive slices of `text` covering it.
fn our_pieces(pattern: SplitPattern, text: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut at = 0;
    split(pattern, text, |p| {
        assert!(!p.is_empty() && p.as_ptr() == text[at..].as_ptr(), "{text:?}: piece {p:?} is not the text's next slice");
        ranges.push((at, at + p.len()));
        at += p.len();
    });
    assert_eq!(at, text.len(), "{text:?}: pieces do not cover the text");
    ranges
}

/// HF's `Split` regex matches and the gaps between them, as byte ranges (but the empty span
/// of an empty text, which the pre-tokenizer drops).
fn hf_spans(hf: &Split, text: &str) -> Vec<(usize, usize)> {
    (&hf.regex).find_matches(text).unwrap().into_iter().map(|(range, _)| range).filter(|(a, b)| a < b).collect()
}

/// How ours differs from HF's (`hf_pieces` or `hf_spans`) on `text`, if it does.
fn differs(f: &Fixture, text: &str, hf: fn(&Split, &str) -> Vec<(usize, usize)>) -> Option<String> {
    let (ours, hf) = (our_pieces(f.pattern, text), hf(&f.hf, text));
    let show = |r: &[(usize, usize)]| r.iter().map(|&(a, b)| &text[a..b]).collect::<Vec<_>>();
    (ours != hf).then(|| format!("\n ours {:?}\n HF   {:?}", show(&ours), show(&hf)))
}

/// Strings around `c` that show how the regex classes it: `a_a` tells letters, `!_` whitespace
/// from CR/LF and letters from digits, `_!` others from whitespace (and U+0020 from other
/// whitespace), `1_1` digits (runs of three in Llama 3's); after `'` in each contraction slot,
/// with a letter after it, a case fold of `s t re ve m ll d` from other letters; `_s` a fold of `'`.
fn probes(c: char) -> [String; 9] {
    [
        format!("a{c}a"),
        format!("!{c}"),
        format!("{c}!"),
        format!("1{c}1"),
        format!("'{c}ex"),
        format!("'{c}lx"),
        format!("'r{c}x"),
        format!("'l{c}x"),
        format!("{c}sx"),
    ]
}

/// Every scalar value's probes, in blocks of code points (one HF call per block, joined by
/// newlines), over every core; a failing block is narrowed to its first failing probe. HF's side
/// is the `Split`'s own regex search (`Pattern::find_matches`, what `Split` cuts with; Isolated
/// keeps each span as a piece), twice as fast as the whole pre-tokenizer.
fn every_scalar_value(model: &str, pattern: SplitPattern) {
    const BLOCK: u32 = 0x800;
    let f = fixture(model, pattern);
    let next = std::sync::atomic::AtomicU32::new(0);
    let failures = std::sync::Mutex::new(Vec::<(u32, String)>::new());
    std::thread::scope(|s| {
        for _ in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
            s.spawn(|| loop {
                let lo = next.fetch_add(BLOCK, std::sync::atomic::Ordering::Relaxed);
                if lo > char::MAX as u32 {
                    return;
                }
                let chars = (lo..lo + BLOCK).filter_map(char::from_u32);
                let text = chars.clone().flat_map(probes).collect::<Vec<_>>().join("\n");
                if differs(&f, &text, hf_spans).is_none() {
                    continue;
                }
                let first = chars.flat_map(|c| probes(c).map(|p| (c, p))).find_map(|(c, p)| Some((c, p.clone(), differs(&f, &p, hf_spans)?)));
                let why = match first {
                    Some((c, probe, why)) => format!("U+{:04X} in {probe:?}:{why}", c as u32),
                    None => {
                        let small = shrink(&text, |t| differs(&f, t, hf_spans).is_some());
                        format!("no probe alone, but {small:?}:{}", differs(&f, &small, hf_spans).unwrap())
                    }
                };
                failures.lock().unwrap().push((lo, why));
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    assert!(failures.is_empty(), "{model}: {} blocks of {BLOCK:#x} code points differ from HF; the first:\n{}", failures.len(), failures[0].1);
    eprintln!("{model}: every scalar value classed as HF's Oniguruma does (our tables: Unicode {:?})", UNICODE_VERSION);
}

fn differential(model: &str, pattern: SplitPattern) {
    let f = fixture(model, pattern);
    let total = env_or("TOKENIZER_DIFF_STRINGS", CI_STRINGS);
    let seed = env_or("TOKENIZER_DIFF_SEED", 14);
    let bytes = check_generated(&format!("{model} split"), total, seed, &f.added, |text, _| differs(&f, text, hf_pieces));
    eprintln!("{model} split: {total} strings, {bytes} bytes, identical");
}

#[test]
fn qwen3_every_scalar_value_as_hf() {
    every_scalar_value("qwen3", SplitPattern::Qwen2);
}

#[test]
fn llama3_1_every_scalar_value_as_hf() {
    every_scalar_value("llama3_1", SplitPattern::Llama3);
}

#[test]
fn qwen3_generated_text_as_hf() {
    differential("qwen3", SplitPattern::Qwen2);
}

#[test]
fn llama3_1_generated_text_as_hf() {
    differential("llama3_1", SplitPattern::Llama3);
}

