//! Fuzz the IRC adapter's parser (lines from the IRC server) and what a PRIVMSG delivers:
//! nothing may panic, and what is delivered must hold the invariants the broker checks.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run irc corpus/irc -- -max_total_time=120`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::fuzz_irc_input(data);
});
