//! CPU-heavy request work (parse, render, tokenize) runs off the async reactor on the pool's
//! own threads, at most one job per thread, so a 400 KB body never stalls other streams' I/O;
//! a job that panics or overruns its deadline fails only its own request. Small bodies are done
//! inline: they cost tens of microseconds, less than a thread hand-off, and must not queue
//! behind huge ones.
//!
//! The threads live as long as the pool and each runs a warm-up before the pool is returned: the
//! fast encoder keeps a per-thread copy of its word table (~16 MiB, 7–18 ms to make), which a
//! thread made on demand (tokio's blocking pool) would pay on some request.

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

/// Bodies up to this size are prepared on the calling task (HF `tokenizers`: ~3 ms of work).
pub const INLINE_BYTES: usize = 16 * 1024;

type Job = Box<dyn FnOnce() + Send>;
/// Run once on each pool thread before it takes jobs.
pub type WarmUp = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
pub struct WorkPool {
    permits: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
    inline_bytes: usize,
}

impl WorkPool {
    /// `threads` = 0 means one per available core.
    pub fn new(threads: usize, timeout: Duration) -> Self {
        Self::with_warm_up(threads, timeout, INLINE_BYTES, None)
    }

    /// Bodies up to `inline_bytes` are prepared inline; every pool thread has run `warm` when
    /// this returns.
    pub fn with_warm_up(threads: usize, timeout: Duration, inline_bytes: usize, warm: Option<WarmUp>) -> Self {
        let n = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { threads };
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
                        let job = rx.lock().expect("no job panics while holding the lock").recv();
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
        WorkPool { permits: Arc::new(Semaphore::new(n)), jobs, timeout, inline_bytes }
    }

    /// Runs `job`, for a body of `bytes`: inline if small, else on a pool thread once one is
    /// free. The deadline covers the wait for a thread too; a job still running at its
    /// deadline finishes in the background holding its thread (so the pool stays bounded)
    /// while its request gets `TimedOut`.
    pub async fn run<T, F>(&self, bytes: usize, job: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if bytes <= self.inline_bytes {
            return catch_unwind(AssertUnwindSafe(job)).map_err(|p| PoolError::Panicked(panic_text(p)));
        }
        let permits = self.permits.clone();
        let work = async move {
            let permit = permits.acquire_owned().await.expect("semaphore never closed");
            let (tx, rx) = oneshot::channel();
            let job: Job = Box::new(move || {
                let _slot = permit;
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

    /// Every pool thread has run the warm-up before the pool exists, and jobs run on those
    /// threads only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_warmed_threads() {
        use std::collections::HashSet;
        let warmed = Arc::new(Mutex::new(HashSet::new()));
        let w = warmed.clone();
        let warm: WarmUp = Arc::new(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.lock().unwrap().insert(std::thread::current().id());
        });
        let pool = WorkPool::with_warm_up(3, Duration::from_secs(30), 0, Some(warm));
        assert_eq!(warmed.lock().unwrap().len(), 3, "returned before every thread warmed up");
        let runs = (0..12).map(|_| pool.run(1, || std::thread::current().id()));
        for id in futures_util::future::join_all(runs).await {
            assert!(warmed.lock().unwrap().contains(&id.unwrap()), "a job ran on a thread that was not warmed");
        }
    }
}
