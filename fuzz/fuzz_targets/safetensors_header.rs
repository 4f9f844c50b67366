//! Any bytes as a safetensors file: a header is refused with a reason, or every tensor it
//! lists lies within the file with exactly the bytes its shape needs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_model::safetensors::parse_header;

fuzz_target!(|file: &[u8]| {
    if let Ok((data_start, tensors)) = parse_header(file) {
        let data_len = file.len() - data_start;
        for info in tensors.values() {
            assert!(info.begin <= info.end && info.end <= data_len, "{info:?}");
        }
    }
});
