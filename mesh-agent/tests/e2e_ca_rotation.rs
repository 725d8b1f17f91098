//! A CA rotation with `mesh-agent run` connected to a real mesh-control:
//! `begin` (the agents learn the new CA over their Sync streams and store
//! it), `switch` (control's certificate comes from the new CA; after a
//! control restart the agents reconnect on their first attempt under the
//! new CA), `retire` (the agents drop the old CA). No step costs an agent
//! its session; only the restart does, for one reconnect. Finally an
//! impostor control serving a certificate from the retired CA is refused
//! by both agents.
//!
//! Lab:
//! ```text
//!        ctl 192.0.2.100 (mesh-control)
//!              |  wan 192.0.2.0/24
//!   gw-a 192.0.2.1              gw-b 192.0.2.2
//! ```

use std::time::{Duration, Instant};

use mesh_lab::Lab;
use mesh_proto::v1 as pb;
use pb::rotate_ca_request::Step;

mod e2e_support;

use e2e_support::{BpfFs, Control, Gateway, Tuning, admin, rt, wait_for};

const TUNING: Tuning = Tuning { metrics_listen: None, health_interval_secs: 1.0, extra: "" };

/// The pins an agent stored in its credential file (`ca_pins`).
fn stored_pins(g: &Gateway) -> Vec<String> {
    let text = std::fs::read_to_string(g.credential()).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["ca_pins"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn count(g: &Gateway, what: &str) -> usize {
    g.log().matches(what).count()
}

/// Only what the gateways' tag needs: the test is about control's TLS.
const POLICY: &str = r#"{"tagOwners": {"tag:gw": []}, "acls": []}"#;

const OPENED: &str = "sync stream open";
const REFUSED: &str = "no certificate matching the CA pin";

#[test]
fn agents_follow_a_ca_rotation_and_then_refuse_the_retired_ca() {
    mesh_lab::require_root!();
    let lab = Lab::new().unwrap();
    let hosts = e2e_support::wan(&lab, &[("ctl", "192.0.2.100"), ("gwa", "192.0.2.1"), ("gwb", "192.0.2.2")]);
    let ctl = hosts[0].clone();
    let ctl_dir = tempfile::tempdir().unwrap();
    let mut control = Control::start(&ctl, ctl_dir.path(), 2);
    let rt = rt();
    let [k_a, k_b]: [String; 2] = e2e_support::policy_and_keys(&rt, ctl_dir.path(), POLICY, 2).try_into().unwrap();
    let bpf = BpfFs::mount();
    let mut gws = [
        Gateway::new(hosts[1].clone(), &lab.unique_ifname("wg"), bpf.0.path(), &k_a, "192.0.2.1", &[], &TUNING),
        Gateway::new(hosts[2].clone(), &lab.unique_ifname("wg"), bpf.0.path(), &k_b, "192.0.2.2", &[], &TUNING),
    ];
    for g in &mut gws {
        g.start();
    }
    let logs_of =
        |gws: &[Gateway]| gws.iter().map(|g| format!("--- {}:\n{}", g.host.name(), g.log())).collect::<String>();
    let rotate = |step: Step| {
        rt.block_on(async {
            admin(ctl_dir.path()).await.rotate_ca(pb::RotateCaRequest { step: step.into() }).await.unwrap().into_inner()
        })
    };
    let connected = || {
        rt.block_on(async {
            admin(ctl_dir.path())
                .await
                .get_status(pb::GetStatusRequest {})
                .await
                .map(|s| s.into_inner().agents_connected)
        })
        .unwrap_or(0)
    };

    // Connected, and told the CA to trust: the enrollment key's.
    let old_pin = rt.block_on(async {
        admin(ctl_dir.path()).await.get_ca(pb::Empty {}).await.unwrap().into_inner().certificates[0].pin.clone()
    });
    wait_for("both agents store the trusted CA", &|| logs_of(&gws), || {
        gws.iter().all(|g| stored_pins(g) == [old_pin.clone()])
    });
    assert_eq!(connected(), 2);

    // Begin: the new CA reaches both agents on their open streams.
    let begun = rotate(Step::Begin);
    let new_pin = begun.certificates[1].pin.clone();
    wait_for("both agents store the new CA next to the old one", &|| logs_of(&gws), || {
        gws.iter().all(|g| stored_pins(g) == [old_pin.clone(), new_pin.clone()])
    });
    // The old CA's key, for the impostor at the end.
    let old_ca = std::fs::read_to_string(ctl_dir.path().join("ca.key")).unwrap();

    // Switch, then a control restart: every agent's next connection meets
    // the new CA's certificate.
    assert_eq!(rotate(Step::Switch).phase, "switched");
    for g in &gws {
        assert_eq!(count(g, OPENED), 1, "no step so far cost a session\n{}", logs_of(&gws));
    }
    control.stop();
    control = Control::start(&ctl, ctl_dir.path(), 2);
    let restarted = Instant::now();
    wait_for("both agents reconnect under the new CA", &|| logs_of(&gws), || {
        gws.iter().all(|g| count(g, OPENED) == 2) && connected() == 2
    });
    // One reconnect each: the first attempt that met the new control got
    // through (the backoff is at most 1 s; 5 s is far above the noise).
    assert!(restarted.elapsed() < Duration::from_secs(5), "{:?}\n{}", restarted.elapsed(), logs_of(&gws));
    for g in &gws {
        assert_eq!(count(g, REFUSED), 0, "no connection was refused\n{}", logs_of(&gws));
    }

    // Retire: the agents keep their sessions and drop the old CA.
    assert_eq!(rotate(Step::Retire).phase, "steady");
    wait_for("both agents drop the old CA", &|| logs_of(&gws), || {
        gws.iter().all(|g| stored_pins(g) == [new_pin.clone()])
    });
    assert!(gws.iter().all(|g| count(g, OPENED) == 2), "retiring cost no session\n{}", logs_of(&gws));

    // An impostor with the retired CA at control's address is refused.
    control.stop();
    let impostor_dir = tempfile::tempdir().unwrap();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(impostor_dir.path().join("ca.key"))
            .unwrap();
        f.write_all(old_ca.as_bytes()).unwrap();
    }
    let _impostor = Control::start(&ctl, impostor_dir.path(), 2);
    wait_for("both agents refuse the retired CA", &|| logs_of(&gws), || gws.iter().all(|g| count(g, REFUSED) > 0));
    assert!(gws.iter().all(|g| count(g, OPENED) == 2), "no session with the impostor\n{}", logs_of(&gws));
    for g in &mut gws {
        g.stop();
    }
}
