//! Self-signed TLS for the ext_proc port, as Dynamo's EPP: a fresh certificate at every start
//! (SAN `localhost` and IP 0.0.0.0); gateways skip verification. tonic's rustls setup
//! advertises ALPN `h2`.

use tonic::transport::{Identity, ServerTlsConfig};

pub fn self_signed() -> Result<ServerTlsConfig, rcgen::Error> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "0.0.0.0".to_string()])?;
    let identity = Identity::from_pem(ck.cert.pem(), ck.signing_key.serialize_pem());
    Ok(ServerTlsConfig::new().identity(identity))
}
