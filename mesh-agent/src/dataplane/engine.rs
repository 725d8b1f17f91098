//! [`Dataplane`]: the ACL, MSS clamp and underlay guard, loaded (or adopted
//! from bpffs), attached to named interfaces and fed policies.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use mesh_common::{acl, guard as guard_maps};
use mesh_policy::CompiledPolicy;

use super::{
    DataplaneError, EBPF_OBJECT,
    acl::InstallReport,
    compile,
    counters::Counters,
    guard::{self, GuardSettings},
    program_mut, sys,
};

/// ACL program for interfaces whose frames start at the IP header.
pub const PROG_ACL_IP: &str = "acl_tc_ip";
/// ACL program for Ethernet interfaces.
pub const PROG_ACL_ETH: &str = "acl_tc_eth";
/// The underlay guard.
pub const PROG_GUARD: &str = "guard_xdp";
/// Empty TC program (benchmark baseline).
pub const PROG_PASS_TC: &str = "pass_tc";
/// Empty XDP program (benchmark baseline).
pub const PROG_PASS_XDP: &str = "pass_xdp";
/// XDP program that transmits every frame (the benchmarks' traffic
/// generator, see [`Dataplane::transmit_frames`]).
pub const PROG_TX_XDP: &str = "tx_xdp";

/// Header bytes the generator restores per frame (Ethernet + IPv4 + UDP;
/// `TEMPLATE_LEN` in mesh-ebpf src/traffic.rs).
const GEN_TEMPLATE_LEN: usize = 42;

const TC_PROGS: [&str; 3] = [PROG_ACL_IP, PROG_ACL_ETH, PROG_PASS_TC];
const XDP_PROGS: [&str; 3] = [PROG_GUARD, PROG_PASS_XDP, PROG_TX_XDP];

/// Every map the ACL and the guard share across restarts.
fn pinned_maps() -> Vec<&'static str> {
    let mut v = vec![
        acl::names::ACTIVE,
        acl::names::CONFIG,
        acl::names::SLOT_META,
        acl::names::LENS,
        acl::names::FLOWS,
        acl::names::FRAGS,
        acl::names::VERDICTS,
        acl::names::MSS_STATS,
        guard_maps::names::CONFIG,
        guard_maps::names::KNOWN,
        guard_maps::names::RATE,
        guard_maps::names::ALLOW,
        guard_maps::names::STATS,
    ];
    for s in 0..2 {
        v.extend([
            acl::names::SRC4[s],
            acl::names::SRC6[s],
            acl::names::DST4[s],
            acl::names::DST6[s],
            acl::names::POLICY[s],
            acl::names::RULE_STATS[s],
            acl::names::RULE_IDS[s],
        ]);
    }
    v
}

/// The data path of one agent instance.
///
/// With [`Dataplane::open`] every map lives in bpffs under the pin directory
/// and every attachment is a pinned bpf_link: when the agent exits (or
/// crashes) the programs stay attached with the last policy, and the next
/// `open` adopts the same maps, so enforcement never lapses and never fails
/// open. Before the first policy is installed the ACL drops every IP packet.
#[derive(Debug)]
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
}

impl Dataplane {
    /// Loads the programs and creates, or adopts, the maps pinned under
    /// `pin_dir` (e.g. `/sys/fs/bpf/mesh/<instance>`; bpffs is mounted on
    /// `/sys/fs/bpf` if it is not). Adopted maps keep their policy, flows and
    /// counters.
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        sys::check_kernel()?;
        sys::ensure_bpffs(pin_dir)?;
        let adopted = pin_dir.join(acl::names::ACTIVE).exists();
        let paths: Vec<(&'static str, PathBuf)> = pinned_maps().into_iter().map(|n| (n, pin_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(EBPF_OBJECT).map_err(DataplaneError::Load)?;
        let mut dp = Self { ebpf, pin_dir: Some(pin_dir.to_owned()) };
        dp.load_programs()?;
        super::acl::init_config(&mut dp.ebpf)?;
        tracing::info!(pin_dir = %pin_dir.display(), adopted, generation = ?dp.active_generation()?, "dataplane open");
        Ok(dp)
    }

    /// Loads the programs with fresh, unpinned maps: for tests and
    /// benchmarks. Attachments end when the value is dropped.
    pub fn load_unpinned() -> Result<Self, DataplaneError> {
        sys::check_kernel()?;
        let ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(DataplaneError::Load)?;
        let mut dp = Self { ebpf, pin_dir: None };
        dp.load_programs()?;
        super::acl::init_config(&mut dp.ebpf)?;
        Ok(dp)
    }

    /// Removes everything pinned under `pin_dir`: attachments end and the
    /// maps go once no program uses them. For uninstalling, not restarts.
    pub fn remove_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
        match std::fs::remove_dir_all(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataplaneError::Io { what: format!("removing {}", pin_dir.display()), source }),
        }
    }

    fn load_programs(&mut self) -> Result<(), DataplaneError> {
        for name in TC_PROGS {
            let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
            prog.load().map_err(|source| DataplaneError::Program { what: format!("loading {name}"), source })?;
        }
        for name in XDP_PROGS {
            let prog: &mut Xdp = program_mut(&mut self.ebpf, name)?;
            prog.load().map_err(|source| DataplaneError::Program { what: format!("loading {name}"), source })?;
        }
        Ok(())
    }

    /// Attaches the ACL and MSS clamp to both directions of `ifname` (looked
    /// up in the calling thread's network namespace). If a previous agent
    /// left a pinned attachment there, its program is replaced atomically.
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let prog = if sys::has_ethernet_header(ifname)? { PROG_ACL_ETH } else { PROG_ACL_IP };
        self.attach_tc(prog, ifname)
    }

    /// Attaches the empty TC program to both directions of `ifname` (the
    /// benchmarks' baseline for the cost of a TC hook).
    pub fn attach_pass_through(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.attach_tc(PROG_PASS_TC, ifname)
    }

    fn attach_tc(&mut self, prog_name: &'static str, ifname: &str) -> Result<(), DataplaneError> {
        for (hook, direction) in [("tc-ingress", TcAttachType::Ingress), ("tc-egress", TcAttachType::Egress)] {
            let what = format!("attaching {prog_name} to {ifname} ({hook})");
            let pin = self.link_pin(ifname, hook)?;
            let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, prog_name)?;
            if let Some(pin) = &pin
                && let Some(old) = open_pinned(pin, &what)?
            {
                let adopted = SchedClassifierLink::try_from(old)
                    .map_err(|e| link_err(&what, e))
                    .and_then(|old| {
                        prog.attach_to_link(old)
                            .map_err(|source| DataplaneError::Program { what: what.clone(), source })
                    })
                    .and_then(|id| {
                        prog.take_link(id)
                            .map_err(|source| DataplaneError::Program { what: "keeping the link".into(), source })
                    });
                match adopted {
                    Ok(link) => {
                        // The pin still names the same link, now running this program.
                        drop(FdLink::try_from(link));
                        tracing::info!(ifname, hook, prog = prog_name, "adopted pinned attachment");
                        continue;
                    }
                    // Typically the link of an interface that was recreated
                    // (a dead link cannot be updated). The pin, and with it
                    // the old link, stays until the new link replaces it.
                    Err(e) => {
                        tracing::warn!(ifname, hook, error = %e, "pinned attachment not adoptable: attaching afresh")
                    }
                }
            }
            // Kernels before 6.6 have no TCX links and need a clsact qdisc
            // (aya picks TCX where it exists); "exists already" is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(ifname);
            let id = prog
                .attach(ifname, direction)
                .map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
            if let Some(pin) = pin {
                let link =
                    prog.take_link(id).map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
                match FdLink::try_from(link) {
                    Ok(fd) => pin_replacing(fd, &pin, &what)?,
                    Err(_) => {
                        // A netlink filter (old kernel): it stays attached
                        // after we exit as long as we do not detach it.
                        tracing::warn!(
                            ifname,
                            hook,
                            "no bpf_link on this kernel: the TC filter is not pinned but persists"
                        );
                    }
                }
            }
            tracing::info!(ifname, hook, prog = prog_name, "attached");
        }
        Ok(())
    }

    /// Attaches the underlay guard (XDP, native mode where the driver has
    /// it) to `ifname` and points it at WireGuard port `wg_port`.
    pub fn attach_underlay(&mut self, ifname: &str, wg_port: u16) -> Result<(), DataplaneError> {
        guard::set_port(&mut self.ebpf, wg_port)?;
        self.attach_xdp(PROG_GUARD, ifname)
    }

    /// Points the guard at WireGuard port `wg_port` without attaching it
    /// (attach_underlay does this too); for tests and re-configuration.
    pub fn set_wg_port(&mut self, wg_port: u16) -> Result<(), DataplaneError> {
        guard::set_port(&mut self.ebpf, wg_port)
    }

    /// Attaches the empty XDP program (benchmark baseline).
    pub fn attach_xdp_pass_through(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.attach_xdp(PROG_PASS_XDP, ifname)
    }

    fn attach_xdp(&mut self, prog_name: &'static str, ifname: &str) -> Result<(), DataplaneError> {
        let what = format!("attaching {prog_name} to {ifname} (xdp)");
        let pin = self.link_pin(ifname, "xdp")?;
        let prog: &mut Xdp = program_mut(&mut self.ebpf, prog_name)?;
        if let Some(pin) = &pin
            && let Some(old) = open_pinned(pin, &what)?
        {
            let adopted = XdpLink::try_from(old)
                .map_err(|e| link_err(&what, e))
                .and_then(|old| {
                    prog.attach_to_link(old).map_err(|source| DataplaneError::Program { what: what.clone(), source })
                })
                .and_then(|id| {
                    prog.take_link(id)
                        .map_err(|source| DataplaneError::Program { what: "keeping the link".into(), source })
                });
            match adopted {
                Ok(link) => {
                    drop(FdLink::try_from(link));
                    tracing::info!(ifname, prog = prog_name, "adopted pinned XDP attachment");
                    return Ok(());
                }
                // As for TC: the old link stays pinned until replaced. A
                // live one keeps the interface's only XDP slot, so the
                // fresh attach below fails and the old program keeps running.
                Err(e) => tracing::warn!(ifname, error = %e, "pinned XDP attachment not adoptable: attaching afresh"),
            }
        }
        let id = prog
            .attach(ifname, XdpMode::Driver)
            .or_else(|_| prog.attach(ifname, XdpMode::Skb))
            .map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
        if let Some(pin) = pin {
            let link = prog.take_link(id).map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
            match FdLink::try_from(link) {
                Ok(fd) => pin_replacing(fd, &pin, &what)?,
                Err(_) => tracing::warn!(ifname, "no bpf_link for XDP on this kernel: attachment not pinned"),
            }
        }
        tracing::info!(ifname, prog = prog_name, "attached");
        Ok(())
    }

    /// Detaches the ACL from `ifname` (both directions). With pinning this
    /// removes the pinned links; traffic on the interface is then unfiltered.
    pub fn detach_overlay(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        for hook in ["tc-ingress", "tc-egress"] {
            self.detach_hook(ifname, hook, &TC_PROGS)?;
        }
        Ok(())
    }

    /// Detaches the underlay guard from `ifname`.
    pub fn detach_underlay(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.detach_hook(ifname, "xdp", &XDP_PROGS)
    }

    fn detach_hook(&mut self, ifname: &str, hook: &str, progs: &[&'static str]) -> Result<(), DataplaneError> {
        if let Some(pin) = self.link_pin(ifname, hook)? {
            let what = format!("detaching {hook} from {ifname}");
            if let Some(link) = open_pinned(&pin, &what)? {
                std::fs::remove_file(&pin).map_err(|source| DataplaneError::Io { what: what.clone(), source })?;
                drop(link);
            }
            return Ok(());
        }
        // Unpinned: the links are owned by the programs; drop every one on
        // this interface by detaching all of that program's links.
        let _ = progs;
        Err(DataplaneError::Usage(format!(
            "detaching {hook} from {ifname}: unpinned attachments end when the Dataplane is dropped"
        )))
    }

    fn link_pin(&self, ifname: &str, hook: &str) -> Result<Option<PathBuf>, DataplaneError> {
        self.pin_dir.as_deref().map(|dir| sys::link_pin_path(dir, ifname, hook)).transpose()
    }

    /// Compiles `policy` and swaps it in atomically (see
    /// `mesh_common::acl`): each packet sees the old or the new policy, never
    /// a mix. A policy that does not compile changes nothing.
    pub fn install_policy(&mut self, policy: &CompiledPolicy) -> Result<InstallReport, DataplaneError> {
        let tables = compile::compile(policy)?;
        let report = super::acl::install(&mut self.ebpf, &tables)?;
        tracing::info!(
            generation = report.generation,
            slot = report.slot,
            rules = report.rules,
            entries = report.entries,
            elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
            "policy installed"
        );
        Ok(report)
    }

    /// Generation of the active policy, `None` before the first install.
    pub fn active_generation(&self) -> Result<Option<u64>, DataplaneError> {
        super::acl::active_generation(&self.ebpf)
    }

    /// Clamps the MSS of TCP SYN / SYN-ACK on the overlay to fit `mtu`
    /// (MTU - 40 for IPv4, MTU - 60 for IPv6); 0 turns the clamp off.
    pub fn set_mss(&mut self, mtu: u32) -> Result<(), DataplaneError> {
        super::acl::update_config(&mut self.ebpf, |c| c.mss_mtu = mtu)
    }

    /// Flow idle timeouts, seconds (defaults: TCP 600, others 120).
    pub fn set_flow_timeouts(&mut self, tcp_s: u32, other_s: u32) -> Result<(), DataplaneError> {
        super::acl::update_config(&mut self.ebpf, |c| {
            c.tcp_timeout_s = tcp_s;
            c.other_timeout_s = other_s;
        })
    }

    /// Applies the underlay guard's settings.
    pub fn set_guard(&mut self, settings: &GuardSettings) -> Result<(), DataplaneError> {
        guard::apply(&mut self.ebpf, settings)
    }

    /// Makes the guard's known-endpoint set exactly `endpoints` (the peers'
    /// underlay addresses; they are never rate-limited).
    pub fn set_known_endpoints(&mut self, endpoints: &[IpAddr]) -> Result<(), DataplaneError> {
        guard::set_known(&mut self.ebpf, endpoints)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        Ok(Counters {
            generation: self.active_generation()?,
            rules: super::acl::rule_counters(&self.ebpf)?,
            verdicts: super::acl::verdict_counters(&self.ebpf)?,
            mss: super::acl::mss_counters(&self.ebpf)?,
            guard: guard::counters(&self.ebpf)?,
        })
    }

    /// Runs a TC program once on an Ethernet `frame` through
    /// BPF_PROG_TEST_RUN (counted like a real packet; flows it accepts are
    /// recorded). Returns the TC verdict and the frame as the program left
    /// it.
    pub fn test_run_tc(&self, prog: &'static str, frame: &[u8]) -> Result<(i32, Vec<u8>), DataplaneError> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.test_run(prog, frame, Some(&mut out), 1)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// Runs an XDP program once on `frame`; returns the XDP action.
    pub fn test_run_xdp(&self, prog: &'static str, frame: &[u8]) -> Result<u32, DataplaneError> {
        Ok(self.test_run(prog, frame, None, 1)?.return_value)
    }

    /// Runs `prog` `repeat` times on `frame` in the kernel and returns the
    /// mean time per run, nanoseconds (the benchmarks' per-packet cost).
    pub fn time_per_run(&self, prog: &'static str, frame: &[u8], repeat: u32) -> Result<f64, DataplaneError> {
        let r = self.test_run(prog, frame, None, repeat)?;
        Ok(r.duration.as_nanos() as f64)
    }

    /// Sends `count` copies of the Ethernet `frame` out of `ifname` (looked
    /// up in the calling thread's network namespace) from inside the kernel:
    /// [`PROG_TX_XDP`] run through BPF_PROG_TEST_RUN in live-frames mode
    /// (Linux 5.18+), `batch` frames per round. Returns the time it took.
    /// On a veth the frames arrive at the peer through its XDP path, so the
    /// peer needs an XDP program attached (veth drops them otherwise).
    /// A traffic generator for the benchmarks (like xdp-trafficgen).
    pub fn transmit_frames(
        &mut self,
        ifname: &str,
        frame: &[u8],
        count: u32,
        batch: u32,
    ) -> Result<std::time::Duration, DataplaneError> {
        let what = format!("transmitting frames out of {ifname}");
        let index = sys::ifindex(ifname)?;
        // The headers the generator restores before each send (pages are
        // recycled with whatever the receiver left in them).
        let mut template = [0u8; GEN_TEMPLATE_LEN];
        let n = frame.len().min(GEN_TEMPLATE_LEN);
        template[..n].copy_from_slice(&frame[..n]);
        let map = self.ebpf.map_mut("GEN_TEMPLATE").ok_or(DataplaneError::MissingMap("GEN_TEMPLATE"))?;
        let mut map = aya::maps::Array::<_, [u8; GEN_TEMPLATE_LEN]>::try_from(map)
            .map_err(|source| DataplaneError::Map { what: "opening GEN_TEMPLATE".into(), source })?;
        map.set(0, template, 0)
            .map_err(|source| DataplaneError::Map { what: "writing GEN_TEMPLATE".into(), source })?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let ctx: Vec<u8> = [0, frame.len() as u32, 0, index, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let p = self.ebpf.program(PROG_TX_XDP).ok_or(DataplaneError::MissingProgram(PROG_TX_XDP))?;
        let x: &Xdp = p.try_into().map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(batch),
            ..TestRunOptions::default()
        };
        let start = std::time::Instant::now();
        x.test_run(opts).map_err(|source| DataplaneError::Program { what, source })?;
        Ok(start.elapsed())
    }

    fn test_run(
        &self,
        prog: &'static str,
        frame: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult, DataplaneError> {
        let what = format!("test-running {prog}");
        let p = self.ebpf.program(prog).ok_or(DataplaneError::MissingProgram(prog))?;
        let opts = TestRunOptions { data_in: Some(frame), data_out, repeat, ..TestRunOptions::default() };
        let result = if XDP_PROGS.contains(&prog) {
            let x: &Xdp = p.try_into().map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
            x.test_run(opts)
        } else {
            let t: &SchedClassifier =
                p.try_into().map_err(|source| DataplaneError::Program { what: what.clone(), source })?;
            t.test_run(opts)
        };
        result.map_err(|source| DataplaneError::Program { what, source })
    }
}

/// Pins `link` at `pin`, atomically replacing a stale pin there: pinned
/// beside it first, then renamed over it, so the path never names nothing
/// and the old link is released only once the new one is pinned.
fn pin_replacing(link: FdLink, pin: &Path, what: &str) -> Result<(), DataplaneError> {
    // bpffs refuses names with a dot ("reserved for future use").
    let mut fresh = pin.as_os_str().to_owned();
    fresh.push("-new");
    let fresh = PathBuf::from(fresh);
    // A leftover of an interrupted replacement.
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| link_err(what, e))?;
    std::fs::rename(&fresh, pin)
        .map_err(|source| DataplaneError::Io { what: format!("{what}: replacing the pin"), source })
}

/// Opens the pinned link at `pin`, `None` if there is none.
fn open_pinned(pin: &Path, what: &str) -> Result<Option<FdLink>, DataplaneError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(link_err(what, e)),
    }
}

fn link_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> DataplaneError {
    DataplaneError::Link { what: what.to_owned(), source: Box::new(e) }
}
