//! The `carapace` binary: everything lives in the library (`carapace_supervisor::cli`).

fn main() {
    std::process::exit(carapace_supervisor::cli::main());
}
