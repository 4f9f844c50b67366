//! Any bytes as the body of `/v1/completions` and `/v1/chat/completions`: refused with an
//! OpenAI error, or requests whose fields are in range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_coordinator::openai::{chat_requests, completion_requests};

fuzz_target!(|body: &[u8]| {
    for decoded in [completion_requests(body, "m"), chat_requests(body, "m")] {
        if let Ok(d) = decoded {
            assert!(!d.requests.is_empty() && d.requests.len() <= 1024);
            for (r, _) in &d.requests {
                assert!((0.0..=2.0).contains(&r.temperature));
            }
        }
    }
});
