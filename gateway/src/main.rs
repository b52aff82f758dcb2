//! `carapace-gateway`: see the library's documentation and docs/protocol.md.

const USAGE: &str = "\
carapace-gateway: the agent gateway, run confined by `carapace run`.

Usage: carapace-gateway [--help | --version]

It takes no arguments. It serves HTTP and WebSocket (JSON-RPC 2.0) on the listening socket at
fd $CARAPACE_LISTEN_FD (refusing to start without one), asks the broker at fd
$CARAPACE_BROKER_FD (default 3) for everything that acts, and reads its settings from
$CARAPACE_GATEWAY_SETTINGS (JSON, written by the supervisor). The protocol is in
docs/protocol.md: GET /health, GET /ws (WebSocket JSON-RPC), POST /rpc, /v1/... REST routes;
every route but /health needs `Authorization: Bearer TOKEN` (`carapace token create`).
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
            println!("carapace-gateway {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Some(other) => {
            eprintln!("carapace-gateway: unexpected argument {other:?}\n\n{USAGE}");
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
    match carapace_gateway::run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("carapace-gateway: {e}");
            2
        }
    }
}
