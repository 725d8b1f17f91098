//! Reading the guest's console back into results: which binaries ran, how
//! they exited, how many tests passed and failed (libtest's summary lines),
//! and whether the VM's exit code agrees.

use std::time::Duration;

use super::guest::{FATAL, MARK};

/// How one test binary fared in the VM.
#[derive(Debug, Clone)]
pub(crate) struct BinaryResult {
    pub(crate) name: String,
    /// None: it started but the VM ended before it did.
    pub(crate) exit: Option<i32>,
    /// Summed over libtest's `test result:` lines.
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    /// From its `run` line to its `exit` line, by the host's clock.
    pub(crate) took: Option<Duration>,
    started: Duration,
}

/// Everything read from one VM run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) booted: Option<String>,
    /// When `/init` started, since the VM started.
    pub(crate) booted_at: Option<Duration>,
    pub(crate) binaries: Vec<BinaryResult>,
    pub(crate) fatal: Option<String>,
    /// The failed-binary count `/init` printed before powering off.
    pub(crate) done: Option<u32>,
}

impl Report {
    /// Feeds one console line (without its line end) that arrived `at`
    /// (since the VM started).
    pub(crate) fn line(&mut self, line: &str, at: Duration) {
        if let Some(rest) = line.find(MARK).map(|at| line[at + MARK.len()..].trim()) {
            let mut words = rest.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("booted"), release, _) => {
                    self.booted = Some(release.unwrap_or("").to_owned());
                    self.booted_at = Some(at);
                }
                (Some("run"), Some(name), None) => self.binaries.push(BinaryResult {
                    name: name.to_owned(),
                    exit: None,
                    passed: 0,
                    failed: 0,
                    took: None,
                    started: at,
                }),
                (Some("exit"), Some(name), Some(code)) => {
                    if let Some(b) = self.binaries.iter_mut().rev().find(|b| b.name == name) {
                        b.exit = Some(code.trim().parse().unwrap_or(-1));
                        b.took = Some(at.saturating_sub(b.started));
                    }
                }
                (Some("fatal"), ..) => self.fatal = Some(rest["fatal".len()..].trim().to_owned()),
                (Some("done"), Some(n), None) => self.done = n.parse().ok(),
                _ => {}
            }
            return;
        }
        if let (Some(counts), Some(current)) = (line.trim().strip_prefix("test result: "), self.binaries.last_mut()) {
            current.passed += count(counts, "passed");
            current.failed += count(counts, "failed");
        }
    }

    /// The test tally: every libtest pass and failure, plus one failure
    /// for each binary that failed without a libtest failure (a crash, a
    /// panic outside a test, the VM dying under it) and one for a guest
    /// that could not set up or report.
    pub(crate) fn tally(&self, vm_exit: VmExit) -> Tally {
        let mut t = Tally::default();
        for b in &self.binaries {
            t.passed += b.passed;
            t.failed += b.failed;
            let ok = b.exit == Some(0);
            if !ok && b.failed == 0 {
                t.failed += 1;
                t.problems.push(match b.exit {
                    Some(code) => format!("{} exited with {code} without a failed test (crash?)", b.name),
                    None => format!("{} did not finish: the VM ended under it", b.name),
                });
            } else if !ok {
                t.problems.push(format!("{}: {} test(s) failed", b.name, b.failed));
            } else if b.failed > 0 {
                // libtest never exits 0 with failures; trust the failures.
                t.problems.push(format!("{}: exit 0 but {} failed test(s)", b.name, b.failed));
            }
        }
        let failed_binaries = self.binaries.iter().filter(|b| b.exit != Some(0)).count() as u32;
        let problem = match (vm_exit, &self.fatal) {
            (_, Some(why)) => Some(format!("the guest could not start the tests: {why}")),
            (VmExit::Reported(code), None) if u32::from(code) == u32::from(FATAL) => {
                Some("the guest reported a fatal error".to_owned())
            }
            (VmExit::Reported(code), None)
                if u32::from(code) != failed_binaries || self.done != Some(failed_binaries) =>
            {
                Some(format!(
                    "the VM's exit code says {code} binaries failed, its console says {failed_binaries} (lost output?)"
                ))
            }
            (VmExit::Reported(_), None) => None,
            (VmExit::NoReport, None) => {
                Some("the VM powered off or panicked without reporting (see the console above)".to_owned())
            }
            (VmExit::Qemu(code), None) => Some(format!("qemu failed (exit status {code})")),
            (VmExit::TimedOut, None) => Some("the VM timed out and was killed".to_owned()),
        };
        if let Some(problem) = problem {
            t.failed += 1;
            t.problems.push(problem);
        }
        t
    }
}

/// Counts for `cargo xtask test`'s tally.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    /// One line per thing that went wrong.
    pub(crate) problems: Vec<String>,
}

/// How qemu ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmExit {
    /// The guest wrote this value to the isa-debug-exit port.
    Reported(u8),
    /// qemu exited 0: the guest powered off or (with `panic=-1
    /// -no-reboot`) the kernel panicked, without writing to the port.
    NoReport,
    /// qemu itself failed (an even exit status other than 0).
    Qemu(i32),
    TimedOut,
}

impl VmExit {
    /// Decodes qemu's exit status: isa-debug-exit makes it `(value << 1) | 1`.
    pub(crate) fn from_status(code: i32) -> Self {
        match code {
            0 => Self::NoReport,
            c if c & 1 == 1 && (1..=511).contains(&c) => Self::Reported(((c - 1) >> 1) as u8),
            c => Self::Qemu(c),
        }
    }
}

/// `N passed` in `ok. 3 passed; 1 failed; 0 ignored; ...`.
fn count(counts: &str, what: &str) -> u64 {
    counts
        .split(';')
        .filter_map(|part| {
            let mut words = part.split_whitespace().rev();
            let (label, number) = (words.next()?, words.next()?);
            (label == what).then(|| number.parse::<u64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Report, VmExit};

    /// One line per second.
    fn feed(text: &str) -> Report {
        let mut r = Report::default();
        for (i, line) in text.lines().enumerate() {
            r.line(line, Duration::from_secs(i as u64));
        }
        r
    }

    #[test]
    fn exit_codes_decode() {
        assert_eq!(VmExit::from_status(1), VmExit::Reported(0));
        assert_eq!(VmExit::from_status(5), VmExit::Reported(2));
        assert_eq!(VmExit::from_status(255), VmExit::Reported(127));
        assert_eq!(VmExit::from_status(0), VmExit::NoReport);
        assert_eq!(VmExit::from_status(2), VmExit::Qemu(2));
    }

    #[test]
    fn passing_run() {
        let r = feed(
            "@@vm: booted 6.1.0-1-cloud-amd64\n@@vm: run a:counter\nrunning 2 tests\n\
             test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s\n\
             @@vm: exit a:counter 0\n@@vm: run b:lab\n\
             test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.0s\n\
             @@vm: exit b:lab 0\n@@vm: done 0\n",
        );
        assert_eq!(r.booted.as_deref(), Some("6.1.0-1-cloud-amd64"));
        assert_eq!(r.binaries[0].took, Some(Duration::from_secs(3)));
        let t = r.tally(VmExit::Reported(0));
        assert_eq!((t.passed, t.failed), (5, 0), "{:?}", t.problems);
    }

    #[test]
    fn failing_test_and_crash_count() {
        let r = feed(
            "@@vm: run a:counter\r\n\
             test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s\n\
             @@vm: exit a:counter 101\n@@vm: run b:lab\nSegmentation fault\n@@vm: exit b:lab 139\n@@vm: done 2\n",
        );
        let t = r.tally(VmExit::Reported(2));
        assert_eq!((t.passed, t.failed), (1, 2), "{:?}", t.problems);
        // The exit port disagreeing with the console is a failure too.
        assert_eq!(r.tally(VmExit::Reported(0)).failed, 3);
    }

    #[test]
    fn vm_dying_mid_test_fails() {
        let r = feed("@@vm: run a:counter\nKernel panic - not syncing\n");
        let t = r.tally(VmExit::NoReport);
        assert_eq!((t.passed, t.failed), (0, 2), "{:?}", t.problems);
        let r = feed("@@vm: fatal loading kernel/drivers/net/veth.ko\n");
        assert_eq!(r.tally(VmExit::Reported(127)).failed, 1);
    }
}
