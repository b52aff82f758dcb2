//! Dead-letter queue: entries persist, list, release and drop; ids cannot escape the directory.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use carapace_broker::audit::Who;
use carapace_broker::dlq::{DeadLetters, DlqError, Entry};

fn entry(n: u32) -> Entry {
    Entry {
        channel: "log".into(),
        recipient: format!("user{n}@example.com"),
        body: format!("message {n}\nwith \"quotes\" and ünïcode"),
        reason: "recipient not allowlisted".into(),
        who: Who {
            id: 3,
            role: "gateway".into(),
            profile: "agent".into(),
        },
        ts: "2026-11-21T13:20:07.000000Z".into(),
    }
}

#[test]
fn put_list_get_release_drop_and_persistence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/dlq");
    let q = DeadLetters::open(&dir).unwrap();
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let a = q.put(&entry(1)).unwrap();
    let b = q.put(&entry(2)).unwrap();
    let c = q.put(&entry(3)).unwrap();
    assert!(a < b && b < c, "ids sort by time: {a} {b} {c}");
    let file = dir.join(format!("{a}.json"));
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // No temporary files left behind.
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with('.')));

    assert_eq!(q.get(&b).unwrap(), entry(2));

    // Reopen: still there, in order.
    drop(q);
    let q = DeadLetters::open(&dir).unwrap();
    let l = q.list().unwrap();
    assert!(l.unreadable.is_empty());
    let ids: Vec<&str> = l.letters.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, [a.as_str(), b.as_str(), c.as_str()]);
    assert_eq!(l.letters[2].entry, entry(3));

    // Release takes it out.
    assert_eq!(q.release(&a).unwrap(), entry(1));
    assert!(matches!(q.release(&a), Err(DlqError::NotFound { .. })));
    assert!(matches!(q.get(&a), Err(DlqError::NotFound { .. })));
    // Drop deletes.
    q.drop(&b).unwrap();
    assert!(matches!(q.drop(&b), Err(DlqError::NotFound { .. })));
    let l = q.list().unwrap();
    assert_eq!(l.letters.len(), 1);
    assert_eq!(l.letters[0].id, c);
}

#[test]
fn ids_with_path_tricks_are_refused_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dlq");
    let q = DeadLetters::open(&dir).unwrap();
    // A file one level up that a `../victim` id would reach.
    let victim = tmp.path().join("victim.json");
    fs::write(&victim, b"{}").unwrap();
    for id in [
        "../victim",
        "..",
        "a/b",
        "/etc/passwd",
        ".hidden",
        "",
        "x\0y",
    ] {
        assert!(
            matches!(q.drop(id), Err(DlqError::BadId { .. })),
            "drop {id:?}"
        );
        assert!(
            matches!(q.release(id), Err(DlqError::BadId { .. })),
            "release {id:?}"
        );
        assert!(
            matches!(q.get(id), Err(DlqError::BadId { .. })),
            "get {id:?}"
        );
    }
    assert!(victim.exists());
}

#[test]
fn a_corrupt_entry_is_reported_not_hidden_and_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let q = DeadLetters::open(tmp.path()).unwrap();
    let good = q.put(&entry(1)).unwrap();
    let bad = "00000000000000000001-1-0";
    fs::write(tmp.path().join(format!("{bad}.json")), b"{not json").unwrap();
    fs::write(tmp.path().join("stray.txt"), b"?").unwrap();
    // A temporary file of a write in progress is ignored.
    fs::write(tmp.path().join(".x.json.tmp.1.1"), b"partial").unwrap();

    let l = q.list().unwrap();
    assert_eq!(l.letters.len(), 1);
    assert_eq!(l.letters[0].id, good);
    assert_eq!(l.unreadable.len(), 2, "{:?}", l.unreadable);
    assert!(l
        .unreadable
        .iter()
        .any(|u| u.file.ends_with(format!("{bad}.json"))));
    assert!(l.unreadable.iter().any(|u| u.file.ends_with("stray.txt")));

    // Releasing it fails and keeps it; dropping it works.
    assert!(matches!(q.release(bad), Err(DlqError::Corrupt { .. })));
    assert!(tmp.path().join(format!("{bad}.json")).exists());
    q.drop(bad).unwrap();
    assert!(!tmp.path().join(format!("{bad}.json")).exists());
}

#[test]
fn unusable_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        DeadLetters::open(&file),
        Err(DlqError::Io { op: "mkdir", .. })
    ));
    // Directory removed under the queue: put fails, nothing claimed.
    let dir = tmp.path().join("gone");
    let q = DeadLetters::open(&dir).unwrap();
    fs::remove_dir(&dir).unwrap();
    assert!(matches!(
        q.put(&entry(1)),
        Err(DlqError::Io { op: "open", .. })
    ));
}
