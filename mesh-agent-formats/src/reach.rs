//! A reachability target of an advertised route (`[control.reachability]`
//! in the config): how the gateway checks that it still reaches its LAN. The
//! checks themselves are mesh-agent's `reach` module.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// One reachability target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    /// A TCP connection to this address is accepted or refused (a refusal
    /// also proves the host answers).
    Tcp(SocketAddr),
    /// An ICMP (or ICMPv6) echo to this address is answered.
    Icmp(IpAddr),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(Self::Tcp).map_err(|_| format!("{s:?}: expected tcp:IP:PORT (tcp:[IPv6]:PORT)"));
        }
        if let Some(a) = s.strip_prefix("icmp:") {
            return a.parse().map(Self::Icmp).map_err(|_| format!("{s:?}: expected icmp:IP"));
        }
        Err(format!("{s:?}: a reachability target is tcp:IP:PORT or icmp:IP"))
    }
}

impl TryFrom<String> for Target {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Target> for String {
    fn from(t: Target) -> Self {
        t.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Icmp(a) => write!(f, "icmp:{a}"),
        }
    }
}
