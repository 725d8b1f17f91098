//! Batch operations on BPF hash maps (`BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH`, Linux 5.6+), which aya 0.14 does not
//! wrap: a thin layer over the `bpf(2)` syscall so that installing a policy
//! of 10,000 rules is a handful of syscalls instead of one per entry.
//!
//! The kernel reads keys and values as packed arrays of the map's key and
//! value size, which is what a slice of `#[repr(C)]` [`aya::Pod`] types
//! without padding is.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Elements per lookup-and-delete call: large enough that a map of
/// thousands of entries empties in a few calls, small enough for a stack
/// of buffers nobody notices.
const DELETE_CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the
    // pointers in it point at live buffers of `count` elements.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<BatchAttr>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Inserts or replaces `keys[i]` -> `values[i * per_key .. (i + 1) *
/// per_key]` in the map `fd` (hash or array; `per_key` is the number of
/// possible CPUs for per-CPU maps, else 1), in as few syscalls as the
/// kernel allows. On an error some prefix of the keys may have been written.
pub(crate) fn update<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    per_key: usize,
) -> io::Result<()> {
    if values.len() != keys.len() * per_key {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut done = 0;
    // The kernel may stop early (it reports how far it got in `count`);
    // continue from there.
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done * per_key..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count == 0 {
            return Err(io::Error::other("BPF_MAP_UPDATE_BATCH made no progress"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

/// Deletes every entry of the hash map `fd`, a few thousand per syscall;
/// returns how many there were.
pub(crate) fn clear<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut keys: Vec<K> = Vec::with_capacity(DELETE_CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(DELETE_CHUNK);
    // The batch token is a bucket number for hash maps (u32); 8 bytes is
    // room enough.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    let mut deleted = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { std::ptr::from_mut(&mut token_in) as u64 },
            out_batch: std::ptr::from_mut(&mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: DELETE_CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_AND_DELETE_BATCH, &mut attr);
        // The buffers' contents are not read: only the count matters.
        deleted += attr.count as usize;
        match result {
            Ok(()) => {}
            // ENOENT: the walk reached the end (`count` still says how many
            // this last call deleted).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(deleted),
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}
