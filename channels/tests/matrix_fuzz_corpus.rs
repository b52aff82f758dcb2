//! Replays every file of the Matrix fuzz corpus (`fuzz/corpus/matrix/`) through the fuzz entry
//! point, so the normal `cargo test` covers what the fuzzer found, and checks that the corpus's
//! real frames decode as they should (so the replay exercises the parser, not only its errors).

use std::path::Path;

use carapace_channels::fuzz_matrix_input;
use carapace_channels::matrix::{parse_sync, Item};

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/matrix")
}

#[test]
fn replay_matrix_fuzz_corpus() {
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
        let result = std::panic::catch_unwind(|| fuzz_matrix_input(&data));
        assert!(result.is_ok(), "panic on corpus file {}", path.display());
        n += 1;
    }
    assert!(n >= 10, "fuzz corpus has only {n} files");
}

#[test]
fn the_corpus_frames_decode_as_expected() {
    let read =
        |name: &str| std::fs::read(corpus().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let me = "@bot:example.org";
    let b = parse_sync(200, &read("sync-text.json"), me).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(&b.items[..], [Item::Message(m)] if m.text == "hello bot"));
    let b = parse_sync(200, &read("sync-mixed.json"), me).unwrap_or_else(|e| panic!("{e}"));
    let delivered = b
        .items
        .iter()
        .filter(|i| matches!(i, Item::Message(_)))
        .count();
    assert_eq!((b.items.len(), delivered), (6, 3));
    let b = parse_sync(200, &read("sync-invite.json"), me).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.invites.len(), 1);
    for bad in [
        "sync-bad-rooms.json",
        "sync-bad-events.json",
        "truncated.json",
    ] {
        assert!(parse_sync(200, &read(bad), me).is_err(), "{bad}");
    }
    let e = parse_sync(429, &read("error-429.json"), me).expect_err("429");
    assert_eq!(e.retry_after, Some(std::time::Duration::from_millis(2000)));
}
