//! Any bytes as a GGUF file: the header is refused with a reason, or every tensor it lists lies
//! in the data section, inside the file, with exactly the bytes its dims and type need.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_model::gguf::parse;

fuzz_target!(|file: &[u8]| {
    if let Ok(h) = parse(file) {
        for t in &h.tensors {
            assert!(t.range.start >= h.data_start && t.range.end <= file.len(), "{t:?}");
            let row = t.ty.row_bytes(t.dims[0]).expect("whole blocks");
            let size = t.dims[1..].iter().product::<usize>() * row;
            assert_eq!(t.range.len(), size, "{t:?}");
        }
    }
});
