//! Mooncake request traces (`data/traces/`): one JSON object a line with `timestamp` (ms),
//! `input_length`, `output_length` and `hash_ids`, each id standing for 512 prompt tokens.
//!
//! A row becomes real token ids: every hash id expands into a deterministic block of 512 ids
//! (a generator seeded by the id), so equal ids give equal tokens and hence equal block hashes at
//! any block size dividing 512; the last block is cut at `input_length`.

use std::{
    collections::HashSet,
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

/// Reused ÷ input tokens with one infinite cache shared by every request: no router can beat
/// it. Counted at `block` tokens per block with the same one-token rule as the engine.
pub fn ideal_reuse(trace: &[TraceRequest], block: u32) -> f64 {
    let per = TRACE_BLOCK as u32 / block;
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    let (mut reused, mut input) = (0u64, 0u64);
    for r in trace {
        // Trace ids are prefix-unique, so (position, id) names a block and its whole prefix.
        let full = r.input_length / block;
        let hit = (0..full).take_while(|&b| seen.contains(&((b / per) as usize, r.hash_ids[(b / per) as usize] * per as u64 + (b % per) as u64))).count() as u32;
        reused += reusable_tokens(r.input_length, hit, block) as u64;
        input += r.input_length as u64;
        for b in 0..full {
            seen.insert(((b / per) as usize, r.hash_ids[(b / per) as usize] * per as u64 + (b % per) as u64));
        }
    }
    reused as f64 / input.max(1) as f64
}

#[cfg(test)]
mod tests {
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
