//! Kubernetes discovery against a fake API server on loopback (tests/kube_support): the
//! library's `KubeSource` over real HTTP list/watch traffic, and the real binary in
//! `DYN_DISCOVERY=kubernetes` mode behind a real Envoy.

mod common;
mod kube_support;

use std::time::{Duration, Instant};

use dynamo_epp::workers::{
    hash_pod_name,
    kube::{KubeSource, Selection},
    Fleet, Role,
};
use kube_support::*;
use serde_json::json;
use tokio::sync::mpsc;

const BASE_NS: &str = "vllm-agg";
const NS_LABEL: &str = "nvidia.com/dynamo-namespace";

/// Every fleet the source hands over, in order.
struct Fleets {
    rx: mpsc::UnboundedReceiver<Fleet>,
}

impl Fleets {
    fn start(api: &FakeApi, selection: Selection) -> Fleets {
        Self::start_with(api, selection, Duration::from_secs(30))
    }

    /// With this API timeout (`DYN_EPP_KUBE_API_TIMEOUT_SECS`).
    fn start_with(api: &FakeApi, selection: Selection, api_timeout: Duration) -> Fleets {
        let config = kube::Config::new(api.url().parse().unwrap());
        let source = KubeSource::with_config(config, Some(NAMESPACE.into()), selection, api_timeout).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(source.run(move |f| {
            let _ = tx.send(f);
        }));
        Fleets { rx }
    }

    async fn next(&mut self, within: Duration) -> Option<Fleet> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// The next fleet, which must hold exactly `names` (sorted).
    async fn expect(&mut self, names: &[&str]) -> Fleet {
        let f = self.next(Duration::from_secs(15)).await.unwrap_or_else(|| panic!("no fleet; wanted {names:?}"));
        assert_eq!(pod_names(&f), names);
        f
    }

    /// Skips fleets until one holds exactly `names` (a watch may deliver intermediate states).
    async fn until(&mut self, names: &[&str]) -> Fleet {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = None;
        while Instant::now() < deadline {
            match self.next(deadline - Instant::now()).await {
                Some(f) if pod_names(&f) == names => return f,
                Some(f) => last = Some(pod_names(&f)),
                None => break,
            }
        }
        panic!("fleet never became {names:?}; last {last:?}");
    }
}

fn pod_names(f: &Fleet) -> Vec<String> {
    let mut n: Vec<_> = f.workers.iter().map(|w| w.name.clone()).collect();
    n.sort();
    n
}

fn pod(name: &str, last_octet: u8) -> serde_json::Value {
    worker_pod(name, &format!("10.244.1.{last_octet}"), 8000, &[])
}

fn labels_mode() -> Selection {
    Selection::DynamoNamespace(BASE_NS.into())
}

#[tokio::test]
async fn first_fleet_is_the_complete_list_of_ready_worker_pods() {
    let api = FakeApi::start().await;
    api.put(PODS, pod("agg-0", 10));
    let mut not_ready = pod("agg-1", 11);
    set_ready(&mut not_ready, false);
    api.put(PODS, not_ready);
    api.put(PODS, worker_pod("other-graph-0", "10.244.1.12", 8000, &[(NS_LABEL, "other")]));
    let mut prefill = worker_pod("prefill-0", "10.244.1.13", 8001, &[("nvidia.com/dynamo-component-type", "prefill")]);
    prefill["metadata"]["annotations"]["dynamo-epp/dp-size"] = json!("2");
    api.put(PODS, prefill);
    let mut frontend = pod("frontend-0", 14);
    frontend["metadata"]["labels"]["nvidia.com/dynamo-component-class"] = json!("frontend");
    api.put(PODS, frontend);

    api.hold_lists(true);
    let mut fleets = Fleets::start(&api, labels_mode());
    // Nothing before the list completes: health stays NOT_SERVING meanwhile.
    assert!(fleets.next(Duration::from_millis(500)).await.is_none());
    api.hold_lists(false);
    let f = fleets.expect(&["agg-0", "prefill-0"]).await;
    let agg = f.workers.iter().find(|w| w.name == "agg-0").unwrap();
    assert_eq!(agg.id, hash_pod_name("agg-0"));
    assert_eq!(agg.endpoint, "10.244.1.10:8000".parse().unwrap());
    assert_eq!((agg.role, agg.dp_size, agg.total_kv_blocks), (Role::Worker, 1, Some(4096)));
    let pre = f.workers.iter().find(|w| w.name == "prefill-0").unwrap();
    assert_eq!((pre.role, pre.dp_size, pre.endpoint.port()), (Role::Prefill, 2, 8001));
    assert_eq!(api.list_calls(PODS), 1);
}

#[tokio::test]
async fn adds_ready_flips_and_deletes_follow_the_watch() {
    let api = FakeApi::start().await;
    api.put(PODS, pod("a", 1));
    let mut fleets = Fleets::start(&api, labels_mode());
    fleets.expect(&["a"]).await;

    api.put(PODS, pod("b", 2));
    fleets.expect(&["a", "b"]).await;

    let mut a = api.get(PODS, "a");
    set_ready(&mut a, false);
    api.put(PODS, a.clone());
    fleets.expect(&["b"]).await;

    set_ready(&mut a, true);
    api.put(PODS, a);
    fleets.expect(&["a", "b"]).await;

    api.delete(PODS, "b");
    fleets.expect(&["a"]).await;
    // An update that changes nothing the router sees hands over no new fleet.
    let mut a = api.get(PODS, "a");
    a["metadata"]["labels"]["unrelated"] = json!("x");
    api.put(PODS, a);
    assert!(fleets.next(Duration::from_millis(500)).await.is_none());
    assert_eq!(api.list_calls(PODS), 1, "everything after the first list came over the watch");
}

#[tokio::test]
async fn a_stale_resource_version_gets_410_and_the_pods_are_relisted() {
    let api = FakeApi::start().await;
    api.put(PODS, pod("a", 1));
    api.put(PODS, pod("b", 2));
    let mut fleets = Fleets::start(&api, labels_mode());
    fleets.expect(&["a", "b"]).await;

    // The connection drops; meanwhile history is compacted and the pods change. The watcher
    // resumes from its old resourceVersion, gets 410 Gone, and only a relist can see this.
    api.compact();
    api.drop_watches();
    api.delete(PODS, "a");
    api.put(PODS, pod("c", 3));
    api.compact();
    fleets.until(&["b", "c"]).await;
    assert_eq!(api.list_calls(PODS), 2);

    // And the watch works again after the relist.
    api.put(PODS, pod("d", 4));
    fleets.expect(&["b", "c", "d"]).await;
}

#[tokio::test]
async fn an_inference_pool_selects_the_pods_and_its_selector_changes_are_followed() {
    let api = FakeApi::start().await;
    // A pod naming no `http` port is served on the pool's target port.
    let mut no_http = pod("base-1", 2);
    no_http["spec"]["containers"][1]["ports"][0]["name"] = json!("api");
    no_http["spec"]["containers"][1]["ports"][0]["containerPort"] = json!(7000);
    api.put(PODS, worker_pod("base-0", "10.244.1.1", 18001, &[]));
    api.put(PODS, no_http);
    api.put(PODS, worker_pod("canary-0", "10.244.1.3", 18003, &[(NS_LABEL, "canary")]));

    let mut fleets = Fleets::start(&api, Selection::Pool("vllm-agg-pool".into()));
    // No pool yet: no fleet (NOT_SERVING), however long it takes.
    assert!(fleets.next(Duration::from_millis(700)).await.is_none());

    api.put(POOLS, fixture("inferencepool.json"));
    let f = fleets.expect(&["base-0", "base-1"]).await;
    let port = |n: &str| f.workers.iter().find(|w| w.name == n).unwrap().endpoint.port();
    assert_eq!((port("base-0"), port("base-1")), (18001, 8000));

    let mut pool = api.get(POOLS, "vllm-agg-pool");
    pool["spec"]["selector"]["matchLabels"][NS_LABEL] = json!("canary");
    api.put(POOLS, pool);
    fleets.expect(&["canary-0"]).await;

    api.delete(POOLS, "vllm-agg-pool");
    fleets.expect(&[]).await;
}

#[tokio::test]
async fn rolling_updates_keep_old_and_new_pods_until_the_old_ones_terminate() {
    let api = FakeApi::start().await;
    // Old and new revisions: the worker hash differs, the Dynamo namespace label keeps the base
    // (the runtime registers `<base>-<hash>` namespaces; ids come from pod names either way).
    let old = worker_pod("vllm-agg-vllmworker-aaaa-1", "10.244.1.1", 8000, &[("nvidia.com/dynamo-worker-hash", "aaaa")]);
    api.put(PODS, old.clone());
    let mut fleets = Fleets::start(&api, labels_mode());
    fleets.expect(&["vllm-agg-vllmworker-aaaa-1"]).await;

    api.put(PODS, worker_pod("vllm-agg-vllmworker-bbbb-1", "10.244.1.2", 8000, &[("nvidia.com/dynamo-worker-hash", "bbbb")]));
    let f = fleets.expect(&["vllm-agg-vllmworker-aaaa-1", "vllm-agg-vllmworker-bbbb-1"]).await;
    for w in &f.workers {
        assert_eq!(w.id, hash_pod_name(&w.name));
    }

    let mut terminating = api.get(PODS, "vllm-agg-vllmworker-aaaa-1");
    terminating["metadata"]["deletionTimestamp"] = json!("2026-08-21T11:00:00Z");
    api.put(PODS, terminating);
    fleets.expect(&["vllm-agg-vllmworker-bbbb-1"]).await;
    api.delete(PODS, "vllm-agg-vllmworker-aaaa-1");
    assert!(fleets.next(Duration::from_millis(500)).await.is_none(), "already gone from the fleet");
}

/// The API server answering 500s, then silent (calls and open watches never answered, and
/// those stay dead after it recovers): no fleet is handed over meanwhile, so the last one stays
/// in force, and the changes made during each fault arrive once the server is healthy again.
/// With kube's defaults the silent phase never recovered: a call is awaited forever and an
/// open watch for 295 s.
#[tokio::test]
async fn api_errors_and_silence_keep_the_last_fleet_and_changes_arrive_after_recovery() {
    let api = FakeApi::start().await;
    api.put(PODS, pod("a", 1));
    api.put(POOLS, fixture("inferencepool.json"));
    api.put(PODS, worker_pod("base-0", "10.244.1.7", 18001, &[]));
    let mut fleets = Fleets::start_with(&api, labels_mode(), Duration::from_secs(2));
    let mut pooled = Fleets::start_with(&api, Selection::Pool("vllm-agg-pool".into()), Duration::from_secs(2));
    fleets.expect(&["a", "base-0"]).await;
    pooled.expect(&["a", "base-0"]).await;

    for (fault, change) in [(Fault::Errors, "add b"), (Fault::Silent, "remove a")] {
        api.set_fault(fault);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if change == "add b" {
            api.put(PODS, pod("b", 2));
        } else {
            api.delete(PODS, "a");
        }
        let want: &[&str] = if change == "add b" { &["a", "b", "base-0"] } else { &["b", "base-0"] };
        // Long enough for several failed calls and retries.
        assert!(fleets.next(Duration::from_secs(4)).await.is_none(), "{fault:?}: a fleet was handed over during the fault");
        assert!(pooled.next(Duration::from_millis(10)).await.is_none(), "{fault:?}: a fleet was handed over during the fault");
        let (failed, hung) = api.faulted_calls();
        let healed = Instant::now();
        api.set_fault(Fault::Healthy);
        fleets.expect(want).await;
        pooled.expect(want).await;
        assert!(if fault == Fault::Errors { failed > 0 } else { hung > 0 }, "{fault:?}: no call met the fault ({failed}, {hung})");
        println!("{fault:?} ({change}): fleet updated {:?} after the API recovered; calls answered 500 {failed}, left hanging {hung}", healed.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_discovers_pods_and_routes_to_them_through_envoy() {
    use common::*;
    let worker = MockWorker::start("k8s-worker").await;
    let api = FakeApi::start().await;
    let pod_name = "vllm-agg-vllmworker-6d9f7c8b5-x2k4q";
    api.put(PODS, worker_pod(pod_name, "127.0.0.1", worker.addr.port(), &[]));
    api.hold_lists(true);

    let dir = tempfile::tempdir().unwrap();
    let opts = EppOptions {
        env: api.epp_env(dir.path()),
        write_workers_first: false,
        ..Default::default()
    };
    let epp = Epp::start("", opts).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(epp.health("inference-extension").await, "NOT_SERVING", "serving before the first list");
    api.hold_lists(false);
    assert_eq!(epp.wait_health("inference-extension", "SERVING", Duration::from_secs(15)).await, "SERVING");

    let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    let client = reqwest::Client::new();
    let r = client.post(envoy.url("/v1/chat/completions")).body(chat_body("hello k8s")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = worker.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-dynamo-worker-instance-id"], hash_pod_name(pod_name).to_string());
    assert_eq!(seen[0].headers["x-gateway-destination-endpoint"], worker.addr.to_string());

    // The pod stops being Ready: it leaves the fleet and requests get 503, forwarding nothing.
    let mut p = api.get(PODS, pod_name);
    set_ready(&mut p, false);
    api.put(PODS, p);
    assert_eq!(epp.wait_metric("dynamo_epp_workers", Duration::from_secs(10), |v| v == 0.0).await, 0.0);
    let r = client.post(envoy.url("/v1/chat/completions")).body(chat_body("nobody")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(worker.seen().len(), 1);
}
