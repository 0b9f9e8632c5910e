//! Deciding, pure: the cost of each candidate, the choice among them, and the load bookkeeping
//! the costs read. No I/O, no clocks: `now` and the RNG come from the caller.

pub mod active;
pub mod admission;
pub mod cost;
pub mod disagg;
pub mod latency;
pub mod prompts;
pub mod queue;
pub mod replica;
pub mod select;

use std::time::Duration;

use admission::{Capacity, Thresholds};
use cost::CostWeights;

/// What a candidate's score is (`DYN_ROUTER_POLICY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    /// Dynamo's cost model: prefill and decode blocks ([`cost`]).
    #[default]
    Cost,
    /// The predicted time to first token, learned online per rank ([`latency`]), guarded by
    /// the predicted time per output token.
    PredictedTtft,
}

/// How the scheduler decides (contracts §8, §9 A and C); built once from the `Config`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedSettings {
    pub policy: RoutingPolicy,
    pub weights: CostWeights,
    /// 0 = lowest cost wins (ties at random); > 0 = softmax over normalized costs.
    pub temperature: f64,
    /// Count each rank's active KV blocks (decode load).
    pub track_active_blocks: bool,
    /// Add placeholder blocks as responses stream (needs active blocks).
    pub track_output_blocks: bool,
    /// Book prompt blocks by their real sequence hashes (shared prefixes count once on a rank);
    /// false = random hashes, every booking's blocks are its own.
    pub assume_kv_reuse: bool,
    /// Bookings whose end was never seen are dropped after this long.
    pub expiry: Duration,
    /// Token-capacity admission; `None` = every worker always admits.
    pub admission: Option<Thresholds>,
    /// Capacity of workers whose fleet entry does not declare it.
    pub default_capacity: Capacity,
    /// With no prefill workers: true = refuse (503), false = serve aggregated.
    pub enforce_disagg: bool,
    /// The longest a group of requests arriving together waits for its last member before
    /// they are decided together, the one that loses most by not getting its best worker first
    /// (`Router::most_constrained`); zero = each on arrival (as Dynamo). The edges (server,
    /// simulator) hold the group.
    pub decision_window: Duration,
}

impl Default for SchedSettings {
    fn default() -> Self {
        SchedSettings {
            policy: RoutingPolicy::Cost,
            weights: CostWeights::default(),
            temperature: 0.0,
            track_active_blocks: true,
            track_output_blocks: false,
            assume_kv_reuse: true,
            expiry: Duration::from_secs(300),
            admission: None,
            default_capacity: Capacity::default(),
            enforce_disagg: false,
            decision_window: Duration::ZERO,
        }
    }
}
