//! Userspace WireGuard: gotatun inside the agent process, on a TUN device,
//! serving the standard UAPI socket `/var/run/wireguard/<ifname>.sock` (so
//! `wg show` works) and configured through that socket by
//! wireguard-control's userspace backend, exactly like any other engine.
//!
//! The engine runs on its own multi-threaded tokio runtime, apart from the
//! agent's, so reconcile's blocking UAPI calls can never starve it.
//!
//! The fast path (on by default, each step falling back with a logged
//! reason when the kernel refuses it): a TUN with vnet headers and TSO/
//! checksum offloads ([`tun`], [`gso`]) and a UDP socket with GSO and forced
//! buffer sizes ([`udp`]). The agent's `tun_offload = false` and
//! `udp_gso = false` turn them off, to measure what each step brings.
//!
//! The TUN device is made persistent: when the agent exits, the interface
//! with its addresses, routes and eBPF programs stays, and packets routed
//! into it are dropped (not leaked to another route) until an agent opens it
//! again.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use gotatun::device::{Device, DeviceBuilder};
use wireguard_control::{Backend, DeviceUpdate, InterfaceName, PeerConfigBuilder};

use super::{BackendKind, WgDevice, WgError, WgUpdate, WireGuard, convert};
use crate::net::{NetOps as _, rtnl::Rtnl};

/// Where UAPI sockets live (shared by every network namespace).
pub const UAPI_DIR: &str = "/var/run/wireguard";

mod checksum;
pub mod gso;
mod scratch;
mod tun;
mod uapi;
pub mod udp;

type Engine = Device<(udp::GsoUdpFactory, tun::TunSend, tun::TunRecv)>;

/// Whether the environment switch `name` leaves a fast-path step on.
/// Options of the userspace engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserspaceOptions {
    /// `SO_RCVBUF` of the UDP socket (the receive side overflows first).
    pub udp_recv_buffer: Option<usize>,
    /// `SO_SNDBUF` of the UDP socket.
    pub udp_send_buffer: Option<usize>,
    /// Worker threads of the engine's runtime.
    pub threads: usize,
    /// TUN offloads (segmentation on read, merging on write).
    pub tun_offload: bool,
    /// UDP GSO on the underlay socket.
    pub udp_gso: bool,
}

impl Default for UserspaceOptions {
    /// The fast path: every offload on.
    fn default() -> Self {
        Self { udp_recv_buffer: None, udp_send_buffer: None, threads: 2, tun_offload: true, udp_gso: true }
    }
}

struct Running {
    // Field order matters: the device is stopped before its runtime drops.
    device: Option<Engine>,
    rt: tokio::runtime::Runtime,
}

/// The userspace engine on one interface.
pub struct UserspaceWg {
    ifname: String,
    iface: InterfaceName,
    opts: UserspaceOptions,
    rtnl: Rtnl,
    running: Option<Running>,
}

impl std::fmt::Debug for UserspaceWg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceWg")
            .field("ifname", &self.ifname)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl UserspaceWg {
    /// Binds to `ifname` in the calling thread's network namespace (the
    /// engine starts in [`WireGuard::ensure`]).
    pub fn new(ifname: &str, opts: UserspaceOptions) -> Result<Self, WgError> {
        let iface = ifname.parse().map_err(|_| WgError::Name(ifname.to_owned()))?;
        Ok(Self { ifname: ifname.to_owned(), iface, opts, rtnl: Rtnl::new()?, running: None })
    }

    /// The UAPI socket of this interface.
    #[must_use]
    pub fn socket_path(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.ifname))
    }

    /// Gives every peer fresh handshake state, after a key change.
    ///
    /// gotatun restarts its connection when the private key changes, and
    /// what the old connection still had queued is dropped: a handshake
    /// initiation or response sent in that moment is lost. The peer's state
    /// then says "in progress", so its next attempt waits for REKEY_TIMEOUT
    /// (5 s): a rotation cut that long (or as long as the probes take to
    /// fail the route over) in about one rotation of fifteen. Setting a peer
    /// again rebuilds it in gotatun with its endpoint and allowed IPs kept,
    /// so the next packet to each peer starts a handshake at once, on the
    /// new connection. The key change has already dropped every session, so
    /// nothing else is lost.
    fn restart_handshakes(&self) -> Result<(), WgError> {
        let dev = wireguard_control::Device::get(&self.iface, Backend::Userspace).map_err(|e| self.io("read", e))?;
        let update =
            dev.peers.iter().fold(DeviceUpdate::new(), |u, p| u.add_peer(PeerConfigBuilder::new(&p.config.public_key)));
        update.apply(&self.iface, Backend::Userspace).map_err(|e| self.io("restarting the peers' handshakes", e))
    }

    fn engine_err(&self, message: impl std::fmt::Display) -> WgError {
        WgError::Engine { ifname: self.ifname.clone(), message: message.to_string() }
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> WgError {
        WgError::Io { op, ifname: self.ifname.clone(), backend: BackendKind::Userspace, source }
    }

    fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            if let Some(device) = running.device.take() {
                running.rt.block_on(device.stop());
            }
            running.rt.shutdown_background();
        }
    }

    fn start(&mut self) -> Result<(), WgError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.opts.threads.max(1))
            .thread_name(format!("wg-{}", self.ifname))
            .enable_all()
            .build()
            .map_err(|e| self.engine_err(format!("runtime: {e}")))?;
        let ifname = self.ifname.clone();
        let opts = self.opts;
        let device = rt.block_on(async move {
            let (tun_tx, tun_rx, mode) =
                tun::open(&ifname, opts.tun_offload).map_err(|e| format!("TUN device: {e}"))?;
            tracing::info!(ifname = %ifname, ?mode, "TUN device open");
            let uapi = uapi::serve(&Path::new(UAPI_DIR).join(format!("{ifname}.sock")))
                .map_err(|e| format!("UAPI socket: {e}"))?;
            let udp = udp::GsoUdpFactory::new(opts.udp_recv_buffer, opts.udp_send_buffer, opts.udp_gso);
            DeviceBuilder::new()
                .with_udp(udp)
                .with_ip_pair(tun_tx, tun_rx)
                .with_uapi(uapi)
                .build()
                .await
                .map_err(|e| format!("device: {e}"))
        });
        match device {
            Ok(device) => {
                self.running = Some(Running { device: Some(device), rt });
                tracing::info!(ifname = %self.ifname, socket = %self.socket_path().display(), "userspace WireGuard engine started");
                Ok(())
            }
            Err(e) => {
                rt.shutdown_background();
                Err(self.engine_err(e))
            }
        }
    }
}

impl WireGuard for UserspaceWg {
    fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn ensure(&mut self) -> Result<bool, WgError> {
        let link = self.rtnl.link(&self.ifname)?;
        if self.running.is_some() && link.is_some() && self.socket_path().exists() {
            return Ok(false);
        }
        if self.running.is_some() {
            tracing::warn!(ifname = %self.ifname, link = link.is_some(), "userspace WireGuard engine lost its TUN or socket: restarting it");
            self.stop();
        }
        self.start()?;
        Ok(true)
    }

    fn read(&self) -> Result<WgDevice, WgError> {
        if self.running.is_none() {
            return Err(self.engine_err("not running"));
        }
        let dev = wireguard_control::Device::get(&self.iface, Backend::Userspace).map_err(|e| self.io("read", e))?;
        Ok(convert::device_from_wgc(dev, SystemTime::now()))
    }

    fn apply(&mut self, update: &WgUpdate) -> Result<(), WgError> {
        // wireguard-control starts `wireguard-go` when the socket is missing:
        // never let it. Our engine is in this process or nowhere.
        if self.running.is_none() || !self.socket_path().exists() {
            return Err(self.engine_err("not running (no UAPI socket)"));
        }
        convert::update_to_wgc(update).apply(&self.iface, Backend::Userspace).map_err(|e| self.io("apply", e))?;
        if update.private_key.is_some() {
            self.restart_handshakes()?;
        }
        Ok(())
    }

    fn shutdown(&mut self, keep: bool) -> Result<(), WgError> {
        self.stop();
        let _ = std::fs::remove_file(self.socket_path());
        if !keep {
            self.rtnl.delete_link(&self.ifname)?;
            tracing::info!(ifname = %self.ifname, "deleted the userspace WireGuard TUN device");
        }
        Ok(())
    }
}

impl Drop for UserspaceWg {
    fn drop(&mut self) {
        self.stop();
    }
}
