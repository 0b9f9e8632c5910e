//! Drop-in for the Dynamo operator: the EPP container exactly as the operator renders it
//! (contracts §1.4) starts our binary and serves, with the Go-style arguments and the operator's
//! environment accepted and the meaningless ones logged as ignored.

mod kube_support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use kube_support::container;
use serde_json::json;

/// The operator's EPP container for DGD `dgd` in `namespace` with Dynamo namespace `dynamo_ns`
/// (`component_epp.go`, `epp/config.go`, `consts.go`, `component_common.go` per contracts §1.4).
fn operator_epp_container(dgd: &str, namespace: &str, dynamo_ns: &str) -> Container {
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let grpc_probe = |extra: serde_json::Value| {
        let mut p = json!({"grpc": {"port": 9003, "service": "inference-extension"}, "periodSeconds": 10});
        p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        p
    };
    serde_json::from_value(json!({
        "name": "epp",
        "image": "nvcr.io/nvidia/ai-dynamo/dynamo-frontend:1.4.0",
        "args": [
            "--pool-name", format!("{dgd}-pool"),
            "--pool-namespace", namespace,
            "--pool-group", "inference.networking.k8s.io",
            "-v", "4",
            "--zap-encoder", "json",
            "--grpc-port", "9002",
            "--grpc-health-port", "9003",
            "--config-file", "/etc/epp/epp-config-dynamo.yaml"
        ],
        "env": [
            {"name": "USE_STREAMING", "value": "true"},
            {"name": "RUST_LOG", "value": "info"},
            {"name": "DYN_ENFORCE_DISAGG", "value": "false"},
            {"name": "DYN_NAMESPACE_PREFIX", "value": dynamo_ns},
            {"name": "DYN_COMPONENT", "value": "Epp"},
            {"name": "DYN_PARENT_DGD_K8S_NAME", "value": dgd},
            {"name": "DYN_PARENT_DGD_K8S_NAMESPACE", "value": namespace},
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "POD_UID", "valueFrom": field("metadata.uid")},
            {"name": "DYN_DISCOVERY_BACKEND", "value": "kubernetes"},
            {"name": "CONTAINER_NAME", "value": "main"},
            {"name": "DYN_KUBE_DISCOVERY_MODE", "value": "container"}
        ],
        "ports": [
            {"name": "grpc", "containerPort": 9002, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": 9003, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}
        ],
        "livenessProbe": grpc_probe(json!({"initialDelaySeconds": 5})),
        "readinessProbe": grpc_probe(json!({"initialDelaySeconds": 5})),
        "startupProbe": grpc_probe(json!({"failureThreshold": 180})),
        "volumeMounts": [
            {"name": "epp-config", "mountPath": "/etc/epp"},
            {"name": "hf-cache", "mountPath": "/home/nonroot/.cache"}
        ]
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_rendered_container_starts_and_serves_in_file_discovery_mode() {
    let c = operator_epp_container("vllm-agg", "dynamo", "vllm-agg");
    // File discovery instead of the cluster; everything else exactly as rendered. Waits for
    // what the kubelet asks: startup, then readiness and liveness.
    let epp = container::start_with_one_worker(&c, "vllm-agg-epp-7d8c9-abcde").await;
    // ext_proc answers over TLS (the default) on the `grpc` port: grpcurl lists it by reflection.
    let grpcurl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    let out = tokio::process::Command::new(&grpcurl)
        .args(["-insecure", "-max-time", "10", &epp.addr(container::port(&c, "grpc")).to_string(), "list"])
        .output()
        .await
        .expect("grpcurl (scripts/setup.sh installs it)");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("envoy.service.ext_proc.v3.ExternalProcessor"), "{listed} {}", String::from_utf8_lossy(&out.stderr));
    // Metrics on the `metrics` port, with the one worker from the file.
    let metrics = epp.metrics(&c).await;
    assert!(metrics.lines().any(|l| l == "dynamo_epp_workers 1"), "{metrics}");

    // Arguments and variables with no meaning here are named in the log as ignored.
    let log = epp.log();
    for setting in ["-v", "--zap-encoder", "--config-file", "USE_STREAMING", "DYN_DISCOVERY_BACKEND", "DYN_KUBE_DISCOVERY_MODE", "POD_UID"] {
        assert!(
            log.lines().any(|l| l.contains("ignored") && l.contains(&format!("setting=\"{setting}\""))),
            "{setting} not logged as ignored: {log}"
        );
    }
    assert!(log.contains("pool name ignored: discovery is file"), "{log}");
}

#[tokio::test]
async fn a_pool_group_other_than_v1_is_refused_with_one_line() {
    let mut c = operator_epp_container("vllm-agg", "dynamo", "vllm-agg");
    let args = c.args.as_mut().unwrap();
    let i = args.iter().position(|a| a == "--pool-group").unwrap();
    args[i + 1] = "inference.networking.x-k8s.io".into();
    let fields = container::downward("p", "dynamo", "u");
    let mut epp = container::run(&c, &fields, &[("DYN_DISCOVERY", "file".into())]);
    let status = tokio::time::timeout(Duration::from_secs(10), epp.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(2));
    let log = epp.log();
    assert_eq!(log.trim().lines().count(), 1, "{log}");
    assert!(log.contains("inference.networking.x-k8s.io") && log.contains("inference.networking.k8s.io"), "{log}");
}
