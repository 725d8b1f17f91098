//! Small kernel facts the loader needs: whether the kernel is recent enough,
//! whether a directory is on bpffs (mounting it if not), which network
//! namespace the calling thread is in, and whether an interface carries
//! Ethernet headers.

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::DataplaneError;

/// `statfs` magic of the BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// The oldest kernel the programs load on: the ACL's LPM probes run in
/// `bpf_loop` (Linux 5.17).
pub(crate) const MIN_KERNEL: (u32, u32) = (5, 17);

/// (major, minor) of a kernel release string (`6.1.0-28-cloud-amd64`).
pub(crate) fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses kernels older than [`MIN_KERNEL`] with an error that says so
/// (the verifier's own complaint, an unknown helper, does not).
pub(crate) fn check_kernel() -> Result<(), DataplaneError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|source| DataplaneError::Io { what: "reading the kernel release".into(), source })?;
    check_release(release.trim())
}

fn check_release(release: &str) -> Result<(), DataplaneError> {
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(DataplaneError::KernelTooOld { release: release.to_owned(), needed: MIN_KERNEL }),
    }
}

/// Makes sure `dir` exists on a bpffs: mounts bpffs on `/sys/fs/bpf` when
/// nothing is mounted there (a fresh host or container), then creates `dir`.
pub(crate) fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        mount_bpffs(root).map_err(|source| DataplaneError::Io {
            what: "mounting bpffs on /sys/fs/bpf (pinning needs it)".into(),
            source,
        })?;
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir.join("links"))
        .map_err(|source| DataplaneError::Io { what: format!("creating {}", dir.display()), source })?;
    if !is_bpffs(dir) {
        return Err(DataplaneError::Io {
            what: format!("{} is not on a BPF file system (mount -t bpf bpf DIR)", dir.display()),
            source: io::Error::from(io::ErrorKind::Unsupported),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: a zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: NUL-terminated strings, no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Identity of the calling thread's network namespace (its inode number), so
/// that pinned attachments of same-named interfaces in different namespaces
/// do not collide.
pub(crate) fn netns_id() -> Result<u64, DataplaneError> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|source| DataplaneError::Io { what: "reading this thread's network namespace".into(), source })
}

/// Where the pinned link of `hook` on `ifname` (in this thread's namespace)
/// lives.
pub(crate) fn link_pin_path(pin_dir: &Path, ifname: &str, hook: &str) -> Result<PathBuf, DataplaneError> {
    Ok(pin_dir.join("links").join(format!("{}-{ifname}-{hook}", netns_id()?)))
}

/// Whether frames on `ifname` start with an Ethernet header (veth, physical
/// NICs) rather than the IP header (WireGuard, TUN), looked up in the calling
/// thread's namespace.
pub(crate) fn has_ethernet_header(ifname: &str) -> Result<bool, DataplaneError> {
    let what = || format!("reading the link type of {ifname}");
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(DataplaneError::Io { what: what(), source: io::Error::from(io::ErrorKind::InvalidInput) });
    }
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(DataplaneError::Io { what: what(), source: io::Error::last_os_error() });
    }
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above) and
    // stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills `ifr_hwaddr` of the ifreq we own.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(DataplaneError::Io { what: what(), source: err });
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let family = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    Ok(matches!(family, ARPHRD_ETHER | ARPHRD_LOOPBACK))
}

/// Index of `ifname` in the calling thread's network namespace.
pub(crate) fn ifindex(ifname: &str) -> Result<u32, DataplaneError> {
    let what = || format!("looking up interface {ifname}");
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| DataplaneError::Io { what: what(), source: io::Error::from(io::ErrorKind::InvalidInput) })?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 { Err(DataplaneError::Io { what: what(), source: io::Error::last_os_error() }) } else { Ok(index) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_17_are_refused_with_the_reason() {
        assert_eq!(parse_release("6.1.0-28-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.17.0"), Some((5, 17)));
        assert_eq!(parse_release("6.18.2+deb13"), Some((6, 18)));
        for ok in ["5.17.0", "6.1.0-28-cloud-amd64", "6.18.2", "10.0"] {
            check_release(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for old in ["5.15.0-91-generic", "4.19.0-26-amd64", "garbage"] {
            let e = check_release(old).unwrap_err().to_string();
            assert!(e.contains(old) && e.contains("5.17") && e.contains("bpf_loop"), "{e}");
        }
    }
}
