//! Writing compiled policies into the ACL's maps (double-buffered, see
//! `mesh_common::acl`) and reading the ACL's counters.

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, Map, MapError, PerCpuArray, PerCpuValues},
};
use mesh_common::{
    acl::{
        AclConfig, AclVerdict, DstKey4, DstKey6, MssEvent, PolicyKey, PolicyValue, SlotLens, SlotMeta, SrcKey4,
        SrcKey6, names,
    },
    counter::PacketCount,
};

use super::{DataplaneError, batch, compile::AclTables, counters::RuleCounter};

/// What an install did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// Policy generation now active.
    pub generation: u64,
    /// Slot it was written to (0 or 1).
    pub slot: u32,
    /// Rules.
    pub rules: usize,
    /// Decision entries written.
    pub entries: usize,
    /// Source CIDRs and (source class, destination CIDR) pairs written.
    pub cidrs: usize,
    /// Time from the first map write to the switch.
    pub elapsed: Duration,
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Map { what, source }
}

pub(crate) fn map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Map, DataplaneError> {
    ebpf.map(name).ok_or(DataplaneError::MissingMap(name))
}

pub(crate) fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, DataplaneError> {
    ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))
}

/// The slot packets read now.
pub(crate) fn active_slot(ebpf: &Ebpf) -> Result<u32, DataplaneError> {
    let active = Array::<_, u32>::try_from(map(ebpf, names::ACTIVE)?).map_err(map_err("opening ACL_ACTIVE"))?;
    Ok(active.get(&0, 0).map_err(map_err("reading ACL_ACTIVE"))? & 1)
}

fn slot_meta(ebpf: &Ebpf, slot: u32) -> Result<SlotMeta, DataplaneError> {
    let meta = Array::<_, SlotMeta>::try_from(map(ebpf, names::SLOT_META)?).map_err(map_err("opening SLOT_META"))?;
    meta.get(&slot, 0).map_err(map_err("reading SLOT_META"))
}

fn set_slot_meta(ebpf: &mut Ebpf, slot: u32, value: SlotMeta) -> Result<(), DataplaneError> {
    let mut meta =
        Array::<_, SlotMeta>::try_from(map_mut(ebpf, names::SLOT_META)?).map_err(map_err("opening SLOT_META"))?;
    meta.set(slot, value, 0).map_err(map_err("writing SLOT_META"))
}

/// The file descriptor of map `name`.
fn map_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, DataplaneError> {
    Ok(match map(ebpf, name)? {
        Map::HashMap(m) | Map::Array(m) | Map::PerCpuArray(m) => m.fd().as_fd(),
        _ => return Err(DataplaneError::Usage(format!("{name}: not a hash or array map"))),
    })
}

fn batch_err(what: String) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// Empties the hash map `name` (batch deletes).
fn clear_hash<K: aya::Pod, V: aya::Pod>(ebpf: &Ebpf, name: &'static str) -> Result<usize, DataplaneError> {
    batch::clear::<K, V>(map_fd(ebpf, name)?).map_err(batch_err(format!("clearing {name}")))
}

/// Writes `entries` into the hash map `name` (one batch update).
fn fill_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    entries: impl Iterator<Item = (K, V)>,
) -> Result<(), DataplaneError> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.unzip();
    batch::update(map_fd(ebpf, name)?, &keys, &values, 1).map_err(batch_err(format!("writing {name}")))
}

/// Writes `tables` into the inactive slot and switches to it. A packet reads
/// the active slot once, so it sees either the old or the new policy whole.
/// The slot being written was last active one install ago: packets still
/// inside it finished long before (a packet takes microseconds; an install
/// takes at least several syscalls).
pub(crate) fn install(ebpf: &mut Ebpf, tables: &AclTables) -> Result<InstallReport, DataplaneError> {
    let start = Instant::now();
    let slot = 1 - active_slot(ebpf)?;
    let s = slot as usize;
    set_slot_meta(ebpf, slot, SlotMeta::default())?;
    set_slot_lens(ebpf, slot, SlotLens::EMPTY)?;

    clear_hash::<SrcKey4, u32>(ebpf, names::SRC4[s])?;
    clear_hash::<DstKey4, u32>(ebpf, names::DST4[s])?;
    clear_hash::<SrcKey6, u32>(ebpf, names::SRC6[s])?;
    clear_hash::<DstKey6, u32>(ebpf, names::DST6[s])?;
    clear_hash::<PolicyKey, PolicyValue>(ebpf, names::POLICY[s])?;

    let src4 = tables
        .src4
        .iter()
        .map(|(n, c)| (SrcKey4 { prefix_len: u32::from(n.prefix_len()), addr: n.network().octets() }, *c));
    fill_hash(ebpf, names::SRC4[s], src4)?;
    let src6 = tables
        .src6
        .iter()
        .map(|(n, c)| (SrcKey6 { prefix_len: u32::from(n.prefix_len()), addr: n.network().octets() }, *c));
    fill_hash(ebpf, names::SRC6[s], src6)?;
    let dst4 = tables.dst4.iter().map(|(sc, n, dc)| {
        (DstKey4 { src_class: *sc, prefix_len: u32::from(n.prefix_len()), addr: n.network().octets() }, *dc)
    });
    fill_hash(ebpf, names::DST4[s], dst4)?;
    let dst6 = tables.dst6.iter().map(|(sc, n, dc)| {
        (DstKey6 { src_class: *sc, prefix_len: u32::from(n.prefix_len()), addr: n.network().octets() }, *dc)
    });
    fill_hash(ebpf, names::DST6[s], dst6)?;
    fill_hash(ebpf, names::POLICY[s], tables.policy.iter().copied())?;

    let indexes: Vec<u32> = (0..tables.rule_ids.len() as u32).collect();
    batch::update(map_fd(ebpf, names::RULE_IDS[s])?, &indexes, &tables.rule_ids, 1)
        .map_err(batch_err(format!("writing {}", names::RULE_IDS[s])))?;
    let cpus = aya::util::nr_cpus().map_err(|(what, source)| DataplaneError::Io { what: what.into(), source })?;
    let zeros = vec![PacketCount::default(); indexes.len() * cpus];
    batch::update(map_fd(ebpf, names::RULE_STATS[s])?, &indexes, &zeros, cpus)
        .map_err(batch_err(format!("resetting {}", names::RULE_STATS[s])))?;

    set_slot_lens(ebpf, slot, tables.lens)?;
    let meta = SlotMeta { generation: tables.generation, rule_count: tables.rule_ids.len() as u32, valid: 1 };
    set_slot_meta(ebpf, slot, meta)?;

    let mut active = Array::<_, u32>::try_from(map_mut(ebpf, names::ACTIVE)?).map_err(map_err("opening ACL_ACTIVE"))?;
    // Bit 0 is the slot; the bits above count installs, so that the word
    // changes with every install and flows remembered under the previous
    // policy stop answering for it (see `mesh_common::acl`).
    let epoch = (active.get(&0, 0).map_err(map_err("reading ACL_ACTIVE"))? >> 1).wrapping_add(1);
    active.set(0, (epoch << 1) | slot, 0).map_err(map_err("switching ACL_ACTIVE"))?;

    Ok(InstallReport {
        generation: tables.generation,
        slot,
        rules: tables.rule_ids.len(),
        entries: tables.policy.len(),
        cidrs: tables.src4.len() + tables.src6.len() + tables.dst4.len() + tables.dst6.len(),
        elapsed: start.elapsed(),
    })
}

fn set_slot_lens(ebpf: &mut Ebpf, slot: u32, value: SlotLens) -> Result<(), DataplaneError> {
    let mut lens = Array::<_, SlotLens>::try_from(map_mut(ebpf, names::LENS)?).map_err(map_err("opening ACL_LENS"))?;
    lens.set(slot, value, 0).map_err(map_err("writing ACL_LENS"))
}

/// Generation of the active policy, `None` if none was installed.
pub(crate) fn active_generation(ebpf: &Ebpf) -> Result<Option<u64>, DataplaneError> {
    let meta = slot_meta(ebpf, active_slot(ebpf)?)?;
    Ok((meta.valid == 1).then_some(meta.generation))
}

/// Per-rule counters of the active slot.
pub(crate) fn rule_counters(ebpf: &Ebpf) -> Result<Vec<RuleCounter>, DataplaneError> {
    let slot = active_slot(ebpf)?;
    let meta = slot_meta(ebpf, slot)?;
    if meta.valid != 1 {
        return Ok(Vec::new());
    }
    let s = slot as usize;
    let ids = Array::<_, u32>::try_from(map(ebpf, names::RULE_IDS[s])?).map_err(map_err("opening RULE_IDS"))?;
    let stats = PerCpuArray::<_, PacketCount>::try_from(map(ebpf, names::RULE_STATS[s])?)
        .map_err(map_err("opening RULE_STATS"))?;
    (0..meta.rule_count)
        .map(|i| {
            let rule_id = ids.get(&i, 0).map_err(map_err("reading RULE_IDS"))?;
            let count = sum(&stats.get(&i, 0).map_err(map_err("reading RULE_STATS"))?);
            Ok(RuleCounter { rule_id, count })
        })
        .collect()
}

pub(crate) fn sum(values: &PerCpuValues<PacketCount>) -> PacketCount {
    values.iter().fold(PacketCount::default(), |acc, c| acc.saturating_add(*c))
}

/// Per-verdict counters.
pub(crate) fn verdict_counters(ebpf: &Ebpf) -> Result<[PacketCount; AclVerdict::COUNT as usize], DataplaneError> {
    let stats = PerCpuArray::<_, PacketCount>::try_from(map(ebpf, names::VERDICTS)?)
        .map_err(map_err("opening ACL_VERDICTS"))?;
    let mut out = [PacketCount::default(); AclVerdict::COUNT as usize];
    for v in AclVerdict::ALL {
        out[v as usize] = sum(&stats.get(&(v as u32), 0).map_err(map_err("reading ACL_VERDICTS"))?);
    }
    Ok(out)
}

/// MSS clamp counters.
pub(crate) fn mss_counters(ebpf: &Ebpf) -> Result<[u64; MssEvent::COUNT as usize], DataplaneError> {
    let stats = PerCpuArray::<_, u64>::try_from(map(ebpf, names::MSS_STATS)?).map_err(map_err("opening MSS_STATS"))?;
    let mut out = [0; MssEvent::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = stats.get(&(i as u32), 0).map_err(map_err("reading MSS_STATS"))?.iter().sum();
    }
    Ok(out)
}

/// Reads, changes and writes `ACL_CONFIG`.
pub(crate) fn update_config(ebpf: &mut Ebpf, change: impl FnOnce(&mut AclConfig)) -> Result<(), DataplaneError> {
    let mut config =
        Array::<_, AclConfig>::try_from(map_mut(ebpf, names::CONFIG)?).map_err(map_err("opening ACL_CONFIG"))?;
    let mut value = config.get(&0, 0).map_err(map_err("reading ACL_CONFIG"))?;
    if value == AclConfig::default() {
        value = AclConfig::DEFAULT;
    }
    change(&mut value);
    config.set(0, value, 0).map_err(map_err("writing ACL_CONFIG"))
}

/// Makes sure a freshly created `ACL_CONFIG` holds the defaults (an adopted
/// one keeps what the previous agent set).
pub(crate) fn init_config(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    update_config(ebpf, |_| {})
}
