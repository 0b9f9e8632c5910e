//! Token-capacity admission: which ranks are too busy to take another request.
//!
//! A rank is busy when its active decode blocks exceed a fraction of its KV capacity, or its
//! active prefill tokens exceed an absolute count or a fraction of its batch budget; each
//! threshold is opt-in. A worker is busy only when all of its ranks are (the caller applies
//! that). Capacity a worker did not declare never makes it busy.

use super::active::RankLoad;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Thresholds {
    /// `DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD`: fraction of `total_kv_blocks`.
    pub decode_blocks_frac: Option<f64>,
    /// `DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD`: absolute active prefill tokens.
    pub prefill_tokens: Option<u64>,
    /// `DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC`: fraction of `max_num_batched_tokens`.
    pub prefill_tokens_frac: Option<f64>,
}

impl Thresholds {
    pub fn any(&self) -> bool {
        self.decode_blocks_frac.is_some() || self.prefill_tokens.is_some() || self.prefill_tokens_frac.is_some()
    }
}

/// What a worker declared about its capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub total_kv_blocks: Option<u64>,
    pub max_num_batched_tokens: Option<u64>,
}

pub fn rank_is_busy(t: &Thresholds, cap: &Capacity, load: &RankLoad) -> bool {
    let decode = match (t.decode_blocks_frac, cap.total_kv_blocks) {
        (Some(f), Some(total)) => load.active_decode_blocks > f * total as f64,
        _ => false,
    };
    let prefill_abs = t.prefill_tokens.is_some_and(|n| load.active_prefill_tokens > n);
    let prefill_frac = match (t.prefill_tokens_frac, cap.max_num_batched_tokens) {
        (Some(f), Some(budget)) => load.active_prefill_tokens as f64 > f * budget as f64,
        _ => false,
    };
    decode || prefill_abs || prefill_frac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(blocks: f64, prefill: u64) -> RankLoad {
        RankLoad { active_decode_blocks: blocks, active_prefill_tokens: prefill, active_requests: 1, prefilling_requests: u32::from(prefill > 0), long_decodes: 0.0 }
    }

    #[test]
    fn each_threshold_is_independent_and_opt_in() {
        let cap = Capacity { total_kv_blocks: Some(100), max_num_batched_tokens: Some(1000) };
        let none = Thresholds::default();
        assert!(!none.any());
        assert!(!rank_is_busy(&none, &cap, &load(1e9, u64::MAX)));
        let decode = Thresholds { decode_blocks_frac: Some(0.8), ..Default::default() };
        assert!(!rank_is_busy(&decode, &cap, &load(80.0, 1 << 40)));
        assert!(rank_is_busy(&decode, &cap, &load(80.5, 0)));
        let abs = Thresholds { prefill_tokens: Some(500), ..Default::default() };
        assert!(!rank_is_busy(&abs, &cap, &load(1e9, 500)));
        assert!(rank_is_busy(&abs, &cap, &load(0.0, 501)));
        let frac = Thresholds { prefill_tokens_frac: Some(2.0), ..Default::default() };
        assert!(!rank_is_busy(&frac, &cap, &load(0.0, 2000)));
        assert!(rank_is_busy(&frac, &cap, &load(0.0, 2001)));
    }

    #[test]
    fn undeclared_capacity_never_makes_a_rank_busy() {
        let t = Thresholds { decode_blocks_frac: Some(0.1), prefill_tokens_frac: Some(0.1), ..Default::default() };
        assert!(!rank_is_busy(&t, &Capacity::default(), &load(1e9, u64::MAX)));
    }
}
