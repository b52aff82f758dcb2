//! `carapace token create | list | revoke`: the built binary on a temporary state directory
//! (no root, no supervisor needed).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use carapace_broker::tokens::{token_sha256_hex, Scope, TokenStore};

const BIN: &str = env!("CARGO_BIN_EXE_carapace");

fn carapace(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("token")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .output()
        .expect("run carapace")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn create_prints_a_token_that_verifies_once() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = carapace(
        &state,
        &["create", "--name", "laptop", "--scope", "operator"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout
        .split_whitespace()
        .find(|w| w.starts_with("cpt_"))
        .unwrap_or_else(|| panic!("no token in {stdout}"))
        .to_string();
    assert_eq!(stdout.matches(&token).count(), 1, "shown once: {stdout}");
    assert!(stdout.contains("will not be shown again"), "{stdout}");
    assert!(stdout.contains("Authorization: Bearer"), "{stdout}");
    // The state directory was created 0700, the store is 0600 and holds only the hash.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("tokens.json")), 0o600);
    let file = std::fs::read_to_string(state.join("tokens.json")).unwrap();
    assert!(!file.contains(&token));
    // It verifies against the store, as the broker's `auth` checks it.
    let store = TokenStore::in_state_dir(&state);
    let info = store
        .verify(&token_sha256_hex(&token))
        .unwrap()
        .expect("the printed token verifies");
    assert_eq!(info.name, "laptop");
    assert_eq!(info.scope, Scope::Operator);
    assert!(stdout.contains(&info.id), "{stdout}");

    // --json, with the defaults: name "token", scope client.
    let out = carapace(&state, &["create", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "token");
    assert_eq!(v["scope"], "client");
    let t = v["token"].as_str().unwrap();
    let again = store.verify(&token_sha256_hex(t)).unwrap().unwrap();
    assert_eq!(v["id"], again.id.as_str());
    assert_eq!(v["created"], again.created.as_str());
}

#[test]
fn list_shows_tokens_without_hashes_and_revoke_removes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    // An empty (missing) store lists nothing, successfully.
    let out = carapace(state, &["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("no tokens"));

    let store = TokenStore::in_state_dir(state);
    let (laptop, laptop_token) = store.create("laptop", Scope::Operator).unwrap();
    let (phone, phone_token) = store.create("phone", Scope::Client).unwrap();
    let out = carapace(state, &["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    for s in [
        &laptop.id, &phone.id, "laptop", "phone", "operator", "client",
    ] {
        assert!(listed.contains(s), "{s} missing in\n{listed}");
    }
    for secret in [
        &laptop_token,
        &phone_token,
        &token_sha256_hex(&laptop_token),
        &token_sha256_hex(&phone_token),
    ] {
        assert!(!listed.contains(secret.as_str()), "{listed}");
    }
    let out = carapace(state, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    assert_eq!(v[0]["id"], laptop.id.as_str());
    assert_eq!(v[0]["scope"], "operator");
    assert!(v[0].get("sha256").is_none());

    // Revoke by id, then by name.
    let out = carapace(state, &["revoke", &laptop.id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&laptop.id));
    assert_eq!(
        store.verify(&token_sha256_hex(&laptop_token)).unwrap(),
        None
    );
    assert!(store
        .verify(&token_sha256_hex(&phone_token))
        .unwrap()
        .is_some());
    let out = carapace(state, &["revoke", "phone"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(store.verify(&token_sha256_hex(&phone_token)).unwrap(), None);
    assert!(!text(&carapace(state, &["list"]).stdout).contains(&phone.id));

    // Gone: revoking again fails (1), with the reason on stderr.
    let out = carapace(state, &["revoke", "phone"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no token"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ambiguous_names_and_a_corrupt_store_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let store = TokenStore::in_state_dir(state);
    let (a, _) = store.create("ci", Scope::Client).unwrap();
    let (b, _) = store.create("ci", Scope::Client).unwrap();
    let out = carapace(state, &["revoke", "ci"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&a.id) && err.contains(&b.id), "{err}");
    assert_eq!(store.list().unwrap().len(), 2, "nothing revoked");

    std::fs::write(state.join("tokens.json"), "{not json").unwrap();
    for args in [&["list"][..], &["create"], &["revoke", &a.id]] {
        let out = carapace(state, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains("corrupt"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(state.join("tokens.json")).unwrap(),
        "{not json",
        "left untouched"
    );
}

#[test]
fn bad_usage_exits_2_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for args in [
        &["create", "--scope", "admin"][..],
        &["create", "--scope", "Operator"],
        &["create", "--name", ""],
        &["create", "--name", "two\nlines"],
        &["revoke"],
        &["frobnicate"],
    ] {
        let out = carapace(&state, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(!state.join("tokens.json").exists());
}
