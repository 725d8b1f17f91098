//! Connecting to control over TLS, trusting exactly control's CA: either by
//! its SHA-256 pin (what an enrollment key carries; during a CA rotation,
//! any of several pins) or by its PEM (`ca.pem`, one or more certificates);
//! and to control's local admin socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Endpoint, Uri};

/// The channel type [`connect`] and [`connect_unix`] return (re-exported so
/// that callers can name clients without depending on tonic themselves).
pub use tonic::transport::Channel;

/// What to trust.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The CA whose certificate's SHA-256 is this.
    Pin([u8; 32]),
    /// Any CA whose certificate's SHA-256 is one of these (a CA rotation
    /// trusts the old and the new CA for a while).
    AnyPin(Vec<[u8; 32]>),
    /// These CA certificates (PEM, one or more).
    CaPem(String),
}

/// A connection failure.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad address or certificate.
    #[error("{0}")]
    Config(String),
    /// Could not connect.
    #[error("connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// None of several addresses answered (each with its error).
    #[error("no control address answered: {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<(String, String)>),
}

/// How long one connection attempt may take: a replica that drops packets
/// (down, or partitioned away) must not hold up the move to the next.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// SHA-256 of a certificate's DER.
#[must_use]
pub fn pin_of(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies the server's chain against a pinned CA found in the chain.
#[derive(Debug)]
struct PinVerifier {
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| self.pins.contains(&pin_of(c)))
            .ok_or_else(|| rustls::Error::General("server chain has no certificate matching the CA pin".into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, ConnectError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Config(e.to_string()))?;
    let mut config = match trust {
        Trust::Pin(_) | Trust::AnyPin(_) => {
            let pins = match trust {
                Trust::AnyPin(pins) => pins.clone(),
                Trust::Pin(pin) => vec![*pin],
                Trust::CaPem(_) => Vec::new(),
            };
            if pins.is_empty() {
                return Err(ConnectError::Config("no CA pin to trust".into()));
            }
            builder.dangerous().with_custom_certificate_verifier(Arc::new(PinVerifier { pins })).with_no_client_auth()
        }
        Trust::CaPem(pem) => {
            let mut roots = RootCertStore::empty();
            let ders = pem_ders(pem);
            if ders.is_empty() {
                return Err(ConnectError::Config("bad CA PEM".into()));
            }
            for der in ders {
                roots.add(CertificateDer::from(der)).map_err(|e| ConnectError::Config(e.to_string()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The DER of the first certificate in `pem`.
#[must_use]
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    pem_ders(pem).into_iter().next()
}

/// The DER of every certificate in `pem` (a bundle such as `ca.pem`); a
/// block that does not decode ends the list.
#[must_use]
pub fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut lines = pem.lines();
    while lines.by_ref().any(|l| l.starts_with("-----BEGIN CERTIFICATE")) {
        let body: String = lines.by_ref().take_while(|l| !l.starts_with("-----END")).collect();
        match base64::engine::general_purpose::STANDARD.decode(body) {
            Ok(der) if !der.is_empty() => out.push(der),
            _ => break,
        }
    }
    out
}

/// Dials TCP and runs the TLS handshake with our verifier.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(this.config).connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Opens a channel to control at `addr` (`host:port`), trusting `trust`.
pub async fn connect(addr: &str, trust: &Trust) -> Result<Channel, ConnectError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConnectError::Config(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT);
    let host = endpoint.uri().host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']').to_owned();
    let server_name = ServerName::try_from(host).map_err(|e| ConnectError::Config(e.to_string()))?;
    let connector = TlsConnector { config: Arc::new(client_config(trust)?), server_name };
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// Connects to the first of `addrs` (control replicas) that answers,
/// trying them in order from `start` (wrapping around); returns the
/// channel and the index of the address it reached.
pub async fn connect_any(addrs: &[String], start: usize, trust: &Trust) -> Result<(Channel, usize), ConnectError> {
    if addrs.is_empty() {
        return Err(ConnectError::Config("no control address".into()));
    }
    let mut failures = Vec::new();
    for i in (0..addrs.len()).map(|k| (start + k) % addrs.len()) {
        match connect(&addrs[i], trust).await {
            Ok(ch) => return Ok((ch, i)),
            Err(ConnectError::Config(e)) => return Err(ConnectError::Config(format!("{}: {e}", addrs[i]))),
            Err(e) => failures.push((addrs[i].clone(), error_chain(&e))),
        }
    }
    Err(ConnectError::AllFailed(failures))
}

/// An error with its sources ("connect: transport error: ...: invalid peer
/// certificate: UnknownIssuer"): transport errors hide the cause an
/// operator needs in their sources. A source whose text already ends the
/// message is not repeated.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Dials control's local admin Unix socket (for `Endpoint::connect_with_connector`).
#[derive(Clone, Debug)]
pub struct UnixConnector(pub std::path::PathBuf);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

/// Opens a channel over control's local admin socket.
pub async fn connect_unix(path: &std::path::Path) -> Result<Channel, ConnectError> {
    Ok(Endpoint::from_static("http://localhost").connect_with_connector(UnixConnector(path.to_owned())).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_bundles_split_into_every_certificate() {
        let one = "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n";
        let two = "-----BEGIN CERTIFICATE-----\nBAUG\nBw==\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_ders(&format!("{one}{two}")), [vec![1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(pem_der(&format!("junk\n{two}{one}")), Some(vec![4, 5, 6, 7]));
        assert!(pem_ders("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n").is_empty());
        assert!(client_config(&Trust::AnyPin(Vec::new())).is_err());
    }
}
