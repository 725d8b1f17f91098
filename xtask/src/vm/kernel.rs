//! The guest kernel: Debian's cloud kernel package installed on the host
//! (`linux-image-cloud-amd64`), found at run time, and the closure of the
//! modules the tests need from its `modules.dep`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Modules the VM tests need, loaded at boot (with their dependencies) so
/// that no test relies on the kernel's on-demand module loading.
pub(crate) const MODULES: &[&str] = &[
    "wireguard",   // the kernel WireGuard backend
    "veth",        // lab links
    "bridge",      // lab switches
    "sch_ingress", // clsact qdisc (TC ingress/egress programs)
    "cls_bpf",     // TC BPF classifier
    "act_bpf",     // TC BPF action (tc filter ... bpf da)
    "tun",         // the userspace WireGuard backend's TUN device
    "dummy",       // spare interfaces for tests
];

/// An installed kernel with its modules.
#[derive(Debug)]
pub(crate) struct Kernel {
    /// `uname -r` of the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub(crate) release: String,
    pub(crate) vmlinuz: PathBuf,
    /// `/lib/modules/<release>`.
    pub(crate) modules_dir: PathBuf,
}

impl Kernel {
    /// Finds the newest kernel under `/lib/modules` that has a bootable image
    /// in `/boot` and a WireGuard module. The version is never hard-coded:
    /// Debian's point releases change it.
    pub(crate) fn find() -> anyhow::Result<Self> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/lib/modules").context("reading /lib/modules")? {
            let release = entry?.file_name().to_string_lossy().into_owned();
            let kernel = Self {
                vmlinuz: PathBuf::from(format!("/boot/vmlinuz-{release}")),
                modules_dir: Path::new("/lib/modules").join(&release),
                release,
            };
            let has_wg = std::fs::read_to_string(kernel.modules_dir.join("modules.dep"))
                .is_ok_and(|dep| dep.lines().any(|l| module_name(l.split(':').next().unwrap_or("")) == "wireguard"));
            if kernel.vmlinuz.is_file() && has_wg {
                found.push(kernel);
            }
        }
        found.sort_by_key(|k| version_key(&k.release));
        found.pop().context(
            "no kernel with WireGuard under /lib/modules with its /boot/vmlinuz-*: `cargo xtask setup` installs \
             linux-image-cloud-amd64",
        )
    }

    /// The module files (relative to [`Kernel::modules_dir`]) to load, in
    /// load order, for `wanted` and everything they depend on.
    pub(crate) fn module_closure(&self, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
        let path = self.modules_dir.join("modules.dep");
        let dep = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        closure(&dep, wanted)
    }
}

/// Orders `wanted` and their dependencies from a `modules.dep` text so that
/// every module comes after the modules it needs.
pub(crate) fn closure(modules_dep: &str, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((file, rest)) = line.split_once(':') else { continue };
        let needs = rest.split_whitespace().map(|d| module_name(d).to_owned()).collect();
        deps.insert(module_name(file).to_owned(), (file.to_owned(), needs));
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(&deps, &name.replace('-', "_"), &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    deps: &BTreeMap<String, (String, Vec<String>)>,
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let Some((file, needs)) = deps.get(name) else {
        bail!("module {name} is not in modules.dep (built into this kernel, or missing from the package?)");
    };
    for need in needs {
        visit(deps, need, seen, order)?;
    }
    order.push(file.clone());
    Ok(())
}

/// `kernel/net/sched/sch_ingress.ko` → `sch_ingress` (the kernel treats `-`
/// and `_` in module names alike).
fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Sorts `6.1.0-56-cloud-amd64` after `6.1.0-9-cloud-amd64`.
fn version_key(release: &str) -> Vec<(u64, String)> {
    release.split(['.', '-']).map(|part| (part.parse().unwrap_or(0), part.to_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::{closure, version_key};

    const DEP: &str = "\
kernel/drivers/net/wireguard/wireguard.ko: kernel/lib/crypto/libchacha20poly1305.ko kernel/net/ipv4/udp_tunnel.ko kernel/lib/crypto/libchacha.ko
kernel/lib/crypto/libchacha20poly1305.ko: kernel/lib/crypto/libchacha.ko
kernel/lib/crypto/libchacha.ko:
kernel/net/ipv4/udp_tunnel.ko:
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
kernel/arch/x86/crypto/curve25519-x86_64.ko:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let order = closure(DEP, &["wireguard", "bridge", "curve25519-x86_64"]).unwrap();
        let pos = |m: &str| order.iter().position(|f| f.ends_with(m)).unwrap();
        assert!(pos("/libchacha.ko") < pos("/libchacha20poly1305.ko"));
        assert!(pos("/libchacha20poly1305.ko") < pos("/wireguard.ko"));
        assert!(pos("/udp_tunnel.ko") < pos("/wireguard.ko"));
        assert!(pos("/llc.ko") < pos("/stp.ko") && pos("/stp.ko") < pos("/bridge.ko"));
        assert_eq!(order.len(), 8);
        assert!(order.contains(&"kernel/arch/x86/crypto/curve25519-x86_64.ko".to_owned()));
    }

    #[test]
    fn unknown_module_is_an_error() {
        let err = closure(DEP, &["nosuch"]).unwrap_err();
        assert!(err.to_string().contains("nosuch"), "{err}");
    }

    #[test]
    fn releases_sort_numerically() {
        assert!(version_key("6.1.0-56-cloud-amd64") > version_key("6.1.0-9-cloud-amd64"));
        assert!(version_key("6.10.0-1-cloud-amd64") > version_key("6.9.0-1-cloud-amd64"));
    }
}
