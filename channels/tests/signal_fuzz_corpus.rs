//! Replays every file of the Signal fuzz corpus (`fuzz/corpus/signal/`) through the fuzz entry
//! point, so the normal `cargo test` covers what the fuzzer found.

use std::path::Path;

use carapace_channels::fuzz_signal_input;
use carapace_channels::signal::wire::{parse_line, salvage, Frame, Received};

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/signal")
}

#[test]
fn replay_signal_fuzz_corpus() {
    let dir = corpus();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the fuzz corpus {}: {e}", dir.display()));
    let mut n = 0;
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| fuzz_signal_input(&data));
        assert!(result.is_ok(), "panic on corpus file {}", path.display());
        n += 1;
    }
    assert!(n >= 10, "fuzz corpus has only {n} files");
}

/// The seeds decode as named, so the corpus keeps exercising every path.
#[test]
fn corpus_seeds_decode_as_named() {
    let read = |name: &str| {
        std::fs::read(corpus().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
    };
    for name in [
        "receive-private.json",
        "receive-group.json",
        "receive-attachment.json",
    ] {
        assert!(
            matches!(
                parse_line(&read(name)),
                Ok(Frame::Received(Received::Message(_)))
            ),
            "{name}"
        );
    }
    for name in ["receive-sync-subscription.json", "receive-receipt.json"] {
        assert!(
            matches!(
                parse_line(&read(name)),
                Ok(Frame::Received(Received::Skip(_)))
            ),
            "{name}"
        );
    }
    for name in [
        "response-send.json",
        "response-send-short.json",
        "error-ratelimit.json",
        "error-user.json",
    ] {
        assert!(
            matches!(parse_line(&read(name)), Ok(Frame::Response { .. })),
            "{name}"
        );
    }
    assert!(matches!(
        parse_line(&read("error-no-id.json")),
        Ok(Frame::Other(_))
    ));
    for name in ["torn.json", "garbage.txt"] {
        assert!(parse_line(&read(name)).is_err(), "{name}");
    }
    assert!(salvage(&read("torn.json")).is_some());
}
