//! The envelope parser: any bytes either decode or are refused, and a decoded envelope
//! re-encodes to exactly its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::envelope::EnvelopeRef;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = EnvelopeRef::decode(data) {
        assert_eq!(env.encode(), data);
    }
});
