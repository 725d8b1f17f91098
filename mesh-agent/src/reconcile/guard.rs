//! The underlay guard's known endpoints, derived from the desired and the
//! actual state (pure). The guard never rate-limits a known endpoint, so
//! this set must follow the peers: the endpoints control gave us and the
//! ones WireGuard uses now (a peer that roamed, or sits behind a NAT, talks
//! from an address the view does not name).

use std::{collections::BTreeSet, net::IpAddr};

use super::{Actual, Desired};

/// The underlay addresses the guard treats as known: every desired peer's
/// endpoint from the view, plus the endpoint WireGuard currently uses for
/// each desired peer. Peers that are no longer desired drop out, so a
/// removed node's address becomes unknown again.
#[must_use]
pub fn known_endpoints(desired: &Desired, actual: &Actual) -> BTreeSet<IpAddr> {
    let from_view = desired.peers.values().filter_map(|p| p.endpoint);
    let in_use =
        actual.wg.peers.iter().filter(|(key, _)| desired.peers.contains_key(key)).filter_map(|(_, p)| p.endpoint);
    // `to_canonical`: a dual-stack socket reports IPv4 peers as
    // `::ffff:a.b.c.d`; the guard keys IPv4 the same way either form.
    from_view.chain(in_use).map(|e| e.ip().to_canonical()).collect()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr};

    use super::*;
    use crate::{
        keys::SecretKey,
        reconcile::DesiredPeer,
        wg::{WgDevice, WgPeer},
    };

    fn desired(peers: &[(crate::keys::PublicKey, Option<&str>)]) -> Desired {
        let key = SecretKey::generate();
        Desired {
            public_key: key.public_key(),
            private_key: key,
            listen_port: None,
            fwmark: None,
            mtu: 1420,
            addresses: BTreeSet::new(),
            peers: peers
                .iter()
                .map(|(k, e)| {
                    let peer = DesiredPeer {
                        endpoint: e.map(|e| e.parse().unwrap()),
                        pin_endpoint: false,
                        allowed_ips: BTreeSet::new(),
                        persistent_keepalive: None,
                        preshared_key: None,
                    };
                    (*k, peer)
                })
                .collect(),
            routes: BTreeSet::new(),
            routing: crate::reconcile::Routing::default(),
            exceptions: BTreeSet::new(),
            forwarding: false,
            policy: None,
        }
    }

    fn actual(peers: &[(crate::keys::PublicKey, &str)]) -> Actual {
        let peers: BTreeMap<_, _> = peers
            .iter()
            .map(|(k, e)| (*k, WgPeer { endpoint: Some(e.parse::<SocketAddr>().unwrap()), ..WgPeer::default() }))
            .collect();
        Actual { wg: WgDevice { peers, ..WgDevice::default() }, ..Actual::default() }
    }

    fn ips(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn view_endpoints_and_roamed_endpoints_of_desired_peers() {
        let [a, b, c, gone] = [(); 4].map(|()| SecretKey::generate().public_key());
        let d = desired(&[(a, Some("192.0.2.1:51820")), (b, Some("[2001:db8::2]:51820")), (c, None)]);
        // a roamed behind a NAT, c (no endpoint in the view) dialled in, a
        // removed peer is still configured, b answers from a mapped address.
        let act = actual(&[
            (a, "198.51.100.7:40000"),
            (b, "[2001:db8::2]:51820"),
            (c, "[::ffff:203.0.113.9]:51820"),
            (gone, "192.0.2.99:51820"),
        ]);
        assert_eq!(
            known_endpoints(&d, &act),
            ips(&["192.0.2.1", "198.51.100.7", "2001:db8::2", "203.0.113.9"]),
            "the removed peer's address is not known"
        );
        assert_eq!(known_endpoints(&d, &Actual::default()), ips(&["192.0.2.1", "2001:db8::2"]));
    }
}
