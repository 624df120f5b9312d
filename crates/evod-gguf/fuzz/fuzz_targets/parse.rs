//! Fuzz target: any bytes through the validating parser; whatever parses
//! must be self-consistent and its tensors readable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = evod_gguf::GgufFile::parse("fuzz.gguf", data) {
        for t in h.tensors() {
            assert_eq!(h.tensor_bytes_in(data, t).len() as u64, t.size);
            let _ = h.tensor_f32_in(data, t);
        }
    }
});
