//! Replays every file of the frame fuzz corpus (`fuzz/corpus/frame/`) through the fuzz entry
//! point, so the normal `cargo test` covers what the fuzzer found.

use std::path::Path;

#[test]
fn replay_frame_fuzz_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame");
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
        let result = std::panic::catch_unwind(|| carapace_broker::protocol::fuzz_frame(&data));
        assert!(result.is_ok(), "panic on corpus file {}", path.display());
        n += 1;
    }
    assert!(n >= 30, "fuzz corpus has only {n} files");
}

/// The seeds that must decode do (so the corpus keeps exercising the success paths).
#[test]
fn corpus_seeds_decode_as_named() {
    use carapace_broker::protocol::{decode_request, decode_server_frame};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame");
    let read =
        |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"));
    for name in [
        "req_ping",
        "req_connect",
        "req_open_read",
        "req_secret",
        "req_send",
        "req_exec",
        "req_exec_cwd",
        "req_max_id",
    ] {
        assert!(decode_request(&read(name)).is_ok(), "{name}");
    }
    for name in [
        "bad_id_zero",
        "bad_version",
        "bad_unknown_op",
        "bad_unknown_field",
        "bad_dup_keys",
    ] {
        assert!(decode_request(&read(name)).is_err(), "{name}");
    }
    for name in [
        "rep_ping",
        "rep_connect",
        "rep_send_dlq",
        "rep_err",
        "ev_exit",
        "ev_exit_min",
    ] {
        assert!(decode_server_frame(&read(name)).is_ok(), "{name}");
    }
}
