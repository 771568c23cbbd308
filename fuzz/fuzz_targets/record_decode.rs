//! The store's record decoder: corrupt bytes on disk are an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tokenvault::store::fuzz_decode_record(data);
});
