//! Text → token ids, identical to Hugging Face `tokenizers` (which `transformers` wraps), with a
//! segment cache for the multi-turn traffic that resends the same prefix every turn.
//!
//! The tokenizer first cuts the text at added tokens (`<|im_start|>`, `<|eot_id|>`, …) and
//! encodes the pieces between them independently: BPE never merges across those cuts. So each
//! piece's ids can be cached under a hash of its text and reused whenever the same piece
//! reappears, and the concatenation is exactly what encoding the whole text gives.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use parking_lot::Mutex;
use tokenizers::Tokenizer;

/// Bytes of overhead charged per cache entry on top of its ids (key, links, allocation).
const ENTRY_OVERHEAD: usize = 64;

/// The `tokenizers` library refused a text (rare: e.g. an unknown token without `unk`).
#[derive(Clone, Debug, thiserror::Error)]
#[error("tokenizer failed: {0}")]
pub struct EncodeError(pub String);

/// A tokenizer plus the segment cache.
pub struct TextTokenizer {
    tok: Tokenizer,
    /// Leftmost-longest matcher over the added tokens, as `tokenizers` matches them; `None`
    /// when some added token has matching rules (strip, single-word, normalized) that make
    /// cutting outside the library unsafe: then text is encoded whole, uncached.
    splitter: Option<(AhoCorasick, Vec<u32>)>,
    /// Ids the post-processor puts before and after a single sequence (`add_special_tokens`).
    frame: Option<(Vec<u32>, Vec<u32>)>,
    cache: Option<SegmentCache>,
}

impl TextTokenizer {
    /// `cache_bytes` = 0 disables the segment cache.
    pub fn new(mut tok: Tokenizer, cache_bytes: usize) -> Self {
        // transformers encodes without the file's truncation/padding unless asked.
        let _ = tok.with_truncation(None);
        tok.with_padding(None);
        let splitter = splitter_for(&tok);
        let frame = frame_of(&tok);
        let cache = (cache_bytes > 0).then(|| SegmentCache::new(cache_bytes));
        TextTokenizer { tok, splitter, frame, cache }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    /// Encodes `text` (with the post-processor's special tokens if `add_special_tokens`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EncodeError> {
        self.encode_with(text, add_special_tokens, self.cache.as_ref())
    }

    /// The same ids without consulting or filling the cache (benches and the parity proof).
    pub fn encode_uncached(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EncodeError> {
        self.encode_with(text, add_special_tokens, None)
    }

    fn encode_with(&self, text: &str, add_special: bool, cache: Option<&SegmentCache>) -> Result<Vec<u32>, EncodeError> {
        let (Some((matcher, ids)), Some((pre, post))) = (&self.splitter, &self.frame) else {
            return self.whole(text, add_special);
        };
        let mut out = Vec::with_capacity(text.len() / 3 + 8);
        if add_special {
            out.extend_from_slice(pre);
        }
        let mut at = 0;
        for m in matcher.find_iter(text) {
            self.segment(&text[at..m.start()], cache, &mut out)?;
            out.push(ids[m.pattern().as_usize()]);
            at = m.end();
        }
        self.segment(&text[at..], cache, &mut out)?;
        if add_special {
            out.extend_from_slice(post);
        }
        Ok(out)
    }

    fn segment(&self, piece: &str, cache: Option<&SegmentCache>, out: &mut Vec<u32>) -> Result<(), EncodeError> {
        if piece.is_empty() {
            return Ok(());
        }
        let Some(cache) = cache else {
            out.extend(self.whole(piece, false)?);
            return Ok(());
        };
        let key = xxhash_rust::xxh3::xxh3_128(piece.as_bytes());
        if cache.get_into(key, piece.len(), out) {
            return Ok(());
        }
        let ids = self.whole(piece, false)?;
        out.extend_from_slice(&ids);
        cache.put(key, piece.len(), ids);
        Ok(())
    }

    fn whole(&self, text: &str, add_special: bool) -> Result<Vec<u32>, EncodeError> {
        self.tok
            .encode_fast(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EncodeError(e.to_string()))
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

/// Cutting at added tokens outside the library is exact only for tokens matched verbatim on
/// the raw text (`normalized` false, or no normalizer) with no strip or single-word rule.
fn splitter_for(tok: &Tokenizer) -> Option<(AhoCorasick, Vec<u32>)> {
    let has_normalizer = tok.get_normalizer().is_some();
    let mut pats = Vec::new();
    let mut ids = Vec::new();
    for (id, t) in tok.get_added_tokens_decoder() {
        if t.lstrip || t.rstrip || t.single_word || (t.normalized && has_normalizer) {
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

    fn get_into(&self, key: u128, len: usize, out: &mut Vec<u32>) -> bool {
        let ids = {
            let mut c = self.inner.lock();
            match c.map.get(&key) {
                Some(e) if e.len == len => e.ids.clone(),
                _ => return false,
            }
        };
        out.extend_from_slice(&ids);
        true
    }

    fn put(&self, key: u128, len: usize, ids: Vec<u32>) {
        let cost = Self::cost(ids.len());
        if cost > self.budget {
            return;
        }
        let mut c = self.inner.lock();
        if let Some(old) = c.map.put(key, Entry { len, ids: ids.into() }) {
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

    #[test]
    fn cache_evicts_least_recently_used_within_budget() {
        let c = SegmentCache::new(3 * SegmentCache::cost(10));
        for k in 0..3u128 {
            c.put(k, 1, vec![k as u32; 10]);
        }
        let mut out = Vec::new();
        assert!(c.get_into(0, 1, &mut out)); // 0 is now the most recent
        c.put(3, 1, vec![3; 10]);
        assert_eq!(c.usage().0, 3);
        assert!(!c.get_into(1, 1, &mut out), "1 was least recently used");
        assert!(c.get_into(0, 1, &mut out) && c.get_into(3, 1, &mut out));
        assert!(!c.get_into(3, 2, &mut out), "length mismatch is a miss");
        assert!(c.usage().1 <= 3 * SegmentCache::cost(10));
        c.put(9, 1, vec![0; 1000]); // larger than the whole budget: not cached
        assert!(!c.get_into(9, 1, &mut out));
    }
}
