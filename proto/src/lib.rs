//! The wire: package `switchyard.v1`, generated from `proto/switchyard/v1/*.proto`, and the
//! clients of etcd's v3 API ([`etcd`]), generated from our definitions of the part we use.
//!
//! `Inference` is the client API the coordinator serves; `Worker` is the control and data plane
//! between the coordinator and its workers. This crate holds only generated code, the
//! descriptor set for server reflection and the canonical names of status codes; conversions
//! live with the types they convert.

pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// The calls of etcd's v3 gRPC API that Switchyard makes (KV, Watch, Lease, Election), from our
/// own definitions in `proto/etcd/`: etcd's package, service and method names and field
/// numbers, only the fields we use. (The `etcd-client` crate would bring etcd's full API, but
/// its build script needs a `protoc` binary, and Switchyard builds with only Rust installed.)
pub mod etcd {
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
