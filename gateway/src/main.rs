//! The gateway (stand-in until the gateway issue): serves the listener the supervisor hands over.

fn main() {
    eprintln!("carapace-gateway: not written yet");
    std::process::exit(1);
}
