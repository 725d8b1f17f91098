//! The `mesh.v1` protocol, generated from `proto/mesh/v1/*.proto`.

/// `mesh.v1` messages, and with the `grpc` feature (the default) services.
// `allow`, not `expect`: whether these fire depends on what the .proto
// files contain, and generated code is not ours to fix.
#[allow(missing_debug_implementations, unreachable_pub, clippy::all, reason = "generated code")]
pub mod v1 {
    // What `tonic::include_proto!` expands to, without needing tonic: the
    // messages build with or without the `grpc` feature.
    include!(concat!(env!("OUT_DIR"), "/mesh.v1.rs"));

    /// Encoded `FileDescriptorSet` of `mesh.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mesh_v1_descriptor.bin"));
}

/// The capability version this build speaks. The history is in
/// `proto/mesh/v1/mesh.proto` next to `Capabilities`; bump both together.
pub const CAPABILITY_VERSION: u32 = 7;

/// This build's [`v1::Capabilities`], naming the given component.
#[must_use]
pub fn capabilities(component: &str) -> v1::Capabilities {
    v1::Capabilities {
        capability_version: CAPABILITY_VERSION,
        software: format!("{component} {}", env!("CARGO_PKG_VERSION")),
        limits: None,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    #[test]
    fn capabilities_round_trip_on_the_wire() {
        let caps = super::capabilities("mesh-agent");
        let bytes = caps.encode_to_vec();
        let back = super::v1::Capabilities::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.capability_version, super::CAPABILITY_VERSION);
        assert!(back.software.starts_with("mesh-agent "));
    }

    #[test]
    fn descriptor_set_names_the_package() {
        let set = prost_types::FileDescriptorSet::decode(super::v1::FILE_DESCRIPTOR_SET).unwrap();
        assert!(set.file.iter().any(|f| f.package() == "mesh.v1"));
    }
}
