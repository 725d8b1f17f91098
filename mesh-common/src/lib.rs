//! Types shared between the eBPF programs (`mesh-ebpf`, `no_std`, BPF target)
//! and the agent that loads them (`mesh-agent`, with the `user` feature).
//!
//! Every type here is `#[repr(C)]`, `Copy` and free of padding holes that the
//! verifier or the kernel could see uninitialised: the eBPF side and the
//! userspace side must agree byte for byte on map keys and values.
#![no_std]

pub mod acl;
pub mod counter;
pub mod guard;
