//! Between wireguard-control's types and ours, normalising what the kernel
//! and the userspace engines report differently:
//!
//! - "no handshake yet": the kernel reports the epoch, UAPI engines omit the
//!   field or send 0; both become `None`. A handshake time in the future
//!   (an engine computing it from a monotonic clock against a wall clock that
//!   stepped back) is clamped to now.
//! - keepalive off: the kernel reports `0`, UAPI engines omit it; both `None`.
//! - fwmark off: `0` or absent; both `None`.
//! - preshared key off: the all-zero key or absent; both `None`.
//! - endpoints: dual-stack userspace sockets report IPv4 peers as
//!   IPv4-mapped IPv6 (`[::ffff:192.0.2.1]:51820`); mapped back to IPv4.
//! - allowed IPs: host bits cleared, so `10.0.0.1/24` compares equal to the
//!   `10.0.0.0/24` the engine stores.

use std::{
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use ipnet::IpNet;
use wireguard_control::{AllowedIp, Device, DeviceUpdate, Key, PeerConfigBuilder, PeerInfo};

use super::{WgDevice, WgPeer, WgUpdate};
use crate::keys::{PublicKey, SecretKey};

/// Normalises a device read by wireguard-control (either backend). The
/// private key is dropped here: only its public key is kept.
#[must_use]
pub fn device_from_wgc(device: Device, now: SystemTime) -> WgDevice {
    let public_key = device
        .private_key
        .as_ref()
        .map(|k| SecretKey::from_bytes(k.0).public_key())
        .or_else(|| device.public_key.as_ref().map(|k| PublicKey(k.0)))
        .filter(|k| k.0 != [0; 32]);
    WgDevice {
        public_key,
        listen_port: device.listen_port.unwrap_or(0),
        fwmark: device.fwmark.filter(|&m| m != 0),
        peers: device.peers.into_iter().map(|p| (PublicKey(p.config.public_key.0), peer_from_wgc(p, now))).collect(),
    }
}

fn peer_from_wgc(p: PeerInfo, now: SystemTime) -> WgPeer {
    WgPeer {
        endpoint: p.config.endpoint.map(unmap_endpoint),
        allowed_ips: p.config.allowed_ips.iter().filter_map(allowed_to_net).collect(),
        persistent_keepalive: p.config.persistent_keepalive_interval.filter(|&k| k != 0),
        preshared_key: p.config.preshared_key.filter(|k| k.0 != [0; 32]).map(|k| SecretKey::from_bytes(k.0)),
        last_handshake: p.stats.last_handshake_time.filter(|t| *t > SystemTime::UNIX_EPOCH).map(|t| t.min(now)),
        rx_bytes: p.stats.rx_bytes,
        tx_bytes: p.stats.tx_bytes,
    }
}

/// `[::ffff:a.b.c.d]:p` becomes `a.b.c.d:p`.
#[must_use]
pub fn unmap_endpoint(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn allowed_to_net(a: &AllowedIp) -> Option<IpNet> {
    IpNet::new(a.address, a.cidr).ok().map(|n| n.trunc())
}

fn net_to_allowed(n: &IpNet) -> AllowedIp {
    AllowedIp { address: n.network(), cidr: n.prefix_len() }
}

/// Translates our update into wireguard-control's.
#[must_use]
pub fn update_to_wgc(update: &WgUpdate) -> DeviceUpdate {
    let mut out = DeviceUpdate::new();
    if let Some(k) = &update.private_key {
        out = out.set_private_key(Key(*k.as_bytes()));
    }
    if let Some(port) = update.listen_port {
        out = out.set_listen_port(port);
    }
    if let Some(mark) = update.fwmark {
        out = out.set_fwmark(mark);
    }
    for p in &update.peers {
        let mut b = PeerConfigBuilder::new(&Key(p.public_key.0));
        if p.remove {
            out = out.add_peer(b.remove());
            continue;
        }
        if let Some(ep) = p.endpoint {
            b = b.set_endpoint(ep);
        }
        if let Some(ka) = p.persistent_keepalive {
            b = b.set_persistent_keepalive_interval(ka);
        }
        match &p.preshared_key {
            Some(Some(k)) => b = b.set_preshared_key(Key(*k.as_bytes())),
            Some(None) => b = b.unset_preshared_key(),
            None => {}
        }
        if let Some(ips) = &p.allowed_ips {
            let ips: Vec<AllowedIp> = ips.iter().map(net_to_allowed).collect();
            b = b.replace_allowed_ips().add_allowed_ips(&ips);
        }
        out = out.add_peer(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_endpoints_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        assert_eq!(unmap_endpoint(mapped), "192.0.2.1:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(unmap_endpoint(v6), v6);
    }

    #[test]
    fn quirks_are_normalised() {
        let peer_key = SecretKey::generate().public_key();
        let mut info = PeerInfo::from_public_key(Key(peer_key.0));
        info.config.persistent_keepalive_interval = Some(0);
        info.config.preshared_key = Some(Key::zero());
        info.config.endpoint = Some("[::ffff:192.0.2.9]:1".parse().unwrap());
        info.config.allowed_ips = vec!["198.18.20.7/24".parse().unwrap()];
        info.stats.last_handshake_time = Some(SystemTime::UNIX_EPOCH);
        let now = SystemTime::now();
        let p = peer_from_wgc(info.clone(), now);
        assert_eq!(p.persistent_keepalive, None);
        assert_eq!(p.preshared_key, None);
        assert_eq!(p.last_handshake, None);
        assert_eq!(p.endpoint, Some("192.0.2.9:1".parse().unwrap()));
        assert!(p.allowed_ips.contains(&"198.18.20.0/24".parse().unwrap()));

        info.stats.last_handshake_time = Some(now + std::time::Duration::from_secs(5));
        assert_eq!(peer_from_wgc(info, now).last_handshake, Some(now));
    }
}
