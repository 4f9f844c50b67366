//! The wire: package `switchyard.v1`, generated from `proto/switchyard/v1/*.proto`, and the
//! clients of etcd's v3 API ([`etcd`]), generated from etcd's own protos.
//!
//! `Inference` is the client API the coordinator serves; `Worker` is the control and data plane
//! between the coordinator and its workers. This crate holds only generated code, the
//! descriptor set for server reflection and the canonical names of status codes; conversions
//! live with the types they convert.

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

/// The canonical name of a gRPC status code as gRPC tools print it (`RESOURCE_EXHAUSTED`),
/// from tonic's variant name (`ResourceExhausted`).
pub fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_code_names() {
        use super::code_name;
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }
}
