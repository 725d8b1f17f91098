//! The relay ticket signing key (Ed25519), kept like the CA (see
//! [`crate::tls`]): in a file in the data directory, `relay-ticket.key`
//! (0600, PKCS#8 in PEM), never in the database. The database holds only
//! its public half (the `meta` row `relay_ticket_key`, base64), claimed by
//! the first replica that creates a key, so that every replica signs with
//! the same key: a replica without the file does not make a second one.
//! Replicas sharing a PostgreSQL database need the same file; the operator
//! copies it, as with `ca.key`.

use std::path::{Path, PathBuf};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use mesh_local::secret_file::{self, SecretFileError};
use mesh_relay::ticket::{self, TicketSigner};

use crate::store::{Store, StoreError};

/// The key file, in the data directory.
pub const FILE: &str = "relay-ticket.key";
/// The `meta` row holding the public key (base64).
pub const META: &str = "relay_ticket_key";

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// A ticket key problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written, or others may read it.
    #[error(transparent)]
    File(#[from] SecretFileError),
    /// The file does not hold an Ed25519 key.
    #[error("{path}: {why}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The database has a key, and this data directory does not.
    #[error(
        "no relay ticket key in {path}, but this database already has one (public key {public}): copy {FILE} \
         from another replica's data directory, mode 0600"
    )]
    Missing {
        /// The missing file.
        path: String,
        /// The database's public key.
        public: String,
    },
    /// The file holds another key than the database names.
    #[error(
        "{path} holds relay ticket key {file}, but this database's is {database}: copy {FILE} from a replica \
         of this database"
    )]
    Mismatch {
        /// The file.
        path: String,
        /// The file's public key.
        file: String,
        /// The database's.
        database: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The signing key's PEM text.
fn to_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("{PEM_BEGIN}\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out + PEM_END + "\n"
}

/// The signer in PEM `text`.
fn from_pem(text: &str) -> Result<TicketSigner, String> {
    let body = text
        .trim()
        .strip_prefix(PEM_BEGIN)
        .and_then(|t| t.strip_suffix(PEM_END))
        .ok_or_else(|| format!("not a PEM private key ({PEM_BEGIN} ... {PEM_END})"))?;
    let b64: String = body.split_whitespace().collect();
    let der = STANDARD.decode(b64).map_err(|_| "the PEM body is not base64".to_owned())?;
    TicketSigner::from_pkcs8(&der).map_err(|e| e.to_string())
}

/// The key in `path`, if the file exists.
fn load(path: &Path) -> Result<Option<TicketSigner>, KeyError> {
    let text = match secret_file::read(path) {
        Ok(t) => t,
        Err(SecretFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    from_pem(&text).map(Some).map_err(|why| KeyError::Bad { path: path.display().to_string(), why })
}

/// The key file of data directory `dir`.
#[must_use]
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The signing key of the mesh whose store is `store`, from `dir`: loaded,
/// or created on the first start of the mesh (file first, then the claim
/// in the store: a replica that loses a race removes its file and asks
/// for the winner's).
pub async fn open(store: &Store, dir: &Path) -> Result<TicketSigner, KeyError> {
    let path = path(dir);
    let shown = path.display().to_string();
    let claimed = store.meta_get(META).await?;
    let bad = |e: ticket::TicketError| KeyError::Bad { path: shown.clone(), why: e.to_string() };
    let (signer, created) = match (load(&path)?, claimed) {
        (Some(signer), _) => (signer, false),
        (None, Some(public)) => return Err(KeyError::Missing { path: shown, public }),
        (None, None) => {
            let der = TicketSigner::generate_pkcs8().map_err(bad)?;
            secret_file::write(&path, to_pem(&der).as_bytes())?;
            (TicketSigner::from_pkcs8(&der).map_err(bad)?, true)
        }
    };
    let public = ticket::key_to_b64(&signer.public_key());
    let winner = store.meta_get_or_init(META, || public.clone()).await?;
    if winner != public {
        if created {
            // Another replica created one first: never sign with a second.
            let _ = std::fs::remove_file(&path);
            return Err(KeyError::Missing { path: shown, public: winner });
        }
        return Err(KeyError::Mismatch { path: shown, file: public, database: winner });
    }
    if created {
        tracing::info!(file = %shown, public_key = %public, "created the relay ticket key");
    }
    Ok(signer)
}

/// The public key the mesh signs tickets with, without creating anything:
/// from the key file in `dir` if there is one, else from the store (`None`
/// before control's first start).
pub async fn public_key(store: Option<&Store>, dir: &Path) -> Result<Option<[u8; 32]>, KeyError> {
    if let Some(signer) = load(&path(dir))? {
        return Ok(Some(signer.public_key()));
    }
    let Some(store) = store else { return Ok(None) };
    store
        .meta_get(META)
        .await?
        .map(|b64| {
            ticket::key_from_b64(&b64)
                .map_err(|e| KeyError::Bad { path: format!("the database's meta row {META}"), why: e.to_string() })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn pem_round_trips() {
        let der = TicketSigner::generate_pkcs8().unwrap();
        let pem = to_pem(&der);
        assert!(pem.starts_with(PEM_BEGIN) && pem.lines().all(|l| l.len() <= 64), "{pem}");
        let a = TicketSigner::from_pkcs8(&der).unwrap().public_key();
        assert_eq!(from_pem(&pem).unwrap().public_key(), a);
        assert!(from_pem("junk").unwrap_err().contains("not a PEM"));
    }

    #[tokio::test]
    async fn created_once_then_shared_and_a_replica_without_it_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", tmp.path().join("db").display())).await.unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
        }
        assert_eq!(public_key(Some(&store), &a).await.unwrap(), None, "nothing before the first start");
        let first = open(&store, &a).await.unwrap().public_key();
        let mode = std::fs::metadata(path(&a)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(open(&store, &a).await.unwrap().public_key(), first, "loaded, not made again");
        assert_eq!(public_key(Some(&store), &b).await.unwrap(), Some(first), "from the store");
        let e = open(&store, &b).await.unwrap_err().to_string();
        assert!(e.contains("no relay ticket key in") && e.contains(FILE), "{e}");
        assert!(!path(&b).exists(), "no second key");
        // A key that is not the database's is refused, by name.
        secret_file::write(&path(&b), to_pem(&TicketSigner::generate_pkcs8().unwrap()).as_bytes()).unwrap();
        let e = open(&store, &b).await.unwrap_err().to_string();
        assert!(e.contains("this database's is"), "{e}");
        std::fs::copy(path(&a), path(&b)).unwrap();
        assert_eq!(open(&store, &b).await.unwrap().public_key(), first, "the copied file works");
        std::fs::set_permissions(path(&b), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(open(&store, &b).await, Err(KeyError::File(SecretFileError::TooOpen { .. }))));
    }
}
