//! WireGuard key rotation at control (issue #17): a new key is taken only
//! with a proof of possession answering this control's challenge; the
//! rotation is audited, restarts the key's age and reaches the peers' views;
//! `key_rotation_days` asks for a rotation by age; an expired key is
//! audited and its node dropped from its peers' views.

use std::sync::Arc;
use std::time::Duration;

use mesh_client::bearer::Bearer;
use mesh_client::channel::{Trust, connect};
use mesh_client::key_proof;
use mesh_control::engine::ManualClock;
use mesh_control::run::start_with_clock;
use mesh_control::sim::SimAgent;
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use mesh_proto::v1::agent_service_client::AgentServiceClient;
use tonic::Code;

const POLICY: &str =
    r#"{"tagOwners": {"tag:gw": []}, "acls": [{"action": "accept", "src": ["tag:gw"], "dst": ["tag:gw:*"]}]}"#;

fn secret(b: u8) -> [u8; 32] {
    let mut k = [b; 32];
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_needs_a_proof_is_audited_and_reaches_peers_and_expiry_drops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::at_wall_clock());
    let mut config = mesh_control::sim::loopback_config(dir.path());
    config.key_lifetime_days = 30;
    config.key_rotation_days = 20;
    let c = start_with_clock(&config, clock.clone()).await.expect("control starts");
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    let mut admin = AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()));
    admin.set_policy(pb::PolicyDocument { text: POLICY.into(), generation: 0 }).await.unwrap();
    let key = admin
        .create_enrollment_key(pb::CreateEnrollmentKeyRequest {
            reusable: true,
            preapproved: true,
            tags: vec!["tag:gw".into()],
            expires_in_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let addr = c.addr.to_string();
    let a = SimAgent::enroll(&addr, &key, "gw-a", &[]).await.unwrap();
    let b = SimAgent::enroll(&addr, &key, "gw-b", &[]).await.unwrap();
    let mut a_agent = AgentServiceClient::with_interceptor(a.channel.clone(), Bearer(Some(a.token.clone())));
    let new = secret(9);
    let new_pub = key_proof::public_key(&new);
    let renew = |proof: Vec<u8>, nonce: Vec<u8>| pb::RenewRequest {
        new_wireguard_public_key: new_pub.to_vec(),
        challenge_nonce: nonce,
        key_proof: proof,
    };

    // No challenge, a wrong proof, another node's challenge: refused, key unchanged.
    let e = a_agent.renew(renew(vec![0; 32], vec![0; 32])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("no current challenge"), "{e}");
    let ch = a_agent.key_challenge(pb::KeyChallengeRequest {}).await.unwrap().into_inner();
    let control_pub: [u8; 32] = ch.control_public_key.clone().try_into().unwrap();
    let wrong = key_proof::prove(&secret(7), &control_pub, a.node.id, &ch.nonce);
    let e = a_agent.renew(renew(wrong.to_vec(), ch.nonce.clone())).await.unwrap_err();
    assert!(e.message().contains("no proof of possession"), "{e}");
    // The challenge is used up by the failed answer: the right proof now fails too.
    let right = key_proof::prove(&new, &control_pub, a.node.id, &ch.nonce);
    let e = a_agent.renew(renew(right.to_vec(), ch.nonce.clone())).await.unwrap_err();
    assert!(e.message().contains("no current challenge"), "{e}");
    let mut b_agent = AgentServiceClient::with_interceptor(b.channel.clone(), Bearer(Some(b.token.clone())));
    let ch_b = b_agent.key_challenge(pb::KeyChallengeRequest {}).await.unwrap().into_inner();
    let for_b = key_proof::prove(&new, &ch_b.control_public_key.clone().try_into().unwrap(), a.node.id, &ch_b.nonce);
    assert!(a_agent.renew(renew(for_b.to_vec(), ch_b.nonce)).await.is_err(), "b's challenge is not a's");
    let node_a = |nodes: &[pb::Node]| nodes.iter().find(|n| n.id == a.node.id).cloned().unwrap();
    let reader = admin.clone();
    let list = || {
        let mut admin = reader.clone();
        async move { admin.list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes }
    };
    assert_eq!(node_a(&list().await).wireguard_public_key, a.node.wireguard_public_key);

    // An admin asks; the agent answers a fresh challenge with the right proof.
    admin.rotate_node_key(pb::NodeRef { id: a.node.id, name: String::new() }).await.unwrap();
    assert!(node_a(&list().await).key_rotation_requested);
    clock.advance(3600);
    let ch = a_agent.key_challenge(pb::KeyChallengeRequest {}).await.unwrap().into_inner();
    let proof = key_proof::prove(&new, &ch.control_public_key.clone().try_into().unwrap(), a.node.id, &ch.nonce);
    let r = a_agent.renew(renew(proof.to_vec(), ch.nonce)).await.unwrap().into_inner();
    let rotated = r.node.unwrap();
    assert_eq!(rotated.wireguard_public_key, new_pub.to_vec());
    assert!(!rotated.key_rotation_requested);
    assert!(rotated.key_created_unix > a.node.key_created_unix, "the key's age restarts");
    let audit = admin
        .list_audit(pb::ListAuditRequest { action_prefix: "node.key_rotated".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(audit.len(), 1, "{audit:?}");
    // The peer's view carries the new key.
    let b_sync = SimAgent { token: b.token.clone(), ..b.clone() };
    let mut s = b_sync.sync().await.unwrap();
    s.next(Duration::from_secs(5)).await.unwrap();
    let peer = s.view.as_ref().unwrap().peers.iter().find(|p| p.node_id == a.node.id).cloned().expect("a in b's view");
    assert_eq!(peer.wireguard_public_key, new_pub.to_vec());

    // When b's key is 20 days old, control asks b to rotate, not a (whose
    // key is an hour younger).
    clock.advance(20 * 86_400 - 60);
    poll(|| async { node_of(&list().await, b.node.id).key_rotation_requested }).await;
    assert!(!node_a(&list().await).key_rotation_requested);
    let by_age = admin
        .list_audit(pb::ListAuditRequest { action_prefix: "node.rotate_key".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        by_age.iter().any(|e| e.actor == "control:key_rotation_days" && e.subject == format!("node/{}", b.node.id))
    );

    // 30 days after enrollment b's key expires (a's was extended): audited,
    // and a's view drops b.
    admin
        .extend_node_key(pb::ExtendNodeKeyRequest {
            node: Some(pb::NodeRef { id: a.node.id, name: String::new() }),
            days: 60,
        })
        .await
        .unwrap();
    clock.advance(10 * 86_400);
    poll(|| async {
        let mut admin = reader.clone();
        admin
            .list_audit(pb::ListAuditRequest { action_prefix: "node.key_expired".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .entries
            .iter()
            .any(|e| e.subject == format!("node/{}", b.node.id))
    })
    .await;
    let a_now = SimAgent { token: r.credential.unwrap().token, ..a.clone() };
    let mut s = a_now.sync().await.unwrap();
    s.next(Duration::from_secs(5)).await.unwrap();
    assert!(
        s.view.as_ref().unwrap().peers.iter().all(|p| p.node_id != b.node.id),
        "an expired node is dropped by its peers"
    );
}

fn node_of(nodes: &[pb::Node], id: u64) -> pb::Node {
    nodes.iter().find(|n| n.id == id).cloned().unwrap()
}

/// Polls `f` for up to 5 s (control's housekeeping runs every second).
async fn poll<F: std::future::Future<Output = bool>>(f: impl Fn() -> F) {
    for _ in 0..50 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 5 s");
}
