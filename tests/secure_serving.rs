//! Secure serving through real TLS clients (grpcurl, a tonic client, a rustls client that reads
//! the served certificate) and the real Envoy verifying the EPP: the operator's certificate and
//! its rotation, client-certificate verification, start-up failures, and the connection bounds
//! under idle connections and stalled handshakes. Certificates come from a test CA (rcgen).

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use dynamo_epp::server::debug::proto::{debug_client::DebugClient, WorkersRequest};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::{io::AsyncWriteExt, net::TcpStream};

// ---------------------------------------------------------------- certificates

struct TestCa(CertifiedIssuer<'static, KeyPair>);

/// An issued certificate: PEM of the certificate and its key, and the DER a client sees.
struct Issued {
    crt: String,
    key: String,
    der: Vec<u8>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        TestCa(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.0).unwrap();
        Issued { crt: cert.pem(), key: key.serialize_pem(), der: cert.der().to_vec() }
    }

    fn server(&self) -> Issued {
        self.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self) -> Issued {
        self.issue("gateway", ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A directory laid out as the kubelet mounts a Secret: `tls.crt` and `tls.key` are symlinks
/// through `..data`, which an update points at a new timestamped directory in one rename.
struct SecretMount {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretMount {
    fn new(crt: &str, key: &str) -> SecretMount {
        let mut m = SecretMount { dir: tempfile::tempdir().unwrap(), generation: 0 };
        m.update(crt, key);
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), m.path().join(f)).unwrap();
        }
        m
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn update(&mut self, crt: &str, key: &str) {
        let old = format!("..2026_12_06_09_00_00.{}", self.generation);
        self.generation += 1;
        let new = format!("..2026_12_06_09_00_00.{}", self.generation);
        std::fs::create_dir(self.path().join(&new)).unwrap();
        std::fs::write(self.path().join(&new).join("tls.crt"), crt).unwrap();
        std::fs::write(self.path().join(&new).join("tls.key"), key).unwrap();
        std::os::unix::fs::symlink(&new, self.path().join("..data_tmp")).unwrap();
        std::fs::rename(self.path().join("..data_tmp"), self.path().join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.path().join(old));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The end-entity certificate a new TLS connection to `port` gets, verified against `ca_pem`
/// for the name `localhost`.
async fn served_cert(port: u16, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// grpcurl `list` on the EPP's gRPC port, verifying it with `ca` for the name `localhost`, with
/// an optional client certificate; (success, output).
async fn grpcurl_list(port: u16, ca: &Path, client: Option<(&Path, &Path)>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(repo_root().join(".venv/bin/grpcurl"));
    cmd.arg("-cacert").arg(ca).args(["-servername", "localhost", "-max-time", "10"]);
    if let Some((crt, key)) = client {
        cmd.arg("-cert").arg(crt).arg("-key").arg(key);
    }
    let out = cmd.arg(format!("127.0.0.1:{port}")).arg("list").output().await.expect("grpcurl (scripts/setup.sh installs it)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A tonic client over TLS verifying `ca`, with an optional client identity; the Workers call's result.
async fn tonic_workers(port: u16, ca: &str, identity: Option<&Issued>) -> Result<usize, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(i) = identity {
        tls = tls.identity(Identity::from_pem(&i.crt, &i.key));
    }
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let r = DebugClient::new(channel).workers(WorkersRequest {}).await.map_err(|s| format!("call: {s}"))?;
    Ok(r.into_inner().workers.len())
}

async fn post(client: &reqwest::Client, envoy: &Envoy, content: impl AsRef<str>) -> u16 {
    match client.post(envoy.url("/v1/chat/completions")).body(chat_body(content.as_ref())).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

fn tls_env(pairs: &[(&str, &Path)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.display().to_string())).collect()
}

// ---------------------------------------------------------------- the operator's certificate

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_verifies_the_operators_certificate_and_keeps_routing_while_it_rotates() {
    let ca = TestCa::new("epp test ca");
    let files = tempfile::tempdir().unwrap();
    let ca_file = write(files.path(), "ca.crt", &ca.pem());
    let (first, second) = (ca.server(), ca.server());
    let mut mount = SecretMount::new(&first.crt, &first.key);

    let worker = MockWorker::start("w0").await;
    let yaml = workers_yaml(&[("w0", worker.addr, None)]);
    let epp = Epp::start(&yaml, EppOptions { tls: true, env: tls_env(&[("DYN_EPP_CERT_PATH", mount.path())]), ..Default::default() }).await;
    assert_eq!(served_cert(epp.grpc_port, &ca.pem()).await, first.der, "the operator's certificate, not a self-signed one");
    let link = EppLink { port: epp.grpc_port, tls: true };
    let verify = UpstreamTls { ca: ca_file.clone(), client_cert: None };
    let envoy = Envoy::start_tls(Some(&link), Some(&verify)).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, &envoy, "verified").await, 200, "{}", envoy.log());

    // The control: an Envoy trusting another CA refuses this EPP, so the first one did verify.
    let other = TestCa::new("another ca");
    let other_ca = UpstreamTls { ca: write(files.path(), "other.crt", &other.pem()), client_cert: None };
    let refusing = Envoy::start_tls(Some(&link), Some(&other_ca)).await;
    assert_ne!(post(&client, &refusing, "unverifiable").await, 200);
    drop(refusing);

    // A stream open across the rotation: the first event is through, the rest comes after.
    let held = {
        let (c, url) = (client.clone(), envoy.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let r = c.post(url).header("x-mock-mode", "hold-sse").body(chat_body("held across the rotation")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    // Traffic all along: four clients in a loop, every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let (c, url, stop, sent, failed) = (client.clone(), envoy.url("/v1/chat/completions"), stop.clone(), sent.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = matches!(c.post(&url).body(chat_body(&format!("load {i}"))).send().await, Ok(r) if r.status() == 200);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    mount.update(&second.crt, &second.key);
    let rotated = Instant::now();
    while served_cert(epp.grpc_port, &ca.pem()).await != second.der {
        assert!(rotated.elapsed() < Duration::from_secs(5), "new connections still get the old certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("new certificate served {} ms after the Secret update", rotated.elapsed().as_millis());
    assert_eq!(epp.metrics().await.lines().find(|l| l.contains("certificate_reloads_total{outcome=\"loaded\"}")), Some("dynamo_epp_certificate_reloads_total{outcome=\"loaded\"} 1"));
    // A gateway connecting now verifies the new certificate.
    let fresh = Envoy::start_tls(Some(&link), Some(&verify)).await;
    assert_eq!(post(&client, &fresh, "after rotation").await, 200);

    // A bad pair (the new certificate with the old key) is refused; the last good one stays.
    mount.update(&ca.server().crt, &second.key);
    let rejected = epp.wait_metric("dynamo_epp_certificate_reloads_total{outcome=\"rejected\"}", Duration::from_secs(5), |v| v == 1.0).await;
    assert_eq!(rejected, 1.0);
    assert_eq!(served_cert(epp.grpc_port, &ca.pem()).await, second.der);
    assert_eq!(post(&client, &fresh, "after a bad pair").await, 200);

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("{sent} requests through the rotation, {failed} failed");
    assert!(sent > 20, "{sent}");
    assert_eq!(failed, 0);
    worker.release(1);
    let (status, body) = held.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.matches("data: ").count(), 6, "every event and [DONE]: {body}");
}

#[tokio::test]
async fn start_up_stops_with_one_line_on_a_missing_or_bad_pair() {
    let ca = TestCa::new("epp test ca");
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent");
    let mismatched = SecretMount::new(&ca.server().crt, &ca.server().key);
    let good = ca.server();
    let good_dir = tempfile::tempdir().unwrap();
    write(good_dir.path(), "tls.crt", &good.crt);
    write(good_dir.path(), "tls.key", &good.key);
    let not_pem = write(dir.path(), "ca.crt", "not a certificate");
    for (env, needle) in [
        (vec![("DYN_EPP_CERT_PATH", missing.as_os_str())], missing.join("tls.crt").display().to_string()),
        (vec![("DYN_EPP_CERT_PATH", mismatched.path().as_os_str())], "tls.key".to_string()),
        (vec![("DYN_EPP_CERT_PATH", good_dir.path().as_os_str()), ("DYN_EPP_CLIENT_CA_FILE", missing.as_os_str())], missing.display().to_string()),
        (vec![("DYN_EPP_CLIENT_CA_FILE", not_pem.as_os_str())], not_pem.display().to_string()),
    ] {
        let mut env = env;
        env.push(("RUST_LOG", "off".as_ref()));
        let out = epp_start_failure(&env).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&needle), "{needle}: {err}");
    }
}

// ---------------------------------------------------------------- client certificates

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_client_ca_only_clients_holding_its_certificates_get_in() {
    let (server_ca, client_ca, stranger_ca) = (TestCa::new("server ca"), TestCa::new("client ca"), TestCa::new("stranger ca"));
    let files = tempfile::tempdir().unwrap();
    let f = |name: &str, text: &str| write(files.path(), name, text);
    let server_ca_file = f("server-ca.crt", &server_ca.pem());
    let client_ca_file = f("client-ca.crt", &client_ca.pem());
    let server = server_ca.server();
    let mount = SecretMount::new(&server.crt, &server.key);
    let (gateway, stranger) = (client_ca.client(), stranger_ca.client());
    let (gw_crt, gw_key) = (f("gw.crt", &gateway.crt), f("gw.key", &gateway.key));
    let (st_crt, st_key) = (f("st.crt", &stranger.crt), f("st.key", &stranger.key));

    let worker = MockWorker::start("w0").await;
    let env = tls_env(&[("DYN_EPP_CERT_PATH", mount.path()), ("DYN_EPP_CLIENT_CA_FILE", &client_ca_file)]);
    let epp = Epp::start(&workers_yaml(&[("w0", worker.addr, None)]), EppOptions { tls: true, env, ..Default::default() }).await;
    let port = epp.grpc_port;

    // grpcurl: no certificate, or one from another CA, is refused; the gateway's gets in.
    let (ok, out) = grpcurl_list(port, &server_ca_file, None).await;
    assert!(!ok, "no client certificate: {out}");
    let (ok, out) = grpcurl_list(port, &server_ca_file, Some((&st_crt, &st_key))).await;
    assert!(!ok, "a stranger's certificate: {out}");
    let (ok, out) = grpcurl_list(port, &server_ca_file, Some((&gw_crt, &gw_key))).await;
    assert!(ok && out.contains("envoy.service.ext_proc.v3.ExternalProcessor"), "{out}");

    // A tonic client: the same.
    assert!(tonic_workers(port, &server_ca.pem(), None).await.is_err());
    assert!(tonic_workers(port, &server_ca.pem(), Some(&stranger)).await.is_err());
    assert_eq!(tonic_workers(port, &server_ca.pem(), Some(&gateway)).await, Ok(1));

    // Envoy: with the gateway's certificate it routes; without one it cannot reach the picker.
    let link = EppLink { port, tls: true };
    let with = UpstreamTls { ca: server_ca_file.clone(), client_cert: Some((gw_crt.clone(), gw_key.clone())) };
    let without = UpstreamTls { ca: server_ca_file.clone(), client_cert: None };
    let (envoy, anonymous) = (Envoy::start_tls(Some(&link), Some(&with)).await, Envoy::start_tls(Some(&link), Some(&without)).await);
    let client = reqwest::Client::new();
    for i in 0..5 {
        assert_eq!(post(&client, &envoy, &format!("mutual {i}")).await, 200, "{}", envoy.log());
    }
    assert_ne!(post(&client, &anonymous, "anonymous").await, 200);
    assert_eq!(worker.seen().len(), 5, "the refused request reached no worker");
    let tls_failures = epp.metric("dynamo_epp_handshake_failures_total{reason=\"tls\"}").await.unwrap_or(0.0);
    assert!(tls_failures >= 4.0, "{tls_failures}");
}

// ---------------------------------------------------------------- bounded connections

/// Raises this process's soft open-file limit to at least `n` (the hard limit permitting).
fn ensure_fd_limit(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: the calls only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            assert!(lim.rlim_max >= n, "the hard open-file limit {} is below the {n} this test needs", lim.rlim_max);
            lim.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_and_stalled_handshakes_leave_routing_healthy() {
    const IDLE: usize = 2000;
    const STALLED: usize = 200;
    ensure_fd_limit(8192);
    let chain = Chain::start(&[("w0", None)], EppOptions { tls: true, ..Default::default() }).await;
    let port = chain.epp.grpc_port;
    // Both Envoy workers connect to the picker before the flood.
    for _ in 0..20 {
        let batch: Vec<_> = (0..16).map(|i| post(&chain.client, &chain.envoy, format!("warm {i}"))).collect();
        assert!(futures_util::future::join_all(batch).await.iter().all(|&s| s == 200));
        if chain.epp.metric("dynamo_epp_connections").await == Some(2.0) {
            break;
        }
    }
    let gateway_conns = chain.epp.metric("dynamo_epp_connections").await.unwrap();
    let fds_before = open_fds(chain.epp.pid());

    // 200 handshakes that never finish (half a ClientHello record), then 2,000 silent connections.
    let hold = Arc::new(tokio::sync::Notify::new());
    let connected = Arc::new(AtomicUsize::new(0));
    let closed_by_epp = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..STALLED + IDLE {
        let (hold, connected, closed_by_epp) = (hold.clone(), connected.clone(), closed_by_epp.clone());
        flood.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else { return };
            connected.fetch_add(1, Ordering::Relaxed);
            if i < STALLED {
                // A handshake record announcing 512 bytes, and only its first ten.
                let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]).await;
            }
            let mut buf = [0u8; 64];
            tokio::select! {
                _ = hold.notified() => {}
                r = tokio::io::AsyncReadExt::read(&mut s, &mut buf) => if matches!(r, Ok(0) | Err(_)) { closed_by_epp.fetch_add(1, Ordering::Relaxed); },
            }
        }));
        if i == STALLED - 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Routing for the whole time it takes the picker to time them all out.
    let start = Instant::now();
    let (mut routed, mut slowest, mut max_conns, mut max_fds) = (0, Duration::ZERO, 0.0f64, 0);
    while closed_by_epp.load(Ordering::Relaxed) < STALLED + IDLE && start.elapsed() < Duration::from_secs(45) {
        let t = Instant::now();
        assert_eq!(post(&chain.client, &chain.envoy, &format!("during the flood {routed}")).await, 200);
        slowest = slowest.max(t.elapsed());
        routed += 1;
        assert_eq!(chain.epp.health("inference-extension").await, "SERVING");
        max_conns = max_conns.max(chain.epp.metric("dynamo_epp_connections").await.unwrap());
        max_fds = max_fds.max(open_fds(chain.epp.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    let (connected, closed) = (connected.load(Ordering::Relaxed), closed_by_epp.load(Ordering::Relaxed));
    let metrics = chain.epp.metrics().await;
    let failures = |reason: &str| {
        let key = format!("dynamo_epp_handshake_failures_total{{reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&key)).map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    println!(
        "{connected} connected, {closed} closed by the picker in {} ms; {routed} routed meanwhile, slowest {} ms; \
         picker connections ≤ {max_conns} (gateway {gateway_conns}), descriptors {fds_before} → ≤ {max_fds}; timeouts {}",
        took.as_millis(),
        slowest.as_millis(),
        failures("timeout")
    );
    // The 1,176 beyond the bound wait in the listen backlog (4,096, capped by net.core.somaxconn).
    assert_eq!(connected, STALLED + IDLE, "every connection reached the backlog");
    assert_eq!(closed, STALLED + IDLE, "every silent or stalled connection was closed by its deadline");
    assert!(max_conns <= 1024.0, "{max_conns}");
    assert!(max_fds <= fds_before + 1024, "{fds_before} → {max_fds}");
    assert_eq!(failures("timeout"), (STALLED + IDLE) as f64);
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    // 1,024 at a time, each held to its 10 s deadline: 2,200 take three rounds (one, were
    // they all accepted at once).
    assert!(took >= Duration::from_secs(25), "{took:?}");
    hold.notify_waiters();
    for f in flood {
        f.await.unwrap();
    }
    // Slots are back: a new client (the certificate is the self-signed one) gets in at once.
    let t = Instant::now();
    let out = tokio::process::Command::new(repo_root().join(".venv/bin/grpcurl"))
        .args(["-insecure", "-max-time", "5", &format!("127.0.0.1:{port}"), "list"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(chain.epp.wait_metric("dynamo_epp_connections", Duration::from_secs(5), |v| v == gateway_conns).await, gateway_conns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_are_advertised_and_enforced() {
    let epp = Epp::start(&workers_yaml(&[("w", "127.0.0.1:9".parse().unwrap(), Some(7))]), EppOptions::default()).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS as a client sees it (the PONG comes after the SETTINGS).
    let tcp = TcpStream::connect(("127.0.0.1", epp.grpc_port)).await.unwrap();
    let (_send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    tokio::select! {
        r = &mut conn => panic!("connection ended: {r:?}"),
        r = pings.ping(h2::Ping::opaque()) => { r.unwrap(); }
    }
    assert_eq!(conn.max_concurrent_send_streams(), 4096);

    // Metadata within the 16 KiB header list passes; past it the call is refused.
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", epp.grpc_port)).unwrap().connect().await.unwrap();
    let call = |bytes: usize| {
        let mut client = DebugClient::new(channel.clone());
        let mut req = tonic::Request::new(WorkersRequest {});
        req.metadata_mut().insert("x-padding", "a".repeat(bytes).parse().unwrap());
        async move { client.workers(req).await.map(|r| r.into_inner().workers.len()) }
    };
    assert_eq!(call(8 * 1024).await.unwrap(), 1);
    assert!(call(20 * 1024).await.is_err());
    assert_eq!(call(100).await.unwrap(), 1, "the connection still serves");
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    // Started under a soft limit of 256, as a shell with a low `ulimit -n` would start it.
    let (port, health) = (free_port(), free_port());
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\"", &epp_bin().display().to_string()])
        .env("DYN_EPP_GRPC_PORT", port.to_string())
        .env("DYN_EPP_HEALTH_PORT", health.to_string())
        .env("DYN_EPP_METRICS_PORT", "0")
        .env("DYN_EPP_BIND_ADDRESS", "127.0.0.1")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(60)).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id().unwrap())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (v[3], v[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_silent_http2_peer_is_pinged_and_then_dropped() {
    let epp = Epp::start(&workers_yaml(&[("w", "127.0.0.1:9".parse().unwrap(), Some(7))]), EppOptions::default()).await;
    // A client that says hello (preface, empty SETTINGS) and then never answers anything.
    let mut s = TcpStream::connect(("127.0.0.1", epp.grpc_port)).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let silent = Instant::now();
    let (mut ping_at, mut buf) = (None, Vec::new());
    let closed_at = loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(60), tokio::io::AsyncReadExt::read(&mut s, &mut chunk)).await.expect("closed within a minute") {
            Ok(0) | Err(_) => break silent.elapsed(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        // Whole frames: 3-byte length, type, flags, 4-byte stream id, payload.
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == 6 && buf[4] & 1 == 0 && ping_at.is_none() {
                ping_at = Some(silent.elapsed());
            }
            buf.drain(..9 + len);
        }
    };
    let ping_at = ping_at.expect("a PING before the close");
    println!("PING after {} ms of silence, closed after {} ms", ping_at.as_millis(), closed_at.as_millis());
    assert!(ping_at >= Duration::from_secs(29) && ping_at < Duration::from_secs(35), "{ping_at:?}");
    assert!(closed_at >= ping_at + Duration::from_secs(9) && closed_at < ping_at + Duration::from_secs(15), "{closed_at:?}");
}
