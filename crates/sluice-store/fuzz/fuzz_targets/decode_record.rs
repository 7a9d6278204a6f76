//! The record decoder must never panic, and whatever it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_store::codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = codec::decode(data) {
        let again = codec::encode(payload).expect("a decoded payload fits a frame");
        assert_eq!(again, data, "decode accepted a frame encode would not write");
    }
});
