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
    std::process::exit(carapace_gateway::child_main(
        "carapace-gateway",
        env!("CARGO_PKG_VERSION"),
        USAGE,
        carapace_gateway::run,
    ));
}
