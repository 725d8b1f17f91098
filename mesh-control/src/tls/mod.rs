//! Control's CA and server certificate (rcgen + rustls).
//!
//! The CA lives in files in the data directory ([`files`]), never in the
//! database: `ca.key` (0600) holds the current CA, `ca.pem` every trusted
//! CA certificate for standard TLS clients. Replicas sharing a PostgreSQL
//! database must hold the same files: the operator copies them (see README,
//! "CA and secrets at rest"). The database keeps only the first CA's pin
//! (`ca_created_pin`), so that a replica without the files refuses to start
//! instead of creating a second, different CA. An install from before the
//! files kept its CA in the `meta` row `ca`: [`Authority::open`] moves it to
//! the files and deletes the row.
//!
//! The server certificate is issued at each start (and each CA switch, and
//! at half its life) for the configured names, and served together with the
//! CA certificate so that a pinning client finds the CA in the chain. It is
//! served through a resolver, so a switch takes effect for new connections
//! without a restart. Rotation: [`ca`] and [`Authority::rotate`].

pub mod ca;
pub mod files;

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use self::ca::{Ca, CaError, CaSet, Phase, ServerCert};
use self::files::CaDir;
use crate::store::{Store, StoreError};

/// The `meta` row where installs before the CA files kept the CA (cert and
/// key, plaintext).
pub const LEGACY_META: &str = "ca";
/// The `meta` row holding the first CA's pin: set once a CA exists.
pub const CREATED_META: &str = "ca_created_pin";

/// A TLS setup failure.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating, parsing or rotating CAs.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A file or directory others may read.
    #[error("refusing {path}: {why}")]
    Insecure {
        /// The file or directory.
        path: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// A CA file that does not parse.
    #[error("{path}: {why}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The database has a CA but this data directory has no CA files.
    #[error(
        "no CA in {path}, but this database already has one (pin {pin}): copy ca.key (and ca-next.key or \
         ca-previous.crt, if present) from a replica's data directory, mode 0600"
    )]
    Missing {
        /// The missing key file.
        path: String,
        /// The first CA's pin, from the database.
        pin: String,
    },
    /// The server certificate could not be loaded into rustls.
    #[error("server certificate: {0}")]
    Rustls(String),
}

/// One trusted CA certificate and its role.
#[derive(Clone, Debug)]
pub struct TrustedCa {
    /// `current`, `next` or `previous`.
    pub role: &'static str,
    /// The certificate, PEM.
    pub pem: String,
    /// SHA-256 of its DER.
    pub pin: [u8; 32],
}

/// A rotation step (see [`ca`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Trust a new CA next to the current one.
    Begin,
    /// Sign with the new CA.
    Switch,
    /// Stop trusting the previous CA.
    Retire,
}

/// The Sync stream message that tells an agent which CAs to trust.
#[must_use]
pub fn sync_message(trusted: &[TrustedCa]) -> mesh_proto::v1::SyncResponse {
    use mesh_proto::v1 as pb;
    let certificates_pem = trusted.iter().map(|t| t.pem.clone()).collect();
    pb::SyncResponse { msg: Some(pb::sync_response::Msg::TrustedCas(pb::TrustedCas { certificates_pem })) }
}

/// Serves whatever server certificate is current.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| Arc::clone(&k))
    }
}

fn certified(cert: ServerCert) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der));
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(cert.chain_der.into_iter().map(CertificateDer::from).collect(), signing)))
}

/// The pins of the trusted CAs, in `set`'s order.
fn trusted_of(set: &CaSet) -> Vec<TrustedCa> {
    set.trusted()
        .into_iter()
        .map(|(role, pem)| TrustedCa { role, pin: ca::pin_of_pem(&pem).unwrap_or_default(), pem })
        .collect()
}

/// The running CA: its files, the served server certificate and the
/// trusted set that agents are told about.
#[derive(Debug)]
pub struct Authority {
    files: CaDir,
    names: Vec<String>,
    /// The CA set and when the served certificate was issued.
    state: Mutex<(CaSet, i64)>,
    server: Arc<Resolver>,
    trusted: watch::Sender<Vec<TrustedCa>>,
}

impl Authority {
    /// Loads the CA from `dir` (creating the directory 0700, moving a CA
    /// that an older version kept in the store to the files, or creating a
    /// CA on the first start of a new install) and issues a server
    /// certificate for `names` (DNS names or IP addresses; `localhost`,
    /// 127.0.0.1 and ::1 are always included).
    pub async fn open(store: &Store, dir: &Path, names: &[String], now: i64) -> Result<Arc<Self>, TlsError> {
        files::prepare_dir(dir)?;
        let files = CaDir::new(dir);
        let legacy = store.meta_get(LEGACY_META).await?;
        let set = match (files.load()?, legacy) {
            (Some(set), legacy) => {
                if let Some(row) = legacy {
                    // Another replica moved it already, or this one stopped
                    // before deleting the row: the files are authoritative,
                    // but never drop key material they do not hold.
                    let pin = Ca::from_stored(&row)?.pin()?;
                    if !trusted_of(&set).iter().any(|t| t.pin == pin) {
                        return Err(TlsError::Bad {
                            path: files.key_path().display().to_string(),
                            why: format!(
                                "the database holds a different CA (pin {}) in its plaintext meta row `ca`",
                                hex::encode(pin)
                            ),
                        });
                    }
                    store.meta_delete(LEGACY_META).await?;
                }
                set
            }
            (None, Some(row)) => {
                let set = CaSet::new(Ca::from_stored(&row)?);
                files.save(&set)?;
                store.meta_delete(LEGACY_META).await?;
                tracing::info!(file = %files.key_path().display(), "moved the CA key out of the database into its file");
                set
            }
            (None, None) => {
                let set = CaSet::new(Ca::generate(now)?);
                let pin = hex::encode(set.current.pin()?);
                // Files first, then the claim: a replica that loses the race
                // removes its files instead of serving a second CA.
                files.save(&set)?;
                let winner = store.meta_get_or_init(CREATED_META, || pin.clone()).await?;
                if winner != pin {
                    for f in [files.key_path(), files.bundle_path()] {
                        let _ = std::fs::remove_file(f);
                    }
                    return Err(TlsError::Missing { path: files.key_path().display().to_string(), pin: winner });
                }
                tracing::info!(file = %files.key_path().display(), pin, "created the CA");
                set
            }
        };
        let pin = hex::encode(set.current.pin()?);
        store.meta_get_or_init(CREATED_META, || pin).await?;
        files.write_bundle(&set)?;
        let cert = set.current.issue_server(names, now)?;
        let issued = cert.issued_unix;
        Ok(Arc::new(Self {
            files,
            names: names.to_vec(),
            server: Arc::new(Resolver(RwLock::new(certified(cert)?))),
            trusted: watch::channel(trusted_of(&set)).0,
            state: Mutex::new((set, issued)),
        }))
    }

    /// A rustls server configuration serving the current certificate
    /// (HTTP/2 only, as gRPC needs).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.server.clone());
        c.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(c))
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, (CaSet, i64)> {
        // A panic while holding the lock leaves a consistent value: every
        // writer replaces the tuple whole.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The trusted CAs (current first) and the rotation phase.
    #[must_use]
    pub fn trusted(&self) -> (Vec<TrustedCa>, Phase) {
        let st = self.locked();
        (trusted_of(&st.0), st.0.phase())
    }

    /// The trusted CAs, as they change (for the Sync streams).
    #[must_use]
    pub fn watch(&self) -> watch::Receiver<Vec<TrustedCa>> {
        self.trusted.subscribe()
    }

    /// The pin of the CA that signs the server certificate (what new
    /// enrollment keys carry).
    #[must_use]
    pub fn signing_pin(&self) -> [u8; 32] {
        self.locked().0.current.pin().unwrap_or_default()
    }

    /// The file holding the current CA's key.
    #[must_use]
    pub fn key_path(&self) -> std::path::PathBuf {
        self.files.key_path()
    }

    /// Makes `set` the running one: files, server certificate (when the
    /// signer changed, or `reissue`), trusted set.
    fn apply(&self, st: &mut (CaSet, i64), set: CaSet, reissue: bool, now: i64) -> Result<(), TlsError> {
        if set != st.0 {
            self.files.save(&set)?;
        }
        if reissue || set.current != st.0.current {
            let cert = set.current.issue_server(&self.names, now)?;
            let issued = cert.issued_unix;
            let key = certified(cert)?;
            *self.server.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key;
            st.1 = issued;
        }
        let changed = set != st.0;
        st.0 = set;
        if changed {
            self.trusted.send_replace(trusted_of(&st.0));
        }
        Ok(())
    }

    /// One rotation step; returns the phases before and after.
    pub fn rotate(&self, step: Step, now: i64) -> Result<(Phase, Phase), TlsError> {
        let mut st = self.locked();
        let before = st.0.phase();
        let set = match step {
            Step::Begin => st.0.begin(Ca::generate(now)?)?,
            Step::Switch => st.0.switch()?,
            Step::Retire => st.0.retire()?,
        };
        let after = set.phase();
        self.apply(&mut st, set, false, now)?;
        tracing::info!(?step, from = before.name(), to = after.name(), pin = %hex::encode(st.0.current.pin()?), "CA rotation step");
        Ok((before, after))
    }

    /// Picks up CA files that changed on disk (an operator copied another
    /// replica's after a rotation step) and reissues the server certificate
    /// at half its life. Returns whether anything changed.
    pub fn refresh(&self, now: i64) -> Result<bool, TlsError> {
        let Some(on_disk) = self.files.load()? else {
            return Err(TlsError::Bad {
                path: self.files.key_path().display().to_string(),
                why: "the CA file disappeared; keeping the CA in memory".into(),
            });
        };
        let mut st = self.locked();
        let half_life = now - st.1 > ca::SERVER_VALIDITY_SECS / 2;
        if on_disk == st.0 && !half_life {
            return Ok(false);
        }
        if on_disk != st.0 {
            tracing::info!(from = st.0.phase().name(), to = on_disk.phase().name(), "CA files changed on disk");
        }
        self.apply(&mut st, on_disk, half_life, now)?;
        Ok(true)
    }
}
