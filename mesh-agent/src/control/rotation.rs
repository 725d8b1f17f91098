//! WireGuard key rotation, when control asks for one (`meshctl nodes
//! rotate`, or control's `key_rotation_days`).
//!
//! The order keeps the node reachable whatever fails:
//! 1. a new key pair, written 0600 next to the current key
//!    (`<key>.next`) before control hears of it;
//! 2. proof of possession: `KeyChallenge`, then `Renew` with the new public
//!    key and the proof (mesh-client's `key_proof`); control stores the key
//!    and pushes it to every peer, which replaces this node's peer entry;
//! 3. the new key made current: the file renamed over the old one, the
//!    interface switched by the reconcile worker.
//!
//! Peers and this node switch within the time it takes control's push to
//! reach them; whichever side sends first with both switched completes a
//! fresh handshake, so at most one handshake (sent while the other side
//! still had the old key) is lost. If the agent stops between 2 and 3, the
//! next session resolves it from the first view: control's record of this
//! node's key says whether the pending key was taken.

use std::path::{Path, PathBuf};

use mesh_client::{bearer::Bearer, channel::Channel, key_proof};
use mesh_proto::v1::{self as pb, agent_service_client::AgentServiceClient};

use super::{
    SessionError,
    credential::{Credential, renew_with},
    err,
};
use crate::{keys::SecretKey, reconcile::worker::WorkerHandle};

/// Where a rotation keeps the new key until control has taken it.
#[must_use]
fn pending_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

fn write_key(path: &Path, key: &SecretKey) -> Result<(), SessionError> {
    mesh_local::secret_file::write(path, format!("{}\n", key.to_base64()).as_bytes())
        .map_err(|e| SessionError(format!("writing the new key: {e}")))
}

/// Makes the pending key current: the file, then the interface.
async fn adopt(key_path: &Path, key: SecretKey, worker: &WorkerHandle) -> Result<(), SessionError> {
    std::fs::rename(pending_path(key_path), key_path)
        .map_err(|e| SessionError(format!("replacing {} with the new key: {e}", key_path.display())))?;
    worker.set_private_key(key).await.map_err(|e| SessionError(format!("switching the interface's key: {e}")))?;
    Ok(())
}

/// Rotates this node's WireGuard key (steps 1-3 above) and updates the
/// credential `Renew` returned.
pub(super) async fn rotate(
    channel: &Channel,
    cred: &mut Credential,
    cred_path: &Path,
    key_path: &Path,
    worker: &WorkerHandle,
) -> Result<(), SessionError> {
    let key = SecretKey::generate();
    write_key(&pending_path(key_path), &key)?;
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), Bearer(Some(cred.token.clone())));
    let challenge = client
        .key_challenge(pb::KeyChallengeRequest {})
        .await
        .map_err(err("asking control for a key challenge"))?
        .into_inner();
    let control_public: [u8; 32] = challenge
        .control_public_key
        .as_slice()
        .try_into()
        .map_err(|_| SessionError("key challenge: control's key is not 32 bytes".into()))?;
    let proof = key_proof::prove(key.as_bytes(), &control_public, cred.node_id, &challenge.nonce);
    let req = pb::RenewRequest {
        new_wireguard_public_key: key.public_key().0.to_vec(),
        challenge_nonce: challenge.nonce,
        key_proof: proof.to_vec(),
    };
    renew_with(channel, cred, cred_path, req).await?;
    let public_key = key.public_key();
    adopt(key_path, key, worker).await?;
    tracing::info!(node = cred.node_id, %public_key, "WireGuard key rotated");
    Ok(())
}

/// Resolves a rotation an earlier run left half done: `control_key` is this
/// node's public key as control has it (from the first view). The pending
/// key becomes current if control took it, and is deleted otherwise.
pub(super) async fn resolve_pending(
    key_path: &Path,
    control_key: &[u8],
    worker: &WorkerHandle,
) -> Result<(), SessionError> {
    let pending = pending_path(key_path);
    let Ok(text) = std::fs::read_to_string(&pending) else { return Ok(()) };
    match SecretKey::from_base64(&text) {
        Ok(key) if key.public_key().0.as_slice() == control_key => {
            tracing::info!(public_key = %key.public_key(), "control took the key of an interrupted rotation: using it");
            adopt(key_path, key, worker).await
        }
        _ => {
            tracing::info!("an interrupted key rotation never reached control: dropping its key");
            std::fs::remove_file(&pending).map_err(|e| SessionError(format!("removing {}: {e}", pending.display())))
        }
    }
}
