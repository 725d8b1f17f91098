//! The mesh data path's eBPF programs. Each program lives in the module of
//! its concern; they share map types from `mesh-common`.
#![no_std]
#![no_main]

mod acl;
mod counter;
mod guard;
mod traffic;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any reachable panic path, so this is never run.
    loop {}
}

/// GPL-compatible licence: needed for the GPL-only helpers (`bpf_trace_printk`
/// behind aya-log, checksum helpers).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
