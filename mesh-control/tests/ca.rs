//! Control's CA at rest and its rotation, over real TLS on loopback: the key
//! in a 0600 file (moved out of the database of an older install), a start
//! refused when the key file is readable by others or when a replica lacks
//! the files, `ca.pem` trusted by standard TLS clients (tonic's own rustls
//! client, and OpenSSL), and the three rotation steps as agents and clients
//! see them.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use mesh_client::bearer::{Authed, Bearer};
use mesh_client::channel::{Trust, connect};
use mesh_control::run::{Running, start};
use mesh_control::sim::SimAgent;
use mesh_control::store::Store;
use mesh_control::tls::ca::{Ca, pin_of_pem};
use mesh_proto::v1 as pb;
use mesh_proto::v1::admin_service_client::AdminServiceClient;
use pb::rotate_ca_request::Step;

type Admin = AdminServiceClient<Authed>;

async fn control(dir: &Path) -> Running {
    start(&mesh_control::sim::loopback_config(dir)).await.expect("control starts")
}

async fn admin(c: &Running) -> Admin {
    let ch = connect(&c.addr.to_string(), &Trust::CaPem(c.ca_pem.clone())).await.unwrap();
    AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A plain tonic client (rustls with webpki, no pin) trusting `ca_pem`
/// calls `GetCa` with `token`.
async fn standard_client(c: &Running, ca_pem: &str) -> Result<pb::CaInfo, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut a = AdminServiceClient::with_interceptor(ch, Bearer(c.bootstrap_admin_token.clone()));
    a.get_ca(pb::Empty {}).await.map(tonic::Response::into_inner).map_err(|e| e.to_string())
}

/// OpenSSL's verdict on control's chain under `ca_file` (run without
/// blocking: control serves on this test's runtime).
async fn openssl_verifies(c: &Running, ca_file: &Path) -> bool {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &c.addr.to_string(), "-servername", "localhost", "-alpn", "h2"])
        .args(["-verify_return_error", "-verify_hostname", "localhost", "-CAfile"])
        .arg(ca_file)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("Verify return code: 0 (ok)")
}

#[tokio::test]
async fn a_new_install_keeps_its_ca_in_files_only_with_tight_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let c = control(&dir).await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    let pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    assert_eq!(pin_of_pem(&pem), Some(c.ca_pin));
    assert!(!pem.contains("PRIVATE KEY"));
    let store = Store::open(&format!("sqlite://{}", dir.join("control.db").display())).await.unwrap();
    assert_eq!(store.meta_get("ca").await.unwrap(), None);
    assert_eq!(store.meta_get("ca_created_pin").await.unwrap(), Some(hex::encode(c.ca_pin)));
    c.shutdown();
}

#[tokio::test]
async fn an_older_install_has_its_plaintext_ca_moved_out_of_the_database() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    // An install as older versions left it: a 0755 data directory and the
    // CA (certificate and key) in the meta row `ca`.
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = Ca::generate(1_700_000_000).unwrap();
    let db = dir.join("control.db");
    {
        let store = Store::open(&format!("sqlite://{}", db.display())).await.unwrap();
        store.meta_get_or_init("ca", || old.to_stored()).await.unwrap();
    }
    let key_line = old.key_pem.lines().nth(1).unwrap().to_owned();
    // The database's files (the file, its WAL) that hold the key's text.
    let holding = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|f| f.file_name().unwrap().to_string_lossy().starts_with("control.db"))
            .filter(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).contains(&key_line))
            .map(|f| f.display().to_string())
            .collect()
    };
    assert!(!holding(&dir).is_empty(), "the test plants the key");

    let c = control(&dir).await;
    // Same CA, so agents' pins and enrollment keys go on working.
    assert_eq!(c.ca_pin, old.pin().unwrap());
    connect(&c.addr.to_string(), &Trust::Pin(c.ca_pin)).await.expect("the old pin is served");
    assert_eq!(mode(&dir), 0o700, "the data directory is tightened");
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(Ca::from_stored(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap(), old);
    let store = Store::open(&format!("sqlite://{}", db.display())).await.unwrap();
    assert_eq!(store.meta_get("ca").await.unwrap(), None);
    c.shutdown();
    drop(store);
    // Not even in a free page of the database file or in its WAL.
    assert_eq!(holding(&dir), Vec::<String>::new());
}

#[tokio::test]
async fn a_key_file_readable_by_others_or_a_replica_without_the_files_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let c = control(&dir).await;
    c.shutdown();
    drop(c);
    let key = dir.join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = start(&mesh_control::sim::loopback_config(&dir)).await.unwrap_err().to_string();
    assert!(e.contains(&key.display().to_string()) && e.contains("0644"), "{e}");

    // A second replica on the same database, without the CA files: it
    // must not make a CA of its own.
    let other = tmp.path().join("b");
    let config = mesh_control::config::Config {
        database_url: Some(format!("sqlite://{}", dir.join("control.db").display())),
        ..mesh_control::sim::loopback_config(&other)
    };
    let e = start(&config).await.unwrap_err().to_string();
    assert!(e.contains("no CA in") && e.contains("ca.key"), "{e}");
    assert!(!other.join("ca.key").exists());
    // With the files copied (and mode 0600), it serves the same CA.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::copy(&key, other.join("ca.key")).unwrap();
    let b = start(&config).await.expect("the replica starts with the copied CA");
    let a = control(&dir).await;
    assert_eq!(a.ca_pin, b.ca_pin);
}

#[tokio::test]
async fn standard_clients_trust_control_with_ca_pem_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let c = control(tmp.path()).await;
    let ca_pem = std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap();
    let info = standard_client(&c, &ca_pem).await.expect("a standard client verifies control with ca.pem");
    assert_eq!(info.phase, "steady");
    // `meshctl ca` prints what GetCa returns: the same bundle as ca.pem.
    assert_eq!(info.certificates.iter().map(|c| c.pem.as_str()).collect::<String>(), ca_pem);
    assert!(openssl_verifies(&c, &tmp.path().join("ca.pem")).await);
    // And not with another CA (the checks can fail).
    let other = tmp.path().join("other.pem");
    std::fs::write(&other, Ca::generate(1_790_000_000).unwrap().cert_pem).unwrap();
    assert!(standard_client(&c, &std::fs::read_to_string(&other).unwrap()).await.is_err());
    assert!(!openssl_verifies(&c, &other).await);
}

#[tokio::test]
async fn rotation_steps_reach_agents_clients_and_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let c = control(tmp.path()).await;
    let mut a = admin(&c).await;
    let old_pin = c.ca_pin;
    let req = pb::CreateEnrollmentKeyRequest { preapproved: true, ..Default::default() };
    let key = a.create_enrollment_key(req).await.unwrap().into_inner().secret;
    let agent = SimAgent::enroll(&c.addr.to_string(), &key, "gw1", &[]).await.unwrap();
    let mut sync = agent.sync().await.unwrap();
    sync.next(Duration::from_secs(5)).await.unwrap().expect("snapshot");
    let pins = |s: &mesh_control::sim::SyncSession| -> Vec<[u8; 32]> {
        s.trusted_cas.iter().map(|p| pin_of_pem(p).unwrap()).collect()
    };
    // The trusted set follows the first snapshot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while sync.trusted_cas.is_empty() && tokio::time::Instant::now() < deadline {
        sync.next(Duration::from_millis(100)).await.unwrap();
    }
    assert_eq!(pins(&sync), [old_pin]);
    // An agent of capability 3 gets no such message (it would not know it).
    let mut old_agent = agent.sync_as_version(3).await.unwrap();
    old_agent.next(Duration::from_secs(5)).await.unwrap().expect("snapshot");

    let rotator = a.clone();
    let rotate = |step: Step| {
        let mut a = rotator.clone();
        async move { a.rotate_ca(pb::RotateCaRequest { step: step.into() }).await }
    };
    assert_eq!(rotate(Step::Switch).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(rotate(Step::Unspecified).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    let begun = rotate(Step::Begin).await.unwrap().into_inner();
    assert_eq!(begun.phase, "introduced");
    let new_pin: [u8; 32] = hex::decode(&begun.certificates[1].pin).unwrap().try_into().unwrap();
    sync.next(Duration::from_millis(500)).await.unwrap();
    assert_eq!(pins(&sync), [old_pin, new_pin], "the agent learns the new CA on its stream");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap(),
        begun.certificates.iter().map(|c| c.pem.as_str()).collect::<String>()
    );
    // Still served from the old CA.
    connect(&c.addr.to_string(), &Trust::Pin(old_pin)).await.expect("old CA still signs");
    assert!(connect(&c.addr.to_string(), &Trust::Pin(new_pin)).await.is_err());

    let switched = rotate(Step::Switch).await.unwrap().into_inner();
    assert_eq!(switched.phase, "switched");
    assert_eq!(switched.certificates[0].pin, hex::encode(new_pin));
    // New connections get a certificate from the new CA, without a restart;
    // a client that trusts either CA (an agent mid-rotation) connects, as
    // does a standard client with the new ca.pem.
    assert!(connect(&c.addr.to_string(), &Trust::Pin(old_pin)).await.is_err());
    connect(&c.addr.to_string(), &Trust::AnyPin(vec![old_pin, new_pin])).await.expect("either pin");
    let bundle = std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap();
    standard_client(&c, &bundle).await.expect("ca.pem after the switch");
    assert!(openssl_verifies(&c, &tmp.path().join("ca.pem")).await);
    // The existing stream was not cut.
    sync.health(pb::HealthReport::default()).await.expect("the stream from before the switch is alive");
    // New enrollment keys carry the new pin.
    let key = a.create_enrollment_key(pb::CreateEnrollmentKeyRequest::default()).await.unwrap().into_inner().secret;
    assert!(key.ends_with(&hex::encode(new_pin)));

    let retired = rotate(Step::Retire).await.unwrap().into_inner();
    assert_eq!(retired.phase, "steady");
    sync.next(Duration::from_millis(500)).await.unwrap();
    assert_eq!(pins(&sync), [new_pin], "the agent stops trusting the old CA");
    assert_eq!(pin_of_pem(&std::fs::read_to_string(tmp.path().join("ca.pem")).unwrap()), Some(new_pin));
    assert!(!tmp.path().join("ca-previous.crt").exists() && !tmp.path().join("ca-next.key").exists());
    assert!(old_agent.trusted_cas.is_empty());

    let audit = a
        .list_audit(pb::ListAuditRequest { action_prefix: "ca.".into(), limit: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<_> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.len(), 3, "{actions:?}");
    for step in ["ca.rotate.begin", "ca.rotate.switch", "ca.rotate.retire"] {
        assert!(actions.contains(&step), "{actions:?}");
    }
    assert!(audit.iter().all(|e| !e.after.contains("PRIVATE") && e.actor.starts_with("admin:")));

    // A restart serves the rotated CA from the files.
    c.shutdown();
    drop(c);
    let c = control(tmp.path()).await;
    assert_eq!(c.ca_pin, new_pin);
}
