//! CPU-heavy request work (parse, render, tokenize) runs off the async reactor on the pool's
//! own threads, at most `threads` large bodies at a time, so a 400 KB body never stalls other
//! streams' I/O; a job that panics or overruns its deadline fails only its own request. Small
//! bodies never queue behind huge ones: they cost tens of microseconds and are done inline.
//!
//! With a warm-up (the fast encoder, which keeps a per-thread copy of its word table: ~16 MiB,
//! 7–18 ms to make) every pool thread runs it before the pool is returned, and small bodies go
//! to the pool too — one thread more than the large-body slots, so one is always free for them —
//! instead of inline, where a reactor thread's first body would pay that copy. Threads live as
//! long as the pool: tokio's blocking pool makes and ends threads on demand.
//!
//! Huge bodies (over [`HUGE_BYTES`]) also take their size from a byte budget before a slot, so
//! the memory their tokenization takes (many times the body: parsed and rendered copies, the
//! encoder's per-byte state) is bounded by the budget rather than by the number of slots, and
//! they queue among themselves without holding up the slots other bodies need.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use tokio::sync::{oneshot, Semaphore};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("tokenization did not finish within {0} ms")]
    TimedOut(u64),
    #[error("tokenization failed: {0}")]
    Panicked(String),
}

/// Bodies up to this size are small (HF `tokenizers`: ~3 ms of work).
pub const INLINE_BYTES: usize = 16 * 1024;
/// The same with the fast encoder: its `prepare` of 64 KiB costs about what HF's of 16 KiB
/// costs in parse and render alone (under a millisecond).
pub const FAST_SMALL_BYTES: usize = 64 * 1024;
/// The same with `epp`, which keeps no per-thread table to warm: its `prepare` of 256 KiB costs
/// about what HF's of 16 KiB does (2–3 ms), and a pool hop costs two thread wake-ups — on the
/// full-path bench's loaded cores 1–2 ms at the median, more than the whole `prepare` of its
/// typical 100 KB body.
pub const EPP_INLINE_BYTES: usize = 256 * 1024;

/// Bodies above this are huge: they wait for their size in the byte budget.
pub const HUGE_BYTES: usize = 1 << 20;

type Job = Box<dyn FnOnce() + Send>;
/// Run once on each pool thread before it takes jobs.
pub type WarmUp = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
pub struct WorkPool {
    /// Large-body slots.
    permits: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
    small_bytes: usize,
    /// Small bodies run on the pool's (warmed) threads rather than inline.
    small_on_pool: bool,
    /// The byte budget of huge bodies being worked on, in KiB permits.
    huge: Arc<Semaphore>,
    huge_kib: u32,
}

impl WorkPool {
    /// `threads` = 0 means one per available core.
    pub fn new(threads: usize, timeout: Duration) -> Self {
        Self::inline_up_to(threads, timeout, INLINE_BYTES)
    }

    /// A pool that leaves bodies up to `small_bytes` inline.
    pub fn inline_up_to(threads: usize, timeout: Duration, small_bytes: usize) -> Self {
        Self::build(threads, timeout, small_bytes, None)
    }

    /// A pool whose every thread has run `warm` when this returns; bodies up to `small_bytes`
    /// run on its spare thread.
    pub fn with_warm_up(threads: usize, timeout: Duration, small_bytes: usize, warm: WarmUp) -> Self {
        Self::build(threads, timeout, small_bytes, Some(warm))
    }

    fn build(threads: usize, timeout: Duration, small_bytes: usize, warm: Option<WarmUp>) -> Self {
        let slots = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { threads };
        let small_on_pool = warm.is_some();
        let n = slots + usize::from(small_on_pool);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready) = mpsc::channel();
        for i in 0..n {
            let (rx, warm, ready_tx) = (rx.clone(), warm.clone(), ready_tx.clone());
            std::thread::Builder::new()
                .name(format!("epp-prepare-{i}"))
                .spawn(move || {
                    if let Some(w) = warm {
                        w();
                    }
                    let _ = ready_tx.send(());
                    // Ends when the pool (every sender) is dropped.
                    loop {
                        let job = rx.lock().expect("no job runs while holding the lock").recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawn a work-pool thread");
        }
        for _ in 0..n {
            ready.recv().expect("a work-pool thread died warming up");
        }
        let huge_kib = kib(DEFAULT_HUGE_BUDGET);
        WorkPool { permits: Arc::new(Semaphore::new(slots)), jobs, timeout, small_bytes, small_on_pool, huge: Arc::new(Semaphore::new(huge_kib as usize)), huge_kib }
    }

    /// Sets the byte budget of huge bodies worked on at once (`DYN_EPP_TOKENIZATION_BUDGET_BYTES`);
    /// a body larger than the whole budget runs alone.
    pub fn with_huge_budget(mut self, bytes: u64) -> Self {
        self.huge_kib = kib(bytes).max(1);
        self.huge = Arc::new(Semaphore::new(self.huge_kib as usize));
        self
    }

    /// Runs `job`, for a body of `bytes`: a small one inline (or on the spare thread), a large
    /// one on a pool thread once a slot is free. The deadline covers the wait for a slot too; a
    /// job still running at its deadline finishes in the background holding its slot (so the
    /// pool stays bounded) while its request gets `TimedOut`.
    pub async fn run<T, F>(&self, bytes: usize, job: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let small = bytes <= self.small_bytes;
        if small && !self.small_on_pool {
            return catch_unwind(AssertUnwindSafe(job)).map_err(|p| PoolError::Panicked(panic_text(p)));
        }
        let permits = self.permits.clone();
        let huge = (bytes > HUGE_BYTES).then(|| (self.huge.clone(), kib(bytes as u64).min(self.huge_kib)));
        let work = async move {
            // The budget before a slot: a huge body waiting for memory holds no thread.
            let share = match huge {
                Some((budget, n)) => Some(budget.acquire_many_owned(n).await.expect("semaphore never closed")),
                None => None,
            };
            let permit = if small { None } else { Some(permits.acquire_owned().await.expect("semaphore never closed")) };
            let (tx, rx) = oneshot::channel();
            let job: Job = Box::new(move || {
                let _slot = (permit, share);
                let _ = tx.send(catch_unwind(AssertUnwindSafe(job)).map_err(|p| PoolError::Panicked(panic_text(p))));
            });
            self.jobs.send(job).expect("the pool's threads outlive it");
            rx.await.expect("a job always answers")
        };
        match tokio::time::timeout(self.timeout, work).await {
            Err(_) => Err(PoolError::TimedOut(self.timeout.as_millis() as u64)),
            Ok(r) => r,
        }
    }
}

/// The default budget: one body of the default size limit (16 MiB) at a time.
pub const DEFAULT_HUGE_BUDGET: u64 = 16 << 20;

/// Whole KiB, rounded up (permits are counted in KiB so that a u32 covers any budget).
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panics_and_overruns_fail_only_their_job() {
        // Generous deadline: the panic hook may symbolize a backtrace first.
        let big = INLINE_BYTES + 1;
        for bytes in [1, big] {
            let e = WorkPool::new(1, Duration::from_secs(30)).run(bytes, || -> u32 { panic!("boom") }).await.unwrap_err();
            assert_eq!(e, PoolError::Panicked("boom".into()));
        }
        let pool = WorkPool::new(1, Duration::from_millis(200));
        let e = pool.run(big, || std::thread::sleep(Duration::from_millis(600))).await.unwrap_err();
        assert_eq!(e, PoolError::TimedOut(200));
        // The overrunning job still holds the only slot: a small job runs inline meanwhile, and
        // the next big one waits for the slot, then runs.
        let main = std::thread::current().id();
        assert_eq!(pool.run(1, move || std::thread::current().id() == main).await, Ok(true));
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(pool.run(big, || 7).await, Ok(7));
    }

    /// Huge bodies run at most as many at once as the byte budget holds (whatever the slots),
    /// a body over the whole budget runs alone, one past its deadline while waiting gets
    /// `TimedOut`, and bodies under `HUGE_BYTES` pass the queued huge ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn huge_bodies_share_the_byte_budget_and_never_hold_up_the_rest() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let huge = HUGE_BYTES + 1;
        // Room for two such bodies (each rounds up to 1,025 KiB), four slots.
        let pool = WorkPool::new(4, Duration::from_secs(30)).with_huge_budget(2 * 1025 * 1024);
        let (running, peak, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs = (0..6).map(|_| {
            let (pool, running, peak, done) = (pool.clone(), running.clone(), peak.clone(), done.clone());
            tokio::spawn(async move {
                pool.run(huge, move || {
                    peak.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    running.fetch_sub(1, SeqCst);
                    done.fetch_add(1, SeqCst);
                })
                .await
            })
        });
        let jobs: Vec<_> = jobs.collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A body just under the line takes a free slot at once, ahead of the queued huge ones.
        assert_eq!(pool.run(HUGE_BYTES, || 7).await, Ok(7));
        assert!(done.load(SeqCst) < 6, "the mid-size body waited for every huge one");
        for j in jobs {
            j.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(SeqCst), 2, "huge bodies at once");

        let small_budget = WorkPool::new(2, Duration::from_millis(300)).with_huge_budget(1 << 20);
        assert_eq!(small_budget.run(3 << 20, || 1).await, Ok(1), "a body over the whole budget runs alone");
        let (a, b) = (small_budget.clone(), small_budget.clone());
        let first = tokio::spawn(async move { a.run(3 << 20, || std::thread::sleep(Duration::from_millis(1500))).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.run(2 << 20, || 2).await, Err(PoolError::TimedOut(300)), "waited for the budget past the deadline");
        assert_eq!(first.await.unwrap(), Err(PoolError::TimedOut(300)));
    }

    /// Every pool thread has run the warm-up before the pool exists, jobs run on those threads
    /// only, and a small job gets the spare thread while every large-body slot is taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_warmed_threads_and_small_ones_never_wait_for_large_ones() {
        use std::collections::HashSet;
        let warmed = Arc::new(Mutex::new(HashSet::new()));
        let w = warmed.clone();
        let warm: WarmUp = Arc::new(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.lock().unwrap().insert(std::thread::current().id());
        });
        let pool = WorkPool::with_warm_up(2, Duration::from_secs(30), 100, warm);
        assert_eq!(warmed.lock().unwrap().len(), 3, "two slots and the spare thread, all warmed before returning");
        let runs = (0..12).map(|i| pool.run(if i % 2 == 0 { 1 } else { 1000 }, || std::thread::current().id()));
        for id in futures_util::future::join_all(runs).await {
            assert!(warmed.lock().unwrap().contains(&id.unwrap()), "a job ran on a thread that was not warmed");
        }
        let main = std::thread::current().id();
        assert_ne!(pool.run(1, || std::thread::current().id()).await.unwrap(), main, "small bodies are not done inline");
        // Both large slots busy for 2 s: a small job still finishes at once.
        let (a, b) = (pool.clone(), pool.clone());
        let long = || std::thread::sleep(Duration::from_secs(2));
        let big = tokio::spawn(async move { tokio::join!(a.run(1000, long), b.run(1000, long)) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        assert_eq!(pool.run(1, || 7).await, Ok(7));
        assert!(t.elapsed() < Duration::from_secs(1), "the small job waited {:?}", t.elapsed());
        let (x, y) = big.await.unwrap();
        assert!(x.is_ok() && y.is_ok());
    }
}
