//! Fuzz what the channel adapters parse from outside (Telegram answers, webhook bodies and
//! signatures, settings, service URLs) and the message splitting: nothing may panic, and what
//! decodes must hold its invariants.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run channels -- -max_total_time=120 -dict=channels.dict`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::fuzz_input(data);
});
