//! Text → token ids, identical to Hugging Face `tokenizers` (which `transformers` wraps), with a
//! segment cache for the multi-turn traffic that resends the same prefix every turn.
//!
//! The tokenizer first cuts the text at added tokens (`<|im_start|>`, `<|eot_id|>`, …) and
//! encodes the pieces between them independently: BPE never merges across those cuts. So each
//! piece's ids can be cached under a hash of its text and reused whenever the same piece
//! reappears, and the concatenation is exactly what encoding the whole text gives.
//!
//! The pieces go to one of three encoders (`DYN_TOKENIZER`): Hugging Face `tokenizers` itself,
//! `fastokens` (a crate), or `epp`, our own byte-level BPE ([`super::bpe`]) after our own
//! pre-tokenizer ([`super::pretokenize`]); the fast two are used only for a `tokenizer.json`
//! whose every ids-relevant part is one we verified against HF ([`fast_support`]).

use std::{
    borrow::Cow,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokenizers::{
    normalizers::{unicode::NFC, NormalizerWrapper},
    Tokenizer,
};
// The normalization tables `tokenizers` itself uses, so "already NFC" agrees with its NFC.
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use super::{
    bpe::{Bpe, TokenizerFile},
    pretokenize::{self, SplitPattern},
};

/// Bytes of overhead charged per cache entry on top of its ids (key, links, allocation).
const ENTRY_OVERHEAD: usize = 64;
/// New text below this is encoded on the calling thread alone; above, the cores help.
const PARALLEL_MIN_BYTES: usize = 8 * 1024;
/// The same for the fast encoder, ~100× cheaper: 1 MiB is ~5 ms of work, below which a hop to
/// other threads buys little latency and costs CPU under load (fastokens itself still spreads a
/// single piece of 64 KiB or more over its own threads).
const FAST_PARALLEL_MIN_BYTES: usize = 1 << 20;
/// Pieces shorter than this skip the segment cache with the fast encoder: hashing, locking and
/// copying cost about as much as encoding them (chat templates cut many such pieces: role
/// names, newlines).
const FAST_CACHE_MIN_BYTES: usize = 256;
/// Encoded once at load so the fast encoder's lazily built tables exist before serving: words,
/// digits, CJK and an NFC-changing piece.
const WARM_UP: &str = "Warm up: the quick brown fox, 12345 jumps; 漢字 e\u{301}\n";
/// `DYN_TOKENIZER`: which encoder to use, Dynamo's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Hugging Face `tokenizers`.
    Default,
    /// `fastokens` when it supports the file, else HF.
    Fastokens,
    /// The EPP's own byte-level BPE when it supports the file, else HF.
    Epp,
    /// The EPP's own encoder when it supports the file, else HF: the only fast encoder that
    /// also loads faster and smaller than HF (fastokens encodes ~2× faster per byte but starts
    /// 3× slower at 3× the memory; figures in docs/tokenizer-backends.md).
    #[default]
    Auto,
}

impl BackendChoice {
    pub const NAMES: [&'static str; 4] = ["default", "fastokens", "epp", "auto"];

    pub fn parse(name: &str) -> Option<Self> {
        [BackendChoice::Default, BackendChoice::Fastokens, BackendChoice::Epp, BackendChoice::Auto].into_iter().find(|c| c.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Default => "default",
            BackendChoice::Fastokens => "fastokens",
            BackendChoice::Epp => "epp",
            BackendChoice::Auto => "auto",
        }
    }
}

/// The encoder actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Hf,
    Fastokens,
    Epp,
}

impl Backend {
    /// The `DYN_TOKENIZER` value that names it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Hf => "default",
            Backend::Fastokens => "fastokens",
            Backend::Epp => "epp",
        }
    }
}

/// What start-up chose and why (logged, in `/metrics` and the Config RPC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub requested: BackendChoice,
    pub backend: Backend,
    pub reason: String,
}

/// One cut of the text: an added token, a text piece's ids from the cache, or a text piece to
/// encode (with its cache key).
enum Piece<'t> {
    Added(u32),
    Cached(Arc<[u32]>),
    New(&'t str, Option<u128>),
}

/// The `tokenizers` library refused a text (rare: e.g. an unknown token without `unk`).
#[derive(Clone, Debug, thiserror::Error)]
#[error("tokenizer failed: {0}")]
pub struct EncodeError(pub String);

/// The encoder of the pieces between added tokens.
#[allow(clippy::large_enum_variant)] // one per process: boxing would buy nothing
enum Encoder {
    Hf {
        /// The file's tokenizer minus an NFC normalizer, which we apply ourselves to the pieces
        /// that need it (most text is NFC already): the library's NFC costs a copy and per-byte
        /// alignments.
        tok: Tokenizer,
        /// The tokenizer exactly as the file defines it, built on first need only (a piece
        /// whose added tokens change under normalization, and the benches' baseline): a second
        /// copy of the vocabulary and merges costs tens of MiB.
        library: OnceLock<Tokenizer>,
    },
    /// No HF tokenizer is loaded beside it: everything HF would tell us (added tokens, frame,
    /// vocabulary bound) is read from the file's verified form.
    Fast(fastokens::Tokenizer),
    /// Our own: the file's split regex, then byte-level BPE per pre-token. Like `Fast`, alone.
    Epp { split: SplitPattern, bpe: Bpe },
}

/// A tokenizer plus the segment cache.
pub struct TextTokenizer {
    encoder: Encoder,
    /// Whether the file's normalizer is NFC (taken out of HF's `tok`).
    nfc: bool,
    /// Leftmost-longest matcher over the added tokens, as `tokenizers` matches them; `None`
    /// when some added token has matching rules (strip, single-word, normalized) that make
    /// cutting outside the library unsafe: then text is encoded whole, uncached.
    splitter: Option<(AhoCorasick, Vec<u32>)>,
    /// Ids the post-processor puts before and after a single sequence (`add_special_tokens`).
    frame: Option<(Vec<u32>, Vec<u32>)>,
    cache: Option<SegmentCache>,
    /// Computed once: the library builds the whole vocabulary map to answer it.
    vocab_end: u32,
    selection: Selection,
}

impl TextTokenizer {
    /// HF `tokenizers` only. `cache_bytes` = 0 disables the segment cache.
    pub fn new(mut tok: Tokenizer, cache_bytes: usize) -> Self {
        // transformers encodes without the file's truncation/padding unless asked.
        let _ = tok.with_truncation(None);
        tok.with_padding(None);
        let splitter = splitter_for(&tok);
        let frame = frame_of(&tok);
        let cache = (cache_bytes > 0).then(|| SegmentCache::new(cache_bytes));
        let nfc = matches!(tok.get_normalizer(), Some(NormalizerWrapper::NFC(_)));
        if nfc {
            tok.with_normalizer(None::<NormalizerWrapper>);
        }
        let selection = Selection { requested: BackendChoice::Default, backend: Backend::Hf, reason: "DYN_TOKENIZER=default".into() };
        let vocab_end = tok.get_vocab(true).into_values().max().map_or(0, |m| m + 1);
        TextTokenizer { encoder: Encoder::Hf { tok, library: OnceLock::new() }, nfc, splitter, frame, cache, vocab_end, selection }
    }

    /// From a `tokenizer.json` file, with the encoder `choice` asks for if it can prove support
    /// for the file, else HF. A fast encoder's lazily built tables are built here, so the first
    /// request is as fast as later ones.
    pub fn load(path: &Path, cache_bytes: usize, choice: BackendChoice) -> Result<Self, String> {
        let read = || std::fs::read_to_string(path).map_err(|e| e.to_string());
        match choice {
            BackendChoice::Default => return Self::hf(&read()?, cache_bytes, choice, "DYN_TOKENIZER=default".into()),
            BackendChoice::Epp | BackendChoice::Auto => {
                let json = read()?;
                let why = "tokenizer.json verified: normalizer, pre-tokenizer, byte-level BPE vocabulary and merges, added tokens, post-processor frame";
                let reason = if choice == BackendChoice::Auto { format!("auto = epp: fast to encode, quickest to load, smallest; {why}") } else { why.to_string() };
                let why = match Self::epp(&json, cache_bytes, Selection { requested: choice, backend: Backend::Epp, reason }) {
                    Ok(t) => return Ok(t),
                    Err(why) => format!("epp not proven exact here: {why}"),
                };
                return Self::hf(&json, cache_bytes, choice, why);
            }
            BackendChoice::Fastokens => {}
        }
        // fastokens parses the file straight into its own types (its load from a parsed
        // `serde_json::Value` costs that parse plus a third more), on its own thread while this
        // one reads and proves the file: start-up is its load, not the sum. Not scoped: if the
        // proof fails, HF loads without waiting for it.
        let owned = path.to_path_buf();
        let loading = std::thread::spawn(move || fastokens::Tokenizer::from_file(&owned));
        let json = read()?;
        let reason = "tokenizer.json verified: normalizer, pre-tokenizer, BPE model, added tokens, post-processor frame".to_string();
        let why = match Self::fast(&json, loading, cache_bytes, Selection { requested: choice, backend: Backend::Fastokens, reason }) {
            Ok(t) => {
                // fastokens read the file itself: it must be the text that was proven.
                if read()? != json {
                    return Err("tokenizer.json changed while it was loaded".into());
                }
                return Ok(t);
            }
            Err(why) => format!("fastokens not proven exact here: {why}"),
        };
        Self::hf(&json, cache_bytes, choice, why)
    }

    fn hf(json: &str, cache_bytes: usize, requested: BackendChoice, reason: String) -> Result<Self, String> {
        let mut t = TextTokenizer::new(json.parse::<Tokenizer>().map_err(|e| e.to_string())?, cache_bytes);
        t.selection = Selection { requested, backend: Backend::Hf, reason };
        Ok(t)
    }

    /// Our own BPE alone, if the file is of a verified form ([`fast_support`], [`Bpe::load`]).
    /// Everything it needs is built here: nothing is left for the first request.
    fn epp(json: &str, cache_bytes: usize, selection: Selection) -> Result<Self, String> {
        let file = TokenizerFile::parse(json)?;
        let form = fast_support(&file)?;
        let bpe = Bpe::load(&file, form.ignore_merges)?;
        let form = form.with_added(&file, &|t| bpe.find_text(t))?;
        Self::proven(Encoder::Epp { split: form.split, bpe }, form, cache_bytes, selection)
    }

    /// The wrapper around a fast encoder of a proven file: our added-token cut, frame, cache.
    fn proven(encoder: Encoder, form: FastForm, cache_bytes: usize, selection: Selection) -> Result<Self, String> {
        let FastForm { added, frame, vocab_end, nfc, .. } = form;
        let splitter = if added.is_empty() {
            AhoCorasick::new(Vec::<String>::new())
        } else {
            AhoCorasickBuilder::new().match_kind(MatchKind::LeftmostLongest).build(added.iter().map(|(t, _)| t))
        }
        .map_err(|e| e.to_string())?;
        Ok(TextTokenizer {
            encoder,
            nfc,
            splitter: Some((splitter, added.into_iter().map(|(_, id)| id).collect())),
            frame: Some(frame),
            cache: (cache_bytes > 0).then(|| SegmentCache::new(cache_bytes)),
            vocab_end,
            selection,
        })
    }

    /// fastokens alone (being loaded by `loading`), if the file is of a verified form
    /// ([`fast_support`]), with its word table built (~100 ms, once for all threads).
    fn fast(json: &str, loading: std::thread::JoinHandle<Result<fastokens::Tokenizer, fastokens::Error>>, cache_bytes: usize, selection: Selection) -> Result<Self, String> {
        let file = TokenizerFile::parse(json)?;
        let form = fast_support(&file)?;
        let vocab = file.vocab.as_deref().ok_or("model has no vocab")?;
        let mut ids: FxHashMap<&str, u32> = FxHashMap::with_capacity_and_hasher(vocab.len(), Default::default());
        for (k, id) in vocab {
            if ids.insert(k, *id).is_some() {
                return Err(format!("vocab key {k:?} is listed twice"));
            }
        }
        let form = form.with_added(&file, &|t| ids.get(t).copied())?;
        drop(ids);
        drop(file);
        let mut fast = loading.join().map_err(|_| "fastokens panicked loading".to_string())?.map_err(|e| format!("fastokens cannot load it: {e}"))?;
        fast.set_truncation(None);
        fast.set_padding(None);
        // Every piece is normalized by `nfc_like_hf` first (HF's NFC, idempotent): fastokens'
        // own NFC would only scan it again (~10 % of an encode of non-ASCII NFC text).
        fast.set_normalizer(None);
        // Built on a thread that then ends, so no long-lived thread keeps a copy it never uses.
        std::thread::scope(|s| s.spawn(|| fast.encode_ordinary(WARM_UP).map(drop)).join())
            .map_err(|_| "fastokens panicked warming up".to_string())?
            .map_err(|e| e.to_string())?;
        Self::proven(Encoder::Fast(fast), form, cache_bytes, selection)
    }

    /// Gives the calling thread its copy of the fast encoder's word table (7–18 ms, ~16 MiB;
    /// its first encode would otherwise pay it). Nothing to do for HF.
    pub fn warm_thread(&self) {
        if let Encoder::Fast(f) = &self.encoder {
            let _ = f.encode_ordinary(WARM_UP);
        }
    }

    /// One past the highest id of the vocabulary and the added tokens: ids from here on name
    /// nothing the model knows.
    pub fn vocab_end(&self) -> u32 {
        self.vocab_end
    }

    /// Which encoder is in use, and why.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The library's tokenizer exactly as the file defines it; `None` with the fast backend,
    /// which loads no HF tokenizer.
    pub fn inner(&self) -> Option<&Tokenizer> {
        let Encoder::Hf { tok, library } = &self.encoder else { return None };
        if !self.nfc {
            return Some(tok);
        }
        Some(library.get_or_init(|| {
            let mut t = tok.clone();
            t.with_normalizer(Some(NFC));
            t
        }))
    }

    /// Encodes `text` (with the post-processor's special tokens if `add_special_tokens`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EncodeError> {
        self.encode_with(text, add_special_tokens, self.cache.as_ref())
    }

    /// The same ids without consulting or filling the cache (benches and the parity proof).
    pub fn encode_uncached(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EncodeError> {
        self.encode_with(text, add_special_tokens, None)
    }

    fn encode_with<'t>(&self, text: &'t str, add_special: bool, cache: Option<&SegmentCache>) -> Result<Vec<u32>, EncodeError> {
        let (Some((matcher, added)), Some((pre, post))) = (&self.splitter, &self.frame) else {
            return self.whole(text, add_special);
        };
        let fast = !matches!(self.encoder, Encoder::Hf { .. });
        // Cut at added tokens, as the library does; take each text piece from the cache or
        // mark it for encoding.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut at = 0;
        let piece = |s: &'t str, pieces: &mut Vec<Piece<'t>>| {
            if s.is_empty() {
                return;
            }
            let key = cache.filter(|_| !fast || s.len() >= FAST_CACHE_MIN_BYTES).map(|_| xxhash_rust::xxh3::xxh3_128(s.as_bytes()));
            pieces.push(match cache.zip(key).and_then(|(c, key)| c.get(key, s.len())) {
                Some(ids) => Piece::Cached(ids),
                None => Piece::New(s, key),
            });
        };
        for m in matcher.find_iter(text) {
            piece(&text[at..m.start()], &mut pieces);
            pieces.push(Piece::Added(added[m.pattern().as_usize()]));
            at = m.end();
        }
        piece(&text[at..], &mut pieces);
        let texts: Vec<&str> = pieces.iter().filter_map(|p| if let Piece::New(s, _) = p { Some(*s) } else { None }).collect();
        let mut parallel = self.encode_parallel(&texts)?.into_iter();
        // The new pieces are encoded straight into the answer (no per-piece vector to copy);
        // the cache keeps a copy of each.
        let mut out = Vec::with_capacity(text.len() / 3 + pre.len() + post.len());
        if add_special {
            out.extend_from_slice(pre);
        }
        for p in &pieces {
            match p {
                Piece::Added(id) => out.push(*id),
                Piece::Cached(ids) => out.extend_from_slice(ids),
                Piece::New(s, key) => {
                    let start = out.len();
                    match parallel.next() {
                        Some(ids) => out.extend_from_slice(&ids),
                        None => self.whole_into(s, &mut out)?,
                    }
                    if let Some((c, key)) = cache.zip(*key) {
                        c.put(key, s.len(), out[start..].into());
                    }
                }
            }
        }
        if add_special {
            out.extend_from_slice(post);
        }
        Ok(out)
    }

    /// Encodes independent pieces on rayon's threads when there is much new text, taking pieces
    /// (largest first) from a shared counter while the calling thread takes them too: a plain
    /// `par_iter` would park the caller until the pool's threads are scheduled, which on a busy
    /// machine costs more than it gains. Else nothing: the caller encodes them in order.
    fn encode_parallel(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, EncodeError> {
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        let helpers = rayon::current_num_threads().saturating_sub(1).min(texts.len().saturating_sub(1));
        let min = if matches!(self.encoder, Encoder::Hf { .. }) { PARALLEL_MIN_BYTES } else { FAST_PARALLEL_MIN_BYTES };
        if helpers == 0 || bytes < min {
            return Ok(Vec::new());
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_unstable_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let next = AtomicUsize::new(0);
        let done: Vec<OnceLock<Result<Vec<u32>, EncodeError>>> = texts.iter().map(|_| OnceLock::new()).collect();
        let work = || {
            while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                let _ = done[i].set(self.whole(texts[i], false));
            }
        };
        rayon::in_place_scope(|s| {
            for _ in 0..helpers {
                s.spawn(|_| work());
            }
            work();
        });
        done.into_iter().map(|d| d.into_inner().expect("every piece is taken once")).collect()
    }

    fn whole(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EncodeError> {
        let tok = match &self.encoder {
            Encoder::Fast(fast) => {
                // A piece between added tokens (the fast encoder is only chosen when the cut is
                // exact), in which fastokens matches no added token. Normalized here, not by
                // fastokens (its normalizer is removed at load): it would put the whole rest of
                // a piece after its first non-NFC char through HF's slow Unicode 9.0 NFC
                // (~35 MB/s).
                debug_assert!(!add_special);
                let text = if self.nfc { nfc_like_hf(text) } else { Cow::Borrowed(text) };
                return fast.encode_ordinary(&text).map_err(|e| EncodeError(e.to_string()));
            }
            Encoder::Epp { split, bpe } => {
                // A piece between added tokens, as for `Fast`.
                debug_assert!(!add_special);
                let mut ids = Vec::new();
                self.epp_into(*split, bpe, text, &mut ids);
                return Ok(ids);
            }
            Encoder::Hf { tok, .. } => tok,
        };
        let ids = |tok: &Tokenizer, text: &str| {
            tok.encode_fast(text, add_special).map(|e| e.get_ids().to_vec()).map_err(|e| EncodeError(e.to_string()))
        };
        if !self.nfc || is_nfc_quick(text.chars()) == IsNormalized::Yes {
            return ids(tok, text);
        }
        // Normalized here with the library's own tables but without the per-byte alignments
        // it keeps (most of its NFC cost). Same ids unless an added token is in the text before
        // or after normalizing: the library matches those on the raw text, so leave it to it.
        let nfc: String = text.nfc().map(|(c, _)| c).collect();
        match &self.splitter {
            Some((m, _)) if !m.is_match(text) && !m.is_match(nfc.as_str()) => ids(tok, &nfc),
            _ => ids(self.inner().expect("the HF backend has its library"), text),
        }
    }

    /// [`Self::whole`] of a piece between added tokens, appended to `out` (our own encoder
    /// writes there directly; the libraries make their own vector).
    fn whole_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), EncodeError> {
        match &self.encoder {
            Encoder::Epp { split, bpe } => self.epp_into(*split, bpe, text, out),
            _ => out.extend_from_slice(&self.whole(text, false)?),
        }
        Ok(())
    }

    /// Our own encoder on a piece between added tokens, appended to `out`.
    fn epp_into(&self, split: SplitPattern, bpe: &Bpe, text: &str, out: &mut Vec<u32>) {
        // NFC exactly as HF (idempotent).
        let text = if self.nfc { nfc_like_hf(text) } else { Cow::Borrowed(text) };
        out.reserve(text.len() / 3);
        bpe.with_cache(|words| pretokenize::split(split, &text, |word| words.encode(word.as_bytes(), out)));
    }

    /// The encoder alone on a text taken as one piece: no cut at added tokens, no cache, no
    /// frame (the benches' "called directly" figure for our own encoder).
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, EncodeError> {
        self.whole(text, false)
    }

    /// Empties the segment cache (benches measure cold tokenization with it).
    pub fn clear_cache(&self) {
        if let Some(c) = &self.cache {
            let mut inner = c.inner.lock();
            inner.map.clear();
            inner.bytes = 0;
        }
    }

    /// (entries, bytes charged) of the segment cache.
    pub fn cache_usage(&self) -> (usize, usize) {
        self.cache.as_ref().map(|c| c.usage()).unwrap_or((0, 0))
    }
}

/// NFC exactly as HF `tokenizers` computes it (its Unicode 9.0 tables), at ICU4X's speed over
/// the parts that are already NFC. ICU4X finds the longest normalized prefix (as fastokens
/// does; exact because normalization data only grows between versions); the rest is normalized
/// with HF's tables only up to its next ASCII char, and the search resumes there. Cutting before
/// an ASCII char is exact: it has combining class 0 (no reordering crosses it, and it blocks
/// every composition across it) and is the second half of no composition.
fn nfc_like_hf(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        return Cow::Borrowed(text);
    }
    let icu = icu_normalizer::ComposingNormalizerBorrowed::new_nfc();
    let (head, mut rest) = icu.split_normalized(text);
    if rest.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    out.push_str(head);
    while !rest.is_empty() {
        let end = rest.bytes().skip(1).position(|b| b.is_ascii()).map_or(rest.len(), |p| p + 1);
        out.extend(rest[..end].nfc().map(|(c, _)| c));
        let (done, tail) = icu.split_normalized(&rest[end..]);
        out.push_str(done);
        rest = tail;
    }
    Cow::Owned(out)
}

/// What a verified file tells us without loading HF: the added tokens (content, id) as HF
/// numbers them, the post-processor's frame, one past the highest id, whether the normalizer is
/// NFC, the split pattern and the BPE model's `ignore_merges`.
pub struct FastForm {
    pub added: Vec<(String, u32)>,
    pub frame: (Vec<u32>, Vec<u32>),
    pub vocab_end: u32,
    pub nfc: bool,
    pub split: SplitPattern,
    pub ignore_merges: bool,
}

impl FastForm {
    /// Adds the added tokens, numbered with `vocab` (a vocabulary key → its id), which the
    /// caller builds from the file as its encoder needs.
    pub fn with_added(mut self, file: &TokenizerFile<'_>, vocab: &dyn Fn(&str) -> Option<u32>) -> Result<Self, String> {
        let size = file.vocab.as_ref().map_or(0, Vec::len);
        self.added = added_tokens(&file.rest["added_tokens"], vocab, size, self.nfc)?;
        let top = self.added.iter().map(|(_, id)| id + 1).max().unwrap_or(0);
        self.vocab_end = self.vocab_end.max(top);
        Ok(self)
    }
}

/// `Ok` if every part of the file that decides ids is of a form verified to make a fast
/// encoder, with our cut at added tokens and our post-processor frame, encode exactly as HF
/// does; else why not. Unknown keys fail too, so a newer format is not guessed at. (The decoder
/// does not affect encoding.) The added tokens are checked by [`FastForm::with_added`], which
/// needs the vocabulary in the form the encoder keeps it.
pub fn fast_support(file: &TokenizerFile<'_>) -> Result<FastForm, String> {
    use serde_json::Value;
    let only = |v: &Value, what: &str, keys: &[&str]| -> Result<(), String> {
        let o = v.as_object().ok_or(format!("{what} is not an object"))?;
        match o.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(k) => Err(format!("{what} has `{k}`, not verified")),
            None => Ok(()),
        }
    };
    let is = |v: &Value, key: &str, want: &[Value]| want.contains(v.get(key).unwrap_or(&Value::Null));
    let rest = &file.rest;
    let nfc = match &rest["normalizer"] {
        Value::Null => false,
        n if *n == serde_json::json!({"type": "NFC"}) => true,
        n => return Err(format!("normalizer {} (only none or NFC verified)", n["type"])),
    };
    let pre = &rest["pre_tokenizer"];
    only(pre, "pre_tokenizer", &["type", "pretokenizers"])?;
    let steps = match (pre["type"].as_str(), pre["pretokenizers"].as_array()) {
        (Some("Sequence"), Some(steps)) if steps.len() == 2 => steps,
        _ => return Err("pre_tokenizer is not Sequence[Split, ByteLevel]".into()),
    };
    let (split, bytes) = (&steps[0], &steps[1]);
    only(split, "Split", &["type", "pattern", "behavior", "invert"])?;
    // The split regexes our pre-tokenizer cuts, each also verified id-for-id through fastokens
    // against HF (tests/tokenizer_differential.rs): Qwen2/Qwen3's and Llama 3's (cl100k's).
    let pattern = match SplitPattern::from_regex(split["pattern"]["Regex"].as_str().unwrap_or_default()) {
        Some(p) if split["type"] == "Split" && split["behavior"] == "Isolated" && split["invert"] == false => p,
        _ => return Err(format!("pre_tokenizer Split {split} is not a verified regex split")),
    };
    only(bytes, "ByteLevel", &["type", "add_prefix_space", "trim_offsets", "use_regex"])?;
    if bytes["type"] != "ByteLevel" || bytes["add_prefix_space"] != false || bytes["use_regex"] != false {
        return Err(format!("pre_tokenizer step {bytes} is not a plain ByteLevel"));
    }
    let model = &rest["model"];
    // `vocab` and `merges` were taken out of `rest` by the parse.
    only(model, "model", &["type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback", "ignore_merges"])?;
    let none_or_empty = [Value::Null, Value::from("")];
    let off = [Value::Null, Value::from(false)];
    if model["type"] != "BPE"
        || !is(model, "dropout", &[Value::Null])
        || !is(model, "unk_token", &[Value::Null])
        || !is(model, "continuing_subword_prefix", &none_or_empty)
        || !is(model, "end_of_word_suffix", &none_or_empty)
        || !is(model, "fuse_unk", &off)
        || !is(model, "byte_fallback", &off)
    {
        return Err("model is not a plain byte-level BPE (dropout, unk, affixes or byte fallback set)".into());
    }
    let ignore_merges = match &model["ignore_merges"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        v => return Err(format!("model ignore_merges is {v}")),
    };
    let vocab = file.vocab.as_ref().ok_or("model has no vocab")?;
    if file.merges.is_none() {
        return Err("model has no merges".into());
    }
    let top = vocab.iter().map(|(_, id)| *id).max();
    let frame = post_frame(&rest["post_processor"])?;
    Ok(FastForm { added: Vec::new(), frame, vocab_end: top.map_or(0, |m| m + 1), nfc, split: pattern, ignore_merges })
}

/// The added tokens in the ids HF gives them on load (`AddedVocabulary::add_tokens`: the
/// model's id if the content is in the vocabulary, else the next id from the vocabulary's
/// size on, in file order), if matching them on the raw text with one leftmost-longest pass is
/// exactly HF's: no strip or single-word rule, one `normalized` value for all (HF matches
/// normalized and raw ones in two passes) and false under a normalizer, no duplicates. A file
/// whose listed ids disagree with HF's numbering is not guessed at.
fn added_tokens(list: &serde_json::Value, vocab: &dyn Fn(&str) -> Option<u32>, vocab_size: usize, has_normalizer: bool) -> Result<Vec<(String, u32)>, String> {
    let list = match list {
        serde_json::Value::Null => return Ok(Vec::new()),
        l => l.as_array().ok_or("added_tokens is not a list")?,
    };
    let mut next = vocab_size as u32;
    let mut out: Vec<(String, u32)> = Vec::with_capacity(list.len());
    let mut normalized = None;
    for t in list {
        let keys = ["id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"];
        if let Some(k) = t.as_object().and_then(|o| o.keys().find(|k| !keys.contains(&k.as_str()))) {
            return Err(format!("added tokens have `{k}`, not verified"));
        }
        let content = t["content"].as_str().filter(|c| !c.is_empty()).ok_or("an added token has no content")?;
        let flag = |k: &str| t[k].as_bool().ok_or(format!("added token {content:?} has no boolean `{k}`"));
        if flag("single_word")? || flag("lstrip")? || flag("rstrip")? {
            return Err(format!("added tokens: {content:?} has a strip or single-word rule"));
        }
        let norm = flag("normalized")?;
        if (norm && has_normalizer) || *normalized.get_or_insert(norm) != norm {
            return Err("added tokens: some are matched after normalization".into());
        }
        if out.iter().any(|(c, _)| c == content) {
            return Err(format!("added tokens: {content:?} is listed twice"));
        }
        let id = match vocab(content) {
            Some(id) => id,
            None => {
                next += 1;
                next - 1
            }
        };
        if t["id"].as_u64() != Some(u64::from(id)) {
            return Err(format!("added tokens: {content:?} is listed with id {} but HF numbers it {id}", t["id"]));
        }
        out.push((content.to_string(), id));
    }
    Ok(out)
}

/// The ids a post-processor of a verified form puts around one sequence: none (absent, or
/// `ByteLevel`, which only trims offsets), `TemplateProcessing`'s `single` template around
/// `$A` (its special tokens' listed ids, as HF inserts them), or a `Sequence` of those, each
/// wrapping the previous one's output.
fn post_frame(pp: &serde_json::Value) -> Result<(Vec<u32>, Vec<u32>), String> {
    let keys = |want: &[&str]| pp.as_object().is_some_and(|o| o.keys().all(|k| want.contains(&k.as_str())));
    match pp["type"].as_str() {
        None if pp.is_null() => Ok((Vec::new(), Vec::new())),
        Some("ByteLevel") => Ok((Vec::new(), Vec::new())),
        Some("Sequence") if keys(&["type", "processors"]) => {
            let mut frame = (Vec::new(), Vec::new());
            for step in pp["processors"].as_array().ok_or("post_processor Sequence has no processors")? {
                let (pre, post) = post_frame(step)?;
                frame = ([pre, frame.0].concat(), [frame.1, post].concat());
            }
            Ok(frame)
        }
        Some("TemplateProcessing") if keys(&["type", "single", "pair", "special_tokens"]) => {
            let mut frame = (Vec::new(), Vec::new());
            let mut seen_a = false;
            for item in pp["single"].as_array().ok_or("post_processor template has no single")? {
                match (item.get("SpecialToken"), item.get("Sequence")) {
                    (Some(t), None) => {
                        let name = t["id"].as_str().ok_or("post_processor special token without id")?;
                        let ids = pp["special_tokens"][name]["ids"]
                            .as_array()
                            .ok_or(format!("post_processor special token {name:?} has no ids"))?
                            .iter()
                            .map(|i| i.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or("post_processor id is not a u32".to_string()));
                        let side = if seen_a { &mut frame.1 } else { &mut frame.0 };
                        for id in ids {
                            side.push(id?);
                        }
                    }
                    (None, Some(s)) if s["id"] == "A" && !seen_a => seen_a = true,
                    _ => return Err(format!("post_processor template item {item} not verified")),
                }
            }
            if !seen_a {
                return Err("post_processor template has no $A".into());
            }
            Ok(frame)
        }
        _ => Err(format!("post_processor {} not verified", pp["type"])),
    }
}

/// Cutting at added tokens outside the library is exact only for tokens matched verbatim on
/// the raw text (`normalized` false, or no normalizer and all alike) with no strip or
/// single-word rule.
fn splitter_for(tok: &Tokenizer) -> Option<(AhoCorasick, Vec<u32>)> {
    let has_normalizer = tok.get_normalizer().is_some();
    let mut pats = Vec::new();
    let mut ids = Vec::new();
    let mut normalized = None;
    for (id, t) in tok.get_added_tokens_decoder() {
        // HF matches raw and normalized tokens in two passes: one pass is exact only for one kind.
        if t.lstrip || t.rstrip || t.single_word || (t.normalized && has_normalizer) || *normalized.get_or_insert(t.normalized) != t.normalized {
            return None;
        }
        pats.push(t.content.clone());
        ids.push(id);
    }
    if pats.is_empty() {
        return Some((AhoCorasick::new(Vec::<String>::new()).ok()?, ids));
    }
    let m = AhoCorasickBuilder::new().match_kind(MatchKind::LeftmostLongest).build(&pats).ok()?;
    Some((m, ids))
}

/// The ids the post-processor adds around one sequence, found by encoding two probes with and
/// without special tokens; `None` (encode whole) if it does anything but add a fixed frame.
fn frame_of(tok: &Tokenizer) -> Option<(Vec<u32>, Vec<u32>)> {
    let mut frame: Option<(Vec<u32>, Vec<u32>)> = None;
    for probe in ["a", "Hello world, 123!"] {
        let bare = tok.encode_fast(probe, false).ok()?.get_ids().to_vec();
        let full = tok.encode_fast(probe, true).ok()?.get_ids().to_vec();
        let start = (0..=full.len().checked_sub(bare.len())?).find(|&s| full[s..s + bare.len()] == bare[..])?;
        let f = (full[..start].to_vec(), full[start + bare.len()..].to_vec());
        match &frame {
            Some(prev) if *prev != f => return None,
            _ => frame = Some(f),
        }
    }
    frame
}

/// Segment text hash → ids, least-recently-used eviction under a byte budget.
struct SegmentCache {
    inner: Mutex<CacheInner>,
    budget: usize,
}

struct CacheInner {
    map: lru::LruCache<u128, Entry>,
    bytes: usize,
}

struct Entry {
    /// Text length: a cheap second check against hash collisions.
    len: usize,
    ids: Arc<[u32]>,
}

impl SegmentCache {
    fn new(budget: usize) -> Self {
        SegmentCache { inner: Mutex::new(CacheInner { map: lru::LruCache::unbounded(), bytes: 0 }), budget }
    }

    fn cost(ids: usize) -> usize {
        ids * 4 + ENTRY_OVERHEAD
    }

    fn get(&self, key: u128, len: usize) -> Option<Arc<[u32]>> {
        let mut c = self.inner.lock();
        c.map.get(&key).filter(|e| e.len == len).map(|e| e.ids.clone())
    }

    fn put(&self, key: u128, len: usize, ids: Arc<[u32]>) {
        let cost = Self::cost(ids.len());
        if cost > self.budget {
            return;
        }
        let mut c = self.inner.lock();
        if let Some(old) = c.map.put(key, Entry { len, ids }) {
            c.bytes -= Self::cost(old.ids.len());
        }
        c.bytes += cost;
        while c.bytes > self.budget {
            match c.map.pop_lru() {
                Some((_, e)) => c.bytes -= Self::cost(e.ids.len()),
                None => break,
            }
        }
    }

    fn usage(&self) -> (usize, usize) {
        let c = self.inner.lock();
        (c.map.len(), c.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NFC can make an added token out of other text (KELVIN SIGN U+212A → `K`): the library
    /// matches added tokens before normalizing, so such text must not be normalized by us.
    #[test]
    fn text_that_normalizes_into_an_added_token_is_left_to_the_library() {
        use tokenizers::{models::wordlevel::WordLevel, normalizers::unicode::NFC, pre_tokenizers::whitespace::Whitespace, AddedToken};
        let vocab = [("K", 0), ("!", 1), ("é", 2), ("[UNK]", 3)].map(|(t, i)| (t.to_string(), i)).into_iter().collect();
        let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_normalizer(Some(NFC));
        tok.with_pre_tokenizer(Some(Whitespace {}));
        tok.add_special_tokens(&[AddedToken::from("K!", true)]);
        let ours = TextTokenizer::new(tok.clone(), 0);
        assert!(ours.splitter.is_some() && ours.nfc);
        for text in ["\u{212A}! e\u{301}", "K! e\u{301} \u{212A}!", "e\u{301} K"] {
            let want = tok.encode_fast(text, false).unwrap().get_ids().to_vec();
            assert_eq!(ours.encode(text, false).unwrap(), want, "{text:?}");
        }
        assert_eq!(ours.encode("\u{212A}! e\u{301}", false).unwrap(), [0, 1, 2], "the Kelvin sign is K, not the added token");
    }

    /// Our chunked NFC equals HF's tables applied to the whole text, across every cut point:
    /// composition across ASCII and non-ASCII neighbours, Hangul jamo, marks newer than
    /// Unicode 9.0 (HF leaves them unordered), singletons and two-starter compositions.
    #[test]
    fn nfc_like_hf_equals_hfs_nfc_of_the_whole_text() {
        let hf = |s: &str| s.nfc().map(|(c, _)| c).collect::<String>();
        let parts = [
            "e\u{301}", "a", " ", "\u{1100}\u{1161}", "\u{11a8}", "x\u{6e0}\u{7fd}", "\u{212a}", "漢", "\u{301}\u{323}",
            "A\u{30a}", "\n", "\u{958}", "\u{b47}\u{b3e}", "é", "\u{7fd}\u{301}",
        ];
        for a in parts {
            for b in parts {
                for c in parts {
                    for d in parts {
                        let s = format!("{a}{b}{c}{d}");
                        assert_eq!(nfc_like_hf(&s), hf(&s), "{s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn cache_evicts_least_recently_used_within_budget() {
        let c = SegmentCache::new(3 * SegmentCache::cost(10));
        for k in 0..3u128 {
            c.put(k, 1, vec![k as u32; 10].into());
        }
        assert!(c.get(0, 1).is_some()); // 0 is now the most recent
        c.put(3, 1, vec![3; 10].into());
        assert_eq!(c.usage().0, 3);
        assert!(c.get(1, 1).is_none(), "1 was least recently used");
        assert_eq!(c.get(3, 1).as_deref(), Some(&[3u32; 10][..]));
        assert!(c.get(0, 1).is_some());
        assert!(c.get(3, 2).is_none(), "length mismatch is a miss");
        assert!(c.usage().1 <= 3 * SegmentCache::cost(10));
        c.put(9, 1, vec![0; 1000].into()); // larger than the whole budget: not cached
        assert!(c.get(9, 1).is_none());
    }
}
