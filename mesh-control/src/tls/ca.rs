//! Control's certificate authorities, without I/O: generating a CA, issuing
//! the server certificate, and the rotation state machine.
//!
//! A rotation goes through three phases, each one operator step:
//!
//! | phase        | signs the server certificate | trusted (pushed to agents, in `ca.pem`) |
//! |--------------|------------------------------|-----------------------------------------|
//! | `steady`     | current                      | current                                 |
//! | `introduced` | current                      | current, next                           |
//! | `switched`   | current (was next)           | current, previous                       |
//!
//! `begin` goes from steady to introduced, `switch` from introduced to
//! switched and `retire` back to steady. Agents learn the trusted set over
//! the Sync stream, so between `begin` and `switch` every connected agent
//! comes to trust the new CA before any server certificate is issued by it.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use sha2::{Digest as _, Sha256};

/// How long a new CA is valid: ten years. A rotation replaces it well
/// before (see README, "CA and secrets at rest").
pub const CA_VALIDITY_SECS: i64 = 10 * 365 * 86_400;

/// How long a server certificate is valid: one year. Control issues a new
/// one at every start and every CA switch, and again when half of this has
/// passed.
pub const SERVER_VALIDITY_SECS: i64 = 365 * 86_400;

/// Backdating of `not_before`, for peers whose clocks run a little behind.
const BACKDATE_SECS: i64 = 3600;

/// The common name of CAs made before rotation existed (valid 2024-2124).
/// Their issuer name is rebuilt from this, not from their key.
const LEGACY_NAME: &str = "mesh-control CA";

/// A CA or certificate problem.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Certificate generation or signing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Stored CA material that does not parse or does not fit together.
    #[error("{0}")]
    Bad(String),
    /// A rotation step that the current phase does not allow.
    #[error("{0}")]
    Phase(String),
}

/// One CA: its certificate and private key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Ca {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("pin", &hex::encode(pin_of_pem(&self.cert_pem).unwrap_or_default())).finish()
    }
}

/// The unique name of a CA with this key: two CAs trusted side by side
/// must not share a subject, or clients that pick an issuer by name (most
/// of them) may try the wrong one.
fn ca_name(key: &KeyPair) -> String {
    let id = Sha256::digest(key.public_key_raw());
    format!("mesh-control CA {}", hex::encode(&id[..6]))
}

/// Sets `p`'s validity to `[from, to]` (unix seconds).
fn set_validity(p: &mut CertificateParams, from: i64, to: i64) {
    let at = |unix: i64| {
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(u64::try_from(unix.max(0)).unwrap_or(0))
    };
    p.not_before = at(from);
    p.not_after = at(to);
}

fn ca_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

/// The DER of the first certificate in `pem`.
#[must_use]
pub fn der_of_pem(pem: &str) -> Option<Vec<u8>> {
    mesh_client::channel::pem_der(pem)
}

/// The SHA-256 pin of the first certificate in `pem`.
#[must_use]
pub fn pin_of_pem(pem: &str) -> Option<[u8; 32]> {
    der_of_pem(pem).map(|d| mesh_client::channel::pin_of(&d))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

impl Ca {
    /// A new CA valid from (about) `now_unix` for [`CA_VALIDITY_SECS`].
    pub fn generate(now_unix: i64) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut p = ca_params(&ca_name(&key))?;
        set_validity(&mut p, now_unix - BACKDATE_SECS, now_unix + CA_VALIDITY_SECS);
        let cert = p.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Parses the stored form: the certificate PEM followed by the key PEM.
    pub fn from_stored(text: &str) -> Result<Self, CaError> {
        let split = text.find("-----BEGIN PRIVATE KEY-----").ok_or_else(|| CaError::Bad("no CA private key".into()))?;
        let (cert, key) = text.split_at(split);
        let ca = Self { cert_pem: cert.trim_start().to_owned(), key_pem: key.to_owned() };
        ca.check()?;
        Ok(ca)
    }

    /// The stored form (see [`Ca::from_stored`]).
    #[must_use]
    pub fn to_stored(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }

    /// The SHA-256 pin of the certificate.
    pub fn pin(&self) -> Result<[u8; 32], CaError> {
        pin_of_pem(&self.cert_pem).ok_or_else(|| CaError::Bad("bad CA certificate".into()))
    }

    /// Checks that the certificate parses and holds this key's public key.
    fn check(&self) -> Result<(), CaError> {
        let der = der_of_pem(&self.cert_pem).ok_or_else(|| CaError::Bad("bad CA certificate".into()))?;
        let key = KeyPair::from_pem(&self.key_pem)?;
        if !contains(&der, key.public_key_raw()) {
            return Err(CaError::Bad("the CA private key does not belong to the CA certificate".into()));
        }
        Ok(())
    }

    /// An issuer signing in this CA's name. The name is rebuilt from the
    /// key (it is unique per CA), or is the legacy fixed name for CAs made
    /// before rotation existed.
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CaError> {
        self.check()?;
        let key = KeyPair::from_pem(&self.key_pem)?;
        let der = der_of_pem(&self.cert_pem).ok_or_else(|| CaError::Bad("bad CA certificate".into()))?;
        let name = ca_name(&key);
        let name = if contains(&der, name.as_bytes()) { name } else { LEGACY_NAME.to_owned() };
        Ok(Issuer::new(ca_params(&name)?, key))
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses;
    /// `localhost`, 127.0.0.1 and ::1 are always included), valid from
    /// about `now_unix` for [`SERVER_VALIDITY_SECS`].
    pub fn issue_server(&self, names: &[String], now_unix: i64) -> Result<ServerCert, CaError> {
        let issuer = self.issuer()?;
        let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for n in names.iter().filter(|n| !n.is_empty()) {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        let mut params = CertificateParams::new(all)?;
        params.distinguished_name.push(DnType::CommonName, "mesh-control");
        set_validity(&mut params, now_unix - BACKDATE_SECS, now_unix + SERVER_VALIDITY_SECS);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let ca_der = der_of_pem(&self.cert_pem).ok_or_else(|| CaError::Bad("bad CA certificate".into()))?;
        Ok(ServerCert {
            chain_der: vec![cert.der().to_vec(), ca_der],
            key_der: key.serialize_der(),
            issued_unix: now_unix,
        })
    }
}

/// A server certificate and its key.
#[derive(Clone)]
pub struct ServerCert {
    /// Server certificate, then the CA certificate that issued it (so that
    /// a pinning client finds the CA in the chain), DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// When it was issued (unix seconds).
    pub issued_unix: i64,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").field("issued_unix", &self.issued_unix).finish_non_exhaustive()
    }
}

/// Where a rotation stands (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One CA.
    Steady,
    /// A next CA is trusted; the current one still signs.
    Introduced,
    /// The former next CA signs; the previous one is still trusted.
    Switched,
}

impl Phase {
    /// The name used in the API, the audit log and meshctl.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Introduced => "introduced",
            Self::Switched => "switched",
        }
    }
}

/// Every CA control knows and the role of each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaSet {
    /// The CA that signs the server certificate.
    pub current: Ca,
    /// A CA trusted ahead of a switch (phase `introduced`).
    pub next: Option<Ca>,
    /// The former CA's certificate, trusted until retired (phase
    /// `switched`). Its key is gone: nothing is signed with it again.
    pub previous: Option<String>,
}

impl CaSet {
    /// A set of one CA.
    #[must_use]
    pub const fn new(current: Ca) -> Self {
        Self { current, next: None, previous: None }
    }

    /// The phase.
    #[must_use]
    pub const fn phase(&self) -> Phase {
        match (&self.next, &self.previous) {
            (Some(_), _) => Phase::Introduced,
            (None, Some(_)) => Phase::Switched,
            (None, None) => Phase::Steady,
        }
    }

    /// The certificates to trust (PEM): current, then next or previous.
    #[must_use]
    pub fn trusted(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("current", self.current.cert_pem.clone())];
        if let Some(n) = &self.next {
            out.push(("next", n.cert_pem.clone()));
        }
        if let Some(p) = &self.previous {
            out.push(("previous", p.clone()));
        }
        out
    }

    /// The trusted certificates as one PEM bundle (`ca.pem`).
    #[must_use]
    pub fn bundle(&self) -> String {
        self.trusted().into_iter().map(|(_, pem)| pem).collect()
    }

    /// Starts a rotation: `new` becomes trusted next to the current CA.
    pub fn begin(&self, new: Ca) -> Result<Self, CaError> {
        match self.phase() {
            Phase::Steady => Ok(Self { next: Some(new), ..self.clone() }),
            Phase::Introduced => Err(CaError::Phase("a rotation has already begun: switch next".into())),
            Phase::Switched => Err(CaError::Phase("the previous CA is still trusted: retire it first".into())),
        }
    }

    /// The next CA signs from now on; the current one stays trusted.
    pub fn switch(&self) -> Result<Self, CaError> {
        let next = self.next.clone().ok_or_else(|| CaError::Phase("no rotation has begun".into()))?;
        Ok(Self { current: next, next: None, previous: Some(self.current.cert_pem.clone()) })
    }

    /// Ends a rotation: the previous CA is no longer trusted.
    pub fn retire(&self) -> Result<Self, CaError> {
        match self.phase() {
            Phase::Switched => Ok(Self { previous: None, ..self.clone() }),
            Phase::Introduced => Err(CaError::Phase("switch to the next CA before retiring the current one".into())),
            Phase::Steady => Err(CaError::Phase("no rotation to finish".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    #[test]
    fn stored_form_round_trips_and_rejects_a_foreign_key() {
        let a = Ca::generate(NOW).unwrap();
        let b = Ca::generate(NOW).unwrap();
        assert_eq!(Ca::from_stored(&a.to_stored()).unwrap(), a);
        let mixed = format!("{}{}", a.cert_pem, b.key_pem);
        assert!(matches!(Ca::from_stored(&mixed), Err(CaError::Bad(_))));
        assert!(Ca::from_stored(&a.cert_pem).is_err());
        assert_ne!(a.pin().unwrap(), b.pin().unwrap());
    }

    #[test]
    fn rotation_walks_the_phases_in_order_only() {
        let (a, b) = (Ca::generate(NOW).unwrap(), Ca::generate(NOW).unwrap());
        let s = CaSet::new(a.clone());
        assert_eq!(s.phase(), Phase::Steady);
        assert!(s.switch().is_err());
        assert!(s.retire().is_err());
        let s = s.begin(b.clone()).unwrap();
        assert_eq!(s.phase(), Phase::Introduced);
        assert_eq!(s.trusted().iter().map(|t| t.0).collect::<Vec<_>>(), ["current", "next"]);
        assert!(s.begin(a.clone()).is_err());
        assert!(s.retire().is_err());
        let s = s.switch().unwrap();
        assert_eq!(s.phase(), Phase::Switched);
        assert_eq!(s.current, b);
        assert_eq!(s.bundle(), format!("{}{}", b.cert_pem, a.cert_pem));
        assert!(s.begin(a.clone()).is_err());
        let s = s.retire().unwrap();
        assert_eq!(s, CaSet::new(b));
    }

    /// The server certificate verifies under its CA, by name, with a
    /// standard verifier (the name is what clients build the chain by).
    fn verifies(ca: &Ca, cert: &ServerCert, now_unix: i64) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(der_of_pem(&ca.cert_pem).unwrap())).unwrap();
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(now_unix).unwrap()));
        let ee = CertificateDer::from(cert.chain_der[0].clone());
        v.verify_server_cert(&ee, &[], &ServerName::try_from("192.0.2.100").unwrap(), &[], now).map(|_| ())
    }

    #[test]
    fn server_certificate_verifies_under_its_ca_only_while_valid() {
        let (a, b) = (Ca::generate(NOW).unwrap(), Ca::generate(NOW).unwrap());
        let cert = a.issue_server(&["192.0.2.100".into()], NOW).unwrap();
        verifies(&a, &cert, NOW).unwrap();
        assert!(verifies(&b, &cert, NOW).is_err());
        assert!(verifies(&a, &cert, NOW + SERVER_VALIDITY_SECS + 1).is_err());
    }

    #[test]
    fn legacy_ca_still_issues_verifiable_certificates() {
        // A CA as control made it before rotation existed: fixed name and dates.
        let key = KeyPair::generate().unwrap();
        let mut p = ca_params(LEGACY_NAME).unwrap();
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let legacy = Ca { cert_pem: p.self_signed(&key).unwrap().pem(), key_pem: key.serialize_pem() };
        let cert = legacy.issue_server(&[], NOW).unwrap();
        let localhost = verifies(&legacy, &cert, NOW);
        // Issued for the loopback names only.
        assert!(localhost.is_err_and(|e| e.to_string().contains("not valid for name")));
        let cert = legacy.issue_server(&["192.0.2.100".into()], NOW).unwrap();
        verifies(&legacy, &cert, NOW).unwrap();
    }
}
