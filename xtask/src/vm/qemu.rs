//! Booting the guest under qemu (TCG: KVM does not work on these machines)
//! and streaming its serial console.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::report::VmExit;
use crate::cmd;

/// Guest memory: the initramfs (unpacked into RAM), the tests and their
/// namespaces.
const MEMORY: &str = "2G";

/// Boots `vmlinuz` with `initrd`, calls `on_line` for every console line
/// (without its line end) as it arrives, and returns how the VM ended. The
/// VM is killed after `timeout`.
pub(crate) fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<VmExit> {
    let mut command = Command::new("qemu-system-x86_64");
    command
        // `qemu64` is about 2.5x faster than `max` under TCG; two vCPUs
        // because TCG runs one host thread per vCPU.
        .args(["-accel", "tcg,thread=multi", "-cpu", "qemu64", "-m", MEMORY, "-smp", "2"])
        .args(["-nic", "none", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1: a panic reboots at once, and -no-reboot turns that into
        // qemu exiting (status 0: "no report").
        .args(["-append", "console=ttyS0 quiet panic=-1 oops=panic"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let line = cmd::describe(&command);
    eprintln!("xtask: $ {line}");
    let mut child =
        command.spawn().with_context(|| format!("could not start `{line}` (is qemu-system-x86 installed?)"))?;
    let stdout = child.stdout.take().context("qemu's stdout")?;

    // A reader thread, so a silent hung guest still meets the timeout.
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut buf = Vec::new();
        while stdout.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&buf);
            if tx.send(text.trim_end_matches(['\n', '\r']).to_owned()).is_err() {
                break;
            }
            buf.clear();
        }
    });

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(text) => on_line(&text),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !timed_out && Instant::now() > deadline {
            eprintln!("xtask: the VM ran longer than {timeout:?}: killing it");
            let _ = child.kill();
            timed_out = true;
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    let _ = reader.join();
    if timed_out {
        return Ok(VmExit::TimedOut);
    }
    Ok(match status.code() {
        Some(code) => VmExit::from_status(code),
        None => VmExit::Qemu(-1),
    })
}
