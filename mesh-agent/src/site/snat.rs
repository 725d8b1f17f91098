//! SNAT per route: traffic from the overlay into a site prefix leaves the
//! gateway masqueraded behind its own LAN address, so replies return to the
//! same gateway whatever the LAN's routes are (Tailscale's default for
//! subnet routers). The kernel's conntrack does the work, through one
//! nftables table that the agent owns and replaces as a whole (`nft -f` runs
//! it as one transaction: never half a table), and deletes when it stops.

use std::{io::Write as _, process::Command};

use ipnet::IpNet;

/// Why the SNAT table could not be set.
#[derive(Debug, thiserror::Error)]
pub enum SnatError {
    /// `nft` is not installed.
    #[error("snat needs the nft command (Debian package nftables): {0}")]
    NoNft(std::io::Error),
    /// `nft` refused the table.
    #[error("nft refused the SNAT table {table}: {message}")]
    Refused {
        /// The table.
        table: String,
        /// What nft said.
        message: String,
    },
}

/// The table's name for the overlay interface `ifname`.
#[must_use]
pub fn table_name(ifname: &str) -> String {
    let clean: String = ifname.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("mesh_snat_{clean}")
}

/// The nft script that makes the table exactly this (replacing whatever
/// was there).
#[must_use]
pub fn script(ifname: &str, prefixes: &[IpNet]) -> String {
    let table = table_name(ifname);
    let mut s = format!("table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n");
    s.push_str("  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    for p in prefixes {
        let family = if p.addr().is_ipv4() { "ip" } else { "ip6" };
        s.push_str(&format!("    iifname \"{ifname}\" {family} daddr {p} masquerade\n"));
    }
    s.push_str("  }\n}\n");
    s
}

fn nft(input: &str, table: &str) -> Result<(), SnatError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(SnatError::NoNft)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(SnatError::NoNft)?;
    }
    let out = child.wait_with_output().map_err(SnatError::NoNft)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SnatError::Refused {
            table: table.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Sets the table to masquerade traffic from `ifname` into `prefixes`; with
/// no prefix, removes it.
pub fn apply(ifname: &str, prefixes: &[IpNet]) -> Result<(), SnatError> {
    let table = table_name(ifname);
    if prefixes.is_empty() {
        return remove(ifname);
    }
    nft(&script(ifname, prefixes), &table)
}

/// Removes the table (absent is fine).
pub fn remove(ifname: &str) -> Result<(), SnatError> {
    let table = table_name(ifname);
    // Declaring it first makes the delete succeed when it is absent.
    nft(&format!("table inet {table}\ndelete table inet {table}\n"), &table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_per_prefix_in_a_table_replaced_whole() {
        let s = script("wg-a.1", &["198.18.20.0/24".parse().unwrap(), "2001:db8:20::/64".parse().unwrap()]);
        assert!(s.starts_with("table inet mesh_snat_wg_a_1\ndelete table inet mesh_snat_wg_a_1\n"), "{s}");
        assert!(s.contains("iifname \"wg-a.1\" ip daddr 198.18.20.0/24 masquerade"), "{s}");
        assert!(s.contains("iifname \"wg-a.1\" ip6 daddr 2001:db8:20::/64 masquerade"), "{s}");
    }
}
