//! A fake Kubernetes API server on loopback for the discovery tests: list and watch (chunked
//! JSON lines) of pods and InferencePools in one namespace, label and field selectors, resource
//! versions, watches ended after their `timeoutSeconds`, and a compaction switch that answers
//! stale watches with `410 Gone` as a real API server does; faults on demand (every call
//! answered 500, or every call and open watch left silent). Objects start from the JSON
//! fixtures in tests/fixtures/kube (written in the API server's wire format).
#![allow(dead_code)] // each test binary uses a different part

pub mod container;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, Uri},
    response::Response,
};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

pub const NAMESPACE: &str = "dynamo";
pub const PODS: &str = "pods";
pub const POOLS: &str = "inferencepools";

pub fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fixture worker pod, renamed, at `ip`, serving `http` on `port`, with extra `labels`.
pub fn worker_pod(name: &str, ip: &str, port: u16, labels: &[(&str, &str)]) -> Value {
    let mut p = fixture("worker-pod.json");
    p["metadata"]["name"] = json!(name);
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{"ip": ip}]);
    p["spec"]["containers"][1]["ports"][0]["containerPort"] = json!(port);
    for (k, v) in labels {
        p["metadata"]["labels"][*k] = json!(v);
    }
    p
}

pub fn set_ready(pod: &mut Value, ready: bool) {
    for c in pod["status"]["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Ready" || c["type"] == "ContainersReady" {
            c["status"] = json!(if ready { "True" } else { "False" });
        }
    }
}

/// How the fake API server misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Healthy,
    /// Every call is answered `500 InternalError` (an overloaded or broken API server / etcd).
    Errors,
    /// Every call is accepted and never answered, and open watches fall silent: a hung server
    /// or a dead path to it. Calls caught by this stay silent for good, even once healthy
    /// again, as connections through a failed load balancer do.
    Silent,
}

#[derive(Default)]
struct ApiState {
    rv: u64,
    /// Watches resuming from a version below this get 410 Gone.
    oldest_watchable: u64,
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, collection, event type, object)
    log: Vec<(u64, String, &'static str, Value)>,
    lists: HashMap<String, usize>,
    /// Calls answered 500 and calls left hanging under a fault.
    failed: usize,
    hung: usize,
}

struct Shared {
    state: Mutex<ApiState>,
    changed: Notify,
    /// Bumped to end every open watch stream (a dropped connection).
    generation: watch::Sender<u64>,
    /// While false, list calls wait: the test decides when the first list completes.
    lists_open: watch::Sender<bool>,
    fault: watch::Sender<Fault>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let shared = Arc::new(Shared {
            state: Mutex::new(ApiState { rv: 1, ..Default::default() }),
            changed: Notify::new(),
            generation: watch::channel(0).0,
            lists_open: watch::channel(true).0,
            fault: watch::channel(Fault::Healthy).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeApi { addr, shared }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (ADDED or MODIFIED for watchers).
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut st = self.shared.state.lock();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let kind = if st.objects.insert((collection.into(), name), obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        st.log.push((rv, collection.into(), kind, obj));
        drop(st);
        self.shared.changed.notify_waiters();
    }

    pub fn delete(&self, collection: &str, name: &str) {
        let mut st = self.shared.state.lock();
        let Some(mut obj) = st.objects.remove(&(collection.to_string(), name.to_string())) else { return };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let rv = st.rv;
        st.log.push((rv, collection.into(), "DELETED", obj));
        drop(st);
        self.shared.changed.notify_waiters();
    }

    pub fn get(&self, collection: &str, name: &str) -> Value {
        self.shared.state.lock().objects[&(collection.to_string(), name.to_string())].clone()
    }

    /// Ends every open watch, as a dropped connection or an API server restart would.
    pub fn drop_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Forgets history: a watch resuming from any version seen so far gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.shared.state.lock();
        st.oldest_watchable = st.rv + 1;
        st.log.clear();
    }

    pub fn list_calls(&self, collection: &str) -> usize {
        self.shared.state.lock().lists.get(collection).copied().unwrap_or(0)
    }

    /// Starts or ends a fault. `Errors` also ends every open watch (as a restarting API server
    /// would), so the clients' next calls meet it; `Silent` leaves them open and mute.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
        if fault == Fault::Errors {
            self.drop_watches();
        }
    }

    /// (calls answered 500, calls left hanging) so far.
    pub fn faulted_calls(&self) -> (usize, usize) {
        let st = self.shared.state.lock();
        (st.failed, st.hung)
    }

    pub fn hold_lists(&self, hold: bool) {
        self.shared.lists_open.send_replace(!hold);
    }

    /// The environment of the real binary discovering the `vllm-agg` graph's worker pods here,
    /// its kubeconfig written into `dir`.
    pub fn epp_env(&self, dir: &std::path::Path) -> Vec<(String, String)> {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, self.kubeconfig()).unwrap();
        [
            ("DYN_DISCOVERY", "kubernetes".to_string()),
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("POD_NAMESPACE", NAMESPACE.to_string()),
            ("DYN_NAMESPACE_PREFIX", "vllm-agg".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A kubeconfig pointing at this server, namespace `dynamo`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NAMESPACE}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }
}

fn collection_of(path: &str) -> Option<&'static str> {
    if path == format!("/api/v1/namespaces/{NAMESPACE}/pods") {
        Some(PODS)
    } else if path == format!("/apis/inference.networking.k8s.io/v1/namespaces/{NAMESPACE}/inferencepools") {
        Some(POOLS)
    } else {
        None
    }
}

/// Equality-based label selector (`k=v,k=v`) and `metadata.name=` field selector.
fn matches(obj: &Value, q: &HashMap<String, String>) -> bool {
    let labels_ok = q.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            obj["metadata"]["labels"][k].as_str() == Some(v)
        })
    });
    let fields_ok = q.get("fieldSelector").is_none_or(|sel| {
        let name = sel.strip_prefix("metadata.name=").expect("only metadata.name field selectors");
        obj["metadata"]["name"].as_str() == Some(name)
    });
    labels_ok && fields_ok
}

fn status_410() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "too old resource version", "reason": "Expired", "code": 410})
}

fn status_500() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500})
}

async fn handle(State(sh): State<Arc<Shared>>, uri: Uri, Query(q): Query<HashMap<String, String>>) -> Response {
    let fault = *sh.fault.borrow();
    match fault {
        Fault::Healthy => {}
        Fault::Errors => {
            sh.state.lock().failed += 1;
            let body = Body::from(status_500().to_string());
            return Response::builder().status(StatusCode::INTERNAL_SERVER_ERROR).header("content-type", "application/json").body(body).unwrap();
        }
        Fault::Silent => {
            sh.state.lock().hung += 1;
            return std::future::pending().await;
        }
    }
    let Some(collection) = collection_of(uri.path()) else {
        return Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("{}")).unwrap();
    };
    if q.get("watch").map(String::as_str) == Some("true") || q.get("watch").map(String::as_str) == Some("1") {
        return watch_response(sh, collection, q);
    }
    let mut open = sh.lists_open.subscribe();
    let _ = open.wait_for(|o| *o).await;
    let mut st = sh.state.lock();
    *st.lists.entry(collection.into()).or_default() += 1;
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((c, _), o)| c == collection && matches(o, &q))
        .map(|(_, o)| o.clone())
        .collect();
    let (api_version, kind) = if collection == PODS { ("v1", "PodList") } else { ("inference.networking.k8s.io/v1", "InferencePoolList") };
    let body = json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
    Response::builder().header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

fn watch_response(sh: Arc<Shared>, collection: &'static str, q: HashMap<String, String>) -> Response {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let ends = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).map(|s| Instant::now() + Duration::from_secs(s));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let line = |t: &str, o: &Value| Ok(Bytes::from(format!("{}\n", json!({"type": t, "object": o}))));
        if from < sh.state.lock().oldest_watchable {
            let _ = tx.send(line("ERROR", &status_410())).await;
            return;
        }
        let mut generation = sh.generation.subscribe();
        generation.mark_unchanged();
        let mut fault = sh.fault.subscribe();
        let mut cursor = from;
        loop {
            if *fault.borrow_and_update() == Fault::Silent {
                // Mute for good, holding the stream open.
                return std::future::pending().await;
            }
            // Registered before reading the log so a change in between still wakes us.
            let mut changed = std::pin::pin!(sh.changed.notified());
            changed.as_mut().enable();
            let batch: Vec<_> = {
                let st = sh.state.lock();
                st.log.iter().filter(|(rv, c, _, o)| *rv > cursor && c == collection && matches(o, &q)).cloned().collect()
            };
            for (rv, _, t, o) in batch {
                cursor = rv;
                if tx.send(line(t, &o)).await.is_err() {
                    return;
                }
            }
            let end = async {
                match ends {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed => {}
                _ = generation.changed() => return,
                _ = fault.changed() => {}
                _ = end => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap()
}
