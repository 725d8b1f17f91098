//! The agent runtime: builds the backends from the configuration, re-applies
//! the persisted view at startup (fail-static), then runs the reconcile loop
//! on its own thread while the admin socket and signals are served on a
//! small tokio runtime.
//!
//! The reconcile thread owns all state; everything else talks to it through
//! a channel, so runs never overlap.

use std::{path::Path, sync::mpsc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    sync::oneshot,
};

use crate::{
    admin::{Request, Response},
    config::{Config, Enforcement},
    enforce::DataplaneEnforcer,
    keys::{self, KeyError},
    net::{NetError, rtnl::Rtnl},
    reconcile::{
        Applier, ApplyError, Local, PolicyEnforcer, Report,
        worker::{Command, WorkerHandle},
    },
    state::{StateError, StateStore},
    status::{LastRun, Status, unix_now},
    view::NodeView,
    wg::{
        self, BackendKind, Selection, WgError, WireGuard,
        handshake::HandshakeTimes,
        kernel::KernelWg,
        select::SelectError,
        userspace::{UserspaceOptions, UserspaceWg},
    },
};

/// Errors starting or running the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The private key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The state store.
    #[error(transparent)]
    State(#[from] StateError),
    /// Backend selection.
    #[error(transparent)]
    Select(#[from] SelectError),
    /// A WireGuard backend.
    #[error(transparent)]
    Wg(#[from] WgError),
    /// Netlink.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The requested enforcement is not available.
    #[error("{0}")]
    Enforcement(String),
    /// The admin socket or the runtime.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The reconcile thread is gone.
    #[error("the reconcile thread stopped")]
    WorkerGone,
    /// Binding the admin socket.
    #[error(transparent)]
    AdminSocket(#[from] mesh_local::socket::BindError),
}

/// Builds the policy enforcer the configuration asks for: the eBPF
/// dataplane pinned under `<bpf_pin_dir>/<interface>`, or none (logged).
fn enforcer(config: &Config) -> Result<Option<Box<dyn PolicyEnforcer>>, AgentError> {
    match config.enforcement {
        Enforcement::Off => {
            tracing::warn!("policy enforcement is OFF (enforcement = \"off\"): the overlay is not filtered");
            Ok(None)
        }
        Enforcement::Ebpf => {
            let pin_dir = config.bpf_pin_dir.join(&config.interface);
            let underlay = config.underlay_interface.clone().map(|i| (i, config.listen_port));
            let e = DataplaneEnforcer::open(&pin_dir, underlay).map_err(|e| {
                AgentError::Enforcement(format!("opening the eBPF dataplane at {}: {e}", pin_dir.display()))
            })?;
            Ok(Some(Box::new(e)))
        }
    }
}

/// Control's addresses (`host:port`, resolved now; a name that does not
/// resolve yet gives none, and the connected-network exceptions still keep
/// an on-link control reachable).
fn control_addrs(address: &str) -> Vec<std::net::IpAddr> {
    use std::net::ToSocketAddrs as _;
    match address.to_socket_addrs() {
        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
        Err(e) => {
            tracing::warn!(%address, error = %e, "control's address does not resolve: no routing exception for it");
            Vec::new()
        }
    }
}

/// Builds the WireGuard backend for a selection, in the calling thread's
/// network namespace.
pub fn backend(config: &Config, selection: &Selection) -> Result<Box<dyn WireGuard>, AgentError> {
    Ok(match selection.kind {
        BackendKind::Kernel => Box::new(KernelWg::new(&config.interface)?),
        BackendKind::Userspace => Box::new(UserspaceWg::new(
            &config.interface,
            UserspaceOptions {
                udp_recv_buffer: Some(config.udp_recv_buffer),
                udp_send_buffer: Some(config.udp_send_buffer),
                threads: config.engine_threads,
                tun_offload: config.tun_offload,
                udp_gso: config.udp_gso,
            },
        )?),
    })
}

/// Chooses the backend as configured (probing the kernel unless forced to
/// userspace) and logs the choice.
pub fn choose_backend(config: &Config) -> Result<Selection, AgentError> {
    let selection = wg::select(config.backend, wg::probe_kernel)?;
    tracing::info!(mode = ?config.backend, backend = %selection.kind, reason = %selection.reason, "WireGuard backend selected");
    Ok(selection)
}

/// One node's agent: configuration, backends, state.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    selection: Selection,
    applier: Applier,
    store: StateStore,
    /// The view being converged to.
    desired: Option<NodeView>,
    /// The last view applied and confirmed (what `applied.json` holds).
    applied: Option<NodeView>,
    last_run: Option<LastRun>,
    failures: u32,
    /// Handshake times, fed at each status read.
    handshakes: HandshakeTimes,
}

impl Agent {
    /// Builds the agent: state directory, private key, backend selection,
    /// backends. Loads the last applied view (not applied yet: see
    /// [`Agent::startup`]).
    pub fn new(config: Config) -> Result<Self, AgentError> {
        let store = StateStore::open(&config.state_dir)?;
        let private_key = keys::load_or_generate(&config.private_key_path())?;
        tracing::info!(public_key = %private_key.public_key(), interface = %config.interface, "mesh-agent starting");
        let selection = choose_backend(&config)?;
        let wg = backend(&config, &selection)?;
        let enforcer = enforcer(&config)?;
        let local = Local {
            private_key,
            listen_port: Some(config.listen_port).filter(|&p| p != 0),
            fwmark: Some(config.fwmark).filter(|&m| m != 0),
            enforce_policy: false,
            routing: crate::reconcile::Routing { table: config.route_table, priority: config.rule_priority },
            control_addrs: config
                .control
                .as_ref()
                .map(|c| c.addresses().iter().flat_map(|a| control_addrs(a)).collect())
                .unwrap_or_default(),
        };
        let applier = Applier::new(local, wg, Box::new(Rtnl::new()?), enforcer);
        let applied = store.load_applied()?;
        Ok(Self {
            config,
            selection,
            applier,
            store,
            desired: applied.clone(),
            applied,
            last_run: None,
            failures: 0,
            handshakes: HandshakeTimes::default(),
        })
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Re-applies the persisted view, if any (fail-static after a restart:
    /// the mesh and the policy come back without control). A failure is
    /// logged and retried by the loop.
    pub fn startup(&mut self) {
        match &self.desired {
            Some(v) => {
                tracing::info!(generation = v.generation, "re-applying the last applied node view");
                if let Err(e) = self.reconcile() {
                    tracing::error!(error = %e, "re-applying the persisted view failed; will retry");
                }
            }
            None => tracing::info!("no node view applied yet: waiting for one"),
        }
    }

    /// Makes `view` the desired state and reconciles. A view older than the
    /// current desired one (same epoch, lower generation) is refused; a view
    /// of another epoch (a new stream's snapshot) replaces it whatever its
    /// generation.
    pub fn apply(&mut self, view: NodeView) -> Result<Report, String> {
        if let Some(d) = &self.desired
            && view.epoch == d.epoch
            && view.generation != 0
            && view.generation < d.generation
        {
            return Err(format!(
                "refusing generation {}: generation {} is already desired",
                view.generation, d.generation
            ));
        }
        view.validate(&self.applier.public_key()).map_err(|e| e.to_string())?;
        self.desired = Some(view);
        self.reconcile().map_err(|e| e.to_string())
    }

    /// Reconciles the desired view now; persists it once confirmed.
    pub fn reconcile(&mut self) -> Result<Report, ApplyError> {
        let Some(view) = self.desired.clone() else {
            return Err(ApplyError::View(crate::view::ViewError::Invalid("no node view to apply yet".into())));
        };
        let result = self.applier.reconcile(&view);
        match &result {
            Ok(report) => {
                if self.failures > 0 {
                    tracing::info!(failures = self.failures, "reconcile recovered");
                }
                self.failures = 0;
                if self.applied.as_ref() != Some(&view) {
                    if let Err(e) = self.store.save_applied(&view) {
                        tracing::error!(error = %e, "could not persist the applied view");
                    }
                    self.applied = Some(view);
                }
                if !report.changes.is_empty() {
                    tracing::info!(generation = report.generation, changes = ?report.changes, duration_ms = report.duration.as_secs_f64() * 1e3, "reconciled");
                }
                self.last_run = Some(LastRun { at_unix: unix_now(), report: Some(report.clone()), error: None });
            }
            Err(e) => {
                self.failures += 1;
                tracing::error!(error = %e, failures = self.failures, "reconcile failed");
                self.last_run = Some(LastRun { at_unix: unix_now(), report: None, error: Some(e.to_string()) });
            }
        }
        result
    }

    /// The status, with the live state read back now.
    pub fn status(&mut self) -> Status {
        let mut s = Status {
            running: true,
            interface: self.config.interface.clone(),
            backend: Some(self.selection.clone()),
            public_key: Some(self.applier.public_key()),
            policy_enforced: self.applier.enforces_policy(),
            applied_generation: self.applied.as_ref().map(|v| v.generation),
            desired_generation: self.desired.as_ref().map(|v| v.generation),
            consecutive_failures: self.failures,
            last_run: self.last_run.clone(),
            link_up: None,
            mtu: None,
            addresses: vec![],
            routes: vec![],
            peers: vec![],
            observe_error: None,
            dataplane: None,
            handshakes: None,
        };
        s.dataplane = self.applier.dataplane_stats();
        match self.applier.observe() {
            Ok(actual) => {
                s.set_actual(&actual, self.desired.as_ref());
                let peers = actual.wg.peers.iter().map(|(k, p)| (*k, p.last_handshake));
                self.handshakes.observe(std::time::SystemTime::now(), peers);
                s.handshakes = Some(self.handshakes.clone());
            }
            Err(e) => s.observe_error = Some(e.to_string()),
        }
        s
    }

    /// Stops the backends; `keep_dataplane_on_exit` decides whether the
    /// interface stays.
    pub fn shutdown(&mut self) {
        let keep = self.config.keep_dataplane_on_exit;
        if let Err(e) = self.applier.shutdown(keep) {
            tracing::error!(error = %e, "shutdown of the data path failed");
        }
        tracing::info!(kept_dataplane = keep, "mesh-agent stopped");
    }

    fn worker(mut self, rx: mpsc::Receiver<Command>) {
        let secs = |s: f64| Duration::from_secs_f64(s);
        loop {
            let wait = if self.failures > 0 {
                secs(self.config.retry_interval_secs)
            } else {
                secs(self.config.reconcile_interval_secs)
            };
            match rx.recv_timeout(wait) {
                Ok(Command::Apply(view, reply)) => {
                    let _ = reply.send(self.apply(*view));
                }
                Ok(Command::Reconcile(reply)) => {
                    let _ = reply.send(self.reconcile().map_err(|e| e.to_string()));
                }
                Ok(Command::Status(reply)) => {
                    let _ = reply.send(self.status());
                }
                Ok(Command::SetPrivateKey(key, reply)) => {
                    tracing::info!(public_key = %key.public_key(), "switching to the rotated WireGuard key");
                    self.applier.set_private_key(key);
                    // The interface switches with the first view for the new
                    // key: now if control's push came first, else when it comes.
                    let ready = self.desired.as_ref().is_some_and(|v| v.validate(&self.applier.public_key()).is_ok());
                    let _ = reply.send(if ready {
                        self.reconcile().map(|_| ()).map_err(|e| e.to_string())
                    } else {
                        Ok(())
                    });
                }
                Ok(Command::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.desired.is_some() {
                        let _ = self.reconcile();
                    }
                }
            }
        }
        self.shutdown();
    }

    /// Runs until SIGTERM or SIGINT: re-applies the persisted view, then
    /// serves the admin socket and reconciles every
    /// `reconcile_interval_secs` (SIGHUP reconciles at once).
    pub fn run(mut self) -> Result<(), AgentError> {
        self.startup();
        let socket = self.config.admin_socket();
        let config = self.config.clone();
        let public_key = self.applier.public_key();
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || self.worker(rx))
            .map_err(|source| AgentError::Io { what: "starting the reconcile thread".into(), source })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| AgentError::Io { what: "building the runtime".into(), source })?;
        // The site thread (virtual addresses, SNAT) outlives the runtime's
        // tasks so that it cleans up after them, before the data path goes.
        let site = match &config.control {
            Some(cc) => Some(
                crate::site::Site::start(
                    cc.route_options.clone(),
                    config.interface.clone(),
                    config.keep_dataplane_on_exit,
                )
                .map_err(|source| AgentError::Io { what: "starting the site thread".into(), source })?,
            ),
            None => None,
        };
        let (site, owned) = match site {
            Some((s, tx)) => (Some(s), Some(tx)),
            None => (None, None),
        };
        let served = rt.block_on(async {
            let shared = crate::control::SharedControlState::default();
            let probes = crate::probe::SharedProbe::default();
            if let Some(addr) = config.metrics_listen {
                let control = config.control.is_some().then(|| (shared.clone(), probes.clone()));
                tokio::spawn(crate::metrics::serve(addr, WorkerHandle::new(tx.clone()), control));
            }
            if let Some(owned) = owned {
                tokio::spawn(crate::control::run(
                    config,
                    public_key,
                    WorkerHandle::new(tx.clone()),
                    shared,
                    probes,
                    owned,
                ));
            } else {
                tracing::info!("no [control] configured: views come through `mesh-agent apply` only");
            }
            serve(&socket, tx.clone()).await
        });
        drop(rt);
        drop(site);
        let _ = tx.send(Command::Shutdown);
        let _ = worker.join();
        let _ = std::fs::remove_file(&socket);
        served
    }
}

async fn serve(socket: &Path, tx: mpsc::Sender<Command>) -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| AgentError::Io { what, source }
    };
    // `apply` replaces the whole desired state: 0600 from the start and
    // a peer-uid check (root or our uid) keep other local users out.
    let listener = mesh_local::socket::bind_private(socket)?;
    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("SIGHUP handler"))?;
    tracing::info!(socket = %socket.display(), "admin socket ready");
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = hup.recv() => {
                let (reply, _) = oneshot::channel();
                tx.send(Command::Reconcile(reply)).map_err(|_| AgentError::WorkerGone)?;
            }
            conn = listener.accept() => {
                let stream = conn.map_err(io("accepting on the admin socket"))?;
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, tx).await {
                        tracing::warn!(error = %e, "admin connection failed");
                    }
                });
            }
        }
    }
}

async fn handle(stream: tokio::net::UnixStream, tx: mpsc::Sender<Command>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response { error: Some(format!("bad request: {e}")), ..Response::default() },
        Ok(req) => dispatch(req, &tx).await,
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

async fn dispatch(req: Request, tx: &mpsc::Sender<Command>) -> Response {
    let gone = || Response { error: Some("the reconcile thread stopped".into()), ..Response::default() };
    let report = |r: Result<Report, String>| match r {
        Ok(report) => Response { report: Some(report), ..Response::default() },
        Err(e) => Response { error: Some(e), ..Response::default() },
    };
    match req {
        Request::Apply { view } => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Command::Apply(view, reply)).is_err() {
                return gone();
            }
            rx.await.map_or_else(|_| gone(), report)
        }
        Request::Reconcile => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Command::Reconcile(reply)).is_err() {
                return gone();
            }
            rx.await.map_or_else(|_| gone(), report)
        }
        Request::Status => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Command::Status(reply)).is_err() {
                return gone();
            }
            rx.await.map_or_else(|_| gone(), |s| Response { status: Some(Box::new(s)), ..Response::default() })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use mesh_local::testing::{NOBODY, Outcome, connect_as};

    use super::*;

    /// The admin socket (`apply` replaces the desired state) is 0600 under a
    /// permissive umask and refuses another uid even when loosened by hand.
    #[test]
    fn admin_socket_refuses_other_uids() {
        if !mesh_lab::root_or_skip("admin_socket_refuses_other_uids") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("tlo-agent.sock");
        let (tx, rx) = mpsc::channel();
        // Nobody serves the commands: a status request is answered with
        // "the reconcile thread stopped", which is an answer all the same.
        drop(rx);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Own process under nextest: the umask is this test's.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let s = socket.clone();
        rt.spawn(async move { serve(&s, tx).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(std::time::Instant::now() < deadline, "no admin socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        nix::sys::stat::umask(old);
        assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
        let status = b"{\"op\":\"status\"}\n";
        assert_eq!(connect_as(0, &socket, status), Outcome::Answered);
        assert_eq!(connect_as(NOBODY, &socket, status), Outcome::Denied);
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(connect_as(NOBODY, &socket, status), Outcome::Closed);
        assert_eq!(connect_as(0, &socket, status), Outcome::Answered);
    }
}
