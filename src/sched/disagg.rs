//! Disaggregated serving: which workers each stage may use and how each stage weighs its costs
//! (contracts §8.6). The prefill pick is KV-aware on the prefill pool and books its prefill
//! load until the first response chunk (upstream's EPP left it unbooked and piled every prefill
//! on one worker); the decode pick is pure decode load: no overlap credit, no KV-reuse
//! assumption, no prefill tracking.

use super::{cost::CostWeights, SchedSettings};
use crate::workers::Role;

/// One scheduling pass over one pool of workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Prefill and decode on one worker.
    Aggregated,
    Prefill,
    Decode,
}

/// What a stage uses of the settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageRules {
    pub weights: CostWeights,
    pub track_active_blocks: bool,
    pub assume_kv_reuse: bool,
}

impl Stage {
    /// Whether a worker of `role` takes part in this stage.
    pub fn admits(self, role: Role) -> bool {
        match self {
            Stage::Prefill => role == Role::Prefill,
            // Prefill-only workers never take a whole request or its decode.
            Stage::Aggregated | Stage::Decode => role != Role::Prefill,
        }
    }

    pub fn rules(self, s: &SchedSettings) -> StageRules {
        match self {
            Stage::Aggregated => StageRules {
                weights: s.weights,
                track_active_blocks: s.track_active_blocks,
                assume_kv_reuse: s.assume_kv_reuse,
            },
            // Prefill workers hold no decode: only their queued prompt tokens load them.
            Stage::Prefill => StageRules {
                weights: CostWeights { track_prefill_tokens: true, ..s.weights },
                track_active_blocks: false,
                assume_kv_reuse: s.assume_kv_reuse,
            },
            Stage::Decode => StageRules {
                weights: CostWeights { overlap_credit: 0.0, track_prefill_tokens: false, ..s.weights },
                track_active_blocks: s.track_active_blocks,
                assume_kv_reuse: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_stage_is_pure_decode_load_and_prefill_tracks_only_prompts() {
        let s = SchedSettings::default();
        let d = Stage::Decode.rules(&s);
        assert_eq!((d.weights.overlap_credit, d.weights.track_prefill_tokens, d.assume_kv_reuse), (0.0, false, false));
        let p = Stage::Prefill.rules(&s);
        assert_eq!((p.weights.overlap_credit, p.weights.track_prefill_tokens, p.track_active_blocks), (1.0, true, false));
        assert_eq!(Stage::Aggregated.rules(&s).weights, s.weights);
        assert!(Stage::Prefill.admits(Role::Prefill) && !Stage::Prefill.admits(Role::Decode));
        assert!(Stage::Decode.admits(Role::Decode) && Stage::Decode.admits(Role::Worker) && !Stage::Decode.admits(Role::Prefill));
    }
}
