//! The EPP's own byte-level BPE (`DYN_TOKENIZER=epp`): the model part of a `tokenizer.json`
//! (vocabulary and merges), encoding one pre-token's bytes exactly as HF `tokenizers`' `BPE`
//! model encodes its byte-level string (`Word::merge_all`: lowest rank first, ties to the
//! leftmost pair), with the tables built once at load so the first request is as fast as later
//! ones.
//!
//! Also the one parse of `tokenizer.json` both fast backends' proofs read ([`TokenizerFile`]):
//! the vocabulary and merges typed and borrowed from the text, everything else as a JSON value.

use std::{
    borrow::Cow,
    cell::RefCell,
    collections::BinaryHeap,
    fmt,
    hash::BuildHasher,
    sync::atomic::{AtomicU64, Ordering},
};

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Ids above this are not taken from a file (per-id tables are sized by the highest id).
const MAX_ID: u32 = 1 << 24;
/// Words up to this many bytes are merged by scanning their pairs (no heap, no allocation);
/// longer ones with HF's own heap and linked list, so a 100 KB word is not quadratic.
const SHORT_WORD: usize = 64;
/// The per-thread word cache: direct-mapped slots of words up to [`CACHED_BYTES`] bytes merging
/// to up to [`CACHED_IDS`] ids (those not a token by themselves), 64 bytes each, 2 MiB a thread,
/// allocated at a thread's first use. Lossy (a word takes its slot from whatever was there), so
/// it needs no allocation per word, no eviction pass, and a never-seen word costs one store.
const WORD_SLOTS: usize = 1 << 15;
const CACHED_BYTES: usize = 22;
const CACHED_IDS: usize = 8;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct WordSlot {
    /// The word's length; 0 = empty (an empty word is never looked up).
    len: u8,
    n_ids: u8,
    bytes: [u8; CACHED_BYTES],
    ids: [u32; CACHED_IDS],
}

const EMPTY_SLOT: WordSlot = WordSlot { len: 0, n_ids: 0, bytes: [0; CACHED_BYTES], ids: [0; CACHED_IDS] };

/// The merges: (left id, right id) → (priority, merged id), where priorities order pairs as
/// their ranks do. Packed when the file allows (see [`Pairs::new`]): the pair and its priority
/// in one u64, half the bytes of the wide form, so more of the table stays in cache (never-seen
/// words probe it at random ~5 times each; llama3_1's is 4 MiB packed, 8 MiB wide).
enum Pairs {
    /// Slot: `priority << 2 * bits | left << bits | right`, with priority = `merged << sub_bits
    /// | i` for the i-th pair (in rank order) giving `merged`.
    Packed { table: PairTable<u64>, bits: u32, sub_bits: u32 },
    Wide(PairTable<PairSlot>),
}

#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct PairSlot {
    /// `left << 32 | right`.
    key: u64,
    rank: u32,
    merged: u32,
}

impl Pairs {
    /// `merges`: (left, right, merged) in rank order; a pair listed twice keeps its last rank,
    /// as HF's map does. Packed iff ids fit and merged ids never decrease along the ranks (so
    /// `merged << sub_bits | i` increases with rank: true of tiktoken-style files such as
    /// Llama 3's and Qwen's); else wide, keyed as given.
    fn new(merges: &[(u32, u32, u32)], top: u32) -> Pairs {
        let bits = u32::BITS - top.leading_zeros();
        // i of each merge among those giving its merged id.
        let mut subs: Vec<u32> = Vec::with_capacity(merges.len());
        for (k, &(_, _, m)) in merges.iter().enumerate() {
            subs.push(match k.checked_sub(1) {
                Some(j) if merges[j].2 == m => subs[j] + 1,
                _ => 0,
            });
        }
        let monotone = merges.windows(2).all(|w| w[0].2 <= w[1].2);
        let sub_bits = u32::BITS - subs.iter().max().copied().unwrap_or(0).leading_zeros();
        if monotone && 3 * bits + sub_bits <= 64 && bits + sub_bits < 32 {
            let mut table = PairTable::new(merges.len());
            let key_mask = (1u64 << (2 * bits)) - 1;
            for (&(l, r, m), sub) in merges.iter().zip(subs) {
                let key = u64::from(l) << bits | u64::from(r);
                let priority = u64::from(m) << sub_bits | u64::from(sub);
                table.insert(key, priority << (2 * bits) | key, |s| s & key_mask == key);
            }
            return Pairs::Packed { table, bits, sub_bits };
        }
        let mut table = PairTable::new(merges.len());
        for (rank, &(l, r, merged)) in merges.iter().enumerate() {
            let key = u64::from(l) << 32 | u64::from(r);
            table.insert(key, PairSlot { key, rank: rank as u32, merged }, |s| s.key == key);
        }
        Pairs::Wide(table)
    }

    /// (priority, merged id) of a pair.
    #[inline(always)]
    fn get(&self, l: u32, r: u32) -> Option<(u32, u32)> {
        match self {
            Pairs::Packed { table, bits, sub_bits } => {
                let key = u64::from(l) << bits | u64::from(r);
                let key_mask = (1u64 << (2 * bits)) - 1;
                let slot = table.find(key, |s| s & key_mask == key)?;
                let priority = (slot >> (2 * bits)) as u32;
                Some((priority, priority >> sub_bits))
            }
            Pairs::Wide(table) => {
                let key = u64::from(l) << 32 | u64::from(r);
                let slot = table.find(key, |s| s.key == key)?;
                Some((slot.rank, slot.merged))
            }
        }
    }
}

/// Open addressing with linear probing, with a tag byte per slot (a `hashbrown`-style control
/// byte): a probe reads tags until one matches or is empty, and reads a slot only on a matching
/// tag. Most probes of a never-seen word's merging are of pairs with no merge (~4 of its ~5.4);
/// those read only the tags, 1 byte a slot and so mostly in L2, not the slots out in L3.
struct PairTable<S> {
    /// Per slot: 0 = empty, else 8 bits of its key's hash (1–255); then the first [`GROUP`]
    /// again, so a group read near the end needs no wrap.
    tags: Vec<u8>,
    /// The slots are `slots[base..base + mask + 1]`: `base` puts a large table on a 2 MiB
    /// boundary.
    slots: Vec<S>,
    base: usize,
    mask: usize,
    shift: u32,
}

impl<S: Copy + Default> PairTable<S> {
    fn new(n: usize) -> Self {
        const HUGE_PAGE: usize = 2 << 20;
        // Load ≤ 2/3: short probe runs.
        let cap = (n * 3 / 2).max(16).next_power_of_two();
        let (tags, mask, shift) = (vec![0; cap + GROUP], cap - 1, 64 - cap.trailing_zeros());
        let bytes = cap * size_of::<S>();
        if bytes < HUGE_PAGE {
            return PairTable { tags, slots: vec![S::default(); cap], base: 0, mask, shift };
        }
        // Never-seen words probe this table at random; on 4 KiB pages most probes also miss
        // the TLB. So the table starts on a 2 MiB boundary (≤ 2 MiB of slack before it) and
        // asks for huge pages before its first write (advice: ignored where unsupported).
        let mut slots: Vec<S> = Vec::with_capacity(cap + HUGE_PAGE / size_of::<S>());
        let addr = slots.as_ptr() as usize;
        let base = (addr.next_multiple_of(HUGE_PAGE) - addr) / size_of::<S>();
        #[cfg(target_os = "linux")]
        // SAFETY: `base + cap` ≤ the capacity just reserved, so the range is inside this
        // allocation; MADV_HUGEPAGE changes no contents.
        unsafe {
            libc::madvise(slots.as_mut_ptr().add(base).cast(), bytes, libc::MADV_HUGEPAGE);
        }
        slots.resize(base + cap, S::default());
        PairTable { tags, slots, base, mask, shift }
    }

    /// The key's home slot (the hash's top bits) and tag (the 8 bits below them, 0 taken as 1).
    #[inline]
    fn hash(&self, key: u64) -> (usize, u8) {
        let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> self.shift) as usize, ((h >> (self.shift - 8)) as u8).max(1))
    }

    /// Puts `slot` in the slot of `key` (`is_key`), replacing an earlier one, else in the first
    /// empty slot of its run.
    fn insert(&mut self, key: u64, slot: S, is_key: impl Fn(S) -> bool) {
        let (mut i, tag) = self.hash(key);
        while self.tags[i] != 0 && !(self.tags[i] == tag && is_key(self.slots[self.base + i])) {
            i = (i + 1) & self.mask;
        }
        self.tags[i] = tag;
        if i < GROUP {
            // The copy a group read past the end sees.
            self.tags[self.mask + 1 + i] = tag;
        }
        self.slots[self.base + i] = slot;
    }

    /// Reads the tags 8 at a time (as one u64: which bytes equal the tag, which are empty), so
    /// a probe costs one load and no branch per tag: the usual miss (a pair without a merge)
    /// ends at its first group.
    #[inline(always)]
    fn find(&self, key: u64, is_key: impl Fn(S) -> bool) -> Option<S> {
        const LOW: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // Bytes that are zero, exact up to and including the lowest one (a borrow only
        // marks bytes above a zero byte).
        let zeros = |x: u64| x.wrapping_sub(LOW) & !x & HIGH;
        let (mut i, tag) = self.hash(key);
        loop {
            let group = u64::from_le_bytes(self.tags[i..i + GROUP].try_into().expect("GROUP bytes"));
            let empty = zeros(group);
            // The run ends at the first empty tag: only matches below it count.
            let before = if empty == 0 { u64::MAX } else { (empty & empty.wrapping_neg()) - 1 };
            let mut hits = zeros(group ^ LOW * u64::from(tag)) & before;
            while hits != 0 {
                let s = self.slots[self.base + ((i + hits.trailing_zeros() as usize / 8) & self.mask)];
                if is_key(s) {
                    return Some(s);
                }
                hits &= hits - 1;
            }
            if empty != 0 {
                return None;
            }
            i = (i + GROUP) & self.mask;
        }
    }
}

/// Tags read at once by [`PairTable::find`].
const GROUP: usize = 8;

/// Numbers each loaded model, so a thread's word cache is only used for the model that filled it.
static MODELS: AtomicU64 = AtomicU64::new(0);

/// Per thread: the model's number and its merged words. Per thread, so no lock is taken per
/// word; not prefilled, so nothing is built lazily that the first request waits for: a miss
/// costs only the merge it would have cost anyway.
struct WordCache {
    model: u64,
    slots: Box<[WordSlot]>,
}

thread_local! {
    static WORDS: RefCell<WordCache> = RefCell::new(WordCache { model: u64::MAX, slots: Box::new([]) });
}

/// `tokenizer.json` parsed once: `model.vocab` and `model.merges` typed (keys borrowed from the
/// text unless they hold escapes), everything else as JSON for the proofs.
pub struct TokenizerFile<'a> {
    /// The whole file except `model.vocab` and `model.merges`.
    pub rest: serde_json::Value,
    /// `model.vocab` in file order; `None` if absent.
    pub vocab: Option<Vec<(Cow<'a, str>, u32)>>,
    /// `model.merges` in rank order, either form (`"a b"` strings, `#version` lines dropped as HF
    /// does, or `[a, b]` pairs); `None` if absent.
    pub merges: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

impl<'a> TokenizerFile<'a> {
    pub fn parse(json: &'a str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("tokenizer.json: {e}"))
    }
}

/// A JSON string, borrowed when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for TokenizerFile<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectVisitor { model: false })
    }
}

/// The top-level object (`model: false`) or the model object (`model: true`): the big parts typed,
/// the rest as JSON values.
struct ObjectVisitor {
    model: bool,
}

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = TokenizerFile<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut out = TokenizerFile { rest: serde_json::Value::Null, vocab: None, merges: None };
        let mut rest = serde_json::Map::new();
        let twice = |k: &str| de::Error::custom(format!("`{k}` twice"));
        while let Some(Text(key)) = m.next_key::<Text<'de>>()? {
            match (self.model, key.as_ref()) {
                (false, "model") => {
                    if rest.contains_key("model") {
                        return Err(twice("model"));
                    }
                    let model = m.next_value_seed(ModelSeed)?;
                    rest.insert("model".into(), model.rest);
                    (out.vocab, out.merges) = (model.vocab, model.merges);
                }
                (true, "vocab") if out.vocab.is_some() => return Err(twice("vocab")),
                (true, "vocab") => out.vocab = Some(m.next_value::<Vocab<'de>>()?.0),
                (true, "merges") if out.merges.is_some() => return Err(twice("merges")),
                (true, "merges") => out.merges = Some(m.next_value::<Merges<'de>>()?.0),
                (_, k) => {
                    let v: serde_json::Value = m.next_value()?;
                    rest.insert(k.to_string(), v);
                }
            }
        }
        out.rest = serde_json::Value::Object(rest);
        Ok(out)
    }
}

struct ModelSeed;

impl<'de> de::DeserializeSeed<'de> for ModelSeed {
    type Value = TokenizerFile<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(ObjectVisitor { model: true })
    }
}

struct Vocab<'a>(Vec<(Cow<'a, str>, u32)>);

impl<'de> Deserialize<'de> for Vocab<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vocab<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of token to id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Vocab<'de>, A::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(0));
                while let Some((Text(k), id)) = m.next_entry::<Text<'de>, u32>()? {
                    v.push((k, id));
                }
                Ok(Vocab(v))
            }
        }
        d.deserialize_map(V)
    }
}

struct Merges<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

/// One entry of `merges`: HF reads the list as all pairs, else all `"a b"` lines.
enum Merge<'a> {
    Pair(Cow<'a, str>, Cow<'a, str>),
    Line(Cow<'a, str>, Cow<'a, str>),
    /// A `#version` line, which HF drops (legacy form only).
    Version,
}

impl<'de> Deserialize<'de> for Merge<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn line<'a, E: de::Error>(s: Cow<'a, str>) -> Result<Merge<'a>, E> {
            if s.starts_with("#version") {
                return Ok(Merge::Version);
            }
            // HF: `line.split(' ')` must give exactly two parts.
            let bad = || E::custom(format!("merge {s:?} is not two parts"));
            let (a, b) = s.split_once(' ').filter(|(_, b)| !b.contains(' ')).ok_or_else(bad)?;
            Ok(match s {
                Cow::Borrowed(s) => {
                    let (a, b) = (&s[..a.len()], &s[a.len() + 1..]);
                    Merge::Line(Cow::Borrowed(a), Cow::Borrowed(b))
                }
                Cow::Owned(_) => Merge::Line(Cow::Owned(a.to_owned()), Cow::Owned(b.to_owned())),
            })
        }
        impl<'de> Visitor<'de> for V {
            type Value = Merge<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: \"a b\" or [a, b]")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Merge<'de>, E> {
                line(Cow::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Merge<'de>, E> {
                line(Cow::Owned(s.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Merge<'de>, A::Error> {
                let missing = || de::Error::custom("a merge pair has fewer than two parts");
                let Text(a) = s.next_element()?.ok_or_else(missing)?;
                let Text(b) = s.next_element()?.ok_or_else(missing)?;
                if s.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("a merge pair has more than two parts"));
                }
                Ok(Merge::Pair(a, b))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Merges<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Merges<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of merges")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Merges<'de>, A::Error> {
                let mut out = Vec::with_capacity(s.size_hint().unwrap_or(0));
                let (mut pairs, mut lines) = (false, false);
                while let Some(m) = s.next_element::<Merge<'de>>()? {
                    match m {
                        Merge::Pair(a, b) => {
                            pairs = true;
                            out.push((a, b));
                        }
                        Merge::Line(a, b) => {
                            lines = true;
                            out.push((a, b));
                        }
                        Merge::Version => lines = true,
                    }
                }
                if pairs && lines {
                    return Err(de::Error::custom("merges mix pairs and strings"));
                }
                Ok(Merges(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// GPT-2's byte-level alphabet: the char HF's `ByteLevel` pre-tokenizer writes for each byte
/// (printable Latin-1 bytes as themselves, the other 68 as U+0100 on, in byte order).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("below U+0144")
}

/// The inverse of [`byte_char`] for every char, `None` outside the alphabet.
struct ByteAlphabet([u8; 324], [bool; 324]);

impl ByteAlphabet {
    fn new() -> Self {
        let mut a = ByteAlphabet([0; 324], [false; 324]);
        for b in 0..=255u8 {
            let c = byte_char(b) as usize;
            a.0[c] = b;
            a.1[c] = true;
        }
        a
    }

    /// Appends the raw bytes a byte-level string stands for; false if a char is outside it.
    fn decode(&self, s: &str, out: &mut Vec<u8>) -> bool {
        for c in s.chars() {
            let c = c as usize;
            if c >= 324 || !self.1[c] {
                return false;
            }
            out.push(self.0[c]);
        }
        true
    }
}

/// A model with this thread's word cache (see [`Bpe::with_cache`]).
pub struct Words<'a> {
    bpe: &'a Bpe,
    slots: &'a mut [WordSlot],
}

impl Words<'_> {
    pub fn encode(&mut self, word: &[u8], out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        // One hash for both the vocabulary and the cache slot.
        let hash = FxBuildHasher.hash_one(word);
        if self.bpe.token_word_hashed(word, hash, out) {
            return;
        }
        if word.len() > CACHED_BYTES {
            return self.bpe.merge(word, out);
        }
        let slot = &mut self.slots[hash as usize & (WORD_SLOTS - 1)];
        if usize::from(slot.len) == word.len() && slot.bytes[..word.len()] == *word {
            out.extend_from_slice(&slot.ids[..usize::from(slot.n_ids)]);
            return;
        }
        let start = out.len();
        self.bpe.merge(word, out);
        let ids = &out[start..];
        if ids.len() <= CACHED_IDS {
            slot.len = word.len() as u8;
            slot.n_ids = ids.len() as u8;
            slot.bytes[..word.len()].copy_from_slice(word);
            slot.ids[..ids.len()].copy_from_slice(ids);
        }
    }
}

/// A token in the vocabulary table: its first 8 bytes ([`head`]) and length beside its id, so
/// finding a word of up to 8 bytes (most of them) compares integers in the table's own slot:
/// no trip through `spans` to `arena` and no `memcmp` call, which were most of ordinary
/// text's time.
#[derive(Clone, Copy)]
struct VocabEntry {
    head: u64,
    len: u32,
    id: u32,
}

/// The first 8 bytes of `b` as a little-endian u64, zero-padded; without a loop or a call.
#[inline]
fn head(b: &[u8]) -> u64 {
    let n = b.len();
    match n {
        8.. => u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        // Two overlapping 4-byte reads: the overlap holds the same bytes in both.
        4..=7 => {
            let (lo, hi) = (u32::from_le_bytes(b[..4].try_into().expect("4 bytes")), u32::from_le_bytes(b[n - 4..].try_into().expect("4 bytes")));
            u64::from(lo) | u64::from(hi) << (8 * (n - 4))
        }
        1..=3 => u64::from(b[0]) | u64::from(b[n / 2]) << (8 * (n / 2)) | u64::from(b[n - 1]) << (8 * (n - 1)),
        0 => 0,
    }
}

/// A byte-level BPE model, keyed by raw bytes.
pub struct Bpe {
    /// Every token's bytes, concatenated.
    arena: Vec<u8>,
    /// Per id: (start, length) in `arena`; length 0 = no token has this id.
    spans: Vec<(u32, u32)>,
    /// The vocabulary: ids, found by their bytes.
    table: HashTable<VocabEntry>,
    /// (left id, right id) → (priority, merged id).
    merges: Pairs,
    /// The token of each single byte.
    byte_ids: [u32; 256],
    /// `merges` for the pairs of two single-byte tokens, indexed by the two bytes (every word's
    /// first pairs; 512 KiB, against a probe of the large map each); `u64::MAX`: no merge.
    byte_pairs: Box<[u64]>,
    /// Per id, one bit: BPE of the token's own bytes gives the token itself, so a pre-token
    /// equal to it needs no merging (computed at load with this BPE).
    whole: Vec<u64>,
    /// HF's `ignore_merges`: a pre-token that is in the vocabulary is that token.
    ignore_merges: bool,
    alphabet: ByteAlphabet,
    /// This model's number for the word caches.
    serial: u64,
}

impl Bpe {
    /// The model of a file whose vocabulary and merges are of the form this encoder is proven on
    /// (byte-level keys, each merge's parts and result in the vocabulary, every byte a token, no
    /// key twice); else why not. Dropout, unknown token, affixes and byte fallback are the
    /// caller's proof (`tokenize::fast_support`).
    pub fn load(file: &TokenizerFile<'_>, ignore_merges: bool) -> Result<Bpe, String> {
        let vocab = file.vocab.as_ref().ok_or("model has no vocab")?;
        let merge_list = file.merges.as_ref().ok_or("model has no merges")?;
        let top = vocab.iter().map(|(_, id)| *id).max().unwrap_or(0);
        if top >= MAX_ID {
            return Err(format!("vocab id {top} is beyond {MAX_ID}"));
        }
        let mut bpe = Bpe {
            arena: Vec::with_capacity(vocab.len() * 8),
            spans: vec![(0, 0); top as usize + 1],
            table: HashTable::with_capacity(vocab.len()),
            merges: Pairs::Wide(PairTable::new(0)),
            byte_ids: [u32::MAX; 256],
            byte_pairs: vec![u64::MAX; 1 << 16].into_boxed_slice(),
            whole: Vec::new(),
            ignore_merges,
            alphabet: ByteAlphabet::new(),
            serial: MODELS.fetch_add(1, Ordering::Relaxed),
        };
        for (key, id) in vocab {
            let start = bpe.arena.len();
            if !bpe.alphabet.decode(key, &mut bpe.arena) || start == bpe.arena.len() {
                return Err(format!("vocab key {key:?} is not a byte-level string"));
            }
            if bpe.spans[*id as usize].1 != 0 {
                return Err(format!("vocab id {id} is given twice"));
            }
            bpe.spans[*id as usize] = (start as u32, (bpe.arena.len() - start) as u32);
            let (arena, spans) = (&bpe.arena, &bpe.spans);
            let bytes = &arena[start..];
            let hash = FxBuildHasher.hash_one(bytes);
            let tok = |i: u32| &arena[spans[i as usize].0 as usize..][..spans[i as usize].1 as usize];
            match bpe.table.entry(hash, |e| tok(e.id) == bytes, |e| FxBuildHasher.hash_one(tok(e.id))) {
                hashbrown::hash_table::Entry::Occupied(_) => return Err(format!("vocab key {key:?} is listed twice")),
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(VocabEntry { head: head(bytes), len: bytes.len() as u32, id: *id });
                }
            }
        }
        for b in 0..=255u8 {
            bpe.byte_ids[b as usize] = bpe.find(&[b]).ok_or(format!("byte {b:#04x} has no token"))?;
        }
        let mut buf = Vec::new();
        let mut id_of = |s: &str| bpe.find_text_in(s, &mut buf);
        let mut merges = Vec::with_capacity(merge_list.len());
        for (a, b) in merge_list {
            let missing = || format!("merge {a:?} {b:?}: a part or the result is not in the vocab");
            let (l, r) = (id_of(a).ok_or_else(missing)?, id_of(b).ok_or_else(missing)?);
            merges.push((l, r, id_of(&format!("{a}{b}")).ok_or_else(missing)?));
        }
        bpe.merges = Pairs::new(&merges, top);
        for pair in 0..1 << 16 {
            let (l, r) = (bpe.byte_ids[pair >> 8], bpe.byte_ids[pair & 0xFF]);
            if let Some((priority, merged)) = bpe.merges.get(l, r) {
                bpe.byte_pairs[pair] = u64::from(priority) << 32 | u64::from(merged);
            }
        }
        if !ignore_merges {
            bpe.whole = vec![0; (top as usize + 1).div_ceil(64)];
            let mut out = Vec::new();
            for id in 0..=top {
                let (start, len) = bpe.spans[id as usize];
                if len == 0 {
                    continue;
                }
                out.clear();
                bpe.merge(&bpe.arena[start as usize..][..len as usize], &mut out);
                if out == [id] {
                    bpe.whole[id as usize / 64] |= 1 << (id % 64);
                }
            }
        }
        Ok(bpe)
    }

    /// The id of the token with exactly these bytes.
    pub fn find(&self, bytes: &[u8]) -> Option<u32> {
        self.find_hashed(bytes, FxBuildHasher.hash_one(bytes))
    }

    #[inline]
    fn find_hashed(&self, bytes: &[u8], hash: u64) -> Option<u32> {
        let (head, len) = (head(bytes), bytes.len());
        let found = self.table.find(hash, |e| e.head == head && e.len as usize == len && (len <= 8 || self.token(e.id)[8..] == bytes[8..]));
        found.map(|e| e.id)
    }

    /// The id of a vocabulary key as the file writes it (byte-level chars).
    pub fn find_text(&self, key: &str) -> Option<u32> {
        self.find_text_in(key, &mut Vec::with_capacity(key.len()))
    }

    /// [`Self::find_text`] decoding into `buf` (cleared first), for callers looking up many keys.
    fn find_text_in(&self, key: &str, buf: &mut Vec<u8>) -> Option<u32> {
        buf.clear();
        self.alphabet.decode(key, buf).then(|| self.find(buf)).flatten()
    }

    fn token(&self, id: u32) -> &[u8] {
        let (start, len) = self.spans[id as usize];
        &self.arena[start as usize..][..len as usize]
    }

    /// Appends the ids of one pre-token (raw bytes, before the byte-level mapping) as HF's BPE
    /// model tokenizes its byte-level string. No word cache (see [`Self::with_cache`]).
    pub fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        if !self.token_word(word, out) {
            self.merge(word, out);
        }
    }

    /// A word that is one token by HF's rules (in the vocabulary and either `ignore_merges` or
    /// merging to itself): pushes it and returns true.
    #[inline]
    fn token_word(&self, word: &[u8], out: &mut Vec<u32>) -> bool {
        word.is_empty() || self.token_word_hashed(word, FxBuildHasher.hash_one(word), out)
    }

    /// [`Self::token_word`] of a non-empty word with its hash.
    #[inline]
    fn token_word_hashed(&self, word: &[u8], hash: u64, out: &mut Vec<u32>) -> bool {
        match self.find_hashed(word, hash) {
            Some(id) if self.ignore_merges || self.whole[id as usize / 64] >> (id % 64) & 1 == 1 => {
                out.push(id);
                true
            }
            _ => false,
        }
    }

    /// Runs `f` with this thread's word cache for this model: [`Words::encode`] is
    /// [`Self::encode_word`], remembering merged words.
    pub fn with_cache<R>(&self, f: impl FnOnce(&mut Words<'_>) -> R) -> R {
        WORDS.with(|cell| {
            let mut cache = cell.borrow_mut();
            if cache.model != self.serial {
                if cache.slots.is_empty() {
                    cache.slots = vec![EMPTY_SLOT; WORD_SLOTS].into_boxed_slice();
                } else {
                    cache.slots.fill(EMPTY_SLOT);
                }
                cache.model = self.serial;
            }
            f(&mut Words { bpe: self, slots: &mut cache.slots })
        })
    }

    /// (priority, merged id) of a pair of single bytes' tokens.
    #[inline]
    fn byte_pair(&self, l: u8, r: u8) -> Option<(u32, u32)> {
        let v = self.byte_pairs[usize::from(l) << 8 | usize::from(r)];
        (v != u64::MAX).then_some(((v >> 32) as u32, v as u32))
    }

    /// (priority, merged id) of a pair.
    #[inline]
    fn pair(&self, l: u32, r: u32) -> Option<(u32, u32)> {
        self.merges.get(l, r)
    }

    /// HF's `merge_all` without dropout: repeatedly merge the adjacent pair of lowest rank,
    /// the leftmost of equal ones, until no pair has a merge.
    fn merge(&self, word: &[u8], out: &mut Vec<u32>) {
        match word.len() {
            // Most pre-tokens are short: a small array is cheaper to set up per word.
            0..=16 => self.merge_short::<16>(word, out),
            17..=SHORT_WORD => self.merge_short::<SHORT_WORD>(word, out),
            _ => self.merge_long(word, out),
        }
    }

    /// [`Self::merge`] of a word of at most `N` bytes, in an array on the stack.
    fn merge_short<const N: usize>(&self, word: &[u8], out: &mut Vec<u32>) {
        /// A symbol and the pair it starts: its rank (u32::MAX: none, or no next symbol) and
        /// merged id. One array, so a merge removes a symbol with one move.
        #[derive(Clone, Copy)]
        struct Sym {
            id: u32,
            rank: u32,
            merged: u32,
        }
        let mut syms = [Sym { id: 0, rank: u32::MAX, merged: 0 }; N];
        for (s, &b) in syms.iter_mut().zip(word) {
            s.id = self.byte_ids[b as usize];
        }
        for i in 0..word.len() - 1 {
            if let Some((r, m)) = self.byte_pair(word[i], word[i + 1]) {
                (syms[i].rank, syms[i].merged) = (r, m);
            }
        }
        let mut n = word.len();
        while n > 1 {
            let mut best = 0;
            for i in 1..n - 1 {
                if syms[i].rank < syms[best].rank {
                    best = i;
                }
            }
            if syms[best].rank == u32::MAX {
                break;
            }
            syms[best].id = syms[best].merged;
            syms.copy_within(best + 2..n, best + 1);
            n -= 1;
            for i in best.saturating_sub(1)..=best {
                let pair = if i + 1 < n { self.pair(syms[i].id, syms[i + 1].id) } else { None };
                (syms[i].rank, syms[i].merged) = pair.unwrap_or((u32::MAX, 0));
            }
        }
        out.extend(syms[..n].iter().map(|s| s.id));
    }

    /// [`Self::merge`] for long words: HF's heap of candidate merges over a linked list of
    /// symbols, entries checked for staleness when popped.
    fn merge_long(&self, word: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        struct Sym {
            id: u32,
            prev: usize,
            next: usize,
            gone: bool,
        }
        let n = word.len();
        let mut syms: Vec<Sym> = word
            .iter()
            .enumerate()
            .map(|(i, &b)| Sym { id: self.byte_ids[b as usize], prev: i.wrapping_sub(1), next: if i + 1 < n { i + 1 } else { NONE }, gone: false })
            .collect();
        // Min-heap on (rank, position of the left symbol); the merged id checks staleness.
        let mut heap: BinaryHeap<std::cmp::Reverse<(u32, usize, u32)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some((r, m)) = self.byte_pair(word[i], word[i + 1]) {
                heap.push(std::cmp::Reverse((r, i, m)));
            }
        }
        while let Some(std::cmp::Reverse((_, pos, new_id))) = heap.pop() {
            let next = syms[pos].next;
            if syms[pos].gone || next == NONE || self.pair(syms[pos].id, syms[next].id).map(|p| p.1) != Some(new_id) {
                continue;
            }
            syms[pos].id = new_id;
            syms[next].gone = true;
            let after = syms[next].next;
            syms[pos].next = after;
            if after != NONE {
                syms[after].prev = pos;
            }
            let prev = syms[pos].prev;
            if prev != NONE {
                if let Some((r, m)) = self.pair(syms[prev].id, new_id) {
                    heap.push(std::cmp::Reverse((r, prev, m)));
                }
            }
            if after != NONE {
                if let Some((r, m)) = self.pair(new_id, syms[after].id) {
                    heap.push(std::cmp::Reverse((r, pos, m)));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(syms[i].id);
            i = syms[i].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `tokenizer.json` model of the 256 bytes plus `extra` tokens (ids from 256) and `merges`.
    fn file(extra: &[&str], merges: &str) -> String {
        let mut vocab: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        vocab.extend(extra.iter().map(|s| s.to_string()));
        let vocab: serde_json::Map<String, serde_json::Value> = vocab.into_iter().enumerate().map(|(i, k)| (k, i.into())).collect();
        format!(r#"{{"version":"1.0","model":{{"type":"BPE","vocab":{},"merges":{merges}}}}}"#, serde_json::Value::Object(vocab))
    }

    fn load(json: &str) -> Result<Bpe, String> {
        Bpe::load(&TokenizerFile::parse(json)?, false)
    }

    #[test]
    fn a_vocabulary_head_is_the_first_eight_bytes_zero_padded() {
        let bytes: Vec<u8> = (1..=12).collect();
        for n in 0..=12 {
            let want = bytes[..n.min(8)].iter().enumerate().fold(0u64, |h, (i, &b)| h | u64::from(b) << (8 * i));
            assert_eq!(head(&bytes[..n]), want, "{n} bytes");
        }
    }

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        // GPT-2's `bytes_to_unicode`: space → Ġ (U+0120), newline → Ċ (U+010A), 0xAD → U+0143.
        assert_eq!((byte_char(b' '), byte_char(b'\n'), byte_char(0xAD), byte_char(b'a')), ('Ġ', 'Ċ', '\u{143}', 'a'));
        let a = ByteAlphabet::new();
        let mut out = Vec::new();
        assert!(a.decode("ĠaĊ", &mut out) && out == b" a\n");
        assert!(!a.decode("中", &mut out));
    }

    /// Lowest rank first, ties to the leftmost pair; both merge forms read alike; `#version`
    /// lines dropped from the rank count as HF does.
    #[test]
    fn merges_lowest_rank_first_in_both_forms() {
        let extra = ["ab", "bc", "abc", "aa", "aaa"];
        // 256 ab, 257 bc, 258 abc, 259 aa, 260 aaa
        for merges in [r##"["#version: 0.2", "b c", "a b", "a bc", "a a", "aa a"]"##, r#"[["b","c"],["a","b"],["a","bc"],["a","a"],["aa","a"]]"#] {
            let bpe = load(&file(&extra, merges)).unwrap();
            let enc = |w: &str| {
                let mut out = Vec::new();
                bpe.merge(w.as_bytes(), &mut out);
                out
            };
            assert_eq!(enc("abc"), [258], "b c (rank 0) first, then a bc");
            assert_eq!(enc("ab"), [256]);
            assert_eq!(enc("aaaa"), [259, 259], "ties go to the leftmost pair");
            assert_eq!(enc("aaa"), [260], "the leftmost a a, then aa a");
        }
    }

    /// Packed priorities order pairs as their ranks do, also with several pairs giving one
    /// token; a file whose merged ids go down along the ranks is kept wide (packing would
    /// reorder its merges). Both against HF's BPE on random words.
    #[test]
    fn packed_and_wide_pair_tables_merge_as_hf() {
        use rand::{rngs::SmallRng, Rng, SeedableRng};
        use tokenizers::Model;
        let mut rng = SmallRng::seed_from_u64(14);
        // Tokens over "abc", each the join of two earlier ones; a token made again from another
        // pair gets that pair as one more merge.
        let mut tokens: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut merges: Vec<(String, String)> = Vec::new();
        while merges.len() < 400 {
            let pick = |rng: &mut SmallRng| tokens[rng.random_range(0..tokens.len())].clone();
            let pair = (pick(&mut rng), pick(&mut rng));
            if pair.0.len() + pair.1.len() > 8 || merges.contains(&pair) {
                continue;
            }
            let joined = format!("{}{}", pair.0, pair.1);
            if !tokens.contains(&joined) {
                tokens.push(joined);
            }
            merges.push(pair);
        }
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap();
        // Creation order (a token's later pairs come after newer tokens: merged ids go down),
        // and the same merges ordered by merged id (several pairs per id, in creation order).
        let mut by_merged = merges.clone();
        by_merged.sort_by_key(|(a, b)| id(&format!("{a}{b}")));
        for (merges, packed) in [(&merges, false), (&by_merged, true)] {
            let list: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
            let json = file(&tokens[3..].iter().map(String::as_str).collect::<Vec<_>>(), &serde_json::to_string(&list).unwrap());
            let bpe = load(&json).unwrap();
            assert_eq!(matches!(bpe.merges, Pairs::Packed { .. }), packed);
            let model: serde_json::Value = serde_json::from_str(&json).unwrap();
            let hf: tokenizers::models::bpe::BPE = serde_json::from_str(&model["model"].to_string()).unwrap();
            for n in (1..=12).chain([70, 100]) {
                for _ in 0..300 {
                    let word: String = (0..n).map(|_| ['a', 'b', 'c'][rng.random_range(0..3)]).collect();
                    let want: Vec<u32> = hf.tokenize(&word).unwrap().iter().map(|t| t.id).collect();
                    let mut got = Vec::new();
                    bpe.encode_word(word.as_bytes(), &mut got);
                    assert_eq!(got, want, "{word} (packed: {packed})");
                }
            }
        }
    }

    #[test]
    fn unproven_vocabularies_and_merges_are_refused_with_a_reason() {
        let cases = [
            (file(&["中"], "[]"), "not a byte-level string"),
            (file(&["abc"], r#"["ab c"]"#), "not in the vocab"),
            (file(&[], r#"["a b"]"#), "not in the vocab"),
            (file(&["ab"], r#"["a b c"]"#), "not two parts"),
            (file(&["ab"], r#"["a b", ["a", "b"]]"#), "mix pairs and strings"),
            (file(&[], "[]").replace(r#""Ā":0,"#, ""), "has no token"),
            (file(&[], "[]").replace(r#""Ā":0"#, r#""Ā":1"#), "given twice"),
            (file(&[], "[]").replace(r#""Ā":0"#, r#""Ā":0,"Ā":300"#), "listed twice"),
            (r#"{"model":{"type":"BPE","vocab":{}}}"#.to_string(), "no merges"),
        ];
        for (json, why) in cases {
            let err = load(&json).err().unwrap_or_else(|| panic!("accepted: {why}"));
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
