//! The full-decision workload shared by `benches/decision.rs` (ours alone, any machine) and
//! `benches/dynamo-baseline/decision_vs_dynamo.rs` (ours and Dynamo's router pieces in one
//! run), so both decide the identical requests over the identical state.
//!
//! Like `kv_workload.rs` (block size 16, sequences of 512 blocks until ~1 M (rank, block)
//! pairs, sequence i on rank slot i mod slots, its first 25 % the shared prefix of one of 4
//! seeded groups) but built from token ids, because a decision starts from tokens: each
//! sequence is one Stored event carrying the local hashes of its tokens (xxh3, seed 1337) and,
//! as engine hashes, their sequence hashes (a block's whole prefix, the same on every worker,
//! as Dynamo's publishers make them). Queries are 8192-token prompts: a stored sequence (full
//! hit), a group prefix then new tokens, and new tokens only (miss).
//!
//! Background load: `BACKGROUND` requests booked on fixed ranks (request j on slot j mod
//! slots, holding the blocks of a sequence cached there, 2048 prompt tokens, every third still
//! prefilling), so the active-sequence maps the cost reads are not empty.
#![allow(dead_code)] // each bench uses a different part

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use dynamo_epp::{
    kv::{
        events::{ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent, StorageTier},
        hash::{local_block_hashes, seq_hashes, XXH3_SEED},
    },
    workers::{DpRank, Fleet, Role, Worker, WorkerId, WorkerRank},
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

pub const BLOCK_SIZE: usize = 16;
pub const SEQ_BLOCKS: usize = 512;
pub const GROUPS: usize = 4;
pub const TARGET_PAIRS: usize = 1_000_000;
pub const BACKGROUND: usize = 300;
/// Prompt tokens of a background request (its prefill load while it is still prefilling).
pub const BACKGROUND_PREFILL_TOKENS: u64 = 2048;
/// Token ids are drawn below this (a Llama-3-sized vocabulary).
const VOCAB: u32 = 128_256;

/// Workers and data-parallel ranks per worker.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub workers: u64,
    pub ranks: u32,
}

impl Topology {
    pub fn slots(&self) -> usize {
        self.workers as usize * self.ranks as usize
    }

    /// The rank a slot names: worker ids start at 1.
    pub fn rank(&self, slot: usize) -> WorkerRank {
        WorkerRank { id: WorkerId(slot as u64 / self.ranks as u64 + 1), dp_rank: DpRank(slot as u32 % self.ranks) }
    }

    pub fn label(&self) -> String {
        format!("{}x{}", self.workers, self.ranks)
    }

    /// The fleet as dynamo-epp's router is given it: aggregated workers, capacity unknown.
    pub fn fleet(&self) -> Fleet {
        let workers = (1..=self.workers)
            .map(|id| Worker {
                id: WorkerId(id),
                name: format!("worker-{id}"),
                endpoint: SocketAddr::from(([10, 0, (id / 250) as u8, (id % 250) as u8 + 1], 8000)),
                role: Role::Worker,
                dp_start_rank: 0,
                dp_size: self.ranks,
                total_kv_blocks: None,
                max_num_batched_tokens: None,
                kv_events: None,
            })
            .collect();
        Fleet { block_size: Some(BLOCK_SIZE as u32), workers }
    }
}

/// One request that is already running when the decisions are timed.
pub struct Background {
    pub worker: WorkerRank,
    /// Sequence hashes of its prompt blocks (Dynamo's block keys, and ours with replica sync).
    pub blocks: Vec<u64>,
    /// Local hashes of the same blocks (our block keys without replica sync).
    pub local_blocks: Vec<u64>,
    /// True once its first token came: its prompt no longer loads prefill.
    pub prefill_done: bool,
}

pub struct DecisionWorkload {
    pub topology: Topology,
    /// One whole-sequence Stored event per sequence.
    pub stores: Vec<RouterEvent>,
    /// Distinct (rank, block) residencies after all stores.
    pub residencies: usize,
    pub background: Vec<Background>,
    pub full_hit: Vec<Vec<u32>>,
    /// The rank holding each full-hit query's sequence: where a decision must send it.
    pub full_hit_holder: Vec<WorkerRank>,
    pub prefix_then_new: Vec<Vec<u32>>,
    pub miss: Vec<Vec<u32>>,
}

impl DecisionWorkload {
    /// The query kinds, named as the benches report them.
    pub fn kinds(&self) -> [(&'static str, &Vec<Vec<u32>>); 3] {
        [("full_hit", &self.full_hit), ("prefix_then_new", &self.prefix_then_new), ("miss", &self.miss)]
    }
}

fn tokens(rng: &mut SmallRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..VOCAB)).collect()
}

pub fn build(topology: Topology, queries: usize) -> DecisionWorkload {
    let mut rng = SmallRng::seed_from_u64(0xDEC1_5104 + topology.slots() as u64);
    let seq_tokens = SEQ_BLOCKS * BLOCK_SIZE;
    let prefix_tokens = seq_tokens / 4;
    let groups: Vec<Vec<u32>> = (0..GROUPS).map(|_| tokens(&mut rng, prefix_tokens)).collect();
    let n_seqs = TARGET_PAIRS / SEQ_BLOCKS;
    let slots = topology.slots();
    // The sequences kept as full-hit queries; their token vectors are the only ones kept.
    let hit_picks: Vec<usize> = (0..queries).map(|_| rng.random_range(0..n_seqs)).collect();
    let wanted: HashSet<usize> = hit_picks.iter().copied().collect();
    let mut kept = HashMap::new();
    let mut stores = Vec::with_capacity(n_seqs);
    let mut seq_blocks_of = Vec::with_capacity(n_seqs);
    let mut distinct = HashSet::new();
    let mut event_ids = vec![0u64; slots];
    for i in 0..n_seqs {
        let slot = i % slots;
        let rank = topology.rank(slot);
        let mut t = groups[rng.random_range(0..GROUPS)].clone();
        t.extend(tokens(&mut rng, seq_tokens - prefix_tokens));
        let locals = local_block_hashes(&t, BLOCK_SIZE, XXH3_SEED);
        let seqs: Vec<u64> = seq_hashes(&locals).into_iter().map(|s| s.0).collect();
        distinct.extend(seqs.iter().map(|&s| (rank, s)));
        let blocks = seqs
            .iter()
            .zip(&locals)
            .map(|(&s, &l)| KvCacheStoredBlockData { block_hash: ExternalBlockHash(s), tokens_hash: l, mm_extra_info: None })
            .collect();
        event_ids[slot] += 1;
        stores.push(RouterEvent {
            worker_id: rank.id,
            storage_tier: StorageTier::Device,
            residency_domain: None,
            event: KvCacheEvent {
                event_id: event_ids[slot],
                data: KvCacheEventData::Stored(KvCacheStoreData { parent_hash: None, start_position: None, blocks }),
                dp_rank: rank.dp_rank.0,
            },
        });
        seq_blocks_of.push((seqs, locals.iter().map(|l| l.0).collect::<Vec<u64>>()));
        if wanted.contains(&i) {
            kept.insert(i, t);
        }
    }
    let background = (0..BACKGROUND)
        .map(|j| {
            let slot = j % slots;
            // A sequence cached on that slot (sequence i lives on slot i mod slots).
            let seq = slot + slots * (j / slots % (n_seqs / slots));
            let (blocks, local_blocks) = seq_blocks_of[seq].clone();
            Background { worker: topology.rank(slot), blocks, local_blocks, prefill_done: j % 3 != 0 }
        })
        .collect();
    let full_hit = hit_picks.iter().map(|i| kept[i].clone()).collect();
    let full_hit_holder = hit_picks.iter().map(|i| topology.rank(i % slots)).collect();
    let prefix_then_new = (0..queries)
        .map(|_| {
            let mut t = groups[rng.random_range(0..GROUPS)].clone();
            t.extend(tokens(&mut rng, seq_tokens - prefix_tokens));
            t
        })
        .collect();
    let miss = (0..queries).map(|_| tokens(&mut rng, seq_tokens)).collect();
    DecisionWorkload { topology, stores, residencies: distinct.len(), background, full_hit, full_hit_holder, prefix_then_new, miss }
}

/// The two fleets the benches decide over: 100 single-rank workers, and 32 workers of 8 ranks.
pub const TOPOLOGIES: [Topology; 2] = [Topology { workers: 100, ranks: 1 }, Topology { workers: 32, ranks: 8 }];

/// A router under test, driven through its own public API.
pub trait Decider {
    /// A prompt in the subject's own request type, built before any timing (the server owns
    /// the tokenizer's output already).
    type Req;
    fn name(&self) -> &'static str;
    fn prepare(&self, tokens: &[u32]) -> Self::Req;
    /// One full decision for a prompt (hash its tokens, query the index, score every rank,
    /// select, book) and then the end of that request (free the booking). Returns the rank
    /// chosen.
    fn decide(&mut self, req: &Self::Req) -> WorkerRank;
}

/// One subject's percentiles on one fleet: (query kind, p50, p99).
pub struct Row {
    pub name: &'static str,
    pub topology: Topology,
    pub decisions: Vec<(&'static str, Duration, Duration)>,
    /// Where each full hit went, and how many went to their holder.
    pub full_hit_choices: Vec<WorkerRank>,
    pub to_holder: usize,
}

/// Checks the subject sends most full hits to the rank holding them (≥ 3/4; the holder wins by
/// its prefill credit unless its load is unusually high; at random it would be ~1 %), so it is
/// seen to have applied the workload, then times decisions: criterion
/// (mean, spread) and one-by-one timing for p50/p99.
pub fn bench_decider<D: Decider>(c: &mut criterion::Criterion, w: &DecisionWorkload, d: &mut D) -> Row {
    let kinds: Vec<(&'static str, Vec<D::Req>)> =
        w.kinds().into_iter().map(|(kind, qs)| (kind, qs.iter().map(|q| d.prepare(q)).collect())).collect();
    let full_hit_choices: Vec<WorkerRank> = kinds[0].1.iter().map(|q| d.decide(q)).collect();
    let to_holder = full_hit_choices.iter().zip(&w.full_hit_holder).filter(|(a, b)| a == b).count();
    assert!(to_holder * 4 >= full_hit_choices.len() * 3, "{} sent only {to_holder} full hits to their holder", d.name());
    let mut g = c.benchmark_group(format!("decision-{}", w.topology.label()));
    g.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for (kind, qs) in &kinds {
        let mut k = 0;
        g.bench_function(format!("{kind}/{}", d.name()), |b| {
            b.iter(|| {
                k = (k + 1) % qs.len();
                d.decide(&qs[k])
            })
        });
    }
    g.finish();
    let decisions = kinds
        .iter()
        .map(|(kind, qs)| {
            let mut ts = Vec::with_capacity(qs.len() * 20);
            for _ in 0..20 {
                for q in qs.iter() {
                    let t = Instant::now();
                    std::hint::black_box(d.decide(q));
                    ts.push(t.elapsed());
                }
            }
            ts.sort_unstable();
            (*kind, ts[ts.len() / 2], ts[ts.len() * 99 / 100])
        })
        .collect();
    Row { name: d.name(), topology: w.topology, decisions, full_hit_choices, to_holder }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Per query kind, `r`'s p50 / p99 ÷ `base`'s.
pub fn ratio_cells(r: &Row, base: &Row) -> Vec<String> {
    r.decisions.iter().zip(&base.decisions).map(|((_, a50, a99), (_, b50, b99))| format!("{:.2} / {:.2}", us(*a50) / us(*b50), us(*a99) / us(*b99))).collect()
}

/// The percentiles table; then, per baseline subject, every other subject's ratio to it.
pub fn print_rows<'a>(rows: &[Row], baselines: impl IntoIterator<Item = &'a str>) {
    println!("\n| router | fleet | full hit p50/p99 µs | prefix+new p50/p99 µs | miss p50/p99 µs | full hits to holder |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in rows {
        let cells: Vec<String> = r.decisions.iter().map(|(_, a, b)| format!("{:.2} / {:.2}", us(*a), us(*b))).collect();
        println!("| {} | {} | {} | {}/{} |", r.name, r.topology.label(), cells.join(" | "), r.to_holder, r.full_hit_choices.len());
    }
    let baselines: Vec<&str> = baselines.into_iter().collect();
    for base in &baselines {
        println!("\n| fleet | ratio ours/{base} | full hit p50 / p99 | prefix+new p50 / p99 | miss p50 / p99 | same full-hit choice |");
        println!("|---|---|---:|---:|---:|---:|");
        for r in rows.iter().filter(|r| !baselines.contains(&r.name)) {
            let Some(b) = rows.iter().find(|b| b.name == *base && b.topology.label() == r.topology.label()) else { continue };
            let cells = ratio_cells(r, b);
            let same = r.full_hit_choices.iter().zip(&b.full_hit_choices).filter(|(x, y)| x == y).count();
            println!("| {} | {} | {} | {same}/{} |", r.topology.label(), r.name, cells.join(" | "), r.full_hit_choices.len());
        }
    }
}

/// dynamo-epp's router: the fleet set, every store applied, the background booked (as peer
/// bookings, which load a rank exactly as our own do). Time is frozen at set-up so nothing
/// expires while the benches run.
pub struct Ours {
    pub router: dynamo_epp::router::Router,
    pub rng: SmallRng,
    pub now: Instant,
    name: &'static str,
    /// Requests weighed with each one before it is decided, as a decision window's group,
    /// with their lookups (a group takes each once).
    group: Vec<(dynamo_epp::router::RoutingRequest, dynamo_epp::router::Lookup)>,
}

impl Ours {
    /// With Dynamo's defaults (the `cost` policy).
    pub fn new(w: &DecisionWorkload) -> Self {
        Self::with_policy(w, dynamo_epp::sched::RoutingPolicy::Cost, "dynamo-epp")
    }

    /// With the defaults but `policy`, reported as `name`.
    pub fn with_policy(w: &DecisionWorkload, policy: dynamo_epp::sched::RoutingPolicy, name: &'static str) -> Self {
        use dynamo_epp::router::{KvSettings, PeerEvent, PeerEventData, Router};
        use dynamo_epp::sched::SchedSettings;
        let mut router = Router::new(KvSettings::default(), SchedSettings { policy, ..SchedSettings::default() });
        router.set_fleet(w.topology.fleet());
        for e in &w.stores {
            router.apply(e);
        }
        let now = Instant::now();
        for (j, b) in w.background.iter().enumerate() {
            let ev = |data| PeerEvent { request_id: format!("bg-{j}"), worker: b.worker, data };
            // Booked as a peer's bookings, in the keys our router counts blocks by (sync is off).
            let add = PeerEventData::Add { blocks: Some(b.local_blocks.clone()), prefill_tokens: BACKGROUND_PREFILL_TOKENS, expected_output_tokens: None };
            router.apply_peer(1, ev(add), now);
            if b.prefill_done {
                router.apply_peer(1, ev(PeerEventData::PrefillCompleted), now);
            }
        }
        Ours { router, rng: SmallRng::seed_from_u64(7), now, name, group: Vec::new() }
    }

    /// Each request decided as the last of a decision window's group of `k` (the other
    /// `k − 1`: prompts of every query kind): its lookup, `Router::most_constrained` weighing
    /// all `k` (the most a pick in a group of `k` weighs), its decision with that lookup.
    /// Reported as `name`.
    pub fn in_groups_of(mut self, k: usize, w: &DecisionWorkload, name: &'static str) -> Self {
        let prompts = w.kinds().into_iter().flat_map(|(_, qs)| qs.iter().take(k));
        self.group = prompts
            .take(k - 1)
            .map(|t| {
                let req = dynamo_epp::router::RoutingRequest { tokens: t.clone(), ..Default::default() };
                let l = self.router.lookup(&req);
                (req, l)
            })
            .collect();
        self.name = name;
        self
    }

    /// Plus `n` requests of our own decoding, each with an expected output (what
    /// `predicted-ttft`'s E2E guard weighs), reported as `name`.
    pub fn with_own_decodes(mut self, n: usize, name: &'static str) -> Self {
        for i in 0..n as u32 {
            let tokens = (0..256).map(|t| 1_000_000 + i * 256 + t).collect();
            let req = dynamo_epp::router::RoutingRequest { tokens, osl: Some(1000), ..Default::default() };
            let d = self.router.route(&req, self.now, &mut self.rng).expect("a worker is chosen");
            self.router.on_first_token(d.booking, self.now);
        }
        self.name = name;
        self
    }
}

impl Decider for Ours {
    type Req = dynamo_epp::router::RoutingRequest;
    fn name(&self) -> &'static str {
        self.name
    }
    fn prepare(&self, tokens: &[u32]) -> Self::Req {
        dynamo_epp::router::RoutingRequest { tokens: tokens.to_vec(), ..Default::default() }
    }
    fn decide(&mut self, req: &Self::Req) -> WorkerRank {
        let d = if self.group.is_empty() {
            self.router.route(req, self.now, &mut self.rng)
        } else {
            let own = self.router.lookup(req);
            std::hint::black_box(self.router.most_constrained(self.group.iter().map(|(r, l)| (r, l)).chain([(req, &own)])));
            self.router.route_binding(req, Some(&own), dynamo_epp::router::Bind::Now, self.now, &mut self.rng)
        }
        .expect("a worker is chosen");
        self.router.on_end(d.booking, self.now);
        d.decode.worker
    }
}
