//! Runs the real binary as a Kubernetes container spec would: exactly its args and env (downward
//! API fields filled in from a pretend pod), plus the few variables a test adds, bound to a
//! random loopback address so the spec's fixed ports (9002/9003/9090) cannot collide with other
//! tests or runs on the same machine.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Container, Probe};
use tokio::process::{Child, Command};

/// What the downward API would expose (`metadata.name` → value).
pub fn downward(pod: &str, namespace: &str, uid: &str) -> BTreeMap<String, String> {
    [("metadata.name", pod), ("metadata.namespace", namespace), ("metadata.uid", uid)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub struct Running {
    pub child: Child,
    pub ip: IpAddr,
    log: PathBuf,
    /// Holds the log and any workers file.
    dir: tempfile::TempDir,
}

impl Running {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    /// `/metrics` from the container's `metrics` port.
    pub async fn metrics(&self, c: &Container) -> String {
        let url = format!("http://{}/metrics", self.addr(port(c, "metrics")));
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }
}

/// Starts the container in file-discovery mode with one worker (everything else exactly as the
/// spec sets it) and waits until its startup, readiness and liveness probes all pass.
pub async fn start_with_one_worker(c: &Container, pod: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let workers = dir.path().join("workers.yaml");
    std::fs::write(&workers, "workers:\n  - name: vllm-agg-vllmworker-0\n    address: 127.0.0.1:18000\n").unwrap();
    let fields = downward(pod, "dynamo", "3f1c2b4a-0000-4000-8000-000000000001");
    let extra = [("DYN_DISCOVERY", "file".to_string()), ("DYN_EPP_WORKERS_FILE", workers.display().to_string())];
    let mut r = run_in(dir, c, &fields, &extra);
    for probe in [&c.startup_probe, &c.readiness_probe, &c.liveness_probe] {
        probe_until_serving(&mut r, probe.as_ref().expect("startup, readiness and liveness probes"), Duration::from_secs(20)).await;
    }
    r
}

/// Starts `/dynamo-epp` (the image's entrypoint) with the container's args and env.
pub fn run(c: &Container, fields: &BTreeMap<String, String>, extra_env: &[(&str, String)]) -> Running {
    run_in(tempfile::tempdir().unwrap(), c, fields, extra_env)
}

fn run_in(dir: tempfile::TempDir, c: &Container, fields: &BTreeMap<String, String>, extra_env: &[(&str, String)]) -> Running {
    assert!(c.command.is_none(), "the image's ENTRYPOINT is the binary; a command would replace it");
    let log = dir.path().join("stderr.log");
    let ip = IpAddr::V4(Ipv4Addr::new(127, rand::random_range(1..255), rand::random_range(1..255), rand::random_range(2..255)));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamo-epp"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let path = &from.field_ref.as_ref().expect("only fieldRef env sources").field_path;
                fields.get(path).unwrap_or_else(|| panic!("no downward API value for {path}")).clone()
            }
            (None, None) => String::new(),
            (Some(_), Some(_)) => panic!("{}: both value and valueFrom", e.name),
        };
        cmd.env(&e.name, value);
    }
    cmd.env("DYN_EPP_BIND_ADDRESS", ip.to_string());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd
        .args(c.args.iter().flatten())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dynamo-epp");
    Running { child, ip, log, dir }
}

/// The container port with this name.
pub fn port(c: &Container, name: &str) -> u16 {
    let p = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name));
    p.unwrap_or_else(|| panic!("no container port {name:?}")).container_port as u16
}

/// Asks the gRPC health service what a kubelet gRPC probe would ask, until SERVING.
pub async fn probe_until_serving(r: &mut Running, probe: &Probe, within: Duration) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let grpc = probe.grpc.as_ref().expect("a gRPC probe");
    let addr = r.addr(grpc.port as u16);
    let service = grpc.service.clone().unwrap_or_default();
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(Some(status)) = r.child.try_wait() {
            panic!("dynamo-epp exited with {status}: {}", r.log());
        }
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        if let Ok(ch) = ep.connect().await {
            match HealthClient::new(ch).check(HealthCheckRequest { service: service.clone() }).await {
                Ok(resp) if resp.get_ref().status().as_str_name() == "SERVING" => return,
                Ok(resp) => last = resp.get_ref().status().as_str_name().to_string(),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{service:?} on {addr} never SERVING (last: {last}); log: {}", r.log());
}
