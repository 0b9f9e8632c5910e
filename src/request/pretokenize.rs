//! The pre-tokenizer of our own BPE encoder: the two split regexes we support, cut by hand
//! exactly as Hugging Face `tokenizers` cuts them with Oniguruma (the regex engine Python
//! `transformers` uses): `Split(regex, behavior = Isolated, invert = false)`.
//!
//! Both regexes are one alternation tried leftmost-first at each position, each alternative
//! greedy with backtracking. Read that way, every alternative reduces to a decision on the
//! class of the first one or two characters and a scan over a run of one class:
//!
//! | at a … | piece |
//! |---|---|
//! | `'` + `s t re ve m ll d` in any case (`ſ` U+017F folds to `s`) | the contraction |
//! | letter, or non-letter/digit/CR/LF + letter | up to the end of the letter run |
//! | digit (`\p{N}`) | one digit (Qwen2), up to three (Llama 3) |
//! | other (not space, letter, digit), or U+0020 + other | the run of others + any CR/LF run after it |
//! | whitespace run containing CR or LF | up to and including its last CR/LF |
//! | other whitespace run of ≥ 2 | all of it at the end of the text, else all but its last char |
//! | single whitespace | itself |
//!
//! The classes are Oniguruma's own tables, generated into `pretokenize/tables.rs` by
//! scripts/gen_pretokenize_tables.py from the Oniguruma that `tokenizers` runs (6.9.10 in
//! `onig_sys` 69.9, Unicode 16.0): `\p{L}` and `\p{N}` are General Category L and N, `\s` is
//! White_Space (not U+200B, U+FEFF, U+180E). tests/pretokenize.rs runs every scalar value
//! through HF's `Split` to prove it.
//!
//! ASCII is classified through one byte table, letter runs eight bytes at a time; only non-ASCII
//! characters are decoded. Nothing is allocated.

mod tables;

/// The Unicode version of our classes: Oniguruma's.
pub use tables::UNICODE_VERSION;

/// Qwen2/Qwen2.5/Qwen3's split regex.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (OpenAI's cl100k): digits in runs of up to three.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regexes cut by hand, one per regex verified against HF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPattern {
    Qwen2,
    Llama3,
}

impl SplitPattern {
    pub const ALL: [SplitPattern; 2] = [SplitPattern::Qwen2, SplitPattern::Llama3];

    /// The regex this pattern cuts as (the Split pre-tokenizer's `pattern.Regex` string).
    pub fn regex(self) -> &'static str {
        match self {
            SplitPattern::Qwen2 => QWEN2_REGEX,
            SplitPattern::Llama3 => LLAMA3_REGEX,
        }
    }

    /// The pattern whose regex is exactly `regex` (the Split pre-tokenizer's `pattern.Regex` string).
    pub fn from_regex(regex: &str) -> Option<SplitPattern> {
        Self::ALL.into_iter().find(|p| p.regex() == regex)
    }

    /// The most digits one piece takes (`\p{N}` or `\p{N}{1,3}`).
    fn max_digits(self) -> usize {
        match self {
            SplitPattern::Qwen2 => 1,
            SplitPattern::Llama3 => 3,
        }
    }
}

/// Calls `piece` with each piece of `text`, in order, exactly as HF's `Split(regex,
/// behavior=Isolated, invert=false)` pre-tokenizer cuts it (the pieces concatenate to `text`).
pub fn split<'t>(pattern: SplitPattern, text: &'t str, mut piece: impl FnMut(&'t str)) {
    let max_digits = pattern.max_digits();
    let b = text.as_bytes();
    let mut start = 0;
    while start < b.len() {
        let end = piece_end(b, start, max_digits);
        piece(&text[start..end]);
        start = end;
    }
}

// Character classes, the first four as in `tables`. `\s` is split in two because `[\r\n]` is
// special in three alternatives.
/// Neither whitespace, letter nor digit (punctuation, symbols, marks, controls, unassigned…).
const OTHER: u8 = 0;
const LETTER: u8 = 1;
const DIGIT: u8 = 2;
/// Whitespace other than CR and LF.
const SPACE: u8 = 3;
/// CR or LF.
const NEWLINE: u8 = 4;
/// The lead byte of a multi-byte character: decode it and look the class up.
const MULTI: u8 = 5;

/// The class of each byte at a character boundary.
static ASCII: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = match b {
            b'a'..=b'z' | b'A'..=b'Z' => LETTER,
            b'0'..=b'9' => DIGIT,
            b'\n' | b'\r' => NEWLINE,
            b'\t' | 0x0b | 0x0c | b' ' => SPACE,
            0x80..=0xFF => MULTI,
            _ => OTHER,
        };
        i += 1;
    }
    t
};

/// The class of a non-ASCII code point (as `\s` only: CR and LF are ASCII).
#[inline]
fn class_of(cp: u32) -> u8 {
    let block = tables::INDEX[(cp >> 8) as usize] as usize;
    (tables::BLOCKS[block][(cp as usize & 0xFF) >> 2] >> ((cp & 3) * 2)) & 3
}

/// The code point starting at `b[i]` (a lead byte of valid UTF-8) and its length.
#[inline]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    let cont = |k: usize| (b[i + k] & 0x3F) as u32;
    if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | cont(1), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | (cont(1) << 6) | cont(2), 3)
    } else {
        (((b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3), 4)
    }
}

/// The class and byte length of the character at `b[i]`.
#[inline(always)]
fn class_at(b: &[u8], i: usize) -> (u8, usize) {
    let c = ASCII[b[i] as usize];
    if c != MULTI {
        return (c, 1);
    }
    let (cp, n) = decode(b, i);
    (class_of(cp), n)
}

/// The end of the run of `class` characters from `j`.
#[inline(always)]
fn run(b: &[u8], mut j: usize, class: u8) -> usize {
    while j < b.len() {
        let c = ASCII[b[j] as usize];
        if c == class {
            j += 1;
        } else if c == MULTI {
            let (cp, n) = decode(b, j);
            if class_of(cp) != class {
                break;
            }
            j += n;
        } else {
            break;
        }
    }
    j
}

/// The high bit of each byte of `w` (8 bytes of text) that is not an ASCII letter.
#[inline(always)]
fn non_letters(w: u64) -> u64 {
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Lowercased, high bit cleared: no byte overflows into the next below.
    let lower = (w | 0x2020_2020_2020_2020) & LOW7;
    let from_a = lower + 0x1F1F_1F1F_1F1F_1F1F; // high bit: lower >= b'a'
    let past_z = lower + 0x0505_0505_0505_0505; // high bit: lower > b'z'
    !(from_a & !past_z & !w) & HIGH
}

/// The end of the run of letters (`\p{L}+`) from `j`: ASCII eight bytes at a time, so a word
/// ends without a mispredicted branch per letter.
#[inline(always)]
fn letters(b: &[u8], mut j: usize) -> usize {
    loop {
        while let Some(chunk) = b.get(j..j + 8) {
            let stop = non_letters(u64::from_le_bytes(chunk.try_into().unwrap()));
            if stop != 0 {
                j += stop.trailing_zeros() as usize / 8;
                break;
            }
            j += 8;
        }
        // `b[j]` is not an ASCII letter, or fewer than 8 bytes are left.
        loop {
            let Some(&byte) = b.get(j) else { return j };
            match ASCII[byte as usize] {
                LETTER => {
                    j += 1;
                    if b.len() - j >= 8 {
                        break;
                    }
                }
                MULTI => {
                    let (cp, n) = decode(b, j);
                    if class_of(cp) != LETTER {
                        return j;
                    }
                    j += n;
                }
                _ => return j,
            }
        }
    }
}

/// `[\r\n]*` from `j`.
#[inline]
fn newlines(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && (b[j] == b'\n' || b[j] == b'\r') {
        j += 1;
    }
    j
}

/// The end of `(?i:'s|'t|'re|'ve|'m|'ll|'d)` when `j` is just after a `'`.
#[inline]
fn contraction(b: &[u8], j: usize) -> Option<usize> {
    // U+017F LATIN SMALL LETTER LONG S, whose case fold is `s`.
    if b.get(j..j + 2) == Some("\u{17F}".as_bytes()) {
        return Some(j + 2);
    }
    // `| 0x20` lowercases ASCII letters and maps no other byte to a letter below.
    let lower = |k: usize| b.get(j + k).map(|&c| c | 0x20);
    match lower(0)? {
        b's' | b't' | b'm' | b'd' => Some(j + 1),
        b'r' | b'v' if lower(1) == Some(b'e') => Some(j + 2),
        b'l' if lower(1) == Some(b'l') => Some(j + 2),
        _ => None,
    }
}

/// The end of the piece that starts at `i` (`i < b.len()`).
#[inline(always)]
fn piece_end(b: &[u8], i: usize, max_digits: usize) -> usize {
    // Fast path for most of prose: ` word`.
    if b[i] == b' ' && b.get(i + 1).is_some_and(|&c| ASCII[c as usize] == LETTER) {
        return letters(b, i + 2);
    }
    let (c, n) = class_at(b, i);
    let next = i + n;
    match c {
        LETTER => letters(b, next),
        DIGIT => {
            let mut end = next;
            for _ in 1..max_digits {
                if end == b.len() {
                    break;
                }
                let (c, n) = class_at(b, end);
                if c != DIGIT {
                    break;
                }
                end += n;
            }
            end
        }
        OTHER => {
            if b[i] == b'\'' {
                if let Some(end) = contraction(b, next) {
                    return end;
                }
            }
            if next < b.len() {
                let (c2, n2) = class_at(b, next);
                if c2 == LETTER {
                    return letters(b, next + n2);
                }
                if c2 == OTHER {
                    return newlines(b, run(b, next + n2, OTHER));
                }
            }
            newlines(b, next)
        }
        _ => {
            if next < b.len() {
                let (c2, n2) = class_at(b, next);
                // `[^\r\n\p{L}\p{N}]?\p{L}+` with a whitespace prefix.
                if c2 == LETTER && c == SPACE {
                    return letters(b, next + n2);
                }
                // ` ?[^\s\p{L}\p{N}]+[\r\n]*`.
                if c2 == OTHER && b[i] == b' ' {
                    return newlines(b, run(b, next + n2, OTHER));
                }
            }
            whitespace(b, i, c == NEWLINE, next)
        }
    }
}

/// `\s*[\r\n]+|\s+(?!\S)|\s+` at `i`, whose whitespace character ends at `next`.
#[inline]
fn whitespace(b: &[u8], i: usize, newline: bool, next: usize) -> usize {
    let mut after_newline = newline.then_some(next);
    let (mut last, mut end) = (i, next);
    while end < b.len() {
        let (c, n) = class_at(b, end);
        if c == NEWLINE {
            after_newline = Some(end + n);
        } else if c != SPACE {
            break;
        }
        last = end;
        end += n;
    }
    match after_newline {
        // `\s*[\r\n]+`: `\s*` backtracks to the run's last CR/LF.
        Some(end) => end,
        // `\s+(?!\S)` at the end of the text, or a single whitespace (`\s+`).
        None if end == b.len() || last == i => end,
        // `\s+(?!\S)` gives back the last whitespace, which starts the next piece.
        None => last,
    }
}

#[cfg(test)]
mod tests {
    use super::{split, SplitPattern, QWEN2_REGEX};
    use SplitPattern::{Llama3, Qwen2};

    fn pieces(pattern: SplitPattern, text: &str) -> Vec<&str> {
        let mut v = Vec::new();
        split(pattern, text, |p| v.push(p));
        v
    }

    fn assert_cuts(pattern: SplitPattern, cases: &[(&str, &[&str])]) {
        for &(text, want) in cases {
            assert_eq!(pieces(pattern, text), want, "{text:?}");
        }
    }

    #[test]
    fn regexes_round_trip() {
        for p in SplitPattern::ALL {
            assert_eq!(SplitPattern::from_regex(p.regex()), Some(p));
        }
        assert_eq!(SplitPattern::from_regex(&QWEN2_REGEX.replace(r"\p{N}|", r"\p{N}{1,2}|")), None);
    }

    // Expected pieces below: HF `tokenizers`' Split with each regex, run once
    // (tests/pretokenize.rs checks the same against HF on every code point and generated text).

    #[test]
    fn contractions_case_insensitive_and_first() {
        let cases: [(&str, &[&str]); 8] = [
            ("don't I'M we'Re", &["don", "'t", " I", "'M", " we", "'Re"]),
            ("'ll've'D", &["'ll", "'ve", "'D"]),
            // The contraction wins over the letter run it starts: `'s` then `un`.
            ("'sun", &["'s", "un"]),
            // U+017F LATIN SMALL LETTER LONG S case-folds to `s`.
            ("'\u{17F}x", &["'\u{17F}", "x"]),
            ("'x 'rx", &["'x", " '", "rx"]),
            ("''s", &["''", "s"]),
            (" 's", &[" '", "s"]),
            ("'", &["'"]),
        ];
        assert_cuts(Qwen2, &cases);
    }

    #[test]
    fn whitespace_runs() {
        let cases: [(&str, &[&str]); 10] = [
            // A run before a letter gives its last space to the word.
            ("a  b", &["a", " ", " b"]),
            // `\s*[\r\n]+` ends at the run's last CR/LF; the rest is cut again.
            ("a   \n\n  b", &["a", "   \n\n", " ", " b"]),
            ("x\n ", &["x", "\n", " "]),
            ("\r\n\r\n", &["\r\n\r\n"]),
            // At the end of the text the whole run is one piece.
            ("a  ", &["a", "  "]),
            // Before a digit the last space stands alone: no alternative joins it to the digit.
            ("a \t1", &["a", " ", "\t", "1"]),
            // Non-ASCII whitespace: U+3000 prefixes a word; NEL (U+0085) is `\s` but not `[\r\n]`.
            (" \u{3000}x", &[" ", "\u{3000}x"]),
            ("\u{85}x\u{85}\n", &["\u{85}x", "\u{85}\n"]),
            // U+200B and U+FEFF are not White_Space: others.
            (" \u{200B}\u{FEFF}x", &[" \u{200B}\u{FEFF}", "x"]),
            ("", &[]),
        ];
        assert_cuts(Qwen2, &cases);
    }

    #[test]
    fn punctuation_marks_and_prefixes() {
        let cases: [(&str, &[&str]); 7] = [
            // Others take the CR/LF run after them; only U+0020 may lead them.
            ("!!!\n\nx", &["!!!\n\n", "x"]),
            (" !?\r\n", &[" !?\r\n"]),
            ("  !", &[" ", " !"]),
            ("\t!", &["\t", "!"]),
            // One non-letter/digit (not CR/LF) may lead a letter run: punctuation, a mark, a tab.
            ("!abc \u{301}e\tb", &["!abc", " \u{301}", "e", "\tb"]),
            ("e\u{301}", &["e", "\u{301}"]),
            ("\nx", &["\n", "x"]),
        ];
        assert_cuts(Qwen2, &cases);
    }

    // Letter runs are scanned eight ASCII bytes at a time: words across those chunks, non-ASCII
    // letters within them, and the bytes next to `A`–`Z`/`a`–`z` (`@ [ \` {`), derived from the
    // regex.
    #[test]
    fn letter_runs_across_chunks() {
        let cases: [(&str, &[&str]); 4] = [
            ("abcdefgh ijklmnopqrstuvwxyzABCDEFGH!", &["abcdefgh", " ijklmnopqrstuvwxyzABCDEFGH", "!"]),
            ("abcdefgé ijklmnopqrstuÀvwxyz,", &["abcdefgé", " ijklmnopqrstuÀvwxyz", ","]),
            ("a@b[c`d{eZ", &["a", "@b", "[c", "`d", "{eZ"]),
            ("漢字abcdefghijk漢字", &["漢字abcdefghijk漢字"]),
        ];
        assert_cuts(Qwen2, &cases);
    }

    #[test]
    fn digits_one_or_up_to_three() {
        // Any `\p{N}`: Arabic-Indic (Nd), Roman numerals (Nl), vulgar fractions (No).
        let text = "x1234567 \u{663}\u{664}\u{665}\u{666}\u{216B}\u{BD}";
        assert_eq!(pieces(Qwen2, text), ["x", "1", "2", "3", "4", "5", "6", "7", " ", "\u{663}", "\u{664}", "\u{665}", "\u{666}", "\u{216B}", "\u{BD}"]);
        assert_eq!(pieces(Llama3, text), ["x", "123", "456", "7", " ", "\u{663}\u{664}\u{665}", "\u{666}\u{216B}\u{BD}"]);
        assert_eq!(pieces(Llama3, " 1a"), [" ", "1", "a"]);
    }
}
