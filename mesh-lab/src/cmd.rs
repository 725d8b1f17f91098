//! Running commands and owning the processes they start.

use std::process::{Child, Command, Output};

/// A command that could not be run or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` {failure}")]
pub struct CmdError {
    /// The command line, as run.
    pub command: String,
    /// What went wrong: the exit status and stderr, or the spawn error.
    pub failure: String,
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; an unsuccessful exit is an error carrying stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, CmdError> {
    let output = run_unchecked(cmd)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(CmdError {
            command: describe(cmd),
            failure: format!("failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        })
    }
}

/// Runs `cmd` to completion, whatever its exit status.
pub(crate) fn run_unchecked(cmd: &mut Command) -> Result<Output, CmdError> {
    tracing::debug!(command = %describe(cmd), "lab: run");
    cmd.output().map_err(|e| CmdError { command: describe(cmd), failure: format!("could not start: {e}") })
}

/// A process started in a lab host. Killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Process {
    pub(crate) child: Option<Child>,
    pub(crate) command: String,
}

impl Process {
    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Access to the child (its pipes, `try_wait`).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("process already consumed")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> std::io::Result<std::process::ExitStatus> {
        let mut child = self.child.take().expect("process already consumed");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait()
    }

    /// Waits for the process to exit and collects its output.
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.child.take().expect("process already consumed").wait_with_output()
    }

    /// The command line that started it.
    #[must_use]
    pub fn command(&self) -> &str {
        &self.command
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
