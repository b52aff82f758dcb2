//! Fuzz the Slack adapter's parsers (a Socket Mode frame, a Web API answer, the socket URL
//! `apps.connections.open` gives, a recipient): nothing may panic, and what decodes must hold
//! the invariants the adapter relies on.
//!
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run slack corpus/slack -- -max_total_time=120`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    carapace_channels::fuzz_slack_input(data);
});
