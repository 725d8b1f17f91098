//! The guest's whole userland as one initramfs: busybox for the shell and
//! the mounts, the real iproute2/iputils/procps/wireguard-tools the tests
//! call, the kernel modules, the test binaries at their host paths, the ldd
//! closure of every dynamic binary, the `outb` helper and `/init`.

use std::{
    collections::BTreeMap,
    fs::File,
    io::BufWriter,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::cpio;

/// Where busybox and its applets live in the guest: last in `PATH`, so the
/// real tools win over busybox's smaller `ip`, `tc`, `ping` and `sysctl`.
pub(crate) const BUSYBOX_DIR: &str = "/busybox";

/// Host tools the tests run, copied at their real paths with their ldd
/// closure (the tests find them through `PATH`).
pub(crate) const HOST_TOOLS: &[&str] = &["ip", "tc", "ping", "sysctl", "wg"];

/// The `PATH` of every process in the guest.
pub(crate) const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/busybox";

#[derive(Debug)]
enum Node {
    Dir,
    Symlink(PathBuf),
    /// A host file copied in (`perm` from the host unless overridden).
    File {
        source: PathBuf,
        perm: u32,
    },
    Data {
        bytes: Vec<u8>,
        perm: u32,
    },
}

/// The guest's file tree, keyed by absolute guest path; written in path
/// order, so every directory comes before its entries.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    nodes: BTreeMap<PathBuf, Node>,
}

impl Tree {
    pub(crate) fn dir(&mut self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        self.parents(path);
        self.nodes.entry(path.to_owned()).or_insert(Node::Dir);
    }

    pub(crate) fn symlink(&mut self, path: impl AsRef<Path>, target: impl Into<PathBuf>) {
        let path = path.as_ref();
        self.parents(path);
        self.nodes.insert(path.to_owned(), Node::Symlink(target.into()));
    }

    pub(crate) fn data(&mut self, path: impl AsRef<Path>, bytes: impl Into<Vec<u8>>, perm: u32) {
        let path = path.as_ref();
        self.parents(path);
        self.nodes.insert(path.to_owned(), Node::Data { bytes: bytes.into(), perm });
    }

    /// Puts the host file `source` at `path` in the guest.
    pub(crate) fn file_from(&mut self, path: impl AsRef<Path>, source: impl Into<PathBuf>) -> anyhow::Result<()> {
        let source = source.into();
        let perm = std::fs::metadata(&source).with_context(|| format!("{}", source.display()))?.permissions().mode();
        let path = path.as_ref();
        self.parents(path);
        self.nodes.insert(path.to_owned(), Node::File { source, perm });
        Ok(())
    }

    /// Copies the host path into the guest as the guest will look it up:
    /// every symlink on the way (`/lib64` → `usr/lib64`, `libz.so.1` →
    /// `libz.so.1.2.13`) is recreated and followed, then the file itself.
    pub(crate) fn host_path(&mut self, path: &Path) -> anyhow::Result<()> {
        self.host_path_depth(path, 0)
    }

    fn host_path_depth(&mut self, path: &Path, depth: u32) -> anyhow::Result<()> {
        if depth > 40 {
            bail!("{}: too many levels of symbolic links", path.display());
        }
        let mut walked = PathBuf::from("/");
        let components: Vec<Component<'_>> = path.components().collect();
        for (i, component) in components.iter().enumerate().skip(1) {
            walked.push(component);
            let meta = std::fs::symlink_metadata(&walked).with_context(|| format!("{}", walked.display()))?;
            if meta.is_symlink() {
                let target = std::fs::read_link(&walked)?;
                self.symlink(&walked, &target);
                // `walked`'s parent is a real directory here, so resolving
                // `..` lexically is exact.
                let mut next = normalize(&walked.parent().unwrap_or(Path::new("/")).join(&target));
                next.extend(&components[i + 1..]);
                return self.host_path_depth(&next, depth + 1);
            }
            if meta.is_dir() {
                self.dir(&walked);
            } else if i + 1 == components.len() {
                return self.file_from(&walked, &walked);
            } else {
                bail!("{}: not a directory", walked.display());
            }
        }
        Ok(())
    }

    /// Adds `binary` and the shared libraries and loader it needs.
    pub(crate) fn with_libraries(&mut self, binary: &Path) -> anyhow::Result<()> {
        for library in ldd(binary)? {
            self.host_path(&library)?;
        }
        Ok(())
    }

    fn parents(&mut self, path: &Path) {
        for ancestor in path.ancestors().skip(1) {
            if ancestor == Path::new("/") {
                break;
            }
            self.nodes.entry(ancestor.to_owned()).or_insert(Node::Dir);
        }
    }

    /// Where `path` ends up once the symlinks among its parents (`/lib` →
    /// `usr/lib` on a merged-/usr host) are followed: the kernel's initramfs
    /// unpacker does not follow them, so entries are written at that path.
    fn resolve(&self, path: &Path) -> PathBuf {
        let mut out = PathBuf::from("/");
        let Some(parent) = path.parent() else { return out };
        for component in parent.components().skip(1) {
            out.push(component);
            for _ in 0..40 {
                let Some(Node::Symlink(target)) = self.nodes.get(&out) else { break };
                out = normalize(&out.parent().unwrap_or(Path::new("/")).join(target));
            }
        }
        out.join(path.file_name().unwrap_or_default())
    }

    /// Writes the tree as a newc archive.
    pub(crate) fn write(&self, out: &Path) -> anyhow::Result<u64> {
        let mut entries: BTreeMap<PathBuf, &Node> = BTreeMap::new();
        for (path, node) in &self.nodes {
            let at = self.resolve(path);
            if matches!(node, Node::Dir) {
                entries.entry(at).or_insert(node);
            } else {
                entries.insert(at, node);
            }
        }
        // Symlink targets' directories (`usr/lib` for `/lib`) may exist only
        // through the entries just moved below them.
        let dirs: Vec<PathBuf> = entries.keys().flat_map(|p| p.ancestors().skip(1).map(Path::to_path_buf)).collect();
        for dir in dirs {
            if dir != Path::new("/") {
                entries.entry(dir).or_insert(&Node::Dir);
            }
        }
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, file));
        for (path, node) in entries {
            let name = path.strip_prefix("/").unwrap_or(&path).to_string_lossy();
            match node {
                Node::Dir => w.dir(&name)?,
                Node::Symlink(target) => w.symlink(&name, &target.to_string_lossy())?,
                Node::Data { bytes, perm } => w.file(&name, *perm, &mut bytes.as_slice(), bytes.len() as u64)?,
                Node::File { source, perm } => {
                    let mut f = File::open(source).with_context(|| format!("opening {}", source.display()))?;
                    let size = f.metadata()?.len();
                    w.file(&name, *perm, &mut f, size).with_context(|| format!("packing {}", source.display()))?;
                }
            }
        }
        let file = w.finish()?.into_inner().map_err(|e| e.into_error())?;
        Ok(file.metadata()?.len())
    }
}

/// Resolves `.` and `..` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The shared libraries (and the loader) `binary` loads, per `ldd`. A
/// static binary has none.
fn ldd(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("=> not found") {
            bail!("missing library: {line}");
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Finds a program on the host's `PATH` (where `which` would).
pub(crate) fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return Ok(candidate);
        }
    }
    bail!("`{program}` is not installed on the host (`cargo xtask setup` installs the VM's tools)")
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{Tree, normalize, parse_ldd};

    #[test]
    fn ldd_output_to_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
        assert!(parse_ldd("\tlibnope.so.1 => not found\n").is_err());
    }

    #[test]
    fn dotdot_is_resolved() {
        assert_eq!(normalize(Path::new("/usr/lib/../lib64/./ld.so")), PathBuf::from("/usr/lib64/ld.so"));
    }

    #[test]
    fn archive_has_parents_before_children() {
        let dir = tempdir();
        let mut tree = Tree::default();
        tree.data("/usr/bin/tool", "x", 0o755);
        // Added under /bin before /bin became a symlink: lands in usr/bin.
        tree.data("/bin/other", "y", 0o755);
        tree.symlink("/bin", "usr/bin");
        tree.data("/lib/modules/m.ko", "z", 0o644);
        tree.symlink("/lib", "/usr/lib");
        let out = dir.join("a.cpio");
        tree.write(&out).unwrap();
        let names = names(&std::fs::read(&out).unwrap());
        assert_eq!(
            names,
            [
                "bin",
                "lib",
                "usr",
                "usr/bin",
                "usr/bin/other",
                "usr/bin/tool",
                "usr/lib",
                "usr/lib/modules",
                "usr/lib/modules/m.ko",
                "TRAILER!!!"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The entry names of a newc archive, in order.
    fn names(archive: &[u8]) -> Vec<String> {
        let field = |at: usize, i: usize| {
            usize::from_str_radix(std::str::from_utf8(&archive[at + 6 + 8 * i..][..8]).unwrap(), 16).unwrap()
        };
        let (mut at, mut names) = (0, Vec::new());
        while at < archive.len() {
            let (size, namesize) = (field(at, 6), field(at, 11));
            names.push(String::from_utf8(archive[at + 110..at + 110 + namesize - 1].to_vec()).unwrap());
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
        names
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-vm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
