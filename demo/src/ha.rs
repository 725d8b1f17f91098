//! The demo's HA check: a conversation between app-nyc and db-fsn (one
//! long-lived TCP connection with a checked stream both ways, plus a ping
//! series, over IPv4 and IPv6) through four events: fsn's primary gateway
//! is killed, brought back (fail-back), then nyc's primary likewise. After
//! each event the demo waits until control's order and the site's owner
//! (who holds the virtual gateway address) have settled on the expected
//! gateway, then reports the longest cut of every measure since the event.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_lab::twoway::{Conversation, Cuts};
use mesh_proto::v1 as pb;

use crate::{Gateway, REGIONS, wait_for};

/// The bound every cut must stay under.
pub(crate) const BOUND: Duration = Duration::from_millis(1000);

/// One event and what it cost.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) event: String,
    pub(crate) cuts: Cuts,
}

/// Kills (`false`) or brings back (`true`) `name`, waits until `expect` is
/// primary at control and owner of both of the region's prefixes, and
/// measures the cuts since the event.
fn event(
    gateways: &mut [Gateway],
    conv: &Conversation,
    routes: &dyn Fn() -> anyhow::Result<Vec<pb::Route>>,
    name: &str,
    revive: bool,
    region: usize,
    expect: &str,
) -> anyhow::Result<Outcome> {
    let gw = gateways.iter_mut().find(|g| g.name == name).with_context(|| format!("no gateway {name}"))?;
    let what = if revive {
        format!("bring {name} back (fail-back)")
    } else {
        format!("kill {name} ({} primary)", REGIONS[region].name)
    };
    // The wall-clock time lines the event up with the agents' logs.
    println!("== {what} (at {})", humantime::format_rfc3339_millis(std::time::SystemTime::now()));
    let t = Instant::now();
    if revive {
        gw.revive()?
    } else {
        gw.kill()?
    }
    let prefixes = [REGIONS[region].lan(), REGIONS[region].lan6()];
    let settled = || routes().is_ok_and(|rs| prefixes.iter().all(|p| mesh_lab::control::settled_on(&rs, p, expect)));
    wait_for(
        &format!("{expect} to be primary and owner of {}", prefixes.join(" and ")),
        Duration::from_secs(40),
        settled,
    )?;
    let cuts = cuts_since(conv, t, &what)?;
    Ok(Outcome { event: what, cuts })
}

/// Once traffic has flowed again on every path for a while (the cut is
/// over), the longest cut of each measure since `t`, printed; `what`
/// happened at `t`.
pub(crate) fn cuts_since(conv: &Conversation, t: Instant, what: &str) -> anyhow::Result<Cuts> {
    let after = Instant::now() + Duration::from_millis(500);
    wait_for("the conversation to flow again", Duration::from_secs(20), || conv.flowing_since(after))?;
    if let Some(e) = conv.error() {
        bail!("after '{what}': {e}");
    }
    let cuts = conv.cuts(t);
    println!("   {cuts}");
    Ok(cuts)
}

/// Runs the four events under one conversation; the outcomes in order.
pub(crate) fn run(
    gateways: &mut [Gateway],
    app: &mesh_lab::Host,
    db: &mesh_lab::Host,
    routes: &dyn Fn() -> anyhow::Result<Vec<pb::Route>>,
) -> anyhow::Result<Vec<Outcome>> {
    let fsn = &REGIONS[1];
    let addrs: Vec<SocketAddr> = vec![format!("{}:9000", fsn.db()).parse()?, format!("[{}]:9000", fsn.db6()).parse()?];
    let conv = Conversation::start(app, db, &addrs, Duration::from_millis(10))?;
    let start = Instant::now();
    wait_for("the conversation to flow", Duration::from_secs(20), || conv.flowing_since(start))?;
    let mut out = Vec::new();
    for (name, revive, region, expect) in [
        ("fsn_gw1", false, 1, "fsn-gw2"),
        ("fsn_gw1", true, 1, "fsn-gw1"),
        ("nyc_gw1", false, 0, "nyc-gw2"),
        ("nyc_gw1", true, 0, "nyc-gw1"),
    ] {
        out.push(event(gateways, &conv, routes, name, revive, region, expect)?);
    }
    let streams = conv.finish().map_err(|e| anyhow::anyhow!("the conversation did not survive: {e}"))?;
    for (n, o) in streams {
        println!("   {n}: {} / {} bytes checked both ways (SHA-256 equal)", o.bytes.0, o.bytes.1);
    }
    Ok(out)
}

/// The outcomes as a table: one row per event, the worst cut per measure.
pub(crate) fn print(out: &[Outcome]) {
    let Some(first) = out.first() else { return };
    print!("{:<36}", "two-way cut app-nyc <-> db-fsn (ms)");
    for (n, _) in &first.cuts.0 {
        print!(" {:>10}", n.replace("client->server", "->").replace("server->client", "<-"));
    }
    println!();
    for o in out {
        print!("{:<36}", o.event);
        for (_, d) in &o.cuts.0 {
            print!(" {:>10}", d.as_millis());
        }
        println!();
    }
    println!("(expected: every cut under {} ms, the same TCP connections throughout)", BOUND.as_millis());
}
