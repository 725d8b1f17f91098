//! `meshctl`: the operator CLI over the AdminService. Tables by default,
//! `--json` for scripts.
//!
//! Connection: `--socket PATH` (control's local admin socket, root only, no
//! token) or `--server HOST:PORT` with `--token-file PATH` (0600) or
//! `MESHCTL_TOKEN`, and `--ca-pin HEX` (or `--ca-file PEM`) to trust
//! control's CA. `--token` on the command line still works but warns: every
//! local user can read it in `/proc/<pid>/cmdline`.

mod ca;
mod policy;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mesh_client::bearer::{Authed, Bearer};
use mesh_client::channel::{self, Trust};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use serde_json::json;

pub(crate) type Admin = AdminServiceClient<Authed>;

#[derive(Parser, Debug)]
#[command(version, about = "Operate the mesh")]
struct Cli {
    /// Control's gRPC address; several replicas as a comma-separated list
    /// (`a:7443,b:7443`), tried in order until one answers.
    #[arg(long, env = "MESHCTL_SERVER", default_value = "127.0.0.1:7443", value_delimiter = ',')]
    server: Vec<String>,
    /// Local admin socket (overrides --server; no token needed).
    #[arg(long, env = "MESHCTL_SOCKET")]
    socket: Option<PathBuf>,
    /// Admin API token. Prefer `--token-file` or `MESHCTL_TOKEN`: on the
    /// command line it is visible to every local user.
    #[arg(long, env = "MESHCTL_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the admin API token (mode 0600; one that group or
    /// others can read is refused).
    #[arg(long, env = "MESHCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// SHA-256 pin of control's CA (hex, see `status`).
    #[arg(long, env = "MESHCTL_CA_PIN")]
    ca_pin: Option<String>,
    /// Control's CA certificate (PEM file).
    #[arg(long, env = "MESHCTL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Control's status.
    Status,
    /// Nodes.
    Nodes {
        #[command(subcommand)]
        cmd: Option<NodeCmd>,
    },
    /// Enrollment keys.
    Keys {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Admin API tokens.
    Tokens {
        #[command(subcommand)]
        cmd: Option<TokenCmd>,
    },
    /// Site routes.
    Routes {
        #[command(subcommand)]
        cmd: Option<RouteCmd>,
    },
    /// The ACL policy.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// The audit log.
    Audit {
        /// Only actions starting with this.
        #[arg(long, default_value = "")]
        action: String,
        /// Only this actor.
        #[arg(long, default_value = "")]
        actor: String,
        /// Only this subject (`node/3`).
        #[arg(long, default_value = "")]
        subject: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep printing new entries.
        #[arg(long, short)]
        follow: bool,
    },
    /// Control's CA: print its certificates (PEM), its status, rotate it.
    Ca {
        #[command(subcommand)]
        cmd: Option<ca::CaCmd>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes (the default).
    List,
    /// Approve a pending node.
    Approve { node: String },
    /// Replace a node's tags.
    Tag { node: String, tags: Vec<String> },
    /// Expire a node's key now.
    Expire { node: String },
    /// Ask the node to rotate its key.
    Rotate { node: String },
    /// Extend a node's key: it expires this many days from now.
    Extend {
        node: String,
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// Remove a node.
    Remove { node: String },
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Create an enrollment key (its secret is printed once).
    Create {
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        #[arg(long)]
        preapproved: bool,
        /// Lifetime, e.g. 3600s, 24h, 7d.
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Tags (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Owner of the nodes it enrolls.
        #[arg(long, default_value = "")]
        user: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List keys.
    List,
    /// Revoke a key.
    Revoke {
        /// The key's id (ids are base64url and may start with `-`).
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// List admin tokens (the default; never their secrets).
    List,
    /// Create an admin token (printed once).
    Create {
        /// Lifetime, e.g. 12h, 30d (at most 730d).
        #[arg(long, default_value = "90d")]
        expires: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Revoke an admin token.
    Revoke {
        /// The token's id (ids are base64url and may start with `-`).
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RouteCmd {
    /// List routes (the default).
    List,
    /// Approve a gateway's route.
    Approve { node: u64, prefix: String },
    /// Set a route's priority (lower is preferred).
    Priority { node: u64, prefix: String, priority: i32 },
}

fn node_ref(s: &str) -> pb::NodeRef {
    match s.parse() {
        Ok(id) => pb::NodeRef { id, name: String::new() },
        Err(_) => pb::NodeRef { id: 0, name: s.to_owned() },
    }
}

fn duration_secs(s: &str) -> anyhow::Result<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().with_context(|| format!("bad duration {s:?}"))?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad duration unit in {s:?} (s, m, h, d)"),
    };
    n.checked_mul(unit).with_context(|| format!("duration {s:?} is too long"))
}

fn time(t: i64) -> String {
    if t == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp(t, 0).map_or_else(|| t.to_string(), |d| d.format("%Y-%m-%d %H:%M").to_string())
}

/// Prints rows as an aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}

fn state(n: &pb::Node) -> String {
    let s = match n.state() {
        pb::NodeState::Approved => "approved",
        pb::NodeState::Pending => "pending",
        pb::NodeState::Expired => "expired",
        pb::NodeState::Unspecified => "?",
    };
    if n.key_expiring_soon { format!("{s} (key expiring soon)") } else { s.to_owned() }
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    json!({"id": n.id, "name": n.name, "hostname": n.hostname, "ipv4": n.ipv4, "ipv6": n.ipv6, "tags": n.tags,
        "state": state(n), "online": n.online, "ephemeral": n.ephemeral, "key_expiry_unix": n.key_expiry_unix,
        "key_expiring_soon": n.key_expiring_soon, "last_seen_unix": n.last_seen_unix, "endpoints": n.endpoints,
        "advertised_routes": n.advertised_routes, "user": n.user, "acked_generation": n.acked_generation,
        "view_error": n.view_error, "view_error_generation": n.view_error_generation,
        "key_created_unix": n.key_created_unix, "key_rotation_requested": n.key_rotation_requested,
        "replica": n.replica})
}

fn print_nodes(nodes: &[pb::Node], json_out: bool) {
    if json_out {
        println!("{}", serde_json::Value::Array(nodes.iter().map(node_json).collect()));
        return;
    }
    table(
        &["ID", "NAME", "IPV4", "IPV6", "TAGS", "STATE", "ONLINE", "KEY AGE", "KEY EXPIRY", "ROUTES"],
        nodes
            .iter()
            .map(|n| {
                vec![
                    n.id.to_string(),
                    n.name.clone(),
                    n.ipv4.clone(),
                    n.ipv6.clone(),
                    n.tags.join(","),
                    state(n),
                    if n.online { "yes" } else { "no" }.into(),
                    key_age(n),
                    time(n.key_expiry_unix),
                    n.advertised_routes.join(","),
                ]
            })
            .collect(),
    );
}

/// How old the node's WireGuard key is ("12d", "5h", "3m"), and whether a
/// rotation is pending.
fn key_age(n: &pb::Node) -> String {
    let age = if n.key_created_unix > 0 {
        let secs = (chrono::Utc::now().timestamp() - n.key_created_unix).max(0);
        match secs {
            s if s >= 86_400 => format!("{}d", s / 86_400),
            s if s >= 3600 => format!("{}h", s / 3600),
            s => format!("{}m", s / 60),
        }
    } else {
        "-".into()
    };
    if n.key_rotation_requested { format!("{age} (rotating)") } else { age }
}

fn route_json(r: &pb::Route) -> serde_json::Value {
    json!({"prefix": r.prefix, "node_id": r.node_id, "node": r.node_name, "approved": r.approved,
        "auto_approved": r.auto_approved, "priority": r.priority, "healthy": r.healthy, "primary": r.primary,
        "rank": r.rank, "virtual_addresses": r.virtual_addresses, "snat": r.snat, "owner": r.owner,
        "owner_since_unix": r.owner_since_unix, "lan_addresses": r.lan_addresses, "refusal": r.refusal})
}

/// "owner since <time>" for the gateway holding the site side, else "-".
fn site_side(r: &pb::Route) -> String {
    let how = match (r.virtual_addresses.is_empty(), r.snat) {
        (false, _) => r.virtual_addresses.join(","),
        (true, true) => "snat".into(),
        (true, false) => "-".into(),
    };
    if !r.owner {
        return how;
    }
    let since = chrono::DateTime::from_timestamp(r.owner_since_unix, 0)
        .map_or_else(|| r.owner_since_unix.to_string(), |d| d.format("%Y-%m-%d %H:%M:%S").to_string());
    format!("{how} (owner since {since})")
}

/// "primary", "backup 1", ... or "-" outside the order.
fn rank(r: &pb::Route) -> String {
    match r.rank {
        0 => "primary".into(),
        n if n > 0 => format!("backup {n}"),
        _ => "-".into(),
    }
}

fn print_routes(routes: &[pb::Route], json_out: bool) {
    if json_out {
        println!("{}", serde_json::Value::Array(routes.iter().map(route_json).collect()));
        return;
    }
    table(
        &["PREFIX", "NODE", "APPROVED", "PRIORITY", "HEALTHY", "ROLE", "SITE ADDRESS", "REFUSED"],
        routes
            .iter()
            .map(|r| {
                let approved = if r.auto_approved { "auto".to_owned() } else { r.approved.to_string() };
                vec![
                    r.prefix.clone(),
                    format!("{} ({})", r.node_name, r.node_id),
                    approved,
                    r.priority.to_string(),
                    r.healthy.to_string(),
                    rank(r),
                    site_side(r),
                    if r.refusal.is_empty() { "-".into() } else { r.refusal.clone() },
                ]
            })
            .collect(),
    );
}

/// A byte count as text with a binary unit ("1.5 MiB").
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// How packets to a peer travel: "direct", "relay fsn", or "-" when the
/// agent does not say (no relays, or older than capability 7).
fn path(h: &pb::PeerHealth) -> String {
    match h.path.as_str() {
        "" => "-".into(),
        "relay" if !h.relay_region.is_empty() => format!("relay {}", h.relay_region),
        p => p.to_owned(),
    }
}

/// Milliseconds as text, "-" when unknown (negative).
fn millis(v: f64) -> String {
    if v < 0.0 { "-".into() } else { format!("{v:.2}") }
}

/// Control's summary, the nodes, the routes with their failover roles, and
/// per pair of nodes what the agents' probes measured.
fn print_status(s: &pb::Status, nodes: &[pb::Node], routes: &[pb::Route], json_out: bool) {
    if json_out {
        let peers: Vec<_> = s
            .peers
            .iter()
            .map(|l| {
                let h = l.health.clone().unwrap_or_default();
                json!({"from": l.from_name, "from_id": l.from_node, "to": l.to_name, "to_id": l.to_node,
                    "rtt_ms": h.probe_rtt_ms, "rtt_p50_ms": h.probe_rtt_p50_ms, "rtt_p95_ms": h.probe_rtt_p95_ms,
                    "loss": h.probe_loss, "up": h.probe_up, "handshake_age_ms": h.handshake_age_ms,
                    "rx_bytes": h.rx_bytes, "tx_bytes": h.tx_bytes, "endpoint": h.endpoint,
                    "path": h.path, "relay_region": h.relay_region, "path_switches": h.path_switches,
                    "direct_secs": h.direct_secs, "relay_secs": h.relay_secs,
                    "report_age_secs": l.report_age_secs})
            })
            .collect();
        let nodes: Vec<_> = nodes
            .iter()
            .map(|n| {
                let mut v = node_json(n);
                v["backend"] = json!(n.backend);
                v
            })
            .collect();
        println!(
            "{}",
            json!({"nodes_total": s.nodes_total, "nodes_pending": s.nodes_pending, "nodes_online": s.nodes_online,
                "nodes_expired": s.nodes_expired, "nodes_expiring_soon": s.nodes_expiring_soon,
                "agents_connected": s.agents_connected, "policy_generation": s.policy_generation,
                "routes_active": s.routes_active, "store": s.store, "ca_pin": s.ca_pin,
                "relay_ticket_key": s.relay_ticket_key,
                "software": s.capabilities.as_ref().map(|c| c.software.clone()),
                "nodes": nodes, "routes": routes.iter().map(route_json).collect::<Vec<_>>(), "peers": peers})
        );
        return;
    }
    table(
        &["NODES", "PENDING", "ONLINE", "EXPIRED", "EXPIRING SOON", "AGENTS", "POLICY GEN", "ROUTES", "STORE"],
        vec![vec![
            s.nodes_total.to_string(),
            s.nodes_pending.to_string(),
            s.nodes_online.to_string(),
            s.nodes_expired.to_string(),
            s.nodes_expiring_soon.to_string(),
            s.agents_connected.to_string(),
            s.policy_generation.to_string(),
            s.routes_active.to_string(),
            s.store.clone(),
        ]],
    );
    println!("CA pin: {}", s.ca_pin);
    if !s.relay_ticket_key.is_empty() {
        // What each relay's `control_keys` must hold.
        println!("Relay ticket key: {}", s.relay_ticket_key);
    }
    println!();
    table(
        &["NODE", "IPV4", "STATE", "ONLINE", "REPLICA", "BACKEND", "KEY EXPIRY", "VIEW"],
        nodes
            .iter()
            .map(|n| {
                vec![
                    format!("{} ({})", n.name, n.id),
                    n.ipv4.clone(),
                    state(n),
                    if n.online { "yes" } else { "no" }.into(),
                    if n.replica.is_empty() { "-".into() } else { n.replica.clone() },
                    if n.backend.is_empty() { "-".into() } else { n.backend.clone() },
                    time(n.key_expiry_unix),
                    // A nack is what an operator must see first.
                    if n.view_error.is_empty() {
                        format!("ok (gen {})", n.acked_generation)
                    } else {
                        format!("NACK gen {}: {}", n.view_error_generation, n.view_error)
                    },
                ]
            })
            .collect(),
    );
    println!();
    print_routes(routes, false);
    println!();
    table(
        &[
            "FROM",
            "TO",
            "UP",
            "RTT ms",
            "P50 ms",
            "P95 ms",
            "LOSS",
            "HANDSHAKE",
            "ENDPOINT",
            "PATH",
            "SWITCHES",
            "RX",
            "TX",
            "REPORTED",
        ],
        s.peers
            .iter()
            .map(|l| {
                let h = l.health.clone().unwrap_or_default();
                let handshake =
                    if h.handshake_age_ms < 0 { "never".into() } else { format!("{}s ago", h.handshake_age_ms / 1000) };
                vec![
                    l.from_name.clone(),
                    l.to_name.clone(),
                    if h.probe_up { "yes" } else { "no" }.into(),
                    millis(h.probe_rtt_ms),
                    millis(h.probe_rtt_p50_ms),
                    millis(h.probe_rtt_p95_ms),
                    format!("{:.0}%", h.probe_loss * 100.0),
                    handshake,
                    if h.endpoint.is_empty() { "-".into() } else { h.endpoint.clone() },
                    path(&h),
                    h.path_switches.to_string(),
                    bytes(h.rx_bytes),
                    bytes(h.tx_bytes),
                    format!("{}s ago", l.report_age_secs),
                ]
            })
            .collect(),
    );
}

async fn connect(cli: &Cli) -> anyhow::Result<Admin> {
    let ch = if let Some(sock) = &cli.socket {
        channel::connect_unix(sock).await?
    } else {
        let trust = match (&cli.ca_pin, &cli.ca_file) {
            (Some(pin), _) => {
                Trust::Pin(hex::decode(pin)?.try_into().map_err(|_| anyhow::anyhow!("a CA pin is 32 bytes"))?)
            }
            (None, Some(f)) => Trust::CaPem(std::fs::read_to_string(f)?),
            (None, None) => bail!("give --ca-pin or --ca-file to trust control's CA (or --socket)"),
        };
        channel::connect_any(&cli.server, 0, &trust).await?.0
    };
    let token = match &cli.token_file {
        Some(path) => Some(mesh_local::secret_file::read(path)?.trim().to_owned()),
        None => cli.token.clone(),
    };
    Ok(AdminServiceClient::with_interceptor(ch, Bearer(token)))
}

/// Parses the command line, warning when the token came on it (where
/// `ps` and `/proc/<pid>/cmdline` show it to every local user).
fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
    let matches = Cli::command().get_matches();
    if matches.value_source("token") == Some(ValueSource::CommandLine) {
        eprintln!(
            "meshctl: warning: --token on the command line is visible to every local user; \
             use --token-file PATH (mode 0600) or MESHCTL_TOKEN"
        );
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = parse();
    if let Cmd::Policy { cmd: policy::PolicyCmd::Check { file } } = &cli.cmd {
        return policy::check_offline(file, cli.json);
    }
    let mut a = connect(&cli).await?;
    let j = cli.json;
    match &cli.cmd {
        Cmd::Status => {
            let s = a.get_status(pb::GetStatusRequest {}).await?.into_inner();
            let nodes = a.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            let routes = a.list_routes(pb::Empty {}).await?.into_inner().routes;
            print_status(&s, &nodes, &routes, j);
        }
        Cmd::Nodes { cmd } => {
            let node = match cmd.as_ref().unwrap_or(&NodeCmd::List) {
                NodeCmd::List => {
                    let nodes = a.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
                    print_nodes(&nodes, j);
                    return Ok(());
                }
                NodeCmd::Approve { node } => a.approve_node(node_ref(node)).await?.into_inner(),
                NodeCmd::Tag { node, tags } => a
                    .set_node_tags(pb::SetNodeTagsRequest { node: Some(node_ref(node)), tags: tags.clone() })
                    .await?
                    .into_inner(),
                NodeCmd::Expire { node } => a.expire_node_key(node_ref(node)).await?.into_inner(),
                NodeCmd::Rotate { node } => a.rotate_node_key(node_ref(node)).await?.into_inner(),
                NodeCmd::Extend { node, days } => a
                    .extend_node_key(pb::ExtendNodeKeyRequest { node: Some(node_ref(node)), days: *days })
                    .await?
                    .into_inner(),
                NodeCmd::Remove { node } => {
                    a.remove_node(node_ref(node)).await?;
                    println!("{}", if j { json!({"removed": node}).to_string() } else { format!("removed {node}") });
                    return Ok(());
                }
            };
            print_nodes(&[node], j);
        }
        Cmd::Keys { cmd } => match cmd {
            KeyCmd::Create { reusable, ephemeral, preapproved, expires, tags, user, description } => {
                let r = a
                    .create_enrollment_key(pb::CreateEnrollmentKeyRequest {
                        reusable: *reusable,
                        ephemeral: *ephemeral,
                        preapproved: *preapproved,
                        expires_in_seconds: duration_secs(expires)?,
                        tags: tags.clone(),
                        user: user.clone(),
                        description: description.clone(),
                    })
                    .await?
                    .into_inner();
                if j {
                    println!("{}", json!({"id": r.key.map(|k| k.id), "secret": r.secret}));
                } else {
                    println!("{}", r.secret);
                }
            }
            KeyCmd::List => {
                let keys = a.list_enrollment_keys(pb::Empty {}).await?.into_inner().keys;
                if j {
                    let v: Vec<_> = keys
                        .iter()
                        .map(|k| json!({"id": k.id, "reusable": k.reusable, "ephemeral": k.ephemeral, "preapproved": k.preapproved,
                            "tags": k.tags, "user": k.user, "expires_unix": k.expires_unix, "revoked": k.revoked, "uses": k.uses}))
                        .collect();
                    println!("{}", serde_json::Value::Array(v));
                } else {
                    table(
                        &["ID", "REUSABLE", "EPHEMERAL", "PREAPPROVED", "TAGS", "EXPIRES", "REVOKED", "USES"],
                        keys.iter()
                            .map(|k| {
                                vec![
                                    k.id.clone(),
                                    k.reusable.to_string(),
                                    k.ephemeral.to_string(),
                                    k.preapproved.to_string(),
                                    k.tags.join(","),
                                    time(k.expires_unix),
                                    k.revoked.to_string(),
                                    k.uses.to_string(),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            KeyCmd::Revoke { id } => {
                let k = a.revoke_enrollment_key(pb::RevokeEnrollmentKeyRequest { id: id.clone() }).await?.into_inner();
                println!("{}", if j { json!({"revoked": k.id}).to_string() } else { format!("revoked {}", k.id) });
            }
        },
        Cmd::Tokens { cmd } => match cmd.as_ref().unwrap_or(&TokenCmd::List) {
            TokenCmd::List => {
                let tokens = a.list_admin_tokens(pb::Empty {}).await?.into_inner().tokens;
                if j {
                    let v: Vec<_> = tokens
                        .iter()
                        .map(|t| {
                            json!({"id": t.id, "description": t.description, "created_unix": t.created_unix,
                            "expires_unix": t.expires_unix, "revoked": t.revoked})
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(v));
                } else {
                    table(
                        &["ID", "DESCRIPTION", "CREATED", "EXPIRES", "REVOKED"],
                        tokens
                            .iter()
                            .map(|t| {
                                let expires = if t.expires_unix == 0 { "never".into() } else { time(t.expires_unix) };
                                vec![
                                    t.id.clone(),
                                    t.description.clone(),
                                    time(t.created_unix),
                                    expires,
                                    t.revoked.to_string(),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            TokenCmd::Create { expires, description } => {
                let r = a
                    .create_admin_token(pb::CreateAdminTokenRequest {
                        description: description.clone(),
                        expires_in_seconds: duration_secs(expires)?,
                    })
                    .await?
                    .into_inner();
                if j {
                    println!("{}", json!({"id": r.token.map(|t| t.id), "secret": r.secret}));
                } else {
                    println!("{}", r.secret);
                }
            }
            TokenCmd::Revoke { id } => {
                let t = a.revoke_admin_token(pb::AdminTokenRef { id: id.clone() }).await?.into_inner();
                println!("{}", if j { json!({"revoked": t.id}).to_string() } else { format!("revoked {}", t.id) });
            }
        },
        Cmd::Routes { cmd } => {
            let routes = match cmd.as_ref().unwrap_or(&RouteCmd::List) {
                RouteCmd::List => a.list_routes(pb::Empty {}).await?.into_inner().routes,
                RouteCmd::Approve { node, prefix } => {
                    vec![a.approve_route(pb::RouteRef { node_id: *node, prefix: prefix.clone() }).await?.into_inner()]
                }
                RouteCmd::Priority { node, prefix, priority } => vec![
                    a.set_route_priority(pb::SetRoutePriorityRequest {
                        route: Some(pb::RouteRef { node_id: *node, prefix: prefix.clone() }),
                        priority: *priority,
                    })
                    .await?
                    .into_inner(),
                ],
            };
            print_routes(&routes, j);
        }
        Cmd::Policy { cmd } => policy::run(&mut a, cmd, j).await?,
        Cmd::Audit { action, actor, subject, limit, follow } => {
            let req = pb::ListAuditRequest {
                after_id: 0,
                action_prefix: action.clone(),
                actor: actor.clone(),
                subject: subject.clone(),
                limit: *limit,
            };
            let print = |e: &pb::AuditEntry| {
                if j {
                    println!(
                        "{}",
                        json!({"id": e.id, "at_unix": e.at_unix, "actor": e.actor, "action": e.action, "subject": e.subject,
                            "before": e.before, "after": e.after})
                    );
                } else {
                    println!("{:>6}  {}  {:<24} {:<22} {}", e.id, time(e.at_unix), e.actor, e.action, e.subject);
                }
            };
            if *follow {
                let mut s = a.follow_audit(req).await?.into_inner();
                while let Some(e) = s.message().await? {
                    print(&e);
                }
            } else {
                for e in &a.list_audit(req).await?.into_inner().entries {
                    print(e);
                }
            }
        }
        Cmd::Ca { cmd } => ca::run(&mut a, cmd.as_ref(), j).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Cmd, KeyCmd, TokenCmd};

    /// Ids are random base64url: one in 64 starts with `-`, and must still
    /// be taken as the id, not as an unknown flag.
    #[test]
    fn ids_starting_with_a_hyphen_are_ids() {
        let cli = Cli::try_parse_from(["meshctl", "tokens", "revoke", "-Xq3"]).expect("parses");
        assert!(matches!(cli.cmd, Cmd::Tokens { cmd: Some(TokenCmd::Revoke { ref id }) } if id == "-Xq3"), "{cli:?}");
        let cli = Cli::try_parse_from(["meshctl", "keys", "revoke", "-k9"]).expect("parses");
        assert!(matches!(cli.cmd, Cmd::Keys { cmd: KeyCmd::Revoke { ref id } } if id == "-k9"), "{cli:?}");
    }
}
