//! Fuzz the policy engine end to end: parse -> compile every profile for every Landlock ABI ->
//! explain -> evaluate -> run the policy's tests. Nothing may panic.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run policy -- -max_total_time=60`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_policy::fuzz::policy_roundtrip(data);
});
