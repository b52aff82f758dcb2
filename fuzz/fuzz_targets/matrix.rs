//! Fuzz the Matrix adapter's parsers (a `/sync` answer, an error answer) and its URL and
//! transaction-id encoding: nothing may panic, and what parses must hold the invariants the
//! broker relies on.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run matrix corpus/matrix -- -max_total_time=120`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::fuzz_matrix_input(data);
});
