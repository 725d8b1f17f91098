//! Kernel WireGuard: the link is created over rtnetlink, the device is
//! configured and read over WireGuard's generic netlink (wireguard-control).

use std::time::SystemTime;

use wireguard_control::{Backend, Device, InterfaceName};

use super::{BackendKind, WgDevice, WgError, WgUpdate, WireGuard, convert};
use crate::net::{NetOps as _, rtnl::Rtnl};

/// Kernel WireGuard on one interface.
#[derive(Debug)]
pub struct KernelWg {
    ifname: String,
    iface: InterfaceName,
    rtnl: Rtnl,
}

impl KernelWg {
    /// Binds to `ifname` in the calling thread's network namespace (the link
    /// is created by [`WireGuard::ensure`]).
    pub fn new(ifname: &str) -> Result<Self, WgError> {
        let iface = ifname.parse().map_err(|_| WgError::Name(ifname.to_owned()))?;
        Ok(Self { ifname: ifname.to_owned(), iface, rtnl: Rtnl::new()? })
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> WgError {
        WgError::Io { op, ifname: self.ifname.clone(), backend: BackendKind::Kernel, source }
    }
}

impl WireGuard for KernelWg {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn ensure(&mut self) -> Result<bool, WgError> {
        if self.rtnl.link(&self.ifname)?.is_some() {
            return Ok(false);
        }
        self.rtnl.create_wireguard(&self.ifname)?;
        tracing::info!(ifname = %self.ifname, "created kernel WireGuard link");
        Ok(true)
    }

    fn read(&self) -> Result<WgDevice, WgError> {
        let dev = Device::get(&self.iface, Backend::Kernel).map_err(|e| self.io("read", e))?;
        Ok(convert::device_from_wgc(dev, SystemTime::now()))
    }

    fn apply(&mut self, update: &WgUpdate) -> Result<(), WgError> {
        convert::update_to_wgc(update).apply(&self.iface, Backend::Kernel).map_err(|e| self.io("apply", e))
    }

    fn shutdown(&mut self, keep: bool) -> Result<(), WgError> {
        if !keep {
            self.rtnl.delete_link(&self.ifname)?;
            tracing::info!(ifname = %self.ifname, "deleted kernel WireGuard link");
        }
        Ok(())
    }
}
