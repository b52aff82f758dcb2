//! Fuzz the Signal adapter's parser (a line from signal-cli's JSON-RPC daemon, a `send`
//! result): nothing may panic, and what parses must hold the invariants the broker checks.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run signal corpus/signal -- -max_total_time=120`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::fuzz_signal_input(data);
});
