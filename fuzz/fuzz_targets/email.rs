//! Fuzz the e-mail adapter's parser (a raw message from the IMAP server): nothing may panic,
//! and what parses must hold the invariants the broker checks.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run email corpus/email -- -max_total_time=120`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::email::parse::fuzz_message(data);
});
