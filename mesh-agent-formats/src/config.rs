//! The agent's local configuration file (TOML).
//!
//! ```toml
//! interface = "wg0"
//! backend = "auto"
//! listen_port = 51820
//! state_dir = "/var/lib/mesh-agent"
//! ```
//! Every field has a default; see [`Config`] for each one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which WireGuard implementation the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// Kernel WireGuard when the kernel has it, else userspace.
    #[default]
    Auto,
    /// Kernel WireGuard or fail.
    Kernel,
    /// The in-process userspace engine, without probing.
    Userspace,
}

/// How the compiled policy is enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// The eBPF dataplane (TC ACL and MSS clamp on the overlay interface).
    #[default]
    Ebpf,
    /// Not enforced: the overlay passes everything its peers' allowed IPs
    /// admit. For labs and for bringing a node up before its dataplane;
    /// `status` and the log say so loudly.
    Off,
}

/// The agent's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of the WireGuard interface. With the userspace backend its UAPI
    /// socket is `/var/run/wireguard/<interface>.sock`, shared by every
    /// network namespace, so the name must be unique on the machine.
    pub interface: String,
    /// WireGuard backend: `auto` (kernel if the kernel has WireGuard, else
    /// the in-process userspace engine), `kernel` or `userspace`.
    pub backend: BackendMode,
    /// UDP port WireGuard listens on. 0 lets the engine pick one.
    pub listen_port: u16,
    /// fwmark set on the tunnel's own UDP packets (0: none), for policy
    /// routing that keeps them out of the tunnel: with a mark, a rule at
    /// `rule_priority` sends marked packets to the main table (the peers'
    /// endpoints have their own exception rules either way).
    pub fwmark: u32,
    /// Routing table of the mesh routes (default 109; 254, main, puts them
    /// into the main table with no rules, as before). See `rule_priority`.
    pub route_table: u32,
    /// Priority of the first of the agent's three policy-routing rules
    /// (default 5300, 5301, 5302; main's rule is 32766): fwmark -> main,
    /// `to <exception> lookup main` for control's address, the peers'
    /// endpoints and the host's connected networks, then `lookup
    /// <route_table>`. Mesh routes thus win over main's default route but
    /// never over the host's own underlay, control or endpoints.
    pub rule_priority: u32,
    /// The node's WireGuard private key. Generated here on first start
    /// (mode 0600); never logged, never sent anywhere. Default:
    /// `<state_dir>/private.key`.
    pub private_key_file: Option<PathBuf>,
    /// Directory of the agent's state: the last applied node view
    /// (`applied.json`), the admin socket (`agent.sock`). Created 0700.
    pub state_dir: PathBuf,
    /// Seconds between two reconcile runs (each repairs any drift, e.g. a
    /// route deleted by hand).
    pub reconcile_interval_secs: f64,
    /// Seconds before retrying after a failed reconcile run.
    pub retry_interval_secs: f64,
    /// Leave the data path (interface, addresses, routes, eBPF programs) in
    /// place when the agent stops on SIGTERM, so a restart does not cut
    /// traffic (and the policy stays enforced meanwhile).
    pub keep_dataplane_on_exit: bool,
    /// How the policy is enforced.
    pub enforcement: Enforcement,
    /// bpffs directory under which the dataplane pins its maps and links
    /// (in `<bpf_pin_dir>/<interface>`), so enforcement survives restarts.
    pub bpf_pin_dir: PathBuf,
    /// The public (underlay) interface: when set, the XDP guard is attached
    /// to it, checking WireGuard packets to `listen_port`.
    pub underlay_interface: Option<String>,
    /// Userspace engine: `SO_RCVBUF` of its UDP socket, in bytes (the
    /// receiving socket is what overflows under load).
    pub udp_recv_buffer: usize,
    /// Userspace engine: `SO_SNDBUF` of its UDP socket, in bytes.
    pub udp_send_buffer: usize,
    /// Userspace engine: worker threads.
    pub engine_threads: usize,
    /// Userspace engine: TUN offloads (`IFF_VNET_HDR`: TCP segmentation on
    /// read, GRO-like merging on write). Off only to measure without them;
    /// an old kernel that refuses them is detected and logged.
    pub tun_offload: bool,
    /// Userspace engine: UDP GSO (`UDP_SEGMENT`) on the underlay socket.
    pub udp_gso: bool,
    /// Log filter (`tracing` env-filter syntax); `RUST_LOG` overrides it.
    pub log: String,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`), e.g.
    /// `127.0.0.1:9300`; none by default.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// mesh-control: when set, `run` enrolls (first start), holds the Sync
    /// stream and applies what control sends. Without it the agent only
    /// takes views through `mesh-agent apply`.
    pub control: Option<ControlConfig>,
    /// Health probes between agents over the overlay, and local failover.
    pub probe: ProbeConfig,
}

/// Health probes and local failover (the `[probe]` table).
///
/// Every agent answers a small UDP echo on `port` of its overlay addresses
/// and probes its peers: gateways it routes a prefix through every
/// `gateway_interval_secs` (and the other gateways of its own sites just as
/// often), others every `peer_interval_secs`. A probe not answered within
/// `timeout_secs` is lost; `down_after` consecutive losses make a peer
/// down, and every prefix routed through it moves to the next gateway in
/// control's order at once. With the defaults a dead gateway is noticed
/// 0.4-0.5 s after it stops answering: early enough that the two-way cut a
/// TCP connection sees stays under a second (its retransmissions back off
/// 0.2, 0.6, 1.4 s after a loss). A gateway that was skipped is preferred
/// again only after `failback_hold_secs` of health, unless a gateway of the
/// site says it owns the site (see `probe::owner`).
///
/// ```toml
/// [probe]
/// port = 51900
/// gateway_interval_secs = 0.1
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// UDP port of the echo on the overlay (0 turns probing and local
    /// failover off). The agent opens it in the ACL between mesh nodes'
    /// overlay addresses.
    pub port: u16,
    /// Seconds between probes to a gateway this node routes through.
    pub gateway_interval_secs: f64,
    /// Seconds between probes to other peers.
    pub peer_interval_secs: f64,
    /// Seconds after which an unanswered probe counts as lost.
    pub timeout_secs: f64,
    /// Consecutive lost probes that make a peer down.
    pub down_after: u32,
    /// Probes over which loss and RTT percentiles are computed.
    pub window: usize,
    /// Seconds a skipped gateway must be healthy before it is preferred
    /// again (when no gateway of the site claims it; a claim wins).
    pub failback_hold_secs: f64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            port: 51900,
            gateway_interval_secs: 0.1,
            peer_interval_secs: 2.0,
            timeout_secs: 0.3,
            down_after: 2,
            window: 50,
            failback_hold_secs: 30.0,
        }
    }
}

/// How the agent reaches mesh-control (the `[control]` table).
///
/// ```toml
/// [control]
/// address = "192.0.2.100:7443"
/// enrollment_key_file = "/etc/mesh-agent/enroll.key"
/// advertise_routes = ["198.18.10.0/24"]
/// endpoints = ["192.0.2.1:51820"]
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Control's gRPC address, `host:port` (one replica, or a DNS name
    /// resolving to the replicas).
    pub address: String,
    /// More control replicas, `host:port` each: the agent connects to the
    /// first that answers (after `address`), and moves to the next one when
    /// its stream breaks, with backoff and jitter.
    pub addresses: Vec<String>,
    /// The enrollment key (`mek1.<id>.<secret>.<ca-pin>`), read on first
    /// start only: afterwards the credential in `<state_dir>/control.json`
    /// is used. Prefer `enrollment_key_file`.
    pub enrollment_key: Option<String>,
    /// File holding the enrollment key: mode 0600 (a file group or others
    /// can read is refused), removed once the agent has enrolled.
    pub enrollment_key_file: Option<PathBuf>,
    /// Host name registered at enrollment (default: the machine's).
    pub hostname: Option<String>,
    /// Site subnets this gateway advertises.
    pub advertise_routes: Vec<ipnet::IpNet>,
    /// Underlay endpoints peers reach this node at (`192.0.2.1:51820`).
    pub endpoints: Vec<String>,
    /// Persistent keepalive set on every peer, seconds (0: none).
    pub persistent_keepalive: u16,
    /// Seconds between two health reports on the stream.
    pub health_interval_secs: f64,
    /// Longest wait between two reconnection attempts, seconds.
    pub max_backoff_secs: f64,
    /// Per advertised route, targets inside the site that prove this
    /// gateway can reach it (`"tcp:198.18.10.20:5432"`, `"icmp:198.18.10.20"`):
    /// the route is healthy while any target answers. A route without
    /// targets is healthy while an up interface has an address inside it.
    pub reachability: std::collections::BTreeMap<ipnet::IpNet, Vec<crate::reach::Target>>,
    /// Seconds between two reachability checks (a link or address change
    /// runs them at once as well).
    pub reachability_interval_secs: f64,
    /// Seconds a reachability target has to answer.
    pub reachability_timeout_secs: f64,
    /// Per advertised route, how this gateway serves it: a virtual gateway
    /// address that the site's owning gateway holds on its LAN, or SNAT
    /// (`[control.route_options."198.18.10.0/24"]`). Every gateway of a
    /// site must be given the same options.
    pub route_options: std::collections::BTreeMap<ipnet::IpNet, RouteOptions>,
    /// Use control's relays (when it lists any): discover this node's
    /// public UDP mapping from their reflectors, check direct paths with
    /// disco pings from the WireGuard port, and relay a peer's packets when
    /// no direct path works. Needs a fixed `listen_port` and CAP_NET_RAW.
    pub relays: bool,
    /// The region of this node's home relay, the one its peers send through
    /// (default: the first relay control lists).
    pub relay_region: Option<String>,
}

impl ControlConfig {
    /// Every control address, `address` first, without repeats.
    #[must_use]
    pub fn addresses(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for a in std::iter::once(&self.address).chain(&self.addresses) {
            if !a.is_empty() && !all.contains(a) {
                all.push(a.clone());
            }
        }
        all
    }
}

/// How a gateway serves one advertised route (see the README, "Running a
/// gateway", for the trade-offs).
///
/// ```toml
/// [control.route_options."198.18.10.0/24"]
/// virtual_addresses = ["198.18.10.254"]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteOptions {
    /// Addresses inside the prefix (at most one IPv4 and one IPv6) that the
    /// gateway owning the site side of the prefix holds on its LAN interface
    /// and announces (gratuitous ARP, unsolicited neighbour advertisement);
    /// the site's hosts route the mesh through them. Needs the probes
    /// (`probe.port` not 0): the site's gateways decide the owner with them.
    pub virtual_addresses: Vec<std::net::IpAddr>,
    /// Masquerade traffic from the overlay into the prefix behind this
    /// gateway's own LAN address (the kernel's conntrack, through an
    /// nftables table the agent owns), so that replies come back to this
    /// gateway whatever the LAN's routes are. The destination no longer
    /// sees the real source, and connections do not survive a switch of
    /// gateway (their NAT state stays behind on the old one).
    pub snat: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            address: String::new(),
            addresses: Vec::new(),
            enrollment_key: None,
            enrollment_key_file: None,
            hostname: None,
            advertise_routes: Vec::new(),
            endpoints: Vec::new(),
            persistent_keepalive: 25,
            health_interval_secs: 5.0,
            max_backoff_secs: 5.0,
            reachability: std::collections::BTreeMap::new(),
            reachability_interval_secs: 0.2,
            reachability_timeout_secs: 0.5,
            route_options: std::collections::BTreeMap::new(),
            relays: true,
            relay_region: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interface: "wg0".into(),
            backend: BackendMode::Auto,
            listen_port: 51820,
            fwmark: 0,
            route_table: 109,
            rule_priority: 5300,
            private_key_file: None,
            state_dir: PathBuf::from("/var/lib/mesh-agent"),
            reconcile_interval_secs: 30.0,
            retry_interval_secs: 5.0,
            keep_dataplane_on_exit: true,
            enforcement: Enforcement::Ebpf,
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/mesh"),
            underlay_interface: None,
            udp_recv_buffer: 4 << 20,
            udp_send_buffer: 4 << 20,
            engine_threads: 2,
            tun_offload: true,
            udp_gso: true,
            log: "info".into(),
            metrics_listen: None,
            control: None,
            probe: ProbeConfig::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Bad TOML or unknown field.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The message.
        message: String,
    },
    /// A value out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let config = Self::parse_from(&text, &path.display().to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Parses a configuration's text (unchecked: see [`Config::check`]).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_from(text, "<text>")
    }

    fn parse_from(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })
    }

    /// Checks values.
    pub fn check(&self) -> Result<(), ConfigError> {
        let n = &self.interface;
        if n.is_empty() || n.len() > 15 || n.contains(['/', ' ', ':']) {
            return Err(ConfigError::Invalid(format!("interface name {n:?} is not a valid Linux interface name")));
        }
        // 0 is RT_TABLE_UNSPEC, 253 and 255 the kernel's default and local.
        if matches!(self.route_table, 0 | 253 | 255) {
            return Err(ConfigError::Invalid(format!("route_table = {} is a reserved table", self.route_table)));
        }
        if !(1..32_000).contains(&self.rule_priority) {
            return Err(ConfigError::Invalid(format!(
                "rule_priority = {} must be in 1..32000 (before the main table's rule)",
                self.rule_priority
            )));
        }
        for (name, v) in [
            ("reconcile_interval_secs", self.reconcile_interval_secs),
            ("retry_interval_secs", self.retry_interval_secs),
        ] {
            if !(0.05..=86_400.0).contains(&v) {
                return Err(ConfigError::Invalid(format!("{name} = {v} is outside 0.05..=86400")));
            }
        }
        let p = &self.probe;
        for (name, v) in [
            ("probe.gateway_interval_secs", p.gateway_interval_secs),
            ("probe.peer_interval_secs", p.peer_interval_secs),
            ("probe.timeout_secs", p.timeout_secs),
        ] {
            if !(0.01..=3600.0).contains(&v) {
                return Err(ConfigError::Invalid(format!("{name} = {v} is outside 0.01..=3600")));
            }
        }
        if !(0.0..=86_400.0).contains(&p.failback_hold_secs) {
            return Err(ConfigError::Invalid(format!(
                "probe.failback_hold_secs = {} is outside 0..=86400",
                p.failback_hold_secs
            )));
        }
        if p.down_after == 0 || p.window == 0 || p.window > 10_000 {
            return Err(ConfigError::Invalid("probe.down_after must be >= 1 and probe.window in 1..=10000".into()));
        }
        if let Some(c) = &self.control {
            if let Some(p) = c.reachability.keys().find(|p| !c.advertise_routes.contains(p)) {
                return Err(ConfigError::Invalid(format!(
                    "control.reachability names {p}, which is not in control.advertise_routes"
                )));
            }
            for (prefix, o) in &c.route_options {
                if !c.advertise_routes.contains(prefix) {
                    return Err(ConfigError::Invalid(format!(
                        "control.route_options names {prefix}, which is not in control.advertise_routes"
                    )));
                }
                let v4 = o.virtual_addresses.iter().filter(|a| a.is_ipv4()).count();
                if v4 > 1 || o.virtual_addresses.len() - v4 > 1 {
                    return Err(ConfigError::Invalid(format!(
                        "control.route_options.\"{prefix}\": at most one IPv4 and one IPv6 virtual address"
                    )));
                }
                if let Some(a) = o.virtual_addresses.iter().find(|a| !prefix.contains(*a)) {
                    return Err(ConfigError::Invalid(format!(
                        "control.route_options.\"{prefix}\": virtual address {a} is not inside the prefix"
                    )));
                }
                if !o.virtual_addresses.is_empty() && self.probe.port == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "control.route_options.\"{prefix}\": a virtual address needs the probes (probe.port = 0 turns them off)"
                    )));
                }
            }
            if c.addresses().is_empty() {
                return Err(ConfigError::Invalid("control.address (or control.addresses) is empty".into()));
            }
            if c.addresses.iter().any(String::is_empty) {
                return Err(ConfigError::Invalid("control.addresses has an empty entry".into()));
            }
            for (name, v) in [
                ("control.health_interval_secs", c.health_interval_secs),
                ("control.max_backoff_secs", c.max_backoff_secs),
                ("control.reachability_interval_secs", c.reachability_interval_secs),
                ("control.reachability_timeout_secs", c.reachability_timeout_secs),
            ] {
                if !(0.05..=3600.0).contains(&v) {
                    return Err(ConfigError::Invalid(format!("{name} = {v} is outside 0.05..=3600")));
                }
            }
        }
        Ok(())
    }

    /// Where the control credential is kept (mode 0600).
    #[must_use]
    pub fn control_credential_path(&self) -> PathBuf {
        self.state_dir.join("control.json")
    }

    /// The private key file.
    #[must_use]
    pub fn private_key_path(&self) -> PathBuf {
        self.private_key_file.clone().unwrap_or_else(|| self.state_dir.join("private.key"))
    }

    /// The admin socket (`mesh-agent apply` and `status` talk to the running agent through it).
    #[must_use]
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz seeds are real, valid configurations.
    #[test]
    fn fuzz_seeds_parse_and_check() {
        for text in [
            include_str!("../../fuzz/corpus/agent_config/gateway.toml"),
            include_str!("../../fuzz/corpus/agent_config/minimal.toml"),
        ] {
            Config::parse(text).unwrap().check().unwrap();
        }
    }

    /// The shipped default file (`deploy/config/agent.toml`, installed as
    /// /etc/mesh/agent.toml) loads with the real loader, and says what the
    /// built-in defaults are: it differs from them only where its comments
    /// say so (the metrics endpoint, the placeholder `[control]` table).
    #[test]
    fn shipped_default_file() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/agent.toml"));
        let shipped = Config::load(path).unwrap();
        assert_eq!(shipped.metrics_listen, Some("127.0.0.1:9300".parse().unwrap()));
        let control = shipped.control.clone().unwrap();
        assert_eq!(control.address, "control.example.net:7443", "a placeholder, documented as such");
        assert_eq!(
            control,
            ControlConfig {
                address: control.address.clone(),
                enrollment_key_file: Some("/etc/mesh/enroll.key".into()),
                ..ControlConfig::default()
            }
        );
        // The packaged layout (systemd unit, docs/packaging.md) relies on these.
        assert_eq!(shipped.state_dir, Path::new("/var/lib/mesh-agent"));
        assert_eq!(shipped.bpf_pin_dir, Path::new("/sys/fs/bpf/mesh"));
        assert_eq!(Config { metrics_listen: None, control: None, ..shipped }, Config::default());
    }

    #[test]
    fn control_replicas_in_order_without_repeats() {
        let c: Config =
            toml::from_str("[control]\naddress = \"a:7443\"\naddresses = [\"b:7443\", \"a:7443\", \"c:7443\"]\n")
                .unwrap();
        c.check().unwrap();
        assert_eq!(c.control.as_ref().unwrap().addresses(), ["a:7443", "b:7443", "c:7443"]);
        let only_list: Config = toml::from_str("[control]\naddresses = [\"b:7443\"]\n").unwrap();
        only_list.check().unwrap();
        assert_eq!(only_list.control.unwrap().addresses(), ["b:7443"]);
        let none: Config = toml::from_str("[control]\naddresses = []\n").unwrap();
        assert!(none.check().unwrap_err().to_string().contains("control.address (or control.addresses) is empty"));
        let blank: Config = toml::from_str("[control]\naddress = \"a:7443\"\naddresses = [\"\"]\n").unwrap();
        assert!(blank.check().unwrap_err().to_string().contains("empty entry"));
    }

    #[test]
    fn defaults_and_overrides() {
        let c: Config = toml::from_str("interface = \"wgx\"\nbackend = \"userspace\"\n").unwrap();
        assert_eq!(c.backend, BackendMode::Userspace);
        assert_eq!(c.listen_port, 51820);
        assert!(c.keep_dataplane_on_exit);
        assert_eq!(c.private_key_path(), PathBuf::from("/var/lib/mesh-agent/private.key"));
        c.check().unwrap();
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
        let bad = Config { interface: "a-very-long-interface".into(), ..Config::default() };
        assert!(bad.check().is_err());
    }

    #[test]
    fn probe_and_reachability_tables() {
        let text = "[control]\naddress = \"192.0.2.100:7443\"\nadvertise_routes = [\"198.18.20.0/24\"]\n\
                    [control.reachability]\n\"198.18.20.0/24\" = [\"tcp:198.18.20.20:5432\", \"icmp:198.18.20.20\"]\n\
                    [probe]\ngateway_interval_secs = 0.1\nfailback_hold_secs = 5\n";
        let c: Config = toml::from_str(text).unwrap();
        c.check().unwrap();
        assert_eq!(c.probe.gateway_interval_secs, 0.1);
        assert_eq!(c.probe.port, 51900, "defaults fill the rest");
        let r = &c.control.as_ref().unwrap().reachability;
        assert_eq!(r.values().next().unwrap().len(), 2);
        // A bad target names itself.
        let e = toml::from_str::<Config>(&text.replace("icmp:198.18.20.20", "ping:x")).unwrap_err();
        assert!(e.to_string().contains("ping:x"), "{e}");
        // Targets for a route that is not advertised are refused.
        let e = toml::from_str::<Config>(&text.replace("\"198.18.20.0/24\" = [", "\"198.18.30.0/24\" = ["))
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("198.18.30.0/24"), "{e}");
        let mut bad = c;
        bad.probe.down_after = 0;
        assert!(bad.check().is_err());
    }

    #[test]
    fn route_options() {
        let base = "[control]\naddress = \"192.0.2.100:7443\"\nadvertise_routes = [\"198.18.20.0/24\", \"2001:db8:20::/64\"]\n";
        let ok = format!(
            "{base}[control.route_options.\"198.18.20.0/24\"]\nvirtual_addresses = [\"198.18.20.254\"]\n\
             [control.route_options.\"2001:db8:20::/64\"]\nvirtual_addresses = [\"2001:db8:20::254\"]\nsnat = true\n"
        );
        let c: Config = toml::from_str(&ok).unwrap();
        c.check().unwrap();
        let o = &c.control.as_ref().unwrap().route_options;
        assert_eq!(o.len(), 2);
        assert!(o.values().any(|o| o.snat));
        let bad = |text: String, want: &str| {
            let e = toml::from_str::<Config>(&text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.check().map_err(|e| e.to_string()));
            let e = e.unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(ok.replace("198.18.20.254", "198.18.30.254"), "not inside the prefix");
        bad(ok.replace("[\"198.18.20.254\"]", "[\"198.18.20.254\", \"198.18.20.253\"]"), "at most one IPv4");
        bad(
            ok.replace("route_options.\"198.18.20.0/24\"", "route_options.\"198.18.40.0/24\"")
                .replace("198.18.20.254", "198.18.40.254"),
            "not in control.advertise_routes",
        );
        bad(format!("{ok}[probe]\nport = 0\n"), "needs the probes");
        bad(ok.replace("snat = true", "snot = true"), "snot");
    }
}
