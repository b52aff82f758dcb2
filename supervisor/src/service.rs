//! `carapace run`: the supervisor as a long-running service (to be written).

use clap::Args;

/// `carapace run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file [default: /etc/carapace/carapace.toml, else the embedded default]
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

/// Entry point of `carapace run`; returns the process exit code.
pub fn run(_a: RunArgs) -> i32 {
    eprintln!("carapace: run: not implemented yet");
    126
}
