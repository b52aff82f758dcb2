//! Fuzz what the Discord adapter parses from outside (Gateway frames, REST answers and their
//! rate-limit headers, Gateway URLs): nothing may panic, and what decodes must hold its
//! invariants.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run discord -- -max_total_time=120`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::discord::fuzz_discord_input(data);
});
