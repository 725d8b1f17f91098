//! Control under hostile input, in the running lab: a host on the WAN
//! floods control with wrong enrollment keys while the operator changes the
//! policy and the gateways keep their streams; a policy built to crash the
//! parser is refused; admin tokens carry an expiry.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mesh_lab::Host;
use mesh_proto::v1 as pb;
use mesh_proto::v1::agent_service_client::AgentServiceClient;

use crate::control;

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(4);

/// What the flood client saw (its one line of output).
#[derive(Debug, Default)]
pub(crate) struct FloodCounts {
    pub sent: u64,
    pub unauthenticated: u64,
    pub limited: u64,
    pub other: u64,
}

/// What the hostile-input step measured.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub flood: FloodCounts,
    /// The slowest policy change made during the flood.
    pub slowest_write: Duration,
    /// Gateways online at control after the flood.
    pub online: usize,
    /// The deep policy's first problem, as control reported it.
    pub deep_policy: String,
    /// Admin tokens without an expiry.
    pub tokens_without_expiry: usize,
}

/// `mesh-demo flood`: sends wrong enrollment keys to control at `addr`
/// (trusting CA `pin`) from 8 channels × 8 tasks for `secs`, and prints
/// the counts by answer.
pub(crate) fn flood(addr: &str, pin: &str, secs: u64) -> anyhow::Result<()> {
    let pin: [u8; 32] = hex_pin(pin)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let counts = rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for ch in 0..8u64 {
            let channel = mesh_client::channel::connect(addr, &mesh_client::channel::Trust::Pin(pin)).await?;
            for t in 0..8u64 {
                let mut client = AgentServiceClient::new(channel.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = FloodCounts::default();
                    let mut i = (ch * 8 + t) * 1_000_000;
                    while Instant::now() < until {
                        i += 1;
                        let key = mesh_client::enrollment::EnrollmentKeyText {
                            id: format!("mallory{i}"),
                            secret: "x".repeat(32),
                            ca_pin: Some(pin),
                        };
                        let r = client
                            .enroll(pb::EnrollRequest {
                                enrollment_key: key.to_text(),
                                wireguard_public_key: vec![7; 32],
                                hostname: "mallory".into(),
                                ..Default::default()
                            })
                            .await;
                        c.sent += 1;
                        match r.map_err(|s| s.code()) {
                            Err(tonic::Code::Unauthenticated) => c.unauthenticated += 1,
                            Err(tonic::Code::ResourceExhausted) => c.limited += 1,
                            _ => c.other += 1,
                        }
                    }
                    c
                }));
            }
        }
        let mut all = FloodCounts::default();
        for t in tasks {
            let c = t.await?;
            all.sent += c.sent;
            all.unauthenticated += c.unauthenticated;
            all.limited += c.limited;
            all.other += c.other;
        }
        anyhow::Ok(all)
    })?;
    println!("{} {} {} {}", counts.sent, counts.unauthenticated, counts.limited, counts.other);
    Ok(())
}

fn hex_pin(s: &str) -> anyhow::Result<[u8; 32]> {
    anyhow::ensure!(s.len() == 64, "the pin must be 64 hex digits");
    let mut out = [0; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("the pin must be hex")?;
    }
    Ok(out)
}

/// Runs the hostile-input step: `mallory` (a host on the WAN) floods
/// control while the policy `policy` is set again and again over the
/// admin socket of `ctl`.
pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    mallory: &Host,
    ctl: &control::Control,
    pin: &[u8; 32],
    policy: &str,
) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe()?;
    let pin_hex: String = pin.iter().map(|b| format!("{b:02x}")).collect();
    let secs = FLOOD.as_secs().to_string();
    let mut cmd = mallory.command(
        exe.to_str().context("exe path")?,
        ["flood", "--addr", control::ADDRESS, "--pin", &pin_hex, "--secs", &secs],
    );
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let flooder = mallory.spawn_command(cmd)?;
    let began = Instant::now();
    let slowest_write = rt.block_on(async {
        // Let the flood build up, then change the policy during it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut a = control::admin(ctl).await?;
        let mut slowest = Duration::ZERO;
        let mut round = 0;
        while began.elapsed() + Duration::from_millis(700) < FLOOD {
            round += 1;
            let t = Instant::now();
            let text = format!("// change {round} during the flood\n{policy}");
            a.set_policy(pb::PolicyDocument { text, generation: 0 }).await?;
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::Ok(slowest)
    })?;
    let out = flooder.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    anyhow::ensure!(n.len() == 4, "the flood client's output: {line:?}");
    let flood = FloodCounts { sent: n[0], unauthenticated: n[1], limited: n[2], other: n[3] };

    rt.block_on(async {
        let mut a = control::admin(ctl).await?;
        let online =
            a.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes.iter().filter(|n| n.online).count();
        let deep = a
            .validate_policy(pb::PolicyDocument { text: "[".repeat(200_000), generation: 0 })
            .await?
            .into_inner()
            .problems
            .first()
            .map(|p| format!("line {}: {}", p.line, p.message))
            .unwrap_or_default();
        let tokens = a.list_admin_tokens(pb::Empty {}).await?.into_inner().tokens;
        let tokens_without_expiry = tokens.iter().filter(|t| t.expires_unix == 0).count();
        anyhow::Ok(Outcome { flood, slowest_write, online, deep_policy: deep, tokens_without_expiry })
    })
}
