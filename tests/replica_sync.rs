//! Replica sync end to end: two real `dynamo-epp` processes (A and B), each behind its own real
//! Envoy, the same two mock workers, and a real nats-server carrying the booking changes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::task::JoinHandle;

/// One replica: its EPP and the Envoy in front of it.
struct Replica {
    epp: Epp,
    envoy: Envoy,
}

impl Replica {
    async fn start(workers: &str, nats: &NatsServer) -> Replica {
        let url = nats.url();
        let env = [
            ("DYN_ROUTER_REPLICA_SYNC", "true"),
            ("DYN_EPP_REPLICA_TIMEOUT_SECS", "2"),
            ("DYN_USE_KV_EVENTS", "false"),
            ("NATS_SERVER", url.as_str()),
        ];
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let epp = Epp::start(workers, EppOptions { env, ..Default::default() }).await;
        let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
        Replica { epp, envoy }
    }

    /// Active requests on a worker as this replica sees them.
    async fn load(&self, worker: &str) -> f64 {
        self.epp.metric(&format!("dynamo_epp_worker_active_requests{{worker=\"{worker}\",dp_rank=\"0\"}}")).await.unwrap_or(f64::NAN)
    }

    /// Waits up to `within` for `ok(load of w0, load of w1)`; returns the last loads seen.
    async fn wait_loads(&self, within: Duration, ok: impl Fn(f64, f64) -> bool) -> (f64, f64) {
        let deadline = Instant::now() + within;
        loop {
            let l = (self.load("w0").await, self.load("w1").await);
            if ok(l.0, l.1) || Instant::now() > deadline {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A request held open by the worker until released; `subset` restricts the pick.
    fn hold(&self, client: &reqwest::Client, tag: &str, subset: Option<String>) -> JoinHandle<reqwest::StatusCode> {
        let mut req = client.post(self.envoy.url("/v1/chat/completions")).header("x-mock-mode", "hold").body(chat_body(tag));
        if let Some(s) = subset {
            req = req.header("x-test-subset-hint", s);
        }
        tokio::spawn(async move { req.send().await.map(|r| r.status()).unwrap_or(reqwest::StatusCode::BAD_GATEWAY) })
    }
}

async fn wait_seen(workers: &[MockWorker], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().map(|w| w.seen().len()).sum::<usize>() < n {
        assert!(Instant::now() < deadline, "held requests never reached the workers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_load_and_forget_a_dead_peer() {
    let nats = NatsServer::start().await;
    let workers = [MockWorker::start("w0").await, MockWorker::start("w1").await];
    let yaml = workers_yaml(&[("w0", workers[0].addr, Some(100)), ("w1", workers[1].addr, Some(101))]);
    let a = Replica::start(&yaml, &nats).await;
    let mut b = Replica::start(&yaml, &nats).await;
    let client = reqwest::Client::new();
    // Both are subscribed once each hears the other's heartbeat.
    for r in [&a, &b] {
        let peers = r.epp.wait_metric("dynamo_epp_replica_peers", Duration::from_secs(10), |v| v == 1.0).await;
        assert_eq!(peers, 1.0);
    }

    // A burst of held requests through A, all on w0 (the gateway's subset hint).
    let on_w0 = Some(workers[0].addr.to_string());
    let burst: Vec<_> = (0..4).map(|i| a.hold(&client, &format!("a-{i}"), on_w0.clone())).collect();
    wait_seen(&workers, 4).await;
    assert_eq!(workers[0].seen().len(), 4);
    // Within a second B counts them too.
    assert_eq!(b.wait_loads(Duration::from_secs(1), |w0, _| w0 == 4.0).await, (4.0, 0.0));

    // B's own requests avoid the loaded worker. Without A's load B would alternate (ties).
    let from_b: Vec<_> = (0..3).map(|i| b.hold(&client, &format!("b-{i}"), None)).collect();
    wait_seen(&workers, 7).await;
    assert_eq!((workers[0].seen().len(), workers[1].seen().len()), (4, 3), "B sent a request to the worker A loaded");
    assert_eq!(a.wait_loads(Duration::from_secs(1), |_, w1| w1 == 3.0).await, (4.0, 3.0), "A sees B's requests");

    // Everything ends: both views return to zero.
    workers[0].release(4);
    workers[1].release(3);
    for t in burst.into_iter().chain(from_b) {
        assert_eq!(t.await.unwrap(), reqwest::StatusCode::OK);
    }
    for r in [&a, &b] {
        assert_eq!(r.wait_loads(Duration::from_secs(1), |w0, w1| w0 == 0.0 && w1 == 0.0).await, (0.0, 0.0));
    }

    // A dies holding two requests: B drops them once A's heartbeats stop for the timeout.
    let held: Vec<_> = (0..2).map(|i| a.hold(&client, &format!("dead-{i}"), on_w0.clone())).collect();
    wait_seen(&workers, 9).await;
    assert_eq!(b.wait_loads(Duration::from_secs(1), |w0, _| w0 == 2.0).await, (2.0, 0.0));
    let mut a = a;
    a.epp.child.kill().await.unwrap();
    // A's last heartbeat is at most 1 s old at the kill; + the 2 s timeout + one sweep.
    assert_eq!(b.wait_loads(Duration::from_secs(5), |w0, _| w0 == 0.0).await, (0.0, 0.0));
    assert_eq!(b.epp.metric("dynamo_epp_replica_peers").await, Some(0.0));
    // 4 adds, 4 prefill completions, 4 frees, 2 adds.
    assert!(b.epp.metric("dynamo_epp_replica_events_applied_total").await.unwrap() >= 14.0);
    workers[0].release(2);
    for t in held {
        let _ = t.await;
    }
    b.epp.child.kill().await.unwrap();
}
