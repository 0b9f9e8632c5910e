//! NATS with authentication and TLS, configured as Dynamo's runtime is (`NATS_AUTH_USERNAME` /
//! `NATS_AUTH_PASSWORD`, `NATS_AUTH_TOKEN`, `NATS_AUTH_NKEY`, `NATS_TLS_CA_CERT_PATH`, userinfo
//! in `NATS_SERVER`): a real nats-server that refuses anonymous clients, a publisher putting a
//! KV event on JetStream with its own credentials, and the real binary applying it. No secret
//! may appear in the Config debug RPC or in the EPP's log (at debug level).

mod common;

use std::{path::Path, time::Duration};

use common::*;
use dynamo_epp::server::debug::proto::{debug_client::DebugClient, ConfigRequest};
use serde_json::json;

/// One stored event of worker 1002 (8 blocks), as a Dynamo worker publishes it.
fn stored_event() -> Vec<u8> {
    let blocks: Vec<_> = (0..8u64).map(|i| json!({"block_hash": 5000 + i, "tokens_hash": 7000 + i})).collect();
    json!({"worker_id": 1002, "event": {"event_id": 1, "data": {"stored": {"parent_hash": null, "blocks": blocks}}, "dp_rank": 0}})
        .to_string()
        .into_bytes()
}

/// Publishes the event with `opts`, then runs the EPP with `env` and waits for it to apply it.
/// Returns the EPP's Config RPC answer and its log.
async fn epp_applies_the_event(nats: &NatsServer, publisher: async_nats::ConnectOptions, url: &str, env: &[(&str, String)]) -> (String, String) {
    // The server enforces authentication: an anonymous client is refused.
    let anonymous = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3)).connect(nats.url()).await;
    assert!(anonymous.is_err(), "nats-server accepted a client without credentials");

    let js = kv_event_publisher_with(publisher, url).await;
    js.publish(format!("{KV_STREAM}.kv-events"), stored_event().into()).await.unwrap().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("epp.log");
    let mut all_env: Vec<(String, String)> = vec![
        ("DYN_EVENT_PLANE".into(), "jetstream".into()),
        ("DYN_EPP_KV_CONSUMER_NAME".into(), "auth".into()),
        ("RUST_LOG".into(), "debug".into()),
    ];
    all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let yaml = workers_yaml(&[("w2", "127.0.0.1:9".parse().unwrap(), Some(1002))]);
    let epp = Epp::start(&yaml, EppOptions { env: all_env, log: Some(log.clone()), ..Default::default() }).await;
    let applied = epp.wait_metric("dynamo_epp_kv_events_applied_total", Duration::from_secs(30), |v| v >= 1.0).await;
    assert_eq!(applied, 1.0, "EPP log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());

    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", epp.grpc_port)).unwrap().connect().await.unwrap();
    let config = DebugClient::new(channel).config(ConfigRequest {}).await.unwrap().into_inner();
    let config = format!("{:?}", config.config.unwrap());
    (config, std::fs::read_to_string(&log).unwrap())
}

fn assert_hidden(secrets: &[&str], config: &str, log: &str) {
    assert!(!log.is_empty() && log.contains("consuming JetStream KV events"), "{log}");
    for s in secrets {
        assert!(!config.contains(s), "Config RPC shows {s:?}: {config}");
        assert!(!log.contains(s), "log shows {s:?}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_and_password_from_dynamos_variables_and_no_secret_is_shown() {
    let nats = NatsServer::start_with_conf(r#"authorization { users = [ { user: "alice", password: "pw-env-S3CRET" } ] }"#).await;
    let publisher = async_nats::ConnectOptions::with_user_and_password("alice".into(), "pw-env-S3CRET".into());
    let env = [
        ("NATS_SERVER", nats.url()),
        ("NATS_AUTH_USERNAME", "alice".to_string()),
        ("NATS_AUTH_PASSWORD", "pw-env-S3CRET".to_string()),
        // Settings that must be hidden although unused here.
        ("HF_TOKEN", "hf_tok-S3CRET".to_string()),
        ("HF_ENDPOINT", "https://hfuser:hf-url-S3CRET@127.0.0.1:1".to_string()),
    ];
    let (config, log) = epp_applies_the_event(&nats, publisher, &nats.url(), &env).await;
    assert_hidden(&["S3CRET"], &config, &log);
    // What is shown instead: the user name, and that a password and token are set.
    for shown in ["alice", "https://<redacted>@127.0.0.1:1", "nats_auth_password", "hf_token"] {
        assert!(config.contains(shown), "Config lacks {shown:?}: {config}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token() {
    let nats = NatsServer::start_with_conf(r#"authorization { token: "tok-S3CRET" }"#).await;
    let publisher = async_nats::ConnectOptions::with_token("tok-S3CRET".into());
    let env = [("NATS_SERVER", nats.url()), ("NATS_AUTH_TOKEN", "tok-S3CRET".to_string())];
    let (config, log) = epp_applies_the_event(&nats, publisher, &nats.url(), &env).await;
    assert_hidden(&["S3CRET"], &config, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nkey() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats = NatsServer::start_with_conf(&format!(r#"authorization {{ users = [ {{ nkey: "{}" }} ] }}"#, user.public_key())).await;
    let publisher = async_nats::ConnectOptions::with_nkey(seed.clone());
    let env = [("NATS_SERVER", nats.url()), ("NATS_AUTH_NKEY", seed.clone())];
    let (config, log) = epp_applies_the_event(&nats, publisher, &nats.url(), &env).await;
    assert_hidden(&[&seed[2..]], &config, &log);
}

/// TLS with a CA of our own (server certificate for 127.0.0.1 signed by it), and the user's
/// password in the URL's userinfo (async-nats ignores userinfo: the EPP takes it out itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_a_ca_and_credentials_in_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = write_certs(dir.path());
    let nats = NatsServer::start_with_conf(&format!(
        r#"tls {{ cert_file: "{}", key_file: "{}" }}
authorization {{ users = [ {{ user: "bob", password: "url-S3CRET" }} ] }}"#,
        cert.display(),
        key.display()
    ))
    .await;
    let url = format!("nats://bob:url-S3CRET@127.0.0.1:{}", nats.port);
    let publisher = async_nats::ConnectOptions::with_user_and_password("bob".into(), "url-S3CRET".into())
        .add_root_certificates(ca.clone())
        .require_tls(true);
    let env = [("NATS_SERVER", url.clone()), ("NATS_TLS_CA_CERT_PATH", ca.display().to_string())];
    let (config, log) = epp_applies_the_event(&nats, publisher, &nats.url(), &env).await;
    assert_hidden(&["S3CRET"], &config, &log);
    assert!(config.contains(&format!("nats://<redacted>@127.0.0.1:{}", nats.port)), "{config}");
}

/// A CA, and a server certificate for 127.0.0.1 / localhost it signed: (ca.pem, cert.pem, key.pem).
fn write_certs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "dynamo-epp test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}
