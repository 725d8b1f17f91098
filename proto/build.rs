//! Compiles `mesh/v1/*.proto` with a vendored protoc: the build never depends
//! on a `protoc` being installed on the machine.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().context("vendored protoc")?;
    let include = protoc_bin_vendored::include_path().context("vendored protoc includes")?;
    let protos: Vec<_> =
        std::fs::read_dir("mesh/v1")?.map(|entry| entry.map(|e| e.path())).collect::<Result<_, _>>()?;
    let mut protos: Vec<_> = protos.into_iter().filter(|p| p.extension().is_some_and(|e| e == "proto")).collect();
    protos.sort();
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The services only with the `grpc` feature (messages need prost alone).
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .file_descriptor_set_path(out_dir.join("mesh_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &[std::path::PathBuf::from("."), include])
        .context("compiling mesh.v1")?;
    println!("cargo:rerun-if-changed=mesh");
    Ok(())
}
