//! `meshctl ca`: control's CA certificates and their rotation.

use clap::Subcommand;
use mesh_proto::v1 as pb;
use serde_json::json;

use super::Admin;

/// What `meshctl ca` does.
#[derive(Subcommand, Debug)]
pub(crate) enum CaCmd {
    /// Print every trusted CA certificate, PEM (the default): what a
    /// standard gRPC client (grpcurl, grpcio) needs to trust control.
    Pem,
    /// The trusted CAs' roles and pins, and where a rotation stands.
    Status,
    /// One step of a CA rotation: `begin` (a new CA is trusted next to the
    /// current one; agents learn it), `switch` (control's certificate comes
    /// from the new CA), `retire` (the old CA is no longer trusted).
    Rotate {
        #[arg(value_enum)]
        step: RotateStep,
    },
}

/// A rotation step.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum RotateStep {
    /// Trust a new CA next to the current one.
    Begin,
    /// Issue control's server certificate from the new CA.
    Switch,
    /// Stop trusting the old CA.
    Retire,
}

fn print_info(i: &pb::CaInfo, json_out: bool) {
    if json_out {
        let certs: Vec<_> =
            i.certificates.iter().map(|c| json!({"role": c.role, "pin": c.pin, "pem": c.pem})).collect();
        println!("{}", json!({"phase": i.phase, "certificates": certs}));
        return;
    }
    println!("phase: {}", i.phase);
    for c in &i.certificates {
        println!("{:<9} {}", c.role, c.pin);
    }
}

/// Runs `cmd` against control.
pub(crate) async fn run(a: &mut Admin, cmd: Option<&CaCmd>, json_out: bool) -> anyhow::Result<()> {
    match cmd.unwrap_or(&CaCmd::Pem) {
        CaCmd::Pem => {
            let info = a.get_ca(pb::Empty {}).await?.into_inner();
            if json_out {
                print_info(&info, true);
            } else {
                for c in &info.certificates {
                    print!("{}", c.pem);
                }
            }
        }
        CaCmd::Status => print_info(&a.get_ca(pb::Empty {}).await?.into_inner(), json_out),
        CaCmd::Rotate { step } => {
            use pb::rotate_ca_request::Step;
            let step = match step {
                RotateStep::Begin => Step::Begin,
                RotateStep::Switch => Step::Switch,
                RotateStep::Retire => Step::Retire,
            };
            let info = a.rotate_ca(pb::RotateCaRequest { step: step.into() }).await?.into_inner();
            print_info(&info, json_out);
        }
    }
    Ok(())
}
