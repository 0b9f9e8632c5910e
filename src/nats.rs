//! How the process's NATS clients (the JetStream and NATS-core KV planes, replica sync) connect:
//! the server URL plus authentication and TLS as Dynamo's runtime takes them (`NATS_AUTH_*`,
//! `NATS_TLS_*`, see `Config::nats`), so an EPP beside Dynamo's workers reuses their secret.

use std::{path::PathBuf, time::Duration};

use crate::secret::{redact_urls, Secret};

/// One authentication method (Dynamo's priority: user + password, token, NKey, credentials file).
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    UserPassword(String, Secret),
    Token(Secret),
    /// The NKey seed; the client signs the server's nonce with it.
    NKey(Secret),
    CredentialsFile(PathBuf),
}

#[derive(Clone, Default)]
pub struct NatsConnect {
    /// May carry `user:password@` (the client uses it); print [`NatsConnect::shown_url`].
    pub url: String,
    pub auth: Auth,
    /// CA that verifies the server; set = TLS required.
    pub tls_ca: Option<PathBuf>,
    /// (certificate, key) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl NatsConnect {
    /// An unauthenticated connection to `url` (tests, tools).
    pub fn plain(url: impl Into<String>) -> Self {
        NatsConnect { url: url.into(), ..Default::default() }
    }

    /// The URL as logs and errors may show it.
    pub fn shown_url(&self) -> String {
        redact_urls(&self.url)
    }

    /// Client options with the credentials and TLS settings applied, and the ones every client
    /// here shares: a 5 s connection timeout, retrying the first connection in the background.
    /// Fails only when the credentials file cannot be read or parsed.
    pub async fn options(&self) -> std::io::Result<async_nats::ConnectOptions> {
        let mut o = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5)).retry_on_initial_connect();
        o = match &self.auth {
            // async-nats ignores a URL's userinfo; as NATS clients do, it means user:password or a
            // token (the NATS_AUTH_* variables win).
            Auth::None => match split_userinfo(&self.url).1 {
                Some((user, Some(pass))) => o.user_and_password(user, pass),
                Some((token, None)) => o.token(token),
                None => o,
            },
            Auth::UserPassword(u, p) => o.user_and_password(u.clone(), p.expose().to_string()),
            Auth::Token(t) => o.token(t.expose().to_string()),
            Auth::NKey(seed) => o.nkey(seed.expose().to_string()),
            Auth::CredentialsFile(path) => o.credentials_file(path).await?,
        };
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &self.client_cert {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(o)
    }

    /// Connects with [`NatsConnect::options`] plus `customize` (e.g. `no_echo`); an error's text
    /// never holds the URL's credentials.
    pub async fn connect(
        &self,
        customize: impl FnOnce(async_nats::ConnectOptions) -> async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, ConnectError> {
        let o = self.options().await.map_err(|e| ConnectError(format!("NATS credentials file: {e}")))?;
        // The client gets the URL without userinfo, so nothing it logs can show the credentials.
        customize(o).connect(split_userinfo(&self.url).0).await.map_err(|e| ConnectError(redact_urls(&e.to_string())))
    }
}

/// `scheme://[user[:password]@]host…` → (the URL without userinfo, (user, password)).
fn split_userinfo(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some(i) = url.find("://").map(|i| i + 3) else { return (url.to_string(), None) };
    let authority_end = url[i..].find(['/', '?', '#']).map_or(url.len(), |e| i + e);
    let Some(at) = url[i..authority_end].rfind('@').map(|a| i + a) else { return (url.to_string(), None) };
    let info = &url[i..at];
    let creds = match info.split_once(':') {
        Some((u, p)) => (u.to_string(), Some(p.to_string())),
        None => (info.to_string(), None),
    };
    (format!("{}{}", &url[..i], &url[at + 1..]), Some(creds))
}

impl std::fmt::Debug for NatsConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConnect")
            .field("url", &self.shown_url())
            .field("auth", &self.auth)
            .field("tls_ca", &self.tls_ca)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// A failed connection, its message already free of credentials.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_taken_out_of_the_url() {
        let s = |u: &str| split_userinfo(u);
        assert_eq!(s("nats://h:4222"), ("nats://h:4222".into(), None));
        assert_eq!(s("nats://alice:pw@h:4222"), ("nats://h:4222".into(), Some(("alice".into(), Some("pw".into())))));
        assert_eq!(s("tls://t0k@h:4222/x"), ("tls://h:4222/x".into(), Some(("t0k".into(), None))));
        assert_eq!(s("nats://a:p@ss@h"), ("nats://h".into(), Some(("a".into(), Some("p@ss".into())))));
        assert_eq!(s("h:4222"), ("h:4222".into(), None));
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let c = NatsConnect { url: "nats://u:pw1@h:4222".into(), auth: Auth::UserPassword("u".into(), "pw2".parse().unwrap()), ..Default::default() };
        let shown = format!("{c:?} {}", c.shown_url());
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
        assert!(shown.contains("UserPassword(\"u\", \"<redacted>\")"), "{shown}");
        assert_eq!(c.shown_url(), "nats://<redacted>@h:4222");
    }
}
