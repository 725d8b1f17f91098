//! The underlay guard's settings (`mesh_common::guard` has the rules) and
//! their map writes.

use std::{collections::HashSet, net::IpAddr};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;
use mesh_common::{
    counter::PacketCount,
    guard::{AllowKey, GuardAddr, GuardConfig, GuardVerdict, names},
};

use super::{
    DataplaneError,
    acl::{map, map_mut, sum},
};

/// One entry of the strict allow-list: traffic from `src` with protocol
/// `proto` to port `port` passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowRule {
    /// Source CIDR.
    pub src: IpNet,
    /// IP protocol (6 TCP, 17 UDP, ...); 0 for any protocol.
    pub proto: u8,
    /// Destination port; 0 for any port (and for protocols without ports).
    pub port: u16,
}

/// Operator settings of the underlay guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSettings {
    /// WireGuard messages per second one unknown source prefix may send.
    pub rate_pps: u32,
    /// Burst an unknown prefix may send at once.
    pub burst: u32,
    /// Prefix length that groups IPv4 sources into one bucket.
    pub v4_prefix: u8,
    /// Prefix length that groups IPv6 sources into one bucket.
    pub v6_prefix: u8,
    /// Drop non-WireGuard traffic unless it matches `allow` (see the module
    /// doc of `mesh_common::guard` for what always passes).
    pub strict: bool,
    /// The strict allow-list (e.g. TCP 22 from the admin CIDRs).
    pub allow: Vec<AllowRule>,
}

impl Default for GuardSettings {
    /// 20 handshakes per second and a burst of 40 per /24 or /64: far above
    /// what honest peers send (a handshake every two minutes), far below
    /// what a flood needs.
    fn default() -> Self {
        Self { rate_pps: 20, burst: 40, v4_prefix: 24, v6_prefix: 64, strict: false, allow: Vec::new() }
    }
}

fn map_err(what: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { what: what.into(), source }
}

/// IPv4 as IPv4-mapped IPv6, the guard's address form.
#[must_use]
pub(crate) fn guard_addr(ip: IpAddr) -> GuardAddr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    GuardAddr { addr: v6.octets() }
}

fn read_config(ebpf: &Ebpf) -> Result<GuardConfig, DataplaneError> {
    let config =
        Array::<_, GuardConfig>::try_from(map(ebpf, names::CONFIG)?).map_err(map_err("opening GUARD_CONFIG"))?;
    config.get(&0, 0).map_err(map_err("reading GUARD_CONFIG"))
}

fn write_config(ebpf: &mut Ebpf, value: GuardConfig) -> Result<(), DataplaneError> {
    let mut config =
        Array::<_, GuardConfig>::try_from(map_mut(ebpf, names::CONFIG)?).map_err(map_err("opening GUARD_CONFIG"))?;
    config.set(0, value, 0).map_err(map_err("writing GUARD_CONFIG"))
}

/// Sets the WireGuard port the guard checks (0: none).
pub(crate) fn set_port(ebpf: &mut Ebpf, wg_port: u16) -> Result<(), DataplaneError> {
    let mut config = read_config(ebpf)?;
    if config.rate_pps == 0 && config.burst == 0 {
        config = with_settings(config, &GuardSettings::default());
    }
    config.wg_port = wg_port;
    write_config(ebpf, config)
}

fn with_settings(mut config: GuardConfig, s: &GuardSettings) -> GuardConfig {
    config.rate_pps = s.rate_pps;
    config.burst = s.burst;
    config.v4_prefix = s.v4_prefix.min(32);
    config.v6_prefix = s.v6_prefix.min(128);
    config.strict = u8::from(s.strict);
    config
}

/// Applies `settings`. The allow-list is written before strict mode is
/// switched on and after it is switched off, so a change never drops what
/// both the old and new settings allow.
pub(crate) fn apply(ebpf: &mut Ebpf, settings: &GuardSettings) -> Result<(), DataplaneError> {
    let old = read_config(ebpf)?;
    let mut new = with_settings(old, settings);
    if old.strict == 1 && new.strict == 1 {
        // Add the new entries first, then remove the stale ones.
        write_allow(ebpf, &settings.allow)?;
    } else if new.strict == 1 {
        write_allow(ebpf, &settings.allow)?;
    } else {
        new.strict = 0;
    }
    write_config(ebpf, new)?;
    if new.strict == 0 {
        write_allow(ebpf, &settings.allow)?;
    }
    Ok(())
}

fn allow_key(rule: &AllowRule) -> Key<AllowKey> {
    let (addr, prefix) = match rule.src.trunc() {
        IpNet::V4(n) => (n.network().to_ipv6_mapped().octets(), 96 + u32::from(n.prefix_len())),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    };
    Key::new(32 + prefix, AllowKey { proto: rule.proto, pad: 0, port: rule.port.to_be_bytes(), addr })
}

/// Makes the allow-list exactly `rules`: adds first, then removes.
fn write_allow(ebpf: &mut Ebpf, rules: &[AllowRule]) -> Result<(), DataplaneError> {
    let mut trie =
        LpmTrie::<_, AllowKey, u8>::try_from(map_mut(ebpf, names::ALLOW)?).map_err(map_err("opening GUARD_ALLOW"))?;
    let wanted: Vec<Key<AllowKey>> = rules.iter().map(allow_key).collect();
    let ident = |k: &Key<AllowKey>| (k.prefix_len(), k.data());
    let wanted_ids: HashSet<_> = wanted
        .iter()
        .map(|k| {
            let (p, d) = ident(k);
            (p, d.proto, d.port, d.addr)
        })
        .collect();
    for key in &wanted {
        trie.insert(key, 1, 0).map_err(map_err("writing GUARD_ALLOW"))?;
    }
    let existing: Vec<Key<AllowKey>> = trie.keys().collect::<Result<_, _>>().map_err(map_err("listing GUARD_ALLOW"))?;
    for key in existing {
        let (p, d) = ident(&key);
        if !wanted_ids.contains(&(p, d.proto, d.port, d.addr)) {
            trie.remove(&key).map_err(map_err("pruning GUARD_ALLOW"))?;
        }
    }
    Ok(())
}

/// Makes the known-endpoint set exactly `endpoints`: adds first, then
/// removes, so a peer that stays known is never briefly unknown.
pub(crate) fn set_known(ebpf: &mut Ebpf, endpoints: &[IpAddr]) -> Result<(), DataplaneError> {
    let mut known =
        HashMap::<_, GuardAddr, u8>::try_from(map_mut(ebpf, names::KNOWN)?).map_err(map_err("opening GUARD_KNOWN"))?;
    let wanted: HashSet<[u8; 16]> = endpoints.iter().map(|ip| guard_addr(*ip).addr).collect();
    for addr in &wanted {
        known.insert(GuardAddr { addr: *addr }, 1, 0).map_err(map_err("writing GUARD_KNOWN"))?;
    }
    let existing: Vec<GuardAddr> = known.keys().collect::<Result<_, _>>().map_err(map_err("listing GUARD_KNOWN"))?;
    for key in existing {
        if !wanted.contains(&key.addr) {
            known.remove(&key).map_err(map_err("pruning GUARD_KNOWN"))?;
        }
    }
    Ok(())
}

/// Guard counters.
pub(crate) fn counters(ebpf: &Ebpf) -> Result<[PacketCount; GuardVerdict::COUNT as usize], DataplaneError> {
    let stats =
        PerCpuArray::<_, PacketCount>::try_from(map(ebpf, names::STATS)?).map_err(map_err("opening GUARD_STATS"))?;
    let mut out = [PacketCount::default(); GuardVerdict::COUNT as usize];
    for v in GuardVerdict::ALL {
        out[v as usize] = sum(&stats.get(&(v as u32), 0).map_err(map_err("reading GUARD_STATS"))?);
    }
    Ok(out)
}
