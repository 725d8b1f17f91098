//! Empty on purpose: the programs are the `mesh-ebpf` binary (src/main.rs),
//! built for the BPF target by mesh-agent's build.rs. This library target
//! only lets mesh-agent declare a build-dependency, so that cargo rebuilds
//! the agent when the programs' crate changes.
#![no_std]
