//! Test support: talk to a socket as another user, the way a local
//! attacker would.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use nix::{
    sys::wait::{WaitStatus, waitpid},
    unistd::{ForkResult, Gid, Uid, fork, setgid, setgroups, setuid},
};

/// The uid tests use as "someone else" (nobody).
pub const NOBODY: u32 = 65534;

/// What a connection attempt got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `connect` itself failed with EACCES: the file mode kept us out.
    Denied,
    /// Connected, but the server closed without a byte.
    Closed,
    /// The server answered.
    Answered,
    /// Anything else (see the child's exit code).
    Other(i32),
}

/// Connects to `socket` as `uid`/`uid` (group too, no supplementary
/// groups) from a forked child, sends `request`, and reports whether the
/// server answered. Needs root.
///
/// # Panics
///
/// When fork or wait fail.
pub fn connect_as(uid: u32, socket: &Path, request: &[u8]) -> Outcome {
    // SAFETY: the child only makes system calls (setgroups, setgid, setuid,
    // socket, connect, write, read) and `_exit`s; it never returns into the
    // test harness, allocates nothing and takes no lock.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = child(uid, socket, request);
            // SAFETY: leaves the forked child without running the parent's
            // atexit handlers or destructors.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, 0) => Outcome::Answered,
            WaitStatus::Exited(_, 10) => Outcome::Denied,
            WaitStatus::Exited(_, 11) => Outcome::Closed,
            WaitStatus::Exited(_, c) => Outcome::Other(c),
            other => Outcome::Other(-(other.pid().map_or(1, nix::unistd::Pid::as_raw))),
        },
    }
}

fn child(uid: u32, socket: &Path, request: &[u8]) -> i32 {
    if setgroups(&[]).is_err() || setgid(Gid::from_raw(uid)).is_err() || setuid(Uid::from_raw(uid)).is_err() {
        return 20;
    }
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(nix::libc::EACCES) => return 10,
        Err(_) => return 21,
    };
    if s.set_read_timeout(Some(Duration::from_secs(10))).is_err() {
        return 22;
    }
    // A refused peer may be closed before the request goes out (EPIPE):
    // what counts is whether anything comes back.
    let _ = s.write_all(request);
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => 11,
        Ok(_) => 0,
        Err(e) if e.raw_os_error() == Some(nix::libc::ECONNRESET) => 11,
        Err(_) => 23,
    }
}
