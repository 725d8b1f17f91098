//! Local files and sockets that hold authority over a node: the admin
//! sockets of mesh-control and mesh-agent, the userspace WireGuard engine's
//! UAPI socket (it can read the private key), and secret files (tokens,
//! enrollment keys).
//!
//! - [`socket::bind_private`] binds a unix socket that only its owner can
//!   connect to, with no window in which it is reachable with other
//!   permissions, and [`socket::PrivateListener`] refuses peers whose uid is
//!   neither root nor ours (`SO_PEERCRED`), should the file mode ever be
//!   loosened.
//! - [`atomic::write`] replaces a file atomically and durably (temporary
//!   file, fsync, rename, fsync of the directory).
//! - [`secret_file`] writes secrets 0600 (atomically, whatever the umask)
//!   and refuses to read one that group or others can read.

pub mod atomic;
pub mod secret_file;
pub mod socket;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
