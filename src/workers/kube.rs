//! The fleet from the Kubernetes API: Ready worker pods, selected either by an InferencePool
//! (`inference.networking.k8s.io/v1`: its `selector` and `targetPorts`) or by Dynamo's worker
//! labels (contracts §1.1, §4.3).
//!
//! kube-runtime's watcher does list + watch, resumes from the last resourceVersion and relists
//! after `410 Gone`. This module keeps the listed pods, turns each into a [`Worker`] (or a reason
//! it is not one), and hands every changed whole [`Fleet`] to the caller — never a partial list:
//! nothing is handed over before the first complete list, so health stays NOT_SERVING until then.
//!
//! While the API server fails (5xx, refused, silent) the last fleet stays in force and the
//! watcher retries with backoff. A silent server is the dangerous one: kube's client waits
//! forever for an answer by default, so every read is bounded by the API timeout and watches
//! ask the server to end them well before it, so a healthy idle watch never trips it.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    pin::pin,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::core::v1::{Container, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    NamespaceResourceScope,
};
use kube::{
    runtime::{utils::Backoff, watcher, WatchStreamExt},
    Api, Client,
};
use serde::Deserialize;
use tokio::sync::watch;

use super::{hash_pod_name, Fleet, KvEventSource, Role, Worker};

/// Pod label: the worker's part in the graph (`worker` | `prefill` | `decode`).
pub const COMPONENT_TYPE_LABEL: &str = "nvidia.com/dynamo-component-type";
/// Pod label shared by every worker pod of a Dynamo graph.
pub const COMPONENT_CLASS_LABEL: &str = "nvidia.com/dynamo-component-class";
/// Pod label naming the Dynamo namespace; keeps the base name during rolling updates even when
/// the runtime registers suffixed `<base>-<hash>` namespaces, so selecting on it follows both.
pub const DYNAMO_NAMESPACE_LABEL: &str = "nvidia.com/dynamo-namespace";
/// The container port the frontend sidecar (`--router-mode direct`) listens on.
pub const HTTP_PORT_NAME: &str = "http";
/// Container port name of an engine's ZMQ KV-event publisher (as in Dynamo's standalone example).
pub const KV_EVENTS_PORT_NAME: &str = "kv-events";

/// Pod annotations that describe what the labels cannot; absent = the workers file defaults.
pub const DP_SIZE_ANNOTATION: &str = "dynamo-epp/dp-size";
pub const DP_START_RANK_ANNOTATION: &str = "dynamo-epp/dp-start-rank";
pub const TOTAL_KV_BLOCKS_ANNOTATION: &str = "dynamo-epp/total-kv-blocks";
pub const MAX_NUM_BATCHED_TOKENS_ANNOTATION: &str = "dynamo-epp/max-num-batched-tokens";

/// How worker pods are chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The pods an InferencePool of this name selects, on its target port unless a container
    /// names an `http` port.
    Pool(String),
    /// Dynamo's labels: component class `worker` in this Dynamo namespace.
    DynamoNamespace(String),
}

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no usable Kubernetes configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A running view of the worker pods of one namespace.
pub struct KubeSource {
    client: Client,
    namespace: String,
    selection: Selection,
    /// Asked of the API server for every list and watch (`timeoutSeconds`).
    call_secs: u32,
}

impl KubeSource {
    /// Connects with the in-cluster service account or KUBECONFIG. `namespace` None = the
    /// configuration's own namespace (the pod's, in a cluster). `api_timeout`: the longest the
    /// API server may stay silent on a connection before the call is abandoned and retried.
    pub async fn connect(namespace: Option<String>, selection: Selection, api_timeout: Duration) -> Result<Self, KubeError> {
        Self::with_config(kube::Config::infer().await?, namespace, selection, api_timeout)
    }

    pub fn with_config(mut config: kube::Config, namespace: Option<String>, selection: Selection, api_timeout: Duration) -> Result<Self, KubeError> {
        config.read_timeout = Some(api_timeout);
        let client = Client::try_from(config)?;
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
        Ok(KubeSource { client, namespace, selection, call_secs: call_secs(api_timeout) })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Follows the pods forever, calling `apply` with each new whole fleet.
    pub async fn run(self, apply: impl Fn(Fleet) + Send + 'static) {
        let mut out = Publisher { apply, last: None };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        match self.selection {
            Selection::DynamoNamespace(ns) => {
                let query = PodQuery {
                    selector: format!("{COMPONENT_CLASS_LABEL}=worker,{DYNAMO_NAMESPACE_LABEL}={ns}"),
                    target_port: None,
                };
                follow_pods(&pods, &query, self.call_secs, &mut out).await
            }
            Selection::Pool(name) => {
                let (tx, mut rx) = watch::channel(PoolView::Unknown);
                let pools: Api<InferencePool> = Api::namespaced(self.client, &self.namespace);
                let follower = tokio::spawn(follow_pool(pools, name.clone(), self.call_secs, tx));
                loop {
                    let view = rx.borrow_and_update().clone();
                    match view {
                        PoolView::Unknown => {}
                        PoolView::Absent => {
                            tracing::warn!(pool = %name, namespace = %self.namespace, "InferencePool not found or unusable: no workers");
                            // Before any fleet was handed over, staying silent keeps health
                            // NOT_SERVING; afterwards the pool's pods are gone from routing.
                            if out.last.is_some() {
                                out.publish(Fleet::default());
                            }
                        }
                        PoolView::Selects(query) => {
                            tracing::info!(pool = %name, selector = %query.selector, target_port = ?query.target_port, "following the InferencePool's pods");
                            tokio::select! {
                                _ = follow_pods(&pods, &query, self.call_secs, &mut out) => {}
                                _ = rx.changed() => continue,
                            }
                        }
                    }
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                follower.abort();
            }
        }
    }
}

/// The `timeoutSeconds` asked for each list and watch: half the read timeout, so the server ends
/// an idle watch (and the watcher resumes it from its resourceVersion, no relist) long before
/// the client would take the silence for a dead connection.
fn call_secs(api_timeout: Duration) -> u32 {
    u32::try_from(api_timeout.as_secs() / 2).unwrap_or(u32::MAX).max(1)
}

/// Delays between failed API calls: client-go's start (0.8 s, doubling) but at most 5 s rather
/// than its 30 s, so a fleet change made while the API server was failing is seen within
/// seconds of its return; two watches retrying every 5 s are no burden on it. Reset by the
/// watcher on every success.
#[derive(Clone, Copy, Debug)]
struct Retry(Duration);

impl Retry {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(5);
}

impl Default for Retry {
    fn default() -> Self {
        Retry(Self::FIRST)
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (d * 2).min(Self::MAX);
        Some(d)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        *self = Retry::default();
    }
}

/// Hands a fleet over only when it differs from the last one.
struct Publisher<F> {
    apply: F,
    last: Option<Fleet>,
}

impl<F: Fn(Fleet)> Publisher<F> {
    fn publish(&mut self, fleet: Fleet) {
        if self.last.as_ref() != Some(&fleet) {
            tracing::info!(workers = fleet.workers.len(), "fleet from Kubernetes changed");
            self.last = Some(fleet.clone());
            (self.apply)(fleet);
        }
    }
}

/// Which pods, and the port to use when a pod names no `http` port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodQuery {
    selector: String,
    target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PoolView {
    /// Not listed yet.
    Unknown,
    Absent,
    Selects(PodQuery),
}

/// Lists and watches pods matching `query` forever, publishing the fleet after the first
/// complete list and after every change. A relist (after 410 Gone) replaces the whole set.
async fn follow_pods<F: Fn(Fleet)>(api: &Api<Pod>, query: &PodQuery, call_secs: u32, out: &mut Publisher<F>) {
    let cfg = watcher::Config::default().labels(&query.selector).timeout(call_secs);
    let mut events = pin!(watcher(api.clone(), cfg).backoff(Retry::default()));
    let mut listed: Option<BTreeMap<String, Worker>> = None;
    let mut relisting: Option<BTreeMap<String, Worker>> = None;
    let mut skipped: HashMap<String, Skip> = HashMap::new();
    let mut last_error = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => {
                last_error = None;
                e
            }
            Err(e) => {
                // Retried with backoff by the watcher; said once per distinct problem.
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, selector = %query.selector, "pod watch failed; retrying");
                    last_error = Some(msg);
                }
                continue;
            }
        };
        match event {
            watcher::Event::Init => {
                // Skip reasons only keep warnings from repeating; a relist says them again.
                skipped.clear();
                relisting = Some(BTreeMap::new());
            }
            watcher::Event::InitApply(pod) => {
                if let Some(set) = relisting.as_mut() {
                    upsert(set, &pod, query.target_port, &mut skipped);
                }
            }
            watcher::Event::InitDone => {
                listed = Some(relisting.take().unwrap_or_default());
            }
            watcher::Event::Apply(pod) => {
                if let Some(set) = listed.as_mut() {
                    upsert(set, &pod, query.target_port, &mut skipped);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(set) = listed.as_mut() {
                    let name = pod.metadata.name.unwrap_or_default();
                    set.remove(&name);
                    skipped.remove(&name);
                }
            }
        }
        if let Some(set) = &listed {
            out.publish(Fleet { block_size: None, workers: set.values().cloned().collect() });
        }
    }
}

fn upsert(set: &mut BTreeMap<String, Worker>, pod: &Pod, target_port: Option<u16>, skipped: &mut HashMap<String, Skip>) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    match worker_from_pod(pod, target_port) {
        Ok(w) => {
            skipped.remove(&name);
            set.insert(name, w);
        }
        Err(why) => {
            set.remove(&name);
            if skipped.get(&name) != Some(&why) {
                match &why {
                    Skip::NotReady | Skip::Terminating => tracing::debug!(pod = %name, reason = %why, "pod is not serving"),
                    _ => tracing::warn!(pod = %name, reason = %why, "pod left out of the fleet"),
                }
                skipped.insert(name, why);
            }
        }
    }
}

/// Why a selected pod is not (or no longer) a worker.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("not Ready")]
    NotReady,
    #[error("terminating")]
    Terminating,
    #[error("no pod IP")]
    NoAddress,
    #[error("no container port named \"http\" and no pool target port")]
    NoPort,
    #[error("label {COMPONENT_TYPE_LABEL}={0:?} is not worker, prefill or decode")]
    Role(String),
    #[error("annotation {key}={value:?} is not a valid number")]
    Annotation { key: &'static str, value: String },
}

/// A Ready pod as a worker: id = `hash_pod_name(name)`, endpoint = pod IP and the container port
/// named `http` (else the pool's target port), role from its label, DP size and capacity from
/// annotations (else the workers file defaults: one rank from 0, capacity unknown).
pub fn worker_from_pod(pod: &Pod, target_port: Option<u16>) -> Result<Worker, Skip> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return Err(Skip::Terminating);
    }
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Err(Skip::NotReady);
    }
    let ip: IpAddr = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .ok_or(Skip::NoAddress)?;
    let port = http_port(pod).or(target_port).ok_or(Skip::NoPort)?;
    let role = match meta.labels.as_ref().and_then(|l| l.get(COMPONENT_TYPE_LABEL)).map(String::as_str) {
        None | Some("worker") => Role::Worker,
        Some("prefill") => Role::Prefill,
        Some("decode") => Role::Decode,
        Some(other) => return Err(Skip::Role(other.into())),
    };
    let dp_size = annotation(meta, DP_SIZE_ANNOTATION)?.unwrap_or(1u32);
    let dp_start_rank = annotation(meta, DP_START_RANK_ANNOTATION)?.unwrap_or(0u32);
    if dp_size == 0 || dp_start_rank.checked_add(dp_size).is_none() {
        let value = annotation_text(meta, DP_SIZE_ANNOTATION).unwrap_or_default().to_string();
        return Err(Skip::Annotation { key: DP_SIZE_ANNOTATION, value });
    }
    let name = meta.name.clone().unwrap_or_default();
    Ok(Worker {
        id: hash_pod_name(&name),
        name,
        endpoint: SocketAddr::new(ip, port),
        role,
        dp_start_rank,
        dp_size,
        total_kv_blocks: annotation(meta, TOTAL_KV_BLOCKS_ANNOTATION)?,
        max_num_batched_tokens: annotation(meta, MAX_NUM_BATCHED_TOKENS_ANNOTATION)?,
        // The engine's ZMQ KV events (vLLM `--kv-events-config`), where the pod names the port.
        kv_events: named_port(pod, KV_EVENTS_PORT_NAME)
            .map(|p| KvEventSource { endpoint: format!("tcp://{}", SocketAddr::new(ip, p)), replay: None }),
    })
}

/// The container port named `http` in any container, native sidecars (restartable init
/// containers) included.
fn http_port(pod: &Pod) -> Option<u16> {
    named_port(pod, HTTP_PORT_NAME)
}

fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let all = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    all.flat_map(|c: &Container| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

fn annotation_text<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn annotation<T: std::str::FromStr>(meta: &ObjectMeta, key: &'static str) -> Result<Option<T>, Skip> {
    annotation_text(meta, key)
        .map(|v| v.trim().parse().map_err(|_| Skip::Annotation { key, value: v.into() }))
        .transpose()
}

// ---------------------------------------------------------------- InferencePool

/// The part of a GAIE `InferencePool` (`inference.networking.k8s.io/v1`) the EPP reads.
#[derive(Clone, Debug, Deserialize)]
pub struct InferencePool {
    pub metadata: ObjectMeta,
    pub spec: InferencePoolSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    #[serde(default)]
    pub selector: PoolSelector,
    #[serde(default)]
    pub target_ports: Vec<PoolPort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PoolPort {
    pub number: i32,
}

impl kube::Resource for InferencePool {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "InferencePool".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "inference.networking.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "inferencepools".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl InferencePool {
    /// The pool's label selector as a Kubernetes selector string (`k=v,k=v`).
    pub fn label_selector(&self) -> String {
        let labels = &self.spec.selector.match_labels;
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }

    fn query(&self) -> Option<PodQuery> {
        // An empty selector would select every pod in the namespace: refuse it.
        if self.spec.selector.match_labels.is_empty() {
            return None;
        }
        let target_port = self.spec.target_ports.first().and_then(|p| u16::try_from(p.number).ok());
        Some(PodQuery { selector: self.label_selector(), target_port })
    }
}

/// Keeps `tx` at the named pool's current selector and target port.
async fn follow_pool(api: Api<InferencePool>, name: String, call_secs: u32, tx: watch::Sender<PoolView>) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}")).timeout(call_secs);
    let mut events = pin!(watcher(api, cfg).backoff(Retry::default()));
    let mut relisting: Option<PoolView> = None;
    let mut last_error = None;
    let set = |view: PoolView| tx.send_if_modified(|v| (*v != view).then(|| *v = view).is_some());
    let view_of = |pool: &InferencePool| match pool.query() {
        Some(q) => PoolView::Selects(q),
        None => {
            tracing::warn!(pool = %name, "InferencePool has an empty selector: ignored");
            PoolView::Absent
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relisting = Some(PoolView::Absent),
            Ok(watcher::Event::InitApply(pool)) => relisting = Some(view_of(&pool)),
            Ok(watcher::Event::InitDone) => {
                set(relisting.take().unwrap_or(PoolView::Absent));
            }
            Ok(watcher::Event::Apply(pool)) => {
                set(view_of(&pool));
            }
            Ok(watcher::Event::Delete(_)) => {
                set(PoolView::Absent);
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, pool = %name, "InferencePool watch failed; retrying");
                    last_error = Some(msg);
                }
                continue;
            }
        }
        last_error = None;
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerId;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn ready_pod(name: &str, labels: serde_json::Value, annotations: serde_json::Value, port_name: &str) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"containers": [
                {"name": "main", "ports": [{"name": "system", "containerPort": 9090}]},
                {"name": "sidecar-frontend", "ports": [{"name": port_name, "containerPort": 8000}]}
            ]},
            "status": {"podIP": "10.1.2.3", "conditions": [
                {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}
            ]}
        }))
    }

    #[test]
    fn ready_pod_becomes_a_worker_named_and_numbered_like_dynamo() {
        let p = ready_pod(
            "qwen-vllmdecodeworker-0",
            serde_json::json!({COMPONENT_TYPE_LABEL: "decode"}),
            serde_json::json!({DP_SIZE_ANNOTATION: "4", DP_START_RANK_ANNOTATION: "8", TOTAL_KV_BLOCKS_ANNOTATION: "4096"}),
            "http",
        );
        let w = worker_from_pod(&p, Some(1234)).unwrap();
        // Contracts §6.1 vector.
        assert_eq!(w.id, WorkerId(2152695600563388));
        assert_eq!(w.endpoint, "10.1.2.3:8000".parse().unwrap());
        assert_eq!(w.role, Role::Decode);
        assert_eq!((w.dp_start_rank, w.dp_size), (8, 4));
        assert_eq!((w.total_kv_blocks, w.max_num_batched_tokens), (Some(4096), None));
    }

    #[test]
    fn defaults_and_the_pool_port_apply_when_the_pod_says_nothing() {
        let p = ready_pod("w", serde_json::json!({}), serde_json::json!({}), "other");
        let w = worker_from_pod(&p, Some(8001)).unwrap();
        assert_eq!(w.endpoint.port(), 8001);
        assert_eq!(w.role, Role::Worker);
        assert_eq!((w.dp_start_rank, w.dp_size, w.total_kv_blocks), (0, 1, None));
        assert_eq!(worker_from_pod(&p, None), Err(Skip::NoPort));
    }

    #[test]
    fn pods_that_cannot_serve_are_left_out_with_the_reason() {
        let base = ready_pod("w", serde_json::json!({}), serde_json::json!({}), "http");
        let mut not_ready = base.clone();
        not_ready.status.as_mut().unwrap().conditions.as_mut().unwrap()[1].status = "False".into();
        assert_eq!(worker_from_pod(&not_ready, None), Err(Skip::NotReady));
        let mut terminating = base.clone();
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().unwrap(),
        ));
        assert_eq!(worker_from_pod(&terminating, None), Err(Skip::Terminating));
        let mut no_ip = base.clone();
        no_ip.status.as_mut().unwrap().pod_ip = None;
        assert_eq!(worker_from_pod(&no_ip, None), Err(Skip::NoAddress));
        let frontend = ready_pod("f", serde_json::json!({COMPONENT_TYPE_LABEL: "frontend"}), serde_json::json!({}), "http");
        assert_eq!(worker_from_pod(&frontend, None), Err(Skip::Role("frontend".into())));
        for (key, value) in [(DP_SIZE_ANNOTATION, "two"), (DP_SIZE_ANNOTATION, "0"), (TOTAL_KV_BLOCKS_ANNOTATION, "-1")] {
            let p = ready_pod("w", serde_json::json!({}), serde_json::json!({key: value}), "http");
            assert_eq!(worker_from_pod(&p, None), Err(Skip::Annotation { key, value: value.into() }), "{key}={value}");
        }
    }

    #[test]
    fn retries_double_from_800_ms_to_at_most_5_s_and_start_over_after_a_success() {
        let mut r = Retry::default();
        let ms: Vec<u128> = r.by_ref().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [800, 1600, 3200, 5000, 5000, 5000]);
        r.reset();
        assert_eq!(r.next(), Some(Duration::from_millis(800)));
        // Watches end well inside the read timeout, in whole seconds, never 0 (= server default).
        assert_eq!([call_secs(Duration::from_secs(30)), call_secs(Duration::from_secs(3)), call_secs(Duration::from_secs(2))], [15, 1, 1]);
    }

    #[test]
    fn pool_selector_is_sorted_and_empty_selectors_are_refused() {
        let pool: InferencePool = serde_json::from_value(serde_json::json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"b": "2", "a": "1"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}
        }))
        .unwrap();
        assert_eq!(pool.query(), Some(PodQuery { selector: "a=1,b=2".into(), target_port: Some(8000) }));
        let empty: InferencePool =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": {"selector": {}}})).unwrap();
        assert_eq!(empty.query(), None);
    }
}
