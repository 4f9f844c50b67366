//! Any text as a `grpc-timeout` header: refused, or a time that makes a deadline.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_net::grpc::grpc_timeout;

fuzz_target!(|value: &str| {
    if let Ok(d) = grpc_timeout(value) {
        let _deadline = std::time::Instant::now() + d;
    }
});
