//! The lab: unique naming, links, switches and teardown.

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use crate::{Host, LabError, Result, cmd};

/// Prefix of every lab namespace: `ml-<pid>-<n>-<host>`. The pid lets
/// [`sweep_stale`] tell a dead test's leftovers from a live test's lab.
const NETNS_PREFIX: &str = "ml-";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A network-namespace lab. Cheap to clone; torn down when the last clone
/// and the last [`Host`] of it are dropped.
#[derive(Clone, Debug)]
pub struct Lab {
    pub(crate) inner: Arc<LabInner>,
}

#[derive(Debug)]
pub(crate) struct LabInner {
    /// `<pid>-<n>`, unique among live labs on this machine.
    id: String,
    /// Short form of `id` used in interface names (at most 15 bytes).
    short: String,
    next_if: AtomicU32,
    namespaces: Mutex<Vec<String>>,
}

impl Lab {
    /// Creates an empty lab. Also removes leftovers of labs whose process died
    /// without tearing them down (SIGKILL, a crashed test runner).
    pub fn new() -> Result<Self> {
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let inner = LabInner {
            id: format!("{pid}-{n}"),
            short: format!("{}{}", base36(pid), base36(n)),
            next_if: AtomicU32::new(0),
            namespaces: Mutex::new(Vec::new()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The lab's unique id (`<pid>-<n>`).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// A name for an interface that must be unique machine-wide, not just in
    /// its namespace (userspace WireGuard's UAPI sockets live in one shared
    /// directory). `base` is kept as a readable prefix, cut to fit 15 bytes.
    #[must_use]
    pub fn unique_ifname(&self, base: &str) -> String {
        let n = self.inner.next_if.fetch_add(1, Ordering::Relaxed);
        let suffix = format!("{}{}", self.inner.short, base36(n));
        let keep = 15usize.saturating_sub(suffix.len()).min(base.len());
        format!("{}{suffix}", &base[..keep])
    }

    /// Creates a host: a network namespace with loopback up.
    pub fn host(&self, name: &str) -> Result<Host> {
        check_name(name)?;
        let netns = format!("{NETNS_PREFIX}{}-{name}", self.inner.id);
        cmd::run(Command::new("ip").args(["netns", "add", &netns]))?;
        self.inner.namespaces.lock().unwrap().push(netns.clone());
        let host = Host::new(self.clone(), name.to_owned(), netns);
        host.ip(&["link", "set", "lo", "up"])?;
        // Lab addresses are assigned once and never conflict: skip DAD so IPv6
        // addresses work at once instead of after a second.
        host.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        host.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(host)
    }

    /// Joins `a` (as interface `a_if`) and `b` (as `b_if`) with a veth pair,
    /// both ends up.
    pub fn link(&self, a: &Host, a_if: &str, b: &Host, b_if: &str) -> Result<()> {
        check_ifname(a_if)?;
        check_ifname(b_if)?;
        // Created directly inside the namespaces, so no temporary name ever
        // appears in the root namespace.
        cmd::run(Command::new("ip").args([
            "link",
            "add",
            "name",
            a_if,
            "netns",
            a.netns(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.netns(),
        ]))?;
        a.up(a_if)?;
        b.up(b_if)?;
        Ok(())
    }

    /// Creates a switch: a namespace holding one bridge, the site LAN that
    /// hosts are [plugged](Switch::plug) into.
    pub fn switch(&self, name: &str) -> Result<Switch> {
        let host = self.host(name)?;
        // A dumb switch: with multicast snooping on, the bridge sends IGMP
        // reports of its own, stray packets that would spoil exact counts.
        host.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        host.up("br0")?;
        Ok(Switch { host, ports: AtomicU32::new(0) })
    }
}

impl Drop for LabInner {
    fn drop(&mut self) {
        let namespaces = std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        for netns in namespaces.iter().rev() {
            delete_netns(netns);
        }
    }
}

/// Kills every process in `netns`, then deletes it (which deletes its
/// interfaces and unmounts its bind mount).
fn delete_netns(netns: &str) {
    if let Ok(out) = cmd::run_unchecked(Command::new("ip").args(["netns", "pids", netns])) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    if let Err(e) = cmd::run(Command::new("ip").args(["netns", "del", netns])) {
        tracing::warn!(netns, error = %e, "lab: could not delete namespace");
    }
}

/// Deletes namespaces of labs whose process is gone. Safe to call while other
/// tests run: a live process's labs are never touched.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(netns = %name, "lab: removing a dead lab's namespace");
            delete_netns(&name);
        }
    }
}

/// A site LAN: a bridge in its own namespace.
#[derive(Debug)]
pub struct Switch {
    host: Host,
    ports: AtomicU32,
}

impl Switch {
    /// Plugs `host` into the LAN as interface `ifname`; returns the switch
    /// port's name (set it down to cut the host off the LAN).
    pub fn plug(&self, host: &Host, ifname: &str) -> Result<String> {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        self.host.lab().link(&self.host, &port, host, ifname)?;
        self.host.ip(&["link", "set", &port, "master", "br0"])?;
        Ok(port)
    }

    /// Sets a port up or down (a cable pulled or plugged back).
    pub fn set_port(&self, port: &str, up: bool) -> Result<()> {
        self.host.ip(&["link", "set", port, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// The namespace behind the switch.
    #[must_use]
    pub fn host(&self) -> &Host {
        &self.host
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(LabError::Name { name: name.to_owned(), why: "use ASCII letters, digits and '_'" });
    }
    Ok(())
}

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 {
        return Err(LabError::Name { name: name.to_owned(), why: "interface names are 1 to 15 bytes" });
    }
    if name.contains(['/', ' ', ':']) {
        return Err(LabError::Name { name: name.to_owned(), why: "no '/', ':' or spaces in interface names" });
    }
    Ok(())
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304), "2hwcg");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("gw_nyc1").is_ok());
        assert!(check_name("gw-nyc1").is_err());
        assert!(check_name("").is_err());
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a_very_long_ifname").is_err());
    }
}
