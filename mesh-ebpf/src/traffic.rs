//! The benchmarks' traffic generator: run through `BPF_PROG_TEST_RUN` in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18+) on a lab
//! interface, it sends every frame it is given out of that interface, at
//! rates a socket sender on this machine cannot reach (no socket, no
//! routing, no skb on the sending side).

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// Bytes of the frame the generator restores before each send: Ethernet,
/// IPv4 and UDP headers.
pub(crate) const TEMPLATE_LEN: usize = 42;

/// The headers to send (`[0]`), written by the agent before a run.
#[map(name = "GEN_TEMPLATE")]
static GEN_TEMPLATE: Array<[u8; TEMPLATE_LEN]> = Array::with_max_entries(1, 0);

/// Restores the frame's headers from `GEN_TEMPLATE` and transmits it
/// (`XDP_TX`: the test run turns it into a redirect out of the interface
/// named in the run's context). The restore is needed because live-frames
/// mode recycles pages without resetting their data: a frame the receiver
/// forwarded comes back with the next hop's MAC address and a lower TTL.
#[xdp]
pub(crate) fn tx_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TEMPLATE_LEN <= end
        && let Some(template) = GEN_TEMPLATE.get(0)
    {
        let frame = start as *mut u8;
        for (i, b) in template.iter().enumerate() {
            // SAFETY: `i < TEMPLATE_LEN` and the frame has that many bytes
            // (checked above).
            unsafe { *frame.add(i) = *b };
        }
    }
    xdp_action::XDP_TX
}
