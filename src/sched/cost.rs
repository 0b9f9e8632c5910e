//! Dynamo's routing cost (contracts §8.1, `selector/default.rs::worker_logit`), one candidate
//! (worker, dp_rank) at a time. Every intermediate term is kept in [`CostTerms`] so selection, the
//! Explain RPC and the metrics all show the same numbers. Lower cost wins.

/// Weights and switches of the cost model; defaults are Dynamo's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostWeights {
    /// `DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT`: blocks of prefill credited per device-cached block.
    pub overlap_credit: f64,
    /// `DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY`: shrinks the credit on workers with more active
    /// prefill than the least-loaded eligible one.
    pub credit_decay: f64,
    /// `DYN_ROUTER_HOST_CACHE_HIT_WEIGHT` / `..._DISK_...`: value of a host / disk tier hit.
    pub host_weight: f64,
    pub disk_weight: f64,
    /// `DYN_ROUTER_PREFILL_LOAD_SCALE`: scales prompt-side load after the cache credit.
    pub prefill_load_scale: f64,
    /// `DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT`: block-equivalent cost per active request.
    pub decode_active_request_weight: f64,
    /// `DYN_ROUTER_TRACK_PREFILL_TOKENS`: whether prompt-side load counts at all.
    pub track_prefill_tokens: bool,
}

impl Default for CostWeights {
    fn default() -> Self {
        CostWeights {
            overlap_credit: 1.0,
            credit_decay: 0.0,
            host_weight: 0.75,
            disk_weight: 0.25,
            prefill_load_scale: 1.0,
            decode_active_request_weight: 0.0,
            track_prefill_tokens: true,
        }
    }
}

/// Leading prompt blocks a candidate already holds, per storage tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierOverlap {
    pub device: u32,
    pub host: u32,
    pub disk: u32,
}

/// What the cost reads about one candidate.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CandidateLoad {
    pub overlap: TierOverlap,
    /// Prompt tokens still being prefilled by requests booked on this candidate.
    pub active_prefill_tokens: u64,
    /// Distinct KV blocks held by requests booked on this candidate (output placeholders may
    /// be fractional).
    pub active_decode_blocks: f64,
    /// The request's full prompt blocks this candidate would newly hold.
    pub new_blocks: u64,
    pub active_requests: u32,
}

/// Every term of one candidate's cost, in blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CostTerms {
    /// `round(eff_overlap · block_size)`, the tokens expected from cache.
    pub cached_tokens: u64,
    /// Prompt-side load before credit: (active prefill + isl) / block size.
    pub raw_prefill_blocks: f64,
    /// Credit multiplier from `credit_decay` (1 when off).
    pub decay: f64,
    /// Blocks of prefill the cache saves.
    pub credit_blocks: f64,
    /// `prefill_load_scale · max(0, raw_prefill_blocks − credit_blocks)`.
    pub prefill_cost: f64,
    /// Active decode blocks plus the request's new blocks.
    pub decode_blocks: f64,
    /// `decode_active_request_weight · active_requests`.
    pub request_cost: f64,
    /// The total: lower wins.
    pub logit: f64,
}

/// The request-wide inputs of the cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostInput {
    pub block_size: u32,
    /// Prompt length in tokens.
    pub isl: u64,
    /// Least active prefill tokens among eligible candidates (for credit decay).
    pub min_active_prefill_tokens: u64,
}

/// Dynamo's `worker_logit` for one candidate.
pub fn cost_terms(w: &CostWeights, input: &CostInput, c: &CandidateLoad) -> CostTerms {
    let bs = input.block_size as f64;
    let o = c.overlap;
    let eff_overlap = o.device as f64 + w.host_weight * o.host as f64 + w.disk_weight * o.disk as f64;
    let cached_tokens = (eff_overlap * bs).round() as u64;
    let raw_prefill_tokens = if w.track_prefill_tokens { c.active_prefill_tokens + input.isl } else { 0 };
    let raw_prefill_blocks = raw_prefill_tokens as f64 / bs;
    let decay = if w.track_prefill_tokens && w.credit_decay > 0.0 {
        let excess_blocks = c.active_prefill_tokens.saturating_sub(input.min_active_prefill_tokens) as f64 / bs;
        let isl_blocks = (input.isl.div_ceil(input.block_size as u64)).max(1) as f64;
        1.0 / (1.0 + w.credit_decay * excess_blocks / isl_blocks)
    } else {
        1.0
    };
    let credit_blocks =
        w.overlap_credit * decay * o.device as f64 + w.host_weight * o.host as f64 + w.disk_weight * o.disk as f64;
    let prefill_cost = w.prefill_load_scale * (raw_prefill_blocks - credit_blocks).max(0.0);
    let decode_blocks = c.active_decode_blocks + c.new_blocks as f64;
    let request_cost = w.decode_active_request_weight * c.active_requests as f64;
    CostTerms {
        cached_tokens,
        raw_prefill_blocks,
        decay,
        credit_blocks,
        prefill_cost,
        decode_blocks,
        request_cost,
        logit: prefill_cost + decode_blocks + request_cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(isl: u64) -> CostInput {
        CostInput { block_size: 16, isl, min_active_prefill_tokens: 0 }
    }

    // router-design.md's worked example (contracts §8.1): credit 1.0, raw prefill 10 blocks,
    // overlap 5 blocks, decode 5 blocks → 10.
    #[test]
    fn reproduces_the_reference_worked_example() {
        let c = CandidateLoad {
            overlap: TierOverlap { device: 5, ..Default::default() },
            active_prefill_tokens: 0,
            active_decode_blocks: 0.0,
            new_blocks: 5,
            active_requests: 0,
        };
        let t = cost_terms(&CostWeights::default(), &input(160), &c);
        assert_eq!(t.raw_prefill_blocks, 10.0);
        assert_eq!(t.credit_blocks, 5.0);
        assert_eq!(t.decode_blocks, 5.0);
        assert_eq!(t.logit, 10.0);
        assert_eq!(t.cached_tokens, 80);
    }

    #[test]
    fn tiers_credit_at_their_weights_and_credit_never_goes_negative() {
        let c = CandidateLoad { overlap: TierOverlap { device: 2, host: 4, disk: 4 }, ..Default::default() };
        let t = cost_terms(&CostWeights::default(), &input(32), &c);
        // 2 + 0.75·4 + 0.25·4 = 6 blocks of credit against 2 blocks of prefill.
        assert_eq!(t.credit_blocks, 6.0);
        assert_eq!(t.prefill_cost, 0.0);
        assert_eq!(t.cached_tokens, 96);
    }

    #[test]
    fn decay_shrinks_credit_on_busier_candidates() {
        let w = CostWeights { credit_decay: 1.0, ..Default::default() };
        let base = CandidateLoad { overlap: TierOverlap { device: 8, ..Default::default() }, ..Default::default() };
        let busy = CandidateLoad { active_prefill_tokens: 256, ..base };
        let inp = CostInput { block_size: 16, isl: 256, min_active_prefill_tokens: 0 };
        assert_eq!(cost_terms(&w, &inp, &base).decay, 1.0);
        // excess 16 blocks over a 16-block prompt → 1 / (1 + 1) = 0.5
        let t = cost_terms(&w, &inp, &busy);
        assert_eq!(t.decay, 0.5);
        assert_eq!(t.credit_blocks, 4.0);
    }

    #[test]
    fn scale_request_weight_and_prefill_switch() {
        let c = CandidateLoad { active_prefill_tokens: 160, active_decode_blocks: 3.0, new_blocks: 2, active_requests: 4, ..Default::default() };
        let w = CostWeights { prefill_load_scale: 2.0, decode_active_request_weight: 0.5, ..Default::default() };
        let t = cost_terms(&w, &input(160), &c);
        assert_eq!(t.prefill_cost, 40.0);
        assert_eq!(t.request_cost, 2.0);
        assert_eq!(t.logit, 40.0 + 5.0 + 2.0);
        let off = cost_terms(&CostWeights { track_prefill_tokens: false, ..w }, &input(160), &c);
        assert_eq!(off.prefill_cost, 0.0);
        assert_eq!(off.logit, 7.0);
    }
}
