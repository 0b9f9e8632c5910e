//! CPU-heavy request work (parse, render, tokenize) runs off the async reactor, at most
//! `threads` jobs at a time, so a 400 KB body never stalls other streams' I/O; a job that
//! panics or overruns its deadline fails only its own request. Small bodies are done inline:
//! they cost tens of microseconds, less than a thread hand-off, and must not queue behind
//! huge ones.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
    time::Duration,
};

use tokio::sync::Semaphore;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("tokenization did not finish within {0} ms")]
    TimedOut(u64),
    #[error("tokenization failed: {0}")]
    Panicked(String),
}

/// Bodies up to this size are prepared on the calling task.
pub const INLINE_BYTES: usize = 16 * 1024;

#[derive(Clone)]
pub struct WorkPool {
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl WorkPool {
    /// `threads` = 0 means one per available core.
    pub fn new(threads: usize, timeout: Duration) -> Self {
        let n = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { threads };
        WorkPool { permits: Arc::new(Semaphore::new(n)), timeout }
    }

    /// Runs `job`, for a body of `bytes`: inline if small, else on a blocking thread once a
    /// slot is free. The deadline covers the wait for a slot too; a job still running at its
    /// deadline finishes in the background holding its slot (so the pool stays bounded) while
    /// its request gets `TimedOut`.
    pub async fn run<T, F>(&self, bytes: usize, job: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if bytes <= INLINE_BYTES {
            return catch_unwind(AssertUnwindSafe(job)).map_err(|p| PoolError::Panicked(panic_text(p)));
        }
        let permits = self.permits.clone();
        let work = async move {
            let permit = permits.acquire_owned().await.expect("semaphore never closed");
            tokio::task::spawn_blocking(move || {
                let _slot = permit;
                job()
            })
            .await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Err(_) => Err(PoolError::TimedOut(self.timeout.as_millis() as u64)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(PoolError::Panicked(match e.try_into_panic() {
                Ok(p) => panic_text(p),
                Err(e) => e.to_string(),
            })),
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
}
