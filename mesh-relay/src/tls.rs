//! The relay's certificate and both sides' rustls configurations.
//!
//! Nodes trust a relay by pin (SHA-256 of its leaf certificate, published
//! by control), not by a CA: relays are often reached by IP address and
//! have no public name. So the relay's certificate may be self-signed, and
//! one is generated on first start:
//!
//! | file     | mode | what                          |
//! |----------|------|-------------------------------|
//! | cert     | 0644 | the leaf certificate (PEM)    |
//! | key      | 0600 | its private key (PKCS#8 PEM)  |
//!
//! Both are written atomically. Exactly one of them present is an error
//! (never overwrite half of an operator's pair), and a key readable by
//! group or others is refused, never fixed.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use sha2::{Digest as _, Sha256};

/// A certificate problem (loading, generating or configuring).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file that cannot be used as it is.
    #[error("{path}: {why}")]
    Unusable {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The SHA-256 of a certificate's DER: what clients pin.
#[must_use]
pub fn pin_of(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key.
pub(crate) type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Loads the pair at `cert`/`key`, or, if neither exists, generates a
/// self-signed certificate for `names` and writes it there.
pub(crate) fn load_or_generate(cert: &Path, key: &Path, names: &[String]) -> Result<Identity, TlsError> {
    match (cert.try_exists(), key.try_exists()) {
        (Ok(false), Ok(false)) => generate(cert, key, names),
        (Ok(true), Ok(true)) => load(cert, key),
        (Ok(c), Ok(_)) => {
            let (have, missing) = if c { (cert, key) } else { (key, cert) };
            Err(unusable(missing, format!("missing while {} exists; provide both or neither", have.display())))
        }
        (Err(e), _) => Err(io(cert, e)),
        (_, Err(e)) => Err(io(key, e)),
    }
}

fn io(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io { path: path.display().to_string(), source }
}

fn unusable(path: &Path, why: impl Into<String>) -> TlsError {
    TlsError::Unusable { path: path.display().to_string(), why: why.into() }
}

fn generate(cert: &Path, key: &Path, names: &[String]) -> Result<Identity, TlsError> {
    let names = if names.is_empty() { vec!["mesh-relay".to_owned()] } else { names.to_vec() };
    let generated = rcgen::generate_simple_self_signed(names.clone())?;
    // The key first: a crash between the two leaves only the key, which the
    // next start reports instead of silently pairing a new cert with it.
    mesh_local::atomic::write(key, generated.signing_key.serialize_pem().as_bytes(), 0o600).map_err(|e| io(key, e))?;
    mesh_local::atomic::write(cert, generated.cert.pem().as_bytes(), 0o644).map_err(|e| io(cert, e))?;
    tracing::info!(cert = %cert.display(), key = %key.display(), ?names, "generated a self-signed relay certificate");
    let der = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).map_err(|e| unusable(key, e))?;
    Ok((vec![generated.cert.der().clone()], der))
}

fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let mode = fs::metadata(key).map_err(|e| io(key, e))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(unusable(
            key,
            format!("mode {mode:04o}: the private key must not be readable by group or others; replace it"),
        ));
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| unusable(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(unusable(cert, "no certificate in the file"));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| unusable(key, e.to_string()))?;
    Ok((chain, der))
}

/// The relay's TLS configuration: HTTP/1.1 only (the upgrade needs it).
pub(crate) fn server_config((chain, key): Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A client configuration accepting exactly the server whose leaf
/// certificate hashes to `pin`.
pub(crate) fn client_config(pin: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider: provider() }))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Trusts the leaf certificate by its hash: the name and validity period
/// are not checked (the pin is the identity, and a self-signed relay
/// certificate has no CA to expire or revoke it), but the handshake
/// signatures are, so only the holder of the pinned key gets through.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin is public (control publishes it): no constant-time compare.
        let got = pin_of(end_entity);
        if got != self.pin {
            return Err(rustls::Error::General(format!(
                "relay certificate pin mismatch: got {}, expected {}",
                hex::encode(got),
                hex::encode(self.pin)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
        let (chain, _) = load_or_generate(&cert, &key, &["relay.test".into()]).unwrap();
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&cert).unwrap().permissions().mode() & 0o777, 0o644);
        let (again, _) = load_or_generate(&cert, &key, &["other".into()]).unwrap();
        assert_eq!(pin_of(&chain[0]), pin_of(&again[0]), "the second start reuses the pair");
        server_config(load(&cert, &key).unwrap()).unwrap();
    }

    #[test]
    fn half_a_pair_or_an_exposed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
        load_or_generate(&cert, &key, &[]).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_generate(&cert, &key, &[]).unwrap_err().to_string();
        assert!(e.contains("readable by group or others"), "{e}");
        fs::remove_file(&key).unwrap();
        let e = load_or_generate(&cert, &key, &[]).unwrap_err().to_string();
        assert!(e.contains("provide both or neither"), "{e}");
    }
}
