//! Compiles the .proto files with protox (pure Rust, so no `protoc` is needed) and generates
//! the tonic services and prost messages, plus the descriptor set for server reflection.
//! Our definitions of the part of etcd's v3 API Switchyard uses (`proto/etcd/`) get clients
//! only: Switchyard talks to a real etcd.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "switchyard/v1/inference.proto",
        "switchyard/v1/worker.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("switchyard_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;

    let etcd = ["etcd/etcdserverpb.proto", "etcd/v3electionpb.proto"];
    println!("cargo:rerun-if-changed=proto/etcd");
    let fds = protox::compile(etcd, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
