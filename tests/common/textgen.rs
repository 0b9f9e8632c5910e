//! Generated text built to break tokenizers and pre-tokenizers, and the shrinker that reduces a
//! failing input to the shortest one still failing (tests/tokenizer_differential.rs,
//! tests/pretokenize.rs).

use rand::{rngs::SmallRng, Rng};

/// A run's size or seed from the environment (long runs), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
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
pub fn fragment(rng: &mut SmallRng, added: &[String]) -> String {
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

pub fn generate(rng: &mut SmallRng, added: &[String]) -> String {
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
pub fn shrink(input: &str, fails: impl Fn(&str) -> bool) -> String {
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

/// Runs `check` on `total` generated strings (`added`: added tokens to embed), spread over every
/// core, each thread seeded from `seed`, so a run repeats. `check(text, index)` describes how
/// `text` fails, if it does; the first failure found is shrunk to the shortest input still
/// failing and the run panics with `label`, the seed, the index and that description.
/// Returns the bytes checked.
pub fn check_generated(label: &str, total: usize, seed: u64, added: &[String], check: impl Fn(&str, usize) -> Option<String> + Sync) -> usize {
    use rand::SeedableRng;
    use std::sync::{atomic::AtomicUsize, atomic::Ordering::Relaxed, Mutex};
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let found = Mutex::new(None::<String>);
    let bytes = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (check, found, bytes) = (&check, &found, &bytes);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(t as u64));
                for i in (t..total).step_by(threads) {
                    if i % 4096 == 0 && found.lock().unwrap().is_some() {
                        return;
                    }
                    let text = generate(&mut rng, added);
                    bytes.fetch_add(text.len(), Relaxed);
                    if check(&text, i).is_none() {
                        continue;
                    }
                    let small = shrink(&text, |t| check(t, i).is_some());
                    let why = check(&small, i).unwrap();
                    let msg = format!("{label} (seed {seed}, string {i}) on {small:?} (shrunk from {} chars): {why}", text.chars().count());
                    found.lock().unwrap().get_or_insert(msg);
                    return;
                }
            });
        }
    });
    if let Some(msg) = found.into_inner().unwrap() {
        panic!("{msg}");
    }
    bytes.into_inner()
}
