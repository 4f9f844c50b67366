//! gRPC server reflection as generic clients speak it: v1alpha, through grpcio's own Python
//! client (`tests/grpc_reflection_client.py`), against a real `switchyard serve`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{model, output_within, python, serve};

#[test]
fn grpcio_reflection_v1alpha_resolves_the_api_and_calls_it() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path(), "tiny-mixtral", |_| {});
    let server = serve(&["--model", dir.path().to_str().unwrap()]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/grpc_reflection_client.py"
    );
    let out = output_within(
        Command::new(python()).args([script, &server.address]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "grpc_reflection_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    // The model id that ListModels answered, through messages built from reflection alone.
    assert!(!stdout.lines().last().unwrap_or("").is_empty());
}
