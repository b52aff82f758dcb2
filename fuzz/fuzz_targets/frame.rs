//! Fuzz the broker's frame decoders (requests strictly, replies/events leniently): nothing may
//! panic, and whatever decodes must round-trip through the encoder.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_total_time=120 -dict=frame.dict`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_broker::protocol::fuzz_frame(data);
});
