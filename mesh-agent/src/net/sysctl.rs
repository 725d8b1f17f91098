//! Forwarding sysctls through /proc/sys. `net.*` entries belong to the
//! network namespace of the calling thread.

use super::{Forwarding, NetError};

const IPV4: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn read(key: &str) -> Result<bool, NetError> {
    match std::fs::read_to_string(key) {
        Ok(s) => Ok(s.trim() != "0"),
        // A kernel without IPv6 has no such entry: nothing is forwarded.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(NetError::Sysctl { key: key.to_owned(), source }),
    }
}

fn write_on(key: &str) -> Result<(), NetError> {
    std::fs::write(key, "1").map_err(|source| NetError::Sysctl { key: key.to_owned(), source })
}

/// Reads both switches.
pub fn forwarding() -> Result<Forwarding, NetError> {
    Ok(Forwarding { ipv4: read(IPV4)?, ipv6: read(IPV6)? })
}

/// Turns on the switches set in `on`.
pub fn enable(on: Forwarding) -> Result<(), NetError> {
    if on.ipv4 {
        write_on(IPV4)?;
    }
    if on.ipv6 {
        write_on(IPV6)?;
    }
    Ok(())
}
