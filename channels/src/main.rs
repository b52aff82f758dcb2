//! `carapace-channel`: see the library's documentation.

const USAGE: &str = "\
carapace-channel: a channel adapter (Telegram, e-mail, webhook), run confined by `carapace run`.

Usage: carapace-channel [--help | --version]

It takes no arguments. It reads its settings from $CARAPACE_CHANNEL_SETTINGS (JSON, written by
the supervisor from [channels.NAME] of carapace.toml), asks the broker at fd $CARAPACE_BROKER_FD
(default 3) for its network connections and its credential, delivers what its service receives
to the broker and sends what the broker's outbox holds for its channel. A webhook adapter serves
HTTP on the listening socket at fd $CARAPACE_LISTEN_FD.
";

fn main() {
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return 0;
        }
        Some("-V" | "--version") => {
            println!("carapace-channel {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Some(other) => {
            eprintln!("carapace-channel: unexpected argument {other:?}\n\n{USAGE}");
            return 2;
        }
    }
    // Logs go to stderr, which the supervisor relays into its own log (one line each).
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAPACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
    match carapace_channels::run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("carapace-channel: {e}");
            2
        }
    }
}
