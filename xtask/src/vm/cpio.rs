//! A writer for the "newc" cpio format, the one format the kernel unpacks
//! as an initramfs. Written here rather than shelling out to `cpio` so the
//! archive's layout (paths, modes, owners) does not depend on the host's
//! files: everything is owned by root, and files are streamed from disk.

use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const TRAILER: &str = "TRAILER!!!";

/// Writes entries of one newc archive to `out`.
#[derive(Debug)]
pub(crate) struct Writer<W: Write> {
    out: W,
    /// Bytes written so far (entries are 4-byte aligned).
    written: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    pub(crate) fn new(out: W) -> Self {
        Self { out, written: 0, next_ino: 1 }
    }

    /// A directory; `name` is relative to the archive root (no leading `/`).
    pub(crate) fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, S_IFDIR | 0o755, 2, 0)?;
        Ok(())
    }

    /// A symbolic link pointing at `target`.
    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, 1, target.len() as u64)?;
        self.data(&mut target.as_bytes(), target.len() as u64)
    }

    /// A regular file of `size` bytes read from `content`.
    pub(crate) fn file(&mut self, name: &str, perm: u32, content: &mut impl Read, size: u64) -> io::Result<()> {
        self.header(name, S_IFREG | (perm & 0o7777), 1, size)?;
        self.data(content, size)
    }

    /// Ends the archive and returns the underlying writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| io::Error::other(format!("{name}: too large for cpio")))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check. mtime 0 keeps archives
        // reproducible.
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn data(&mut self, content: &mut impl Read, size: u64) -> io::Result<()> {
        let copied = io::copy(&mut content.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("expected {size} bytes, got {copied}")));
        }
        self.written += size;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..pad as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::Writer;

    #[test]
    fn entries_are_newc_and_aligned() {
        let mut w = Writer::new(Vec::new());
        w.dir("bin").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, &mut &b"#!/bin/sh\n"[..], 10).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // The first header: ino 1, a directory 0755, namesize 4 ("bin\0").
        let h = std::str::from_utf8(&out[..110]).unwrap();
        assert_eq!(&h[6..14], "00000001");
        assert_eq!(&h[14..22], "000041ED");
        assert_eq!(&h[94..102], "00000004");
        assert_eq!(&out[110..114], b"bin\0");
        // 110 + 4 bytes, padded to 116: the next header starts there.
        assert_eq!(&out[114..116], b"\0\0");
        assert_eq!(&out[116..122], b"070701");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin/sh\0"));
        assert!(text.contains("#!/bin/sh\n"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn short_content_is_an_error() {
        let mut w = Writer::new(Vec::new());
        assert!(w.file("x", 0o644, &mut &b"abc"[..], 4).is_err());
    }
}
