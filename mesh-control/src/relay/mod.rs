//! Relays (capability 7): the `[[relays]]` of control's configuration, the
//! relay tickets control signs for nodes ([`key`] holds the signing key),
//! and the audit of path changes that agents report ([`paths`]).
//!
//! Control does not talk to relays. It tells agents where they are (every
//! snapshot's `NodeView.relays`) and vouches for a node with a ticket
//! (mesh-relay's `ticket` format) that names the node's WireGuard key; each
//! relay trusts the ticket key's public half (`control_keys` in its file).

pub mod key;
pub mod paths;

use mesh_proto::v1 as pb;
use mesh_relay::ticket::{Ticket, TicketSigner};
use serde::Deserialize;

/// How long a ticket is valid at most (less when the node key expires
/// sooner). Agents ask for a new one before it expires.
pub const TICKET_LIFETIME_SECS: i64 = 12 * 3600;

/// The prefix of a node's home relay among its endpoints (`relay:fsn`).
pub const ENDPOINT_PREFIX: &str = "relay:";

/// One `[[relays]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RelayEntry {
    /// The region it serves (1-32 of `a-z`, `0-9`, `-`); nodes name their
    /// home relay by it (`relay:<region>` among their endpoints).
    pub region: String,
    /// The relay's TLS listener, `host:port` (an address, `[v6]:port`, or
    /// a DNS name).
    pub address: String,
    /// The TLS server name agents send; none: the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// SHA-256 of the relay's certificate (DER), 64 hex digits: agents
    /// trust exactly this certificate (`mesh-relay` prints it at start).
    pub cert_sha256: String,
    /// The relay's UDP reflector, `host:port`; none: it has none.
    #[serde(default)]
    pub reflector: Option<String>,
}

/// Whether `region` is a valid region name: 1-32 of `a-z`, `0-9`, `-`.
#[must_use]
pub fn valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a `host:port`: an IP address (IPv6 in brackets) or a DNS name,
/// and a port other than 0.
fn check_host_port(s: &str) -> Result<(), String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return if a.port() == 0 { Err(format!("{s:?} has port 0")) } else { Ok(()) };
    }
    let bad = || format!("{s:?} is not host:port (an IP address, [IPv6]:port, or a DNS name)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
        return Err(bad());
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(())
}

/// Checks one entry; the error says what is wrong with it.
fn check_entry(r: &RelayEntry) -> Result<(), String> {
    if !valid_region(&r.region) {
        return Err("region must be 1-32 characters of a-z, 0-9 and -".into());
    }
    check_host_port(&r.address).map_err(|e| format!("address {e}"))?;
    if let Some(name) = &r.server_name
        && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        return Err(format!("server_name {name:?} is not a DNS name or an IP address"));
    }
    if r.cert_sha256.len() != 64 || !r.cert_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("cert_sha256 {:?} is not 64 hex digits (SHA-256 of the certificate's DER)", r.cert_sha256));
    }
    if let Some(reflector) = &r.reflector {
        check_host_port(reflector).map_err(|e| format!("reflector {e}"))?;
    }
    Ok(())
}

/// Checks the `[[relays]]` entries: each one's fields, and that no region
/// appears twice (nodes name their home relay by region). The error names
/// the entry (`relays[1] (region "fsn")`).
pub fn check(relays: &[RelayEntry]) -> Result<(), String> {
    for (i, r) in relays.iter().enumerate() {
        let name = format!("relays[{i}] (region {:?})", r.region);
        check_entry(r).map_err(|e| format!("{name}: {e}"))?;
        if relays[..i].iter().any(|o| o.region == r.region) {
            return Err(format!("{name}: region {:?} is configured twice", r.region));
        }
    }
    Ok(())
}

/// The entries as agents get them, in the operator's order.
#[must_use]
pub fn to_proto(relays: &[RelayEntry]) -> Vec<pb::Relay> {
    relays
        .iter()
        .map(|r| pb::Relay {
            region: r.region.clone(),
            address: r.address.clone(),
            server_name: r.server_name.clone().unwrap_or_default(),
            cert_sha256: r.cert_sha256.to_ascii_lowercase(),
            reflector: r.reflector.clone().unwrap_or_default(),
        })
        .collect()
}

/// When a ticket issued `now` for a node whose key expires at `key_expiry`
/// expires: never after the key, whose expiry ends the node's authority.
#[must_use]
pub fn ticket_expiry(now: i64, key_expiry: i64) -> i64 {
    now.saturating_add(TICKET_LIFETIME_SECS).min(key_expiry)
}

/// Why no ticket was issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketRefusal {
    /// Control has no relays: a ticket would be of no use.
    #[error("no relays configured")]
    NoRelays,
    /// This replica has no signing key file (see [`key`]).
    #[error("this control replica has no relay ticket key (copy {} from another replica)", key::FILE)]
    NoKey,
}

/// The relays of a running control: what agents are told, and the ticket
/// signer.
#[derive(Debug, Default)]
pub struct Relays {
    list: Vec<pb::Relay>,
    signer: Option<TicketSigner>,
    public_key: Option<[u8; 32]>,
}

impl Relays {
    /// The configured `list`, signing with `signer` (whose public key is
    /// `public_key`; a replica without the key file knows only the public
    /// key, from the store).
    #[must_use]
    pub const fn new(list: Vec<pb::Relay>, signer: Option<TicketSigner>, public_key: Option<[u8; 32]>) -> Self {
        Self { list, signer, public_key }
    }

    /// The relays, in the operator's order.
    #[must_use]
    pub fn list(&self) -> &[pb::Relay] {
        &self.list
    }

    /// The ticket key's public half, base64 (empty: none yet).
    #[must_use]
    pub fn public_key_b64(&self) -> String {
        self.public_key.as_ref().map(mesh_relay::ticket::key_to_b64).unwrap_or_default()
    }

    /// A ticket for node `node_id` with WireGuard key `public_key` (which
    /// expires at `key_expiry`), issued `now`: its base64 text and expiry.
    pub fn ticket(
        &self,
        node_id: u64,
        public_key: [u8; 32],
        key_expiry: i64,
        now: i64,
    ) -> Result<(String, i64), TicketRefusal> {
        if self.list.is_empty() {
            return Err(TicketRefusal::NoRelays);
        }
        let signer = self.signer.as_ref().ok_or(TicketRefusal::NoKey)?;
        let expires_unix = ticket_expiry(now, key_expiry);
        Ok((signer.sign_b64(&Ticket { public_key, node_id, expires_unix }), expires_unix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(region: &str) -> RelayEntry {
        RelayEntry {
            region: region.into(),
            address: "relay-fsn.example.net:443".into(),
            server_name: None,
            cert_sha256: "ab".repeat(32),
            reflector: Some("192.0.2.50:3478".into()),
        }
    }

    #[test]
    fn good_entries_pass_and_convert() {
        let mut v6 = entry("nbg-1");
        v6.address = "[2001:db8::1]:443".into();
        v6.server_name = Some("relay.example.net".into());
        v6.cert_sha256 = "AB".repeat(32);
        v6.reflector = None;
        check(&[entry("fsn"), v6.clone()]).unwrap();
        let p = to_proto(&[v6]);
        assert_eq!(p[0].cert_sha256, "ab".repeat(32), "the pin is sent lowercase");
        assert_eq!((p[0].server_name.as_str(), p[0].reflector.as_str()), ("relay.example.net", ""));
    }

    #[test]
    fn bad_entries_are_named() {
        let cases: Vec<(RelayEntry, &str)> = vec![
            (entry("FSN"), "region must be"),
            (entry(&"a".repeat(33)), "region must be"),
            (RelayEntry { address: "relay.example.net".into(), ..entry("fsn") }, "address \"relay.example.net\""),
            (RelayEntry { address: "relay.example.net:0".into(), ..entry("fsn") }, "not host:port"),
            (RelayEntry { address: "192.0.2.1:0".into(), ..entry("fsn") }, "port 0"),
            (RelayEntry { address: "2001:db8::1:443".into(), ..entry("fsn") }, "not host:port"),
            (RelayEntry { address: "bad_host:443".into(), ..entry("fsn") }, "not host:port"),
            (RelayEntry { cert_sha256: "ab".repeat(31), ..entry("fsn") }, "cert_sha256"),
            (RelayEntry { cert_sha256: "zz".repeat(32), ..entry("fsn") }, "64 hex digits"),
            (RelayEntry { reflector: Some("x".into()), ..entry("fsn") }, "reflector \"x\""),
            (RelayEntry { server_name: Some("a b".into()), ..entry("fsn") }, "server_name"),
        ];
        for (e, want) in cases {
            let err = check(&[entry("ok"), e.clone()]).unwrap_err();
            assert!(err.starts_with(&format!("relays[1] (region {:?}): ", e.region)), "{err}");
            assert!(err.contains(want), "{err} should say {want}");
        }
        let err = check(&[entry("fsn"), entry("nbg"), entry("fsn")]).unwrap_err();
        assert_eq!(err, "relays[2] (region \"fsn\"): region \"fsn\" is configured twice");
    }

    #[test]
    fn regions() {
        for ok in ["fsn", "a", "eu-west-1", &"z".repeat(32)] {
            assert!(valid_region(ok), "{ok}");
        }
        for bad in ["", "Fsn", "fsn_1", "fsn.1", "ü", &"z".repeat(33)] {
            assert!(!valid_region(bad), "{bad}");
        }
    }

    #[test]
    fn tickets_end_with_the_node_key_at_the_latest() {
        assert_eq!(ticket_expiry(1_000, i64::MAX), 1_000 + TICKET_LIFETIME_SECS);
        assert_eq!(ticket_expiry(1_000, 5_000), 5_000);
        let der = TicketSigner::generate_pkcs8().unwrap();
        let signer = TicketSigner::from_pkcs8(&der).unwrap();
        let public = signer.public_key();
        let none = Relays::new(Vec::new(), Some(TicketSigner::from_pkcs8(&der).unwrap()), Some(public));
        assert_eq!(none.ticket(1, [7; 32], i64::MAX, 0), Err(TicketRefusal::NoRelays));
        let list = to_proto(&[entry("fsn")]);
        assert_eq!(Relays::new(list.clone(), None, Some(public)).ticket(1, [7; 32], 9, 0), Err(TicketRefusal::NoKey));
        let relays = Relays::new(list, Some(signer), Some(public));
        let (text, expires) = relays.ticket(3, [7; 32], 5_000, 1_000).unwrap();
        assert_eq!(expires, 5_000);
        let t = mesh_relay::ticket::verify_b64(&text, &[public], 4_999).unwrap();
        assert_eq!((t.public_key, t.node_id, t.expires_unix), ([7; 32], 3, 5_000));
        assert_eq!(relays.public_key_b64(), mesh_relay::ticket::key_to_b64(&public));
    }
}
