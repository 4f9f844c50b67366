//! The wire: package `switchyard.v1`, generated from `proto/switchyard/v1/*.proto`, and the
//! clients of etcd's v3 API ([`etcd`]), generated from etcd's own protos.
//!
//! `Inference` is the client API the coordinator serves; `Worker` is the control and data plane
//! between the coordinator and its workers. This crate holds only generated code and the
//! descriptor set for server reflection; conversions live with the types they convert.

pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// etcd's v3 gRPC API (KV, Watch, Lease, Election), from the protos of etcd 3.x in
/// `proto/etcd/` (Apache-2.0, as vendored by the etcd-client crate).
pub mod etcd {
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

/// The encoded `FileDescriptorSet` of every Switchyard proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));
