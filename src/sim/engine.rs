//! A simulated inference engine (one worker), with the defaults of Dynamo's mocker so results
//! compare: a prefix-cached paged KV cache evicting unreferenced blocks LRU-first, and a
//! vLLM-like scheduler (token budget per pass, chunked prefill, running requests first, then
//! waiting ones FCFS) whose pass time follows a fitted prefill/decode model.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
};

use super::trace::reusable_tokens;

/// Engine model parameters; every one is a simulator flag.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EngineParams {
    pub kv_blocks: u32,
    pub block_tokens: u32,
    pub max_batch_tokens: u32,
    pub max_running: usize,
    /// prefill ms = a·T² + b·T + c, T = new prompt tokens in the pass.
    pub prefill_ms: [f64; 3],
    /// decode ms = max(1, a·p² + b·p + c), p = min(1, decoding context ÷ `decode_context_norm`).
    pub decode_ms: [f64; 3],
    pub decode_context_norm: f64,
}

impl Default for EngineParams {
    fn default() -> Self {
        EngineParams {
            kv_blocks: 16_384,
            block_tokens: 64,
            max_batch_tokens: 8_192,
            max_running: 256,
            prefill_ms: [4.209989e-07, 1.518344e-02, 16.50142],
            decode_ms: [-25.74, 54.01, 5.74],
            decode_context_norm: 1_048_576.0,
        }
    }
}

impl EngineParams {
    /// Duration of one pass in ms.
    pub fn pass_ms(&self, prefill_tokens: u64, decoding: usize, decode_context: u64) -> f64 {
        let mut ms = 0.0;
        if prefill_tokens > 0 {
            let t = prefill_tokens as f64;
            let [a, b, c] = self.prefill_ms;
            ms += a * t * t + b * t + c;
        }
        if decoding > 0 {
            let p = (decode_context as f64 / self.decode_context_norm).min(1.0);
            let [a, b, c] = self.decode_ms;
            ms += (a * p * p + b * p + c).max(1.0);
        }
        ms
    }

    /// A prompt's prefill alone on an idle engine (ms): `tokens` in passes of at most
    /// `max_batch_tokens` — the floor under its TTFT that no routing or queue order lowers.
    pub fn prefill_alone_ms(&self, tokens: u64) -> f64 {
        let budget = self.max_batch_tokens.max(1) as u64;
        let (full, rest) = (tokens / budget, tokens % budget);
        full as f64 * self.pass_ms(budget, 0, 0) + if rest > 0 { self.pass_ms(rest, 0, 0) } else { 0.0 }
    }
}

/// A request as the engine sees it.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub id: usize,
    pub isl: u32,
    pub osl: u32,
    /// (sequence hash, local hash) of each full prompt block (shared: an engine is cloned
    /// per candidate by the oracle).
    pub blocks: Arc<[(u64, u64)]>,
}

/// Something the engine tells the world at the end of a pass.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// A chain of full blocks entered the prefix cache: (sequence hash, local hash, parent
    /// sequence hash) each, every block's parent being the one before it.
    Stored(Vec<(u64, u64, Option<u64>)>),
    /// Blocks left the prefix cache.
    Removed(Vec<u64>),
    /// A request produced its first token, reusing `reused` prompt tokens.
    FirstToken { id: usize, reused: u32 },
    Finished { id: usize },
}

#[derive(Clone)]
struct Running {
    req: EngineRequest,
    /// Prompt tokens computed or reused so far.
    computed: u32,
    /// Leading prompt blocks pinned in the cache.
    pinned: usize,
    generated: u32,
    /// Blocks held outside the cache: the partial prompt block and output blocks.
    private: u32,
    reused: u32,
}

impl Running {
    fn prefilling(&self) -> bool {
        self.computed < self.req.isl
    }

    fn context(&self) -> u64 {
        (self.req.isl + self.generated) as u64
    }

    fn held(&self) -> u64 {
        self.pinned as u64 + self.private as u64
    }
}

/// A cached block: its references, and when it last became unreferenced.
#[derive(Clone, Copy)]
struct Cached {
    refs: u32,
    released: u64,
}

/// One more reference to a cached block; an unreferenced one stops being evictable.
fn take_ref(c: &mut Cached, idle_len: &mut u32) {
    if c.refs == 0 {
        *idle_len -= 1;
    }
    c.refs += 1;
}

/// One worker's engine. Cloning is cheap enough to run one forward per candidate and request
/// (the oracle): the LRU order is a heap of flat entries, not a linked list.
#[derive(Clone)]
pub struct Engine {
    p: EngineParams,
    /// Cached blocks; unreferenced ones are evictable, least recently released first.
    cache: HashMap<u64, Cached>,
    /// (release stamp, hash) of unreferenced blocks; an entry whose block was referenced
    /// again (or evicted) since is stale and skipped.
    idle: BinaryHeap<Reverse<(u64, u64)>>,
    /// Unreferenced cached blocks.
    idle_len: u32,
    clock: u64,
    private: u32,
    /// Queued requests with the tokens they had generated before a preemption.
    waiting: VecDeque<(EngineRequest, u32)>,
    running: Vec<Running>,
    /// What the current pass does, applied at its end.
    pass: Option<Pass>,
}

#[derive(Clone)]
struct Pass {
    /// (index into `running`, prompt tokens computed) for prefill chunks.
    chunks: Vec<(usize, u32)>,
    decodes: Vec<usize>,
}

impl Engine {
    pub fn new(p: EngineParams) -> Self {
        Engine {
            p,
            cache: HashMap::new(),
            idle: BinaryHeap::new(),
            idle_len: 0,
            clock: 0,
            private: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pass: None,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.pass.is_some()
    }

    /// Requests queued or running.
    pub fn load(&self) -> usize {
        self.waiting.len() + self.running.len()
    }

    pub fn enqueue(&mut self, r: EngineRequest) {
        self.waiting.push_back((r, 0));
    }

    pub fn params(&self) -> &EngineParams {
        &self.p
    }

    fn pinned_blocks(&self) -> u32 {
        self.cache.len() as u32 - self.idle_len
    }

    fn free_blocks(&self) -> u32 {
        self.p.kv_blocks.saturating_sub(self.pinned_blocks() + self.private + self.idle_len)
    }

    fn is_idle(&self, h: &u64) -> bool {
        self.cache.get(h).is_some_and(|c| c.refs == 0)
    }

    /// References cached block `h` once more (it must be cached).
    fn reference(&mut self, h: &u64) {
        take_ref(self.cache.get_mut(h).expect("cached"), &mut self.idle_len);
    }

    /// Drops one reference to cached block `h`; unreferenced, it becomes the most recently
    /// released evictable block.
    fn unreference(&mut self, h: u64) {
        let c = self.cache.get_mut(&h).expect("pinned blocks are cached");
        c.refs -= 1;
        if c.refs > 0 {
            return;
        }
        self.clock += 1;
        c.released = self.clock;
        self.idle.push(Reverse((self.clock, h)));
        self.idle_len += 1;
        // Stale entries pile up while blocks are re-referenced: rebuild (same order) now and then.
        if self.idle.len() > 2 * self.idle_len as usize + 1024 {
            self.idle = self.cache.iter().filter(|(_, c)| c.refs == 0).map(|(&h, c)| Reverse((c.released, h))).collect();
        }
    }

    /// Removes the least recently released unreferenced block from the cache.
    fn evict_lru(&mut self) -> Option<u64> {
        while let Some(Reverse((stamp, h))) = self.idle.pop() {
            if self.cache.get(&h).is_some_and(|c| c.refs == 0 && c.released == stamp) {
                self.cache.remove(&h);
                self.idle_len -= 1;
                return Some(h);
            }
        }
        None
    }

    /// Takes one block for private use, evicting the least recently used unreferenced block
    /// if none is free.
    fn alloc(&mut self, removed: &mut Vec<u64>) -> bool {
        if self.free_blocks() == 0 {
            let Some(h) = self.evict_lru() else { return false };
            removed.push(h);
        }
        self.private += 1;
        true
    }

    fn leading_cached(&self, r: &EngineRequest) -> usize {
        r.blocks.iter().take_while(|(s, _)| self.cache.contains_key(s)).count()
    }

    /// Starts a pass if there is work; returns its duration in ms.
    pub fn start_pass(&mut self, events: &mut Vec<EngineEvent>) -> Option<f64> {
        debug_assert!(self.pass.is_none());
        let mut budget = self.p.max_batch_tokens;
        let mut pass = Pass { chunks: Vec::new(), decodes: Vec::new() };
        let mut removed = Vec::new();
        let (mut prefill_tokens, mut decode_ctx) = (0u64, 0u64);
        let bt = self.p.block_tokens as u64;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let r = &self.running[i];
            if r.prefilling() {
                let n = (r.req.isl - r.computed).min(budget);
                budget -= n;
                prefill_tokens += n as u64;
                pass.chunks.push((i, n));
                self.cache_scheduled(i, n, &mut removed, events);
                i += 1;
                continue;
            }
            // The next token needs a new block when it crosses a block boundary.
            if (r.context() + 1).div_ceil(bt) > r.held() {
                if !self.alloc(&mut removed) {
                    // No room: preempt the newest request (vLLM's recompute preemption), or
                    // this one if it is the newest; a lone request may exceed the cache.
                    if self.running.len() == 1 {
                        self.private += 1;
                    } else {
                        let victim = self.running.len() - 1;
                        self.preempt(victim);
                        continue;
                    }
                }
                self.running[i].private += 1;
            }
            budget -= 1;
            decode_ctx += self.running[i].context();
            pass.decodes.push(i);
            i += 1;
        }
        // Admit waiting requests FCFS while the budget, the running limit and the cache allow.
        while budget > 0 && self.running.len() < self.p.max_running {
            let Some((r, _)) = self.waiting.front() else { break };
            let hit = self.leading_cached(r);
            let full = r.blocks.len();
            let partial = u32::from(r.isl % self.p.block_tokens != 0);
            let from_lru = r.blocks[..hit].iter().filter(|(s, _)| self.is_idle(s)).count() as u32;
            let needed = (full - hit) as u32 + partial;
            if self.free_blocks() + self.idle_len - from_lru < needed {
                break;
            }
            let (r, generated) = self.waiting.pop_front().expect("front exists");
            for (s, _) in &r.blocks[..hit] {
                self.reference(s);
            }
            for _ in 0..needed {
                let ok = self.alloc(&mut removed);
                debug_assert!(ok, "room was checked");
            }
            let reused = reusable_tokens(r.isl, hit as u32, self.p.block_tokens);
            let n = (r.isl - reused).min(budget);
            budget -= n;
            prefill_tokens += n as u64;
            pass.chunks.push((self.running.len(), n));
            self.running.push(Running { req: r, computed: reused, pinned: hit, generated, private: needed, reused });
            self.cache_scheduled(self.running.len() - 1, n, &mut removed, events);
        }
        if !removed.is_empty() {
            events.push(EngineEvent::Removed(removed));
        }
        if pass.chunks.is_empty() && pass.decodes.is_empty() {
            return None;
        }
        let ms = self.p.pass_ms(prefill_tokens, pass.decodes.len(), decode_ctx);
        self.pass = Some(pass);
        Some(ms)
    }

    /// Applies the pass that just ended.
    pub fn end_pass(&mut self, events: &mut Vec<EngineEvent>) {
        let Some(pass) = self.pass.take() else { return };
        for (i, n) in pass.chunks {
            let r = &mut self.running[i];
            r.computed += n;
            if !r.prefilling() {
                // A resumed request already sent its first token.
                if r.generated == 0 {
                    events.push(EngineEvent::FirstToken { id: r.req.id, reused: r.reused });
                }
                r.generated += 1;
            }
        }
        for i in pass.decodes {
            self.running[i].generated += 1;
        }
        // Finished requests release their blocks; unreferenced cached ones become evictable.
        let mut k = 0;
        while k < self.running.len() {
            let r = &self.running[k];
            if r.prefilling() || r.generated < r.req.osl.max(1) {
                k += 1;
                continue;
            }
            let r = self.release(k);
            events.push(EngineEvent::Finished { id: r.req.id });
        }
    }

    /// Makes the full blocks that running request `i`'s next `n` prompt tokens complete visible
    /// in the prefix cache at once, as the mocker (like vLLM) does when it schedules the chunk,
    /// not when the pass ends: the router hears of them a pass earlier. A block another request
    /// already stored is joined; each unbroken run of new blocks is one Stored chain.
    /// Evictions so far are reported first, so a block evicted and stored again in one pass
    /// ends up cached in the router's view too.
    fn cache_scheduled(&mut self, i: usize, n: u32, removed: &mut Vec<u64>, events: &mut Vec<EngineEvent>) {
        if !removed.is_empty() {
            events.push(EngineEvent::Removed(std::mem::take(removed)));
        }
        let blocks = Arc::clone(&self.running[i].req.blocks);
        let done = (((self.running[i].computed + n) / self.p.block_tokens) as usize).min(blocks.len());
        let mut chain = Vec::new();
        while self.running[i].pinned < done {
            let pinned = self.running[i].pinned;
            let (s, l) = blocks[pinned];
            let parent = pinned.checked_sub(1).map(|p| blocks[p].0);
            match self.cache.get_mut(&s) {
                Some(c) => {
                    take_ref(c, &mut self.idle_len);
                    if !chain.is_empty() {
                        events.push(EngineEvent::Stored(std::mem::take(&mut chain)));
                    }
                }
                None => {
                    self.cache.insert(s, Cached { refs: 1, released: 0 });
                    chain.push((s, l, parent));
                }
            }
            let r = &mut self.running[i];
            r.pinned += 1;
            r.private -= 1;
            self.private -= 1;
        }
        if !chain.is_empty() {
            events.push(EngineEvent::Stored(chain));
        }
    }

    /// Removes running request `k` and releases its blocks; unreferenced cached ones become
    /// evictable.
    fn release(&mut self, k: usize) -> Running {
        let r = self.running.remove(k);
        for &(s, _) in &r.req.blocks[..r.pinned] {
            self.unreference(s);
        }
        self.private -= r.private;
        r
    }

    /// Sends running request `k` back to the queue's head; its prompt is computed again.
    fn preempt(&mut self, k: usize) {
        let r = self.release(k);
        self.waiting.push_front((r.req, r.generated));
    }

    /// Blocks in use (pinned, private, cached): for tests.
    pub fn used_blocks(&self) -> u32 {
        self.pinned_blocks() + self.private + self.idle_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> EngineParams {
        EngineParams { kv_blocks: 8, block_tokens: 4, max_batch_tokens: 16, max_running: 4, ..Default::default() }
    }

    fn req(id: usize, isl: u32, osl: u32, blocks: &[u64]) -> EngineRequest {
        EngineRequest { id, isl, osl, blocks: blocks.iter().map(|&b| (b, b + 100)).collect() }
    }

    fn run_all(e: &mut Engine) -> Vec<EngineEvent> {
        let mut ev = Vec::new();
        while e.start_pass(&mut ev).is_some() {
            e.end_pass(&mut ev);
        }
        ev
    }

    #[test]
    fn pass_time_follows_the_model() {
        let p = EngineParams::default();
        assert!((p.pass_ms(1000, 0, 0) - (4.209989e-07 * 1e6 + 15.18344 + 16.50142)).abs() < 1e-9);
        assert!((p.pass_ms(0, 3, 0) - 5.74).abs() < 1e-12);
        assert!((p.pass_ms(0, 1, 1 << 20) - (-25.74 + 54.01 + 5.74)).abs() < 1e-9);
        assert_eq!(p.pass_ms(0, 0, 0), 0.0);
    }

    #[test]
    fn prefix_reuse_keeps_one_token_and_stores_new_blocks() {
        let mut e = Engine::new(params());
        e.enqueue(req(1, 8, 2, &[1, 2]));
        let ev = run_all(&mut e);
        assert!(ev.contains(&EngineEvent::Stored(vec![(1, 101, None), (2, 102, Some(1))])));
        assert!(ev.contains(&EngineEvent::FirstToken { id: 1, reused: 0 }));
        assert!(ev.contains(&EngineEvent::Finished { id: 1 }));
        // The same prompt again: 2 blocks cached, but one token is recomputed → 4 reused.
        e.enqueue(req(2, 8, 1, &[1, 2]));
        let ev = run_all(&mut e);
        assert!(ev.contains(&EngineEvent::FirstToken { id: 2, reused: 4 }));
        assert!(!ev.iter().any(|x| matches!(x, EngineEvent::Stored(_))));
    }

    #[test]
    fn blocks_are_cached_when_scheduled_so_a_request_admitted_in_the_same_pass_reuses_them() {
        let mut e = Engine::new(EngineParams { kv_blocks: 64, ..params() });
        e.enqueue(req(1, 9, 1, &[1, 2]));
        e.enqueue(req(2, 12, 1, &[1, 2, 3]));
        let mut ev = Vec::new();
        e.start_pass(&mut ev).unwrap();
        // Before the pass ends the router already hears of request 1's two blocks; request 2,
        // admitted behind it in the same pass, finds them and computes only its last block.
        assert_eq!(ev.first(), Some(&EngineEvent::Stored(vec![(1, 101, None), (2, 102, Some(1))])), "{ev:?}");
        e.end_pass(&mut ev);
        assert!(ev.contains(&EngineEvent::FirstToken { id: 2, reused: 8 }), "{ev:?}");
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget_and_running_go_first() {
        let mut e = Engine::new(EngineParams { kv_blocks: 64, ..params() });
        e.enqueue(req(1, 40, 3, &(1..=10).collect::<Vec<_>>()));
        let mut ev = Vec::new();
        // 40 prompt tokens at 16 per pass: first token after the third pass.
        for _ in 0..2 {
            e.start_pass(&mut ev).unwrap();
            e.end_pass(&mut ev);
            assert!(!ev.iter().any(|x| matches!(x, EngineEvent::FirstToken { .. })));
        }
        e.enqueue(req(2, 4, 1, &[50]));
        e.start_pass(&mut ev).unwrap(); // 8 tokens of request 1, then request 2's 4
        e.end_pass(&mut ev);
        assert!(ev.contains(&EngineEvent::FirstToken { id: 1, reused: 0 }));
        assert!(ev.contains(&EngineEvent::FirstToken { id: 2, reused: 0 }));
    }

    #[test]
    fn unreferenced_blocks_are_evicted_lru_first_when_space_runs_out() {
        let mut e = Engine::new(params()); // 8 blocks of 4 tokens
        e.enqueue(req(1, 16, 1, &[1, 2, 3, 4]));
        run_all(&mut e);
        e.enqueue(req(2, 12, 1, &[5, 6, 7]));
        run_all(&mut e);
        assert_eq!(e.used_blocks(), 7);
        // 12 new tokens need 3 blocks: only 1 is free, so 1 and 2 (oldest) are evicted.
        e.enqueue(req(3, 12, 1, &[8, 9, 10]));
        let ev = run_all(&mut e);
        assert!(ev.contains(&EngineEvent::Removed(vec![1, 2])), "{ev:?}");
        assert!(e.used_blocks() <= 8);
    }

    #[test]
    fn eviction_stays_least_recently_released_first_after_many_reuses() {
        let mut e = Engine::new(params()); // 8 blocks of 4 tokens
        e.enqueue(req(1, 9, 1, &[1, 2]));
        run_all(&mut e);
        e.enqueue(req(2, 9, 1, &[3, 4]));
        run_all(&mut e);
        // Blocks 1 and 2 taken and released 600 times: the LRU heap fills with stale entries
        // and is rebuilt on the way; they end up released after 3 and 4.
        for id in 3..603 {
            e.enqueue(req(id, 9, 1, &[1, 2]));
            run_all(&mut e);
        }
        assert!(e.idle.len() < 1100, "stale entries are dropped: {}", e.idle.len());
        // 24 new tokens need 6 blocks with 4 free: the two released longest ago, 3 and 4, are
        // evicted, not 1 and 2 (released last).
        e.enqueue(req(700, 24, 1, &[5, 6, 7, 8, 9, 10]));
        let ev = run_all(&mut e);
        let removed: Vec<u64> = ev.iter().filter_map(|x| if let EngineEvent::Removed(v) = x { Some(v.clone()) } else { None }).flatten().collect();
        assert_eq!(removed, [3, 4], "{ev:?}");
    }

    #[test]
    fn when_decode_runs_out_of_blocks_the_newest_request_is_preempted_and_resumes() {
        let mut e = Engine::new(params()); // 8 blocks of 4 tokens
        e.enqueue(req(1, 12, 8, &[1, 2, 3])); // 3 blocks, grows to 5
        e.enqueue(req(2, 12, 8, &[4, 5, 6]));
        let ev = run_all(&mut e);
        let firsts = ev.iter().filter(|x| matches!(x, EngineEvent::FirstToken { .. })).count();
        let done: Vec<_> = ev.iter().filter_map(|x| if let EngineEvent::Finished { id } = x { Some(*id) } else { None }).collect();
        assert_eq!(firsts, 2, "a resumed request sends no second first token");
        assert_eq!(done.len(), 2, "{ev:?}");
        assert_eq!(e.private, 0);
        assert!(e.used_blocks() <= 8);
    }

    #[test]
    fn a_request_that_does_not_fit_waits_until_blocks_free() {
        let mut e = Engine::new(params());
        e.enqueue(req(1, 28, 6, &[1, 2, 3, 4, 5, 6, 7])); // 7 blocks, then an output block
        e.enqueue(req(2, 8, 1, &[8, 9]));
        let mut ev = Vec::new();
        e.start_pass(&mut ev).unwrap();
        assert_eq!(e.load(), 2);
        assert_eq!(e.running.len(), 1, "request 2 must wait for room");
        e.end_pass(&mut ev);
        let ev = run_all(&mut e);
        assert!(ev.contains(&EngineEvent::Finished { id: 2 }));
        assert_eq!(e.private, 0);
    }
}
