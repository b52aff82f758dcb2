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
    std::process::exit(carapace_gateway::child_main(
        "carapace-channel",
        env!("CARGO_PKG_VERSION"),
        USAGE,
        carapace_channels::run,
    ));
}
