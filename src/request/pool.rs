//! CPU-heavy request work (parse, render, tokenize) runs off the async reactor, at most
//! `threads` jobs at a time, so a 400 KB body never stalls other streams' I/O; a job that
//! panics or overruns its deadline fails only its own request.

use std::{sync::Arc, time::Duration};

use tokio::sync::Semaphore;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("tokenization did not finish within {0} ms")]
    TimedOut(u64),
    #[error("tokenization failed: {0}")]
    Panicked(String),
}

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

    /// Runs `job` on a blocking thread once a slot is free. The deadline covers the wait for a
    /// slot too; a job still running at its deadline finishes in the background holding its
    /// slot (so the pool stays bounded) while its request gets `TimedOut`.
    pub async fn run<T, F>(&self, job: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
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
            Ok(Err(e)) => {
                let msg = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into()),
                    Err(e) => e.to_string(),
                };
                Err(PoolError::Panicked(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panics_and_overruns_fail_only_their_job() {
        // Generous deadline: the panic hook may symbolize a backtrace first.
        let e = WorkPool::new(1, Duration::from_secs(30)).run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert_eq!(e, PoolError::Panicked("boom".into()));
        let pool = WorkPool::new(1, Duration::from_millis(200));
        let e = pool.run(|| std::thread::sleep(Duration::from_millis(600))).await.unwrap_err();
        assert_eq!(e, PoolError::TimedOut(200));
        // The overrunning job still holds the only slot: the next one waits, then runs.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }
}
