//! TLS for the ext_proc port. By default, as Dynamo's EPP, a certificate made at every start
//! (SAN `localhost` and IP 0.0.0.0) that gateways do not verify. With `DYN_EPP_CERT_PATH`, the
//! operator's `tls.crt`/`tls.key` (a Kubernetes TLS Secret's mount), re-read every second: a
//! change is served to new connections (open ones keep theirs), a bad pair is logged and the
//! previous one stays. With `DYN_EPP_CLIENT_CA_FILE`, clients must present a certificate from
//! that CA. ALPN `h2` only.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::RwLock;
use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::{
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};

use super::metrics::OutcomeLabel;

/// How often the certificate files are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(1);

/// Why a certificate, key or CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("cannot make the self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn invalid(path: &Path, what: impl ToString) -> TlsError {
    TlsError::Invalid { path: path.to_owned(), what: what.to_string() }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| invalid(path, e))?;
    if chain.is_empty() {
        return Err(invalid(path, "no PEM certificate"));
    }
    Ok(chain)
}

/// The pair in a directory, as files' contents (compared to notice a change).
struct Pair {
    crt: Vec<u8>,
    key: Vec<u8>,
}

impl Pair {
    fn read(dir: &Path) -> Result<Pair, TlsError> {
        Ok(Pair { crt: read(&dir.join("tls.crt"))?, key: read(&dir.join("tls.key"))? })
    }

    /// The chain and its key, checked to belong together.
    fn certified(&self, dir: &Path) -> Result<CertifiedKey, TlsError> {
        let key_path = dir.join("tls.key");
        let chain = certs(&dir.join("tls.crt"), &self.crt)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| invalid(&key_path, e))?;
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| invalid(&key_path, format!("{e} (does the key belong to tls.crt?)")))
    }
}

/// The certificate new handshakes get; replaced as a whole when the files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// Certificate reloads by outcome (`loaded`, `rejected`): `dynamo_epp_certificate_reloads_total`.
pub type ReloadCounter = Family<OutcomeLabel, Counter>;

/// The server's TLS configuration from the settings; with `cert_path`, also starts the task
/// that reloads the pair. Fails if a configured file is missing or unusable now.
pub fn server_config(cert_path: Option<&Path>, client_ca: Option<&Path>, reloads: ReloadCounter) -> Result<Arc<ServerConfig>, TlsError> {
    let current = match cert_path {
        Some(dir) => {
            let pair = Pair::read(dir)?;
            let key = Arc::new(pair.certified(dir)?);
            let current = Arc::new(Current(RwLock::new(key)));
            tokio::spawn(watch(dir.to_owned(), pair, current.clone(), reloads));
            current
        }
        None => Arc::new(Current(RwLock::new(Arc::new(self_signed()?)))),
    };
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().expect("ring supports TLS 1.2 and 1.3");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path)?),
    };
    let mut config = builder.with_cert_resolver(current);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn self_signed() -> Result<CertifiedKey, TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "0.0.0.0".to_string()])?;
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    Ok(CertifiedKey::from_der(vec![ck.cert.der().clone()], key, &provider()).expect("rcgen's key matches its certificate"))
}

/// Clients must present a certificate chaining to one of the CAs in `path` (PEM).
fn client_verifier(path: &Path) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(path, &read(path)?)? {
        roots.add(ca).map_err(|e| invalid(path, e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| invalid(path, e))
}

/// Polls the pair; installs a changed one that is valid. A Secret update swaps both files at
/// once (a `..data` symlink), but a read can fall between the two: that mismatched pair is
/// rejected and the next poll reads the complete new one. Only a pair not seen before is
/// logged and counted, so a lasting bad pair warns once.
async fn watch(dir: PathBuf, mut seen: Pair, current: Arc<Current>, reloads: ReloadCounter) {
    let mut tick = tokio::time::interval(CERT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pair = match Pair::read(&dir) {
            Ok(p) => p,
            // A missing file mid-swap or a Secret deleted: keep serving the last good pair.
            Err(e) => {
                tracing::debug!(error = %e, "certificate not readable now; keeping the current one");
                continue;
            }
        };
        if pair.crt == seen.crt && pair.key == seen.key {
            continue;
        }
        match pair.certified(&dir) {
            Ok(key) => {
                *current.0.write() = Arc::new(key);
                reloads.get_or_create(&OutcomeLabel { outcome: "loaded" }).inc();
                tracing::info!(dir = %dir.display(), "new certificate loaded for new connections");
            }
            Err(e) => {
                reloads.get_or_create(&OutcomeLabel { outcome: "rejected" }).inc();
                tracing::warn!(error = %e, "new certificate files rejected; keeping the current certificate");
            }
        }
        seen = pair;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, ck: &rcgen::CertifiedKey<rcgen::KeyPair>) {
        std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_pair_loads_only_when_key_and_certificate_belong_together() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        write_pair(dir.path(), &a);
        let key = Pair::read(dir.path()).unwrap().certified(dir.path()).unwrap();
        assert_eq!(key.cert[0].as_ref(), a.cert.der().as_ref());
        std::fs::write(dir.path().join("tls.key"), b.signing_key.serialize_pem()).unwrap();
        let e = Pair::read(dir.path()).unwrap().certified(dir.path()).unwrap_err();
        assert!(e.to_string().contains("tls.key"), "{e}");
        std::fs::write(dir.path().join("tls.crt"), "not pem").unwrap();
        let e = Pair::read(dir.path()).unwrap().certified(dir.path()).unwrap_err();
        assert!(e.to_string().contains("tls.crt") && e.to_string().contains("no PEM certificate"), "{e}");
        std::fs::remove_file(dir.path().join("tls.crt")).unwrap();
        assert!(matches!(Pair::read(dir.path()), Err(TlsError::Read { .. })));
    }
}
