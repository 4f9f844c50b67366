//! The wire: package `switchyard.v1`, generated from `proto/switchyard/v1/*.proto`.
//!
//! `Inference` is the client API the coordinator serves; `Worker` is the control and data plane
//! between the coordinator and its workers. This crate holds only generated code and the
//! descriptor set for server reflection; conversions live with the types they convert.

pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// The encoded `FileDescriptorSet` of every Switchyard proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));
