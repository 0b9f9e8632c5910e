//! deploy/: every overlay renders with kustomize (kubectl's, from the venv), every document
//! validates strictly (core kinds with kubernetes-validate, CRD kinds against their CRD schemas:
//! scripts/validate_manifests.py), the pieces point at each other, the InferencePool selects the
//! example worker pod, and the EPP Deployment's container starts the binary and passes its own
//! probes.

mod kube_support;

use std::{path::PathBuf, process::Command};

use dynamo_epp::workers::kube::{worker_from_pod, InferencePool};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Container, EnvVar, Pod, Service},
};
use kube_support::container;
use serde_json::Value;

const OVERLAYS: &[&str] = &["kv-aware", "approximate", "istio-monitored", "istio-mtls", "queue"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(name: &str) -> PathBuf {
    let p = root().join(".venv/bin").join(name);
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

fn render(overlay: &str) -> String {
    let out = Command::new(venv_bin("kubectl"))
        .arg("kustomize")
        .arg(root().join("deploy/overlays").join(overlay))
        .output()
        .unwrap();
    assert!(out.status.success(), "kustomize {overlay}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).unwrap().into_iter().filter(|d| !d.is_null()).collect()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    serde_json::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

/// Runs the strict validator on files; returns (success, output).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(venv_bin("python"))
        .arg(root().join("scripts/validate_manifests.py"))
        .args(files)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn epp_container(d: &Deployment) -> Container {
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers.iter().find(|c| c.name == "epp").unwrap().clone()
}

fn env(c: &Container) -> Vec<(String, Option<String>)> {
    c.env.iter().flatten().map(|EnvVar { name, value, .. }| (name.clone(), value.clone())).collect()
}

#[test]
fn every_overlay_and_example_renders_and_validates_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![root().join("deploy/examples/worker-pod.yaml")];
    for o in OVERLAYS {
        let path = dir.path().join(format!("{o}.yaml"));
        std::fs::write(&path, render(o)).unwrap();
        files.push(path);
    }
    let (ok, out) = validate(&files);
    assert!(ok, "{out}");
    // Every kind went through a schema (the validator fails on a kind it has none for).
    for kind in [
        "ServiceAccount", "Role", "RoleBinding", "Service", "Deployment", "InferencePool", "HTTPRoute", "Gateway",
        "AgentgatewayParameters", "DestinationRule", "ServiceMonitor", "Pod", "Certificate", "Issuer",
    ] {
        assert!(out.lines().any(|l| l.starts_with("ok ") && l.contains(&format!(": {kind}/"))), "{kind} not validated: {out}");
    }
}

#[test]
fn the_validator_rejects_typos_in_core_and_custom_kinds() {
    let bad = render("istio-monitored")
        .replace("appProtocol: http2", "appProtcol: http2")
        .replace("insecureSkipVerify", "insecureSkipVerfy")
        .replace("targetPorts:", "targetPort:")
        .replace("timeouts:", "timeout:");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let (ok, out) = validate(&[path]);
    assert!(!ok, "{out}");
    for (kind, needle) in [
        ("Service/", "appProtcol"),
        ("DestinationRule/", "insecureSkipVerfy"),
        ("InferencePool/", "targetPorts"),
        ("HTTPRoute/", "timeout"),
    ] {
        assert!(out.lines().any(|l| l.starts_with("INVALID") && l.contains(kind) && l.contains(needle)), "{kind} {needle}: {out}");
    }
}

#[test]
fn the_pool_selects_the_example_worker_pod_on_its_http_port() {
    let docs = docs(&render("kv-aware"));
    let pool: InferencePool = one(&docs, "InferencePool");
    let example = std::fs::read_to_string(root().join("deploy/examples/worker-pod.yaml")).unwrap();
    let mut pod: Pod = serde_saphyr::from_str(&example).unwrap();
    let labels = pod.metadata.labels.clone().unwrap();
    let selector = &pool.spec.selector.match_labels;
    let selected: std::collections::BTreeMap<_, _> =
        labels.iter().filter(|(k, _)| selector.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(&selected, selector, "the pool's selector must equal the worker pod's labels");
    // The sidecar runs the direct-routing frontend on the `http` port the pool targets.
    let sidecar = pod.spec.as_ref().unwrap().containers.iter().find(|c| c.name == "sidecar-frontend").unwrap();
    let args = sidecar.args.clone().unwrap().join(" ");
    assert!(args.contains("dynamo.frontend") && args.contains("--router-mode direct"), "{args}");
    // As discovery sees it once Ready: endpoint = pod IP + `http` port = the pool's target port.
    pod.status = Some(serde_json::from_value(serde_json::json!({
        "podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]
    })).unwrap());
    let w = worker_from_pod(&pod, None).unwrap();
    assert_eq!(w.endpoint.port() as i32, pool.spec.target_ports[0].number);
    assert_eq!(pool.label_selector(), "nvidia.com/dynamo-component-class=worker,nvidia.com/dynamo-namespace=vllm-agg");
}

#[test]
fn the_pieces_point_at_each_other() {
    for overlay in OVERLAYS {
        let docs = docs(&render(overlay));
        let deploy: Deployment = one(&docs, "Deployment");
        let svc: Service = one(&docs, "Service");
        let c = epp_container(&deploy);
        let svc_name = svc.metadata.name.clone().unwrap();
        let pool = by_kind(&docs, "InferencePool");

        // Pool → EPP Service port 9002, served over HTTP/2 by the container's grpc port.
        assert_eq!(pool["spec"]["endpointPickerRef"]["name"], svc_name.as_str());
        assert_eq!(pool["spec"]["endpointPickerRef"]["port"]["number"], 9002);
        let grpc = svc.spec.as_ref().unwrap().ports.iter().flatten().find(|p| p.port == 9002).unwrap();
        assert_eq!(grpc.app_protocol.as_deref(), Some("http2"));
        let svc_selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
        let pod_labels = deploy.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
        assert!(svc_selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "Service selects the EPP pods");
        assert_eq!(container::port(&c, "grpc"), 9002);

        // HTTPRoute → the pool, five-minute timeout; Gateway → its parameters, without Istio.
        let route = by_kind(&docs, "HTTPRoute");
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["name"], pool["metadata"]["name"]);
        assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["kind"], "InferencePool");
        assert_eq!(route["spec"]["rules"][0]["timeouts"]["request"], "300s");
        let gw = by_kind(&docs, "Gateway");
        assert_eq!(route["spec"]["parentRefs"][0]["name"], gw["metadata"]["name"]);
        assert_eq!(gw["spec"]["gatewayClassName"], "agentgateway");
        let params = by_kind(&docs, "AgentgatewayParameters");
        assert_eq!(gw["spec"]["infrastructure"]["parametersRef"]["name"], params["metadata"]["name"]);
        assert_eq!(params["spec"]["deployment"]["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"], "false");

        // RBAC: the Deployment's service account may get/list/watch what discovery reads.
        let role = by_kind(&docs, "Role");
        for resource in ["pods", "inferencepools", "endpointslices"] {
            let rule = role["rules"].as_array().unwrap().iter().find(|r| r["resources"].as_array().unwrap().iter().any(|x| x == resource));
            let verbs = &rule.unwrap_or_else(|| panic!("no rule for {resource}"))["verbs"];
            assert_eq!(verbs, &serde_json::json!(["get", "list", "watch"]), "{resource}");
        }
        let sa = deploy.spec.as_ref().unwrap().template.spec.as_ref().unwrap().service_account_name.clone().unwrap();
        let binding = by_kind(&docs, "RoleBinding");
        assert_eq!(binding["subjects"][0]["name"], sa.as_str());
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);

        if *overlay == "istio-mtls" {
            the_mtls_pieces_point_at_each_other(&docs, &c, &deploy);
        }
        if *overlay == "istio-monitored" {
            assert_eq!(by_kind(&docs, "DestinationRule")["spec"]["host"], svc_name.as_str());
            assert_eq!(by_kind(&docs, "DestinationRule")["spec"]["trafficPolicy"]["tls"]["mode"], "SIMPLE");
            let sm = by_kind(&docs, "ServiceMonitor");
            let svc_labels = svc.metadata.labels.clone().unwrap();
            let sel = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
            assert!(sel.iter().all(|(k, v)| svc_labels.get(k).map(String::as_str) == v.as_str()));
            let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
            assert!(svc.spec.as_ref().unwrap().ports.iter().flatten().any(|p| p.name.as_deref() == Some(port)));
        }
    }
}

/// The EPP serves the serving Certificate's Secret and verifies clients against its CA; the
/// DestinationRule presents the client Certificate's Secret and checks the name the serving
/// certificate carries; both certificates come from the one CA.
fn the_mtls_pieces_point_at_each_other(docs: &[Value], c: &Container, deploy: &Deployment) {
    let named = |kind: &str, name: &str| {
        docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).unwrap_or_else(|| panic!("no {kind}/{name}")).clone()
    };
    let env: std::collections::HashMap<_, _> = env(c).into_iter().collect();
    let cert_path = env["DYN_EPP_CERT_PATH"].clone().unwrap();
    assert_eq!(env["DYN_EPP_CLIENT_CA_FILE"].as_deref(), Some(format!("{cert_path}/ca.crt").as_str()));
    let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == cert_path).expect("the certificate directory is mounted");
    let pod = deploy.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).unwrap();
    let served_secret = volume.secret.as_ref().unwrap().secret_name.clone().unwrap();

    let certs: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Certificate").collect();
    let by_secret = |s: &str| *certs.iter().find(|c| c["spec"]["secretName"] == s).unwrap_or_else(|| panic!("no Certificate writes {s}"));
    let serving = by_secret(&served_secret);
    assert!(serving["spec"]["usages"].as_array().unwrap().iter().any(|u| u == "server auth"));
    let tls = &by_kind(docs, "DestinationRule")["spec"]["trafficPolicy"]["tls"];
    assert_eq!(tls["mode"], "MUTUAL");
    assert!(tls.get("insecureSkipVerify").is_none());
    let client = by_secret(tls["credentialName"].as_str().unwrap());
    assert!(client["spec"]["usages"].as_array().unwrap().iter().any(|u| u == "client auth"));
    let names = serving["spec"]["dnsNames"].as_array().unwrap();
    assert!(names.contains(&tls["sni"]));
    assert!(tls["subjectAltNames"].as_array().unwrap().iter().all(|n| names.contains(n)));

    // One CA behind both: their Issuer signs with the CA Certificate's Secret.
    assert_eq!(serving["spec"]["issuerRef"], client["spec"]["issuerRef"]);
    let issuer = named("Issuer", serving["spec"]["issuerRef"]["name"].as_str().unwrap());
    let ca = by_secret(issuer["spec"]["ca"]["secretName"].as_str().unwrap());
    assert_eq!(ca["spec"]["isCA"], true);
    named(ca["spec"]["issuerRef"]["kind"].as_str().unwrap(), ca["spec"]["issuerRef"]["name"].as_str().unwrap());
}

#[test]
fn the_epp_deployment_has_the_operator_shape() {
    let docs = docs(&render("kv-aware"));
    let deploy: Deployment = one(&docs, "Deployment");
    let pod = deploy.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let c = epp_container(&deploy);
    assert_eq!((container::port(&c, "grpc"), container::port(&c, "grpc-health"), container::port(&c, "metrics")), (9002, 9003, 9090));
    for probe in [&c.startup_probe, &c.readiness_probe, &c.liveness_probe] {
        let grpc = probe.as_ref().unwrap().grpc.as_ref().unwrap();
        assert_eq!((grpc.port, grpc.service.as_deref()), (9003, Some("inference-extension")));
    }
    let startup = c.startup_probe.as_ref().unwrap();
    assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(10), Some(180)));
    let sc = pod.security_context.unwrap();
    assert_eq!((sc.run_as_non_root, sc.run_as_user), (Some(true), Some(65532)));
    let csc = c.security_context.as_ref().unwrap();
    assert_eq!((csc.read_only_root_filesystem, csc.allow_privilege_escalation), (Some(true), Some(false)));
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.as_ref().unwrap().contains_key("cpu") && res.limits.as_ref().unwrap().contains_key("memory"));
    // The tuning table's variables (contracts §9 A), at their documented defaults.
    let env = env(&c);
    for (name, value) in [
        ("DYN_ENFORCE_DISAGG", "false"),
        ("DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT", "1.0"),
        ("DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY", "0.0"),
        ("DYN_ROUTER_PREFILL_LOAD_SCALE", "1.0"),
        ("DYN_ROUTER_TEMPERATURE", "0.0"),
        ("DYN_ROUTER_REPLICA_SYNC", "false"),
        ("DYN_ROUTER_TRACK_ACTIVE_BLOCKS", "true"),
        ("DYN_ROUTER_TRACK_OUTPUT_BLOCKS", "false"),
        ("DYN_ROUTER_TRACK_PREFILL_TOKENS", "true"),
        ("DYN_ADMISSION_CONTROL", "none"),
        ("DYN_USE_KV_EVENTS", "true"),
    ] {
        assert!(env.contains(&(name.to_string(), Some(value.to_string()))), "{name}={value} missing: {env:?}");
    }
}

#[test]
fn the_approximate_overlay_changes_exactly_the_two_variables() {
    let env_of = |o: &str| env(&epp_container(&one::<Deployment>(&docs(&render(o)), "Deployment")));
    let (kv, approx) = (env_of("kv-aware"), env_of("approximate"));
    let changed: Vec<_> = approx.iter().filter(|e| !kv.contains(e)).cloned().collect();
    assert_eq!(
        changed,
        [
            ("DYN_USE_KV_EVENTS".to_string(), Some("false".to_string())),
            ("DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT".to_string(), Some("0".to_string()))
        ]
    );
    assert_eq!(kv.len(), approx.len());
}

#[test]
fn the_queue_overlay_turns_the_queue_on_within_the_routes_timeout() {
    let docs = docs(&render("queue"));
    let env = env(&epp_container(&one::<Deployment>(&docs, "Deployment")));
    let get = |name: &str| env.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.clone()).unwrap_or_else(|| panic!("{name} missing: {env:?}"));
    assert_eq!(get("DYN_ROUTER_QUEUE_THRESHOLD"), "4");
    assert_eq!(get("DYN_EPP_MAX_NUM_BATCHED_TOKENS"), "8192");
    // A waiting request must outlive its wait at the gateway, with room left to generate.
    let wait: f64 = get("DYN_EPP_QUEUE_MAX_WAIT_SECS").parse().unwrap();
    let route = by_kind(&docs, "HTTPRoute");
    let request = route["spec"]["rules"][0]["timeouts"]["request"].as_str().unwrap();
    let route_secs: f64 = request.trim_end_matches('s').parse().unwrap();
    assert!(route_secs >= 2.0 * wait, "route timeout {request} vs queue wait {wait} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epp_container_starts_the_binary_and_passes_its_probes() {
    let deploy: Deployment = one(&docs(&render("approximate")), "Deployment");
    let c = epp_container(&deploy);
    // File discovery here (no cluster); every other variable exactly as the Deployment sets it.
    let epp = container::start_with_one_worker(&c, "vllm-agg-epp-5f6d7-xyz12").await;
    let metrics = epp.metrics(&c).await;
    assert!(metrics.lines().any(|l| l == "dynamo_epp_workers 1"), "{metrics}");
}
