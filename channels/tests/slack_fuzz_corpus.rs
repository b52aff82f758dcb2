//! Replays every file of the Slack fuzz corpus (`fuzz/corpus/slack/`) through the fuzz entry
//! point, so the normal `cargo test` covers what the fuzzer found, and checks that the seeds
//! still decode as they are named (so the corpus keeps exercising both paths).

use std::path::{Path, PathBuf};

use carapace_channels::fuzz_slack_input;
use carapace_channels::slack::{api_result, parse_frame, Frame, SocketUrl};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/slack")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(corpus().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
}

#[test]
fn replay_slack_fuzz_corpus() {
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
        let result = std::panic::catch_unwind(|| fuzz_slack_input(&data));
        assert!(result.is_ok(), "panic on corpus file {}", path.display());
        n += 1;
    }
    assert!(n >= 15, "fuzz corpus has only {n} files");
}

#[test]
fn corpus_seeds_decode_as_named() {
    let delivered = |name: &str| match parse_frame(&read(name)) {
        Ok(Frame::Envelope { message, .. }) => message,
        other => panic!("{name}: {other:?}"),
    };
    for name in [
        "events_api_channel_message.json",
        "events_api_thread_reply.json",
        "events_api_dm.json",
        "events_api_file_share.json",
    ] {
        assert!(delivered(name).is_ok(), "{name}");
    }
    for name in [
        "events_api_bot_message.json",
        "events_api_message_changed.json",
        "slash_command.json",
    ] {
        assert!(delivered(name).is_err(), "{name}");
    }
    let m = delivered("events_api_channel_message.json").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.text, "hello <agent> & friends");
    assert_eq!(parse_frame(&read("hello.json")), Ok(Frame::Hello));
    assert!(matches!(
        parse_frame(&read("disconnect_link_disabled.json")),
        Ok(Frame::Disconnect { reason }) if reason == "link_disabled"
    ));
    for name in ["truncated.json", "bad_utf8.bin"] {
        assert!(parse_frame(&read(name)).is_err(), "{name}");
    }
    let open =
        api_result(200, None, &read("connections_open_ok.json")).unwrap_or_else(|e| panic!("{e}"));
    let url = open["url"].as_str().unwrap_or("");
    assert!(SocketUrl::parse(url).is_ok(), "{url}");
    assert!(api_result(200, None, &read("post_message_ok.json")).is_ok());
    assert!(api_result(429, Some(30), &read("ratelimited.json"))
        .is_err_and(|e| e.retry_after.is_some()));
    assert!(api_result(200, None, &read("channel_not_found.json")).is_err_and(|e| !e.retry()));
}
