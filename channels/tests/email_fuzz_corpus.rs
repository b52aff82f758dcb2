//! Replays every file of the e-mail fuzz corpus (`fuzz/corpus/email/`) through the fuzz entry
//! point, so the normal `cargo test` covers what the fuzzer found.

use std::path::Path;

use carapace_channels::email::parse::{fuzz_message, parse_message};

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/email")
}

#[test]
fn replay_email_fuzz_corpus() {
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
        let result = std::panic::catch_unwind(|| fuzz_message(&data));
        assert!(result.is_ok(), "panic on corpus file {}", path.display());
        n += 1;
    }
    assert!(n >= 10, "fuzz corpus has only {n} files");
}

/// The seeds that must parse do, and those that must not do not (so the corpus keeps
/// exercising both paths).
#[test]
fn corpus_seeds_parse_as_named() {
    let read = |name: &str| {
        std::fs::read(corpus().join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"))
    };
    for name in [
        "plain.eml",
        "reply_thread.eml",
        "html_only.eml",
        "alternative.eml",
        "attachment.eml",
        "encoded_headers.eml",
        "nested_multipart.eml",
        "truncated_multipart.eml",
        "lf_only.eml",
    ] {
        assert!(parse_message(&read(name)).is_ok(), "{name}");
    }
    for name in [
        "no_from.eml",
        "bad_from.eml",
        "garbage.bin",
        "empty_headers.eml",
    ] {
        assert!(parse_message(&read(name)).is_err(), "{name}");
    }
    let p = parse_message(&read("attachment.eml")).unwrap();
    assert!(
        p.body.contains("[attachment q3.pdf (8 bytes) refused]"),
        "{}",
        p.body
    );
    let p = parse_message(&read("alternative.eml")).unwrap();
    assert!(p.body.contains("café"), "{}", p.body);
}
