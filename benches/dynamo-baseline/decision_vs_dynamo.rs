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
//! With `--features dynamo-selection` a third subject is Dynamo's whole select-and-reserve
//! path, the one its standalone selection service runs per `/select_and_reserve` and
//! `/reservations/{id}` free (the HTTP and JSON layers aside): `SelectionCore::select_and_reserve`
//! then `free_reservation` on a core built as Dynamo's own `selection_core` bench builds it,
//! driven as a caller would, by `block_on` on a current-thread tokio runtime, every await
//! timed. Beyond the synchronous core it includes the request's normalization (block and
//! tracking hashes), the async index lookup, the reservation-id claim and index, the
//! scheduler's admission queue actor and its oneshot replies, the booking handle and
//! request-lifecycle lease, the response (overlap summary, endpoint) and the free through the
//! reservation index. The same stores go into its index and the same background requests are
//! booked on the same ranks (as explicit reservations, 2/3 of them past prefill).
//!
//!   cd benches/dynamo-baseline && nice cargo bench --features dynamo --bench decision_vs_dynamo
//!   cd benches/dynamo-baseline && nice cargo bench --features dynamo-selection --bench decision_vs_dynamo

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

    /// Our event in Dynamo's type, through the shared wire format (same field names).
    fn dynamo_event(e: &dynamo_epp::kv::events::RouterEvent) -> DEvent {
        serde_json::from_str(&serde_json::to_string(e).unwrap()).expect("Dynamo reads our RouterEvent JSON")
    }

    impl Dynamo {
        pub fn new(w: &DecisionWorkload) -> Self {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let config = KvRouterConfig::default();
            let indexer = ThreadPoolIndexer::new(ConcurrentRadixTreeCompressed::new(), 1, BS);
            for e in &w.stores {
                indexer.enqueue_event(dynamo_event(e)).expect("indexer running");
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
    /// Dynamo's standalone selection service core (`services::selection::SelectionCore`, crate
    /// feature `standalone-selection`), built as its own `selection_core` bench builds it
    /// (`try_new_local`, the reference selection policy, every worker upserted with a KV-event
    /// endpoint), with the default `KvRouterConfig`.
    #[cfg(feature = "dynamo-selection")]
    pub mod selection {
        use std::sync::Arc;

        use super::super::decision_workload::{Decider, DecisionWorkload, BACKGROUND_PREFILL_TOKENS, BLOCK_SIZE};
        use super::{dynamo_event, BS};
        use dynamo_epp::workers::{DpRank, WorkerId as OurWorkerId, WorkerRank};
        use dynamo_kv_router::{
            services::{
                indexer::backend::Indexer,
                selection::{PromptRequest, ReservationRequest, SelectAndReserveRequest, SelectionCacheConfig, SelectionCore, WorkerLifecycle, WorkerRequest},
            },
            KvRouterConfig, RoutingPartitionId, WorkerSelectionPolicy,
        };
        use tokio_util::sync::CancellationToken;

        /// The partition every worker and request is in (the service's default model and group).
        const MODEL: &str = "default";
        const GROUP: &str = "default";

        pub struct Selection {
            core: SelectionCore,
            rt: tokio::runtime::Runtime,
            next_id: u64,
        }

        impl Selection {
            pub fn new(w: &DecisionWorkload) -> Self {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                // More than one indexer thread selects the concurrent index
                // (`ThreadPoolIndexer<ConcurrentRadixTreeCompressed>`, the service's default with
                // its 4 threads), the same index the synchronous-core subject reads; the threads
                // only apply events, all applied before timing.
                let core = SelectionCore::try_new_local(
                    KvRouterConfig::default(),
                    2,
                    CancellationToken::new(),
                    SelectionCacheConfig::default(),
                    Arc::new(|config, role, _| WorkerSelectionPolicy::reference(config.clone(), role.default_selector_label())),
                )
                .expect("selection core");
                let t = w.topology;
                rt.block_on(async {
                    // Each rank needs a KV-event endpoint to be schedulable; its ZMQ listener
                    // stays connected to a silent port (the events come in below, directly).
                    let workers = (1..=t.workers)
                        .map(|id| WorkerRequest {
                            worker_id: id,
                            endpoint: Some(format!("http://worker-{id}:8000")),
                            kv_events_endpoints: (0..t.ranks)
                                .map(|r| (r, format!("tcp://127.0.0.1:{}", 40_000 + (id - 1) * t.ranks as u64 + r as u64)))
                                .collect(),
                            block_size: Some(BS),
                            data_parallel_size: Some(t.ranks),
                            ..WorkerRequest::default()
                        })
                        .collect();
                    for r in core.upsert_workers(workers).await {
                        let record = r.expect("worker upserted");
                        assert!(matches!(record.lifecycle, WorkerLifecycle::Schedulable), "{:?}", record.not_schedulable_reasons);
                    }
                    // The scheduler learns its workers in a spawned task watching the catalog;
                    // this runtime runs it while idle (explicit reservations need it done).
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let key = RoutingPartitionId::new(MODEL, GROUP);
                    let indexer = core.partition(&key).expect("partition").indexer().clone();
                    for e in &w.stores {
                        indexer.apply_event_routed(dynamo_event(e)).await.expect("event applied");
                    }
                    let Indexer::Concurrent { primary, .. } = &indexer else { panic!("not the concurrent index") };
                    primary.flush_and_wait().await.expect("flushed");
                    // The background as explicit reservations (its HTTP `/reservations`):
                    // the same blocks on the same ranks with the same prefill load.
                    for (j, b) in w.background.iter().enumerate() {
                        let selection_id = format!("bg-{j}");
                        core.create_reservation(ReservationRequest {
                            model_name: MODEL.into(),
                            routing_group: GROUP.into(),
                            selection_id: selection_id.clone(),
                            worker_id: Some(b.worker.id.0),
                            dp_rank: Some(b.worker.dp_rank.0),
                            prompt: PromptRequest {
                                sequence_hashes: Some(b.blocks.iter().map(|&h| h as i64).collect()),
                                isl_tokens: Some(b.blocks.len() * BLOCK_SIZE),
                                ..PromptRequest::default()
                            },
                            router_config_override: None,
                            expected_output_tokens: None,
                            effective_prefill_tokens: Some(BACKGROUND_PREFILL_TOKENS as usize),
                            track_prefill_tokens: Some(true),
                        })
                        .await
                        .expect("background booked");
                        if b.prefill_done {
                            core.prefill_complete(&selection_id).await.expect("prefill completed");
                        }
                    }
                });
                Selection { core, rt, next_id: 0 }
            }
        }

        impl Decider for Selection {
            type Req = Vec<u32>;
            fn name(&self) -> &'static str {
                "dynamo select_and_reserve"
            }
            fn prepare(&self, tokens: &[u32]) -> Vec<u32> {
                tokens.to_vec()
            }
            fn decide(&mut self, tokens: &Vec<u32>) -> WorkerRank {
                let selection_id = format!("req-{}", self.next_id);
                self.next_id += 1;
                // The request owns its prompt (a server moves it out of the parsed body), so
                // each decision copies the 32 KB of token ids into it.
                let req = SelectAndReserveRequest {
                    model_name: MODEL.into(),
                    routing_group: GROUP.into(),
                    selection_id: Some(selection_id.clone()),
                    prompt: PromptRequest { token_ids: Some(tokens.clone()), ..PromptRequest::default() },
                    router_config_override: None,
                    expected_output_tokens: None,
                    priority_jump: None,
                    strict_priority: None,
                    session_id: None,
                    session_context: None,
                    affinity_target: None,
                    pinned_worker: None,
                    allowed_worker_ids: None,
                    routing_constraints: Default::default(),
                };
                let core = &self.core;
                let chosen = self.rt.block_on(async {
                    let chosen = core.select_and_reserve(req).await.expect("a worker is chosen");
                    core.free_reservation(&selection_id).await.expect("freed");
                    chosen
                });
                WorkerRank { id: OurWorkerId(chosen.worker_id), dp_rank: DpRank(chosen.dp_rank) }
            }
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
        #[cfg(feature = "dynamo-selection")]
        rows.push(bench_decider(&mut c, &w, &mut dynamo::selection::Selection::new(&w)));
    }
    c.final_summary();
    // Ours is shown as a ratio of each Dynamo subject: those after ours in the first fleet's rows.
    let per_fleet = rows.len() / TOPOLOGIES.len();
    let baselines: Vec<&str> = rows[1..per_fleet].iter().map(|r| r.name).collect();
    print_rows(&rows, baselines);
}
