//! Khlang's wire types. Only the server's gRPC layer and the client see these.
#![forbid(unsafe_code)]

/// Generated protobuf and tonic code for package `khlang.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("khlang.v1");
}

/// Encoded `FileDescriptorSet` of every Khlang .proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/khlang_descriptor.bin"));
