//! Replays every file of the Discord fuzz corpus (`fuzz/corpus/discord/`) through the fuzz entry
//! point, so the normal `cargo test` covers what the fuzzer found; and checks that the real
//! frames among the seeds decode as what they are.

use std::path::Path;

use carapace_channels::discord::fuzz_discord_input;
use carapace_channels::discord::gateway::{inbound_of, parse_frame, Event, Frame};

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/discord")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(corpus().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
}

#[test]
fn replay_discord_fuzz_corpus() {
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
        let result = std::panic::catch_unwind(|| fuzz_discord_input(&data));
        assert!(result.is_ok(), "panic on corpus file {}", path.display());
        n += 1;
    }
    assert!(n >= 20, "fuzz corpus has only {n} files");
}

#[test]
fn corpus_seeds_decode_as_named() {
    let frame = |name: &str| parse_frame(&read(name));
    assert!(matches!(frame("hello.json"), Ok(Frame::Hello { .. })));
    assert!(matches!(
        frame("invalid_session.json"),
        Ok(Frame::InvalidSession { resumable: false })
    ));
    assert!(matches!(
        frame("ready.json"),
        Ok(Frame::Dispatch {
            seq: 1,
            event: Event::Ready(_)
        })
    ));
    assert!(matches!(
        frame("resumed.json"),
        Ok(Frame::Dispatch {
            seq: 42,
            event: Event::Resumed
        })
    ));
    for (name, delivered) in [
        ("message_guild.json", true),
        ("message_dm_attachment.json", true),
        ("message_bot_webhook.json", false),
        ("message_join.json", false),
    ] {
        let Ok(Frame::Dispatch {
            event: Event::Message(m),
            ..
        }) = frame(name)
        else {
            panic!("{name}: not a message")
        };
        assert_eq!(
            inbound_of(&m, Some("1100000000000000001")).is_ok(),
            delivered,
            "{name}"
        );
    }
    assert!(matches!(
        frame("message_malformed.json"),
        Ok(Frame::Dispatch {
            seq: 7,
            event: Event::Malformed(_)
        })
    ));
    for name in [
        "dispatch_without_seq.json",
        "truncated.json",
        "rest_429.json",
    ] {
        assert!(frame(name).is_err(), "{name}");
    }
}
