//! A lab host: one network namespace, and what can be done inside it.

use std::{
    ffi::OsStr,
    fs::File,
    process::{Command, Output, Stdio},
};

use crate::{Lab, LabError, Process, Result, cmd};

/// A host of a [`Lab`]: a network namespace. Holding a host keeps its lab
/// alive.
#[derive(Clone, Debug)]
pub struct Host {
    lab: Lab,
    name: String,
    netns: String,
}

impl Host {
    pub(crate) fn new(lab: Lab, name: String, netns: String) -> Self {
        Self { lab, name, netns }
    }

    /// The host's short name, as given to [`Lab::host`].
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name (under `/run/netns`).
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The lab this host belongs to.
    #[must_use]
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Runs `ip -n <netns> ARGS` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = cmd::run(Command::new("ip").arg("-n").arg(&self.netns).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets an interface up.
    pub fn up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Sets an interface down.
    pub fn down(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "down"]).map(drop)
    }

    /// Adds an address (`"192.0.2.1/24"`, `"fd00::1/64"`) to an interface.
    /// IPv6 addresses skip duplicate address detection (lab addresses are
    /// unique by construction, and a tentative address would delay tests).
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            return self.ip(&["addr", "replace", cidr, "dev", dev, "nodad"]).map(drop);
        }
        self.ip(&["addr", "replace", cidr, "dev", dev]).map(drop)
    }

    /// Adds (or replaces) a route to `dst` via the gateway `via`.
    pub fn route_via(&self, dst: &str, via: &str) -> Result<()> {
        reject_default(dst)?;
        self.ip(&[family(dst), "route", "replace", dst, "via", via]).map(drop)
    }

    /// Adds (or replaces) a route to `dst` out of interface `dev`.
    pub fn route_dev(&self, dst: &str, dev: &str) -> Result<()> {
        reject_default(dst)?;
        self.ip(&[family(dst), "route", "replace", dst, "dev", dev]).map(drop)
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.exec("cat", [format!("/sys/class/net/{dev}/address")])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes: Option<Vec<u8>> = text.trim().split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect();
        bytes.and_then(|b| <[u8; 6]>::try_from(b).ok()).ok_or_else(|| LabError::Sys {
            what: format!("parsing the MAC address of {dev} ({text:?})"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })
    }

    /// Sets a sysctl inside the namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", ["-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Turns IPv4 and IPv6 forwarding on: the host routes between its links.
    pub fn forwarding(&self) -> Result<()> {
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")
    }

    /// Drops (or, `on` false, stops dropping) all UDP through `dev`, both
    /// ways (nftables table `udpblock`): a provider that blocks UDP.
    /// Loopback and the other links are untouched.
    pub fn block_udp(&self, dev: &str, on: bool) -> Result<()> {
        if !on {
            self.exec("nft", ["delete", "table", "inet", "udpblock"])?;
            return Ok(());
        }
        self.exec("nft", ["add", "table", "inet", "udpblock"])?;
        for (chain, hook, dir) in [("in", "input", "iifname"), ("out", "output", "oifname")] {
            let spec = format!("{{ type filter hook {hook} priority -10; }}");
            self.exec("nft", ["add", "chain", "inet", "udpblock", chain, &spec])?;
            self.exec("nft", ["add", "rule", "inet", "udpblock", chain, dir, dev, "meta", "l4proto", "udp", "drop"])?;
        }
        Ok(())
    }

    /// Builds `ip netns exec <netns> PROGRAM ARGS`, for callers that need to
    /// set pipes or the environment themselves.
    pub fn command<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]).args(args);
        cmd
    }

    /// Runs a program inside the namespace to completion; an unsuccessful
    /// exit is an error carrying its stderr.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(cmd::run(&mut self.command(program, args))?)
    }

    /// Whether a socket in the namespace listens on TCP `port` (a server
    /// the test started is ready to accept).
    #[must_use]
    pub fn tcp_listening(&self, port: u16) -> bool {
        self.exec_unchecked("ss", ["-Hltn", &format!("sport = :{port}")])
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
    }

    /// Runs a program inside the namespace to completion, whatever its exit
    /// status (for commands expected to fail, such as a blocked `ping`).
    pub fn exec_unchecked<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(cmd::run_unchecked(&mut self.command(program, args))?)
    }

    /// Starts a program inside the namespace (stdout and stderr piped). It is
    /// killed when the returned [`Process`] or the lab is dropped.
    pub fn spawn<I, S>(&self, program: &str, args: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.command(program, args);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        self.spawn_command(command)
    }

    /// Starts a prepared command (from [`Host::command`]).
    pub fn spawn_command(&self, mut command: Command) -> Result<Process> {
        let described = cmd::describe(&command);
        let child = command
            .spawn()
            .map_err(|e| cmd::CmdError { command: described.clone(), failure: format!("could not start: {e}") })?;
        Ok(Process { child: Some(child), command: described })
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns
    /// its result. Sockets and threads that `f` creates stay in the namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = self.netns_file()?;
        let thread = std::thread::Builder::new()
            .name(format!("lab-{}", self.name))
            .spawn(move || -> Result<T> {
                enter(&file)?;
                Ok(f())
            })
            .map_err(|source| LabError::Sys { what: "spawning a lab thread".into(), source })?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Moves the calling thread into this namespace for good. Use on a
    /// dedicated thread only.
    pub fn enter_current_thread(&self) -> Result<()> {
        enter(&self.netns_file()?)
    }

    fn netns_file(&self) -> Result<File> {
        let path = format!("/run/netns/{}", self.netns);
        File::open(&path).map_err(|source| LabError::Sys { what: format!("opening {path}"), source })
    }
}

fn enter(file: &File) -> Result<()> {
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| LabError::Sys { what: "setns(CLONE_NEWNET)".into(), source: e.into() })
}

fn family(cidr: &str) -> &'static str {
    if cidr.contains(':') { "-6" } else { "-4" }
}

/// Lab hosts never get a route out of the lab.
fn reject_default(dst: &str) -> Result<()> {
    if matches!(dst, "default" | "0.0.0.0/0" | "::/0") {
        return Err(LabError::Name { name: dst.to_owned(), why: "lab hosts never get a default route" });
    }
    Ok(())
}
