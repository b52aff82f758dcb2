//! Fuzz what the gateway parses from outside (client frames, model answers, auth headers,
//! settings, endpoint URLs): nothing may panic, and what decodes must hold its invariants.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run gateway -- -max_total_time=120 -dict=gateway.dict`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_gateway::fuzz_input(data);
});
