//! The packet counter: the first program, proving the build pipeline.

/// Per-CPU packet and byte totals kept by the counter programs.
///
/// Stored in a `PerCpuArray` with one slot per [`CounterSlot`]; userspace sums
/// the CPUs' values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCount {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, counted from the start of the frame the hook sees.
    pub bytes: u64,
}

impl PacketCount {
    /// Adds another CPU's (or another slot's) totals to this one.
    #[must_use]
    pub const fn saturating_add(self, other: Self) -> Self {
        Self { packets: self.packets.saturating_add(other.packets), bytes: self.bytes.saturating_add(other.bytes) }
    }
}

#[cfg(feature = "user")]
// SAFETY: `PacketCount` is `#[repr(C)]`, made of two `u64`s, has no padding
// and every bit pattern is a valid value.
unsafe impl aya::Pod for PacketCount {}

/// Slots of the counter map: what kind of packet was counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterSlot {
    /// Every packet the program saw.
    All = 0,
    /// IPv4 packets.
    Ipv4 = 1,
    /// IPv6 packets.
    Ipv6 = 2,
    /// Anything else (ARP, malformed, ...).
    Other = 3,
}

impl CounterSlot {
    /// Number of slots; the size of the counter map.
    pub const COUNT: u32 = 4;
    /// All slots, in map order.
    pub const ALL: [Self; 4] = [Self::All, Self::Ipv4, Self::Ipv6, Self::Other];
}

/// Name of the per-CPU array map that holds the counter programs' totals.
pub const COUNTER_MAP: &str = "PKT_COUNT";
