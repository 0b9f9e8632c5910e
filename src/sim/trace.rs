//! Mooncake request traces (`data/traces/`): one JSON object a line with `timestamp` (ms),
//! `input_length`, `output_length` and `hash_ids`, each id standing for 512 prompt tokens.
//!
//! A row becomes real token ids: every hash id expands into a deterministic block of 512 ids
//! (a generator seeded by the id), so equal ids give equal tokens and hence equal block hashes at
//! any block size dividing 512; the last block is cut at `input_length`.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
};

use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Deserialize;

/// Tokens per trace hash id.
pub const TRACE_BLOCK: usize = 512;
/// Token ids are drawn below this (Qwen3's vocabulary size): any fixed range works.
const VOCAB: u32 = 151_643;

#[derive(Clone, Debug, Deserialize)]
pub struct TraceRequest {
    /// Arrival, ms from the trace's start.
    pub timestamp: u64,
    pub input_length: u32,
    pub output_length: u32,
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} line {line}: {source}")]
    Parse { path: String, line: usize, source: serde_json::Error },
    #[error("{path} line {line}: {why}")]
    Invalid { path: String, line: usize, why: String },
}

/// Reads a trace; rows are checked (`len(hash_ids) == ceil(input_length / 512)`).
/// Where the tests, benches and documented commands find the traces: `$TRACES_DIR`, else the
/// repository's `data/traces` (compiled in: a development convenience, not a deployed path).
pub fn traces_dir() -> PathBuf {
    std::env::var_os("TRACES_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("data/traces"))
}

pub fn load(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read { path: p.clone(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: TraceRequest =
            serde_json::from_str(line).map_err(|source| TraceError::Parse { path: p.clone(), line: i + 1, source })?;
        if r.input_length == 0 || r.hash_ids.len() != (r.input_length as usize).div_ceil(TRACE_BLOCK) {
            return Err(TraceError::Invalid {
                path: p.clone(),
                line: i + 1,
                why: format!("{} hash ids for input_length {}", r.hash_ids.len(), r.input_length),
            });
        }
        out.push(r);
    }
    Ok(out)
}

impl TraceRequest {
    /// The prompt's token ids.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = Vec::with_capacity(self.hash_ids.len() * TRACE_BLOCK);
        for &id in &self.hash_ids {
            let mut rng = SmallRng::seed_from_u64(id ^ 0x6D6F_6F6E_6361_6B65);
            t.extend((0..TRACE_BLOCK).map(|_| rng.random_range(0..VOCAB)));
        }
        t.truncate(self.input_length as usize);
        t
    }
}

/// Prompt tokens an engine may take from its prefix cache when `cached_blocks` leading blocks
/// of `block` tokens are cached: one token is always recomputed.
pub fn reusable_tokens(input_length: u32, cached_blocks: u32, block: u32) -> u32 {
    (cached_blocks * block).min((input_length.saturating_sub(1) / block) * block)
}

/// Leading cached blocks (of `block` tokens) of each request with one cache shared by every
/// request, holding at most `capacity` blocks — least recently used evicted first, a request's
/// blocks used at its arrival — or every block ever seen (`None`).
pub fn shared_cache_hits(trace: &[TraceRequest], block: u32, capacity: Option<usize>) -> Vec<u32> {
    let per = TRACE_BLOCK as u32 / block;
    // (position, id) names a block and its whole prefix: trace ids are prefix-unique.
    let key = |r: &TraceRequest, b: u32| ((b / per) as usize, r.hash_ids[(b / per) as usize] * per as u64 + (b % per) as u64);
    // Each block's last use; the queue keeps uses in order and is cleaned lazily (a use
    // superseded by a later one is skipped when it reaches the front).
    let mut last_use: HashMap<(usize, u64), u64> = HashMap::new();
    let mut uses: VecDeque<((usize, u64), u64)> = VecDeque::new();
    let mut clock = 0u64;
    trace
        .iter()
        .map(|r| {
            let full = r.input_length / block;
            let hit = (0..full).take_while(|&b| last_use.contains_key(&key(r, b))).count() as u32;
            for b in 0..full {
                clock += 1;
                let k = key(r, b);
                last_use.insert(k, clock);
                if capacity.is_some() {
                    uses.push_back((k, clock));
                }
            }
            while capacity.is_some_and(|c| last_use.len() > c) {
                let (k, at) = uses.pop_front().expect("every cached block has a use queued");
                if last_use.get(&k) == Some(&at) {
                    last_use.remove(&k);
                }
            }
            hit
        })
        .collect()
}

/// Reused ÷ input tokens when each request finds `hits` leading blocks cached (same one-token
/// rule as the engine).
pub fn reuse_share(trace: &[TraceRequest], block: u32, hits: &[u32]) -> f64 {
    let reused: u64 = trace.iter().zip(hits).map(|(r, &h)| reusable_tokens(r.input_length, h, block) as u64).sum();
    reused as f64 / trace.iter().map(|r| r.input_length as u64).sum::<u64>().max(1) as f64
}

/// Reused ÷ input tokens with one infinite cache shared by every request: no router can beat
/// it. Counted at `block` tokens per block with the same one-token rule as the engine.
pub fn ideal_reuse(trace: &[TraceRequest], block: u32) -> f64 {
    reuse_share(trace, block, &shared_cache_hits(trace, block, None))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn row(ids: &[u64], len: u32) -> TraceRequest {
        TraceRequest { timestamp: 0, input_length: len, output_length: 1, hash_ids: ids.to_vec() }
    }

    #[test]
    fn equal_ids_give_equal_tokens_and_the_last_block_is_cut() {
        let a = row(&[7, 8], 700).tokens();
        let b = row(&[7, 9], 1024).tokens();
        assert_eq!(a.len(), 700);
        assert_eq!(a[..512], b[..512]);
        assert_ne!(a[512..700], b[512..700]);
        assert!(a.iter().all(|&t| t < VOCAB));
    }

    #[test]
    fn a_bounded_shared_cache_evicts_the_least_recently_used_blocks() {
        // 64-token blocks: a 512-token trace block is 8 of them; the cache holds two trace blocks.
        let t = vec![row(&[1], 512), row(&[2], 512), row(&[1], 512), row(&[3], 512), row(&[2], 512), row(&[1], 512)];
        // [3] evicts [2] (used before [1]'s second use); then [2] evicts [1].
        assert_eq!(shared_cache_hits(&t, 64, Some(16)), vec![0, 0, 8, 0, 0, 0]);
        assert_eq!(shared_cache_hits(&t, 64, None), vec![0, 0, 8, 0, 8, 8]);
        // One trace block of room: nothing survives a different request.
        assert_eq!(shared_cache_hits(&t, 64, Some(8)), vec![0; 6]);
        // Half a prompt's blocks kept: its leading ones were used first, so they go first.
        assert_eq!(shared_cache_hits(&[row(&[1, 2], 1024), row(&[1, 2], 1024)], 64, Some(12)), vec![0, 0]);
        // 448 of the 512 tokens of the third request reused (one token recomputed), of 3 × 512.
        assert!((reuse_share(&t[..3], 64, &[0, 0, 8]) - 448.0 / 1536.0).abs() < 1e-12);
    }

    #[test]
    fn one_token_is_always_recomputed() {
        assert_eq!(reusable_tokens(128, 2, 64), 64);
        assert_eq!(reusable_tokens(129, 2, 64), 128);
        assert_eq!(reusable_tokens(1000, 3, 64), 192);
        assert_eq!(reusable_tokens(1, 5, 64), 0);
    }

    #[test]
    fn ideal_reuse_counts_leading_blocks_seen_before() {
        // Second request shares the first 512-token block: 8 blocks of 64 reused out of 1024 + 1024.
        let t = vec![row(&[1, 2], 1024), row(&[1, 3], 1024)];
        assert!((ideal_reuse(&t, 64) - 512.0 / 2048.0).abs() < 1e-12);
        // The same prompt twice: all but the last block (one token recomputed).
        let t = vec![row(&[1], 512), row(&[1], 512)];
        assert!((ideal_reuse(&t, 64) - 448.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn the_shipped_traces_parse() {
        let t = load(&traces_dir().join("mooncake_conversation.jsonl")).unwrap();
        assert_eq!(t.len(), 12_031);
        // The README's ideal prefix hit counts whole 512-token blocks: 36.6 %.
        let blocks: f64 = {
            let mut seen = HashSet::new();
            let (mut hit, mut all) = (0usize, 0usize);
            for r in &t {
                let k = r.hash_ids.iter().enumerate().take_while(|(i, id)| seen.contains(&(*i, **id))).count();
                hit += k;
                all += r.hash_ids.len();
                seen.extend(r.hash_ids.iter().enumerate().map(|(i, id)| (i, *id)));
            }
            hit as f64 / all as f64
        };
        assert!((blocks - 0.366).abs() < 0.0005, "{blocks}");
    }
}
