//! dynamo-epp's full routing decision against Dynamo's (crates.io dynamo-kv-router 1.6.1) on
//! the identical workload (`benches/common/decision_workload.rs`), in one run, as p50/p99 per
//! decision and their ratio.
//!
//! A decision on Dynamo's side is the synchronous core of what its router does per request,
//! through its public API and default `KvRouterConfig`, without the distributed runtime:
//! `compute_block_hash_for_seq` and `compute_seq_hashes_for_tracking` over the tokens, the
//! default indexer's lookup (`ThreadPoolIndexer` over `ConcurrentRadixTreeCompressed`, read
//! inline on the caller's thread as in production), `OverlapAnalysis::signals` on the
//! device-tier matches, the active sequences' per-rank load projection
//! (`ActiveSequencesMultiWorker`, as its queue actor does before selecting), the default
//! selector (`DefaultWorkerSelector`, the reference scorer/picker: `worker_logit`, lowest cost
//! at temperature 0), then the booking (`add_request` with the prefill-load hint from the
//! chosen worker's cached tokens) and its `free`. Its scheduler queue actor, the oneshot
//! hand-offs and the request-lifecycle lease around that core are not timed (they only add
//! to Dynamo's side).
//!
//!   cd benches/dynamo-baseline && nice cargo bench --features dynamo --bench decision_vs_dynamo

#[path = "../common/decision_workload.rs"]
mod decision_workload;

use decision_workload::{bench_decider, build, print_rows, Ours, TOPOLOGIES};

#[cfg(feature = "dynamo")]
mod dynamo {
    use std::collections::{HashMap, HashSet};

    use super::decision_workload::{Decider, DecisionWorkload, BACKGROUND_PREFILL_TOKENS, BLOCK_SIZE};
    use dynamo_epp::workers::{DpRank, WorkerId as OurWorkerId, WorkerRank};
    use dynamo_kv_router::{
        indexer::{MatchDetails, TieredMatchDetails},
        protocols::{
            compute_block_hash_for_seq, BlockHashOptions, PrefillLoadHint, RouterEvent as DEvent, RoutingConstraints, WorkerConfigLike, WorkerId,
            WorkerWithDpRank,
        },
        scheduling::{effective_prefill_tokens, prefill_load_hint_from_effective_tokens, OverlapAnalysis, ScheduleMode},
        ActiveSequencesMultiWorker, ConcurrentRadixTreeCompressed, DefaultWorkerSelector, KvRouterConfig, NoopSequencePublisher, SchedulingRequest,
        SequenceRequest, SyncIndexer, ThreadPoolIndexer, WorkerSelectionInput, WorkerSelector,
    };
    use rustc_hash::FxHashMap;

    const BS: u32 = BLOCK_SIZE as u32;

    /// A worker's configuration as Dynamo's selector reads it: its ranks, capacity unknown
    /// (as in our fleet).
    #[derive(Clone, PartialEq)]
    pub struct Config {
        ranks: u32,
        taints: HashSet<String>,
    }

    impl WorkerConfigLike for Config {
        fn data_parallel_start_rank(&self) -> u32 {
            0
        }
        fn data_parallel_size(&self) -> u32 {
            self.ranks
        }
        fn max_num_batched_tokens(&self) -> Option<u64> {
            None
        }
        fn total_kv_blocks(&self) -> Option<u64> {
            None
        }
        fn taints(&self) -> &HashSet<String> {
            &self.taints
        }
    }

    pub struct Dynamo {
        config: KvRouterConfig,
        indexer: ThreadPoolIndexer<ConcurrentRadixTreeCompressed>,
        slots: ActiveSequencesMultiWorker<NoopSequencePublisher>,
        selector: DefaultWorkerSelector,
        workers: HashMap<WorkerId, Config>,
        /// Reused across decisions, as its queue actor reuses its projection map.
        loads: FxHashMap<WorkerWithDpRank, dynamo_kv_router::WorkerLoadProjection>,
        now: tokio::time::Instant,
        next_id: u64,
        _rt: tokio::runtime::Runtime,
    }

    fn rank(w: WorkerWithDpRank) -> WorkerRank {
        WorkerRank { id: OurWorkerId(w.worker_id), dp_rank: DpRank(w.dp_rank) }
    }

    fn dyn_rank(w: WorkerRank) -> WorkerWithDpRank {
        WorkerWithDpRank::new(w.id.0, w.dp_rank.0)
    }

    impl Dynamo {
        pub fn new(w: &DecisionWorkload) -> Self {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let config = KvRouterConfig::default();
            let indexer = ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), 1, BS);
            for e in &w.stores {
                // Our events in Dynamo's type, through the shared wire format (same field names).
                let ev: DEvent = serde_json::from_str(&serde_json::to_string(e).unwrap()).expect("Dynamo reads our RouterEvent JSON");
                indexer.enqueue_event(ev).expect("indexer running");
            }
            rt.block_on(indexer.flush_and_wait()).expect("flushed");
            let t = w.topology;
            let workers: HashMap<WorkerId, Config> = (1..=t.workers).map(|id| (id, Config { ranks: t.ranks, taints: HashSet::new() })).collect();
            let slots = ActiveSequencesMultiWorker::new(
                NoopSequencePublisher,
                BLOCK_SIZE,
                workers.keys().map(|&id| (id, (0, t.ranks))).collect(),
                false,
                0,
                "decode",
            );
            let now = tokio::time::Instant::now();
            for (j, b) in w.background.iter().enumerate() {
                let id = format!("bg-{j}");
                let hint = PrefillLoadHint { initial_effective_prefill_tokens: BACKGROUND_PREFILL_TOKENS as usize, expected_prefill_duration: None };
                let req = SequenceRequest {
                    request_id: id.clone(),
                    token_sequence: Some(b.blocks.clone()),
                    track_prefill_tokens: true,
                    expected_output_tokens: None,
                    prefill_load_hint: Some(hint),
                    worker: dyn_rank(b.worker),
                    lora_name: None,
                };
                slots.add_request(req, now).expect("background booked");
                if b.prefill_done {
                    slots.mark_prefill_completed(&id, now).expect("prefill completed");
                }
            }
            // The aggregated pool's selector, as Dynamo labels it (`WorkerType::default_selector_label`).
            let selector = DefaultWorkerSelector::new(Some(config.clone()), "decode");
            Dynamo { config, indexer, slots, selector, workers, loads: FxHashMap::default(), now, next_id: 0, _rt: rt }
        }
    }

    impl Decider for Dynamo {
        type Req = Vec<u32>;
        fn name(&self) -> &'static str {
            "dynamo ThreadPool<CRTC> + DefaultWorkerSelector"
        }
        fn prepare(&self, tokens: &[u32]) -> Vec<u32> {
            tokens.to_vec()
        }
        fn decide(&mut self, tokens: &Vec<u32>) -> WorkerRank {
            let opts = BlockHashOptions::default();
            let hashes = compute_block_hash_for_seq(tokens, BS, opts);
            let token_seq = self.config.compute_seq_hashes_for_tracking(tokens, BS, None, opts, Some(hashes.as_slice()));
            let tiered = TieredMatchDetails {
                device: MatchDetails { overlap_scores: self.indexer.backend().find_matches(&hashes, false), ..MatchDetails::default() },
                lower_tier: HashMap::new(),
            };
            let overlap = OverlapAnalysis::new(&self.config, BS, &tiered).signals();
            let request_id = format!("req-{}", self.next_id);
            self.next_id += 1;
            let mut req = SchedulingRequest {
                mode: ScheduleMode::Tracked { request_id: request_id.clone() },
                token_seq,
                isl_tokens: tokens.len(),
                lora_name: None,
                expected_output_tokens: None,
                affinity_target: None,
                pinned_worker: None,
                allowed_worker_ids: None,
                routing_constraints: RoutingConstraints::default(),
                router_config_override: None,
                track_prefill_tokens: self.config.router_track_prefill_tokens,
                priority_jump: 0.0,
                strict_priority: 0,
                policy_class: None,
                session_context: None,
                overlap,
                kv_transfer_candidates: None,
                retain_kv_transfer_chain: false,
                shared_cache_hits: None,
                worker_loads: std::mem::take(&mut self.loads),
                resp_tx: None,
            };
            self.slots.bench_project_worker_loads_into(req.token_seq.as_deref(), self.now, &mut req.worker_loads);
            let selected = self
                .selector
                .select_worker(WorkerSelectionInput::configured(&self.workers, &req, req.eligibility(), BS))
                .expect("a worker is chosen");
            let effective = effective_prefill_tokens(req.isl_tokens, selected.cached_tokens);
            let prefill_load_hint = (req.track_prefill_tokens && effective > 0)
                .then(|| prefill_load_hint_from_effective_tokens(req.isl_tokens, effective).expect("effective ≤ isl"));
            let booking = SequenceRequest {
                request_id: request_id.clone(),
                token_sequence: req.token_seq.take(),
                track_prefill_tokens: req.track_prefill_tokens,
                expected_output_tokens: None,
                prefill_load_hint,
                worker: selected.worker,
                lora_name: None,
            };
            self.slots.add_request(booking, self.now).expect("booked");
            self.slots.free(&request_id, self.now).expect("freed");
            self.loads = std::mem::take(&mut req.worker_loads);
            rank(selected.worker)
        }
    }
}

fn main() {
    let mut c = criterion::Criterion::default().configure_from_args();
    let mut rows = Vec::new();
    for t in TOPOLOGIES {
        let w = build(t, 200);
        rows.push(bench_decider(&mut c, &w, &mut Ours::new(&w)));
        #[cfg(feature = "dynamo")]
        rows.push(bench_decider(&mut c, &w, &mut dynamo::Dynamo::new(&w)));
    }
    c.final_summary();
    #[cfg(feature = "dynamo")]
    print_rows(&rows, Some("dynamo ThreadPool<CRTC> + DefaultWorkerSelector"));
    #[cfg(not(feature = "dynamo"))]
    print_rows(&rows, None);
}
