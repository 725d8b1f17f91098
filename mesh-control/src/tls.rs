//! Control's own CA and server certificate (rcgen + rustls).
//!
//! The CA is created on first start and kept in the store's `meta` table, so
//! every replica sharing a database serves certificates from the same CA and
//! enrollment keys (which carry the CA's SHA-256 pin) work with any of them.
//! The server certificate is issued fresh at each start for the configured
//! names, and served together with the CA certificate so that a pinning
//! client finds the CA in the chain.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::store::{Store, StoreError};

/// A TLS setup failure.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored CA does not parse.
    #[error("stored CA: {0}")]
    Stored(String),
}

/// The CA and a server certificate issued by it.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// Server certificate then CA certificate, PEM.
    pub chain_pem: String,
    /// Server private key, PEM.
    pub key_pem: String,
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// SHA-256 of the CA certificate (DER): the pin in enrollment keys.
    pub ca_pin: [u8; 32],
}

/// The CA's parameters. Rebuilt identically each time: an [`Issuer`] needs
/// only its name, key usages and key-id method, plus the stored key.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, "mesh-control CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// Loads (or creates, once) the CA from `store` and issues a server
/// certificate for `names` (DNS names or IP addresses; `localhost`,
/// 127.0.0.1 and ::1 are always included).
pub async fn server_tls(store: &Store, names: &[String]) -> Result<ServerTls, TlsError> {
    let stored = store
        .meta_get_or_init("ca", || {
            // Generated inside the closure so only the winning replica's CA
            // is kept; errors here surface as a parse failure just below.
            let make = || -> Result<String, rcgen::Error> {
                let key = KeyPair::generate()?;
                let cert = ca_params()?.self_signed(&key)?;
                Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
            };
            make().unwrap_or_default()
        })
        .await?;
    let split = stored.find("-----BEGIN PRIVATE KEY-----").ok_or_else(|| TlsError::Stored("no CA key".into()))?;
    let (ca_pem, ca_key_pem) = stored.split_at(split);
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let ca_der = mesh_client::channel::pem_der(ca_pem).ok_or_else(|| TlsError::Stored("bad CA certificate".into()))?;
    let issuer = Issuer::new(ca_params()?, ca_key);

    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    all.extend(names.iter().filter(|n| !n.is_empty()).cloned());
    all.dedup();
    let mut params = CertificateParams::new(all)?;
    params.distinguished_name.push(DnType::CommonName, "mesh-control");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServerTls {
        chain_pem: format!("{}{}", cert.pem(), ca_pem),
        key_pem: key.serialize_pem(),
        ca_pem: ca_pem.to_owned(),
        ca_pin: mesh_client::channel::pin_of(&ca_der),
    })
}
