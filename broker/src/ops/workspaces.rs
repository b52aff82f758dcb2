//! Tool workspaces: which host directory a tool (or a file request) works in.
//!
//! - **Per owner.** A gateway names who a tool runs for (`owner`: `token:<id>`,
//!   `channel:<name>:<conversation>`, `job:<name>`); the tool gets that owner's own directory,
//!   chosen by the supervisor from the SHA-256 of the key ([`owner_digest`]), so the path
//!   never holds the key's text and cannot leave the owners' directory.
//! - **Granted.** The operator names project directories (`[workspaces.NAME]` of the
//!   configuration) and which profiles may use them; `exec` and `open` may name one.
//!
//! Relative paths within a workspace (`cwd`, an `open` path) are checked here for their
//! syntax ([`check_relative_path`]); the opening itself is `openat2(RESOLVE_BENEATH)`.

use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest owner key, in bytes.
pub const MAX_OWNER_KEY: usize = 256;
/// Longest relative path within a workspace, in bytes.
pub const MAX_RELATIVE_PATH: usize = 4095;

/// A workspace the operator granted (`[workspaces.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedWorkspace {
    pub name: String,
    /// Absolute and canonical: the directory tools and file requests work beneath.
    pub path: PathBuf,
    /// `access = "rw"`: tools may write it, `open` may write and create in it. `ro`: neither.
    pub writable: bool,
    /// The profiles whose children may name it.
    pub profiles: Vec<String>,
    pub why: String,
}

/// A workspace name: 1 to 64 characters among `a-z`, `0-9`, `_` and `-`.
pub fn valid_workspace_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Check an owner key: 1..=[`MAX_OWNER_KEY`] bytes, no control characters.
pub fn check_owner_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty owner key");
    }
    if key.len() > MAX_OWNER_KEY {
        return Err("owner key longer than 256 bytes");
    }
    if key.chars().any(char::is_control) {
        return Err("control character in the owner key");
    }
    Ok(())
}

/// The name of an owner's directory: the first 32 hex digits of the SHA-256 of the key.
/// Only `[0-9a-f]`, so it is always one plain path component.
pub fn owner_digest(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    hex::encode(&d[..16])
}

/// Check a path relative to a workspace: not empty, not absolute, no NUL, no `..`, no `.`
/// after the start, no empty component (`a//b`), no trailing `/`, shorter than PATH_MAX.
/// `.` alone is the workspace itself. Returns the path as components joined again.
pub fn check_relative_path(p: &str) -> Result<PathBuf, &'static str> {
    if p.is_empty() {
        return Err("empty path");
    }
    if p.len() > MAX_RELATIVE_PATH {
        return Err("path longer than 4095 bytes");
    }
    if p.contains('\0') {
        return Err("NUL in the path");
    }
    if p.starts_with('/') {
        return Err("absolute path: give it relative to the workspace");
    }
    if p == "." {
        return Ok(PathBuf::from("."));
    }
    let mut out = PathBuf::new();
    for part in p.split('/') {
        match part {
            "" => return Err("empty path component (`//` or a trailing `/`)"),
            "." => return Err("`.` component"),
            ".." => return Err("`..` component: paths stay beneath the workspace"),
            s => out.push(s),
        }
    }
    debug_assert!(out.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(out)
}

/// `rel` ([`check_relative_path`]) joined beneath `dir`; `.` is `dir` itself.
pub fn beneath(dir: &Path, rel: &Path) -> PathBuf {
    if rel == Path::new(".") {
        dir.to_path_buf()
    } else {
        dir.join(rel)
    }
}

/// Why a request's workspace cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkspaceRefusal {
    #[error("invalid workspace name {0:?}: 1 to 64 characters among a-z, 0-9, `_` and `-`")]
    BadName(String),
    #[error("no workspace `{name}` is granted to profile `{profile}`")]
    NotGranted { name: String, profile: String },
}

impl super::Ops {
    /// The granted workspace `name`, if the identity's profile may use it. An unknown name and
    /// one granted to other profiles get the same refusal.
    pub(crate) fn granted(
        &self,
        who: &crate::server::Identity,
        name: &str,
    ) -> Result<GrantedWorkspace, WorkspaceRefusal> {
        if !valid_workspace_name(name) {
            return Err(WorkspaceRefusal::BadName(name.to_string()));
        }
        crate::sync::read(&self.workspaces)
            .iter()
            .find(|w| w.name == name && w.profiles.contains(&who.profile))
            .cloned()
            .ok_or_else(|| WorkspaceRefusal::NotGranted {
                name: name.to_string(),
                profile: who.profile.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_beneath() {
        for ok in [
            ".",
            "a",
            "a/b.txt",
            "src/main.rs",
            "..a",
            "a..",
            "a/.hidden",
        ] {
            assert!(check_relative_path(ok).is_ok(), "{ok} refused");
        }
        assert_eq!(check_relative_path("a/b").unwrap(), PathBuf::from("a/b"));
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_relative_path(&"a/".repeat(2048)).is_err());
    }

    #[test]
    fn owner_keys_and_digests() {
        assert!(check_owner_key("token:tok_1").is_ok());
        assert!(check_owner_key("channel:tg:12345").is_ok());
        assert!(check_owner_key("").is_err());
        assert!(check_owner_key("a\nb").is_err());
        assert!(check_owner_key(&"x".repeat(257)).is_err());
        let a = owner_digest("token:a");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, owner_digest("token:b"));
        assert_eq!(a, owner_digest("token:a"));
        // Whatever the key, the digest is one plain component.
        let d = owner_digest("../../etc");
        assert!(!d.contains('/') && !d.contains('.'));
    }

    #[test]
    fn workspace_names() {
        assert!(valid_workspace_name("proj-a_1"));
        assert!(!valid_workspace_name(""));
        assert!(!valid_workspace_name("Proj"));
        assert!(!valid_workspace_name("a/b"));
        assert!(!valid_workspace_name(".."));
        assert!(!valid_workspace_name(&"a".repeat(65)));
    }

    #[test]
    fn beneath_joins() {
        assert_eq!(
            beneath(Path::new("/w"), Path::new(".")),
            PathBuf::from("/w")
        );
        assert_eq!(
            beneath(Path::new("/w"), Path::new("a/b")),
            PathBuf::from("/w/a/b")
        );
    }
}
