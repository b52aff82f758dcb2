//! The fake signal-cli the Signal end-to-end tests install as the daemon's `program`
//! (see `carapace_tests::fake_signal_cli`).

fn main() -> std::process::ExitCode {
    carapace_tests::fake_signal_cli::daemon_main(std::env::args().skip(1).collect())
}
