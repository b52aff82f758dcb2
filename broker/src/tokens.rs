//! Client tokens of the gateway: made by the operator (`carapace token create`), shown once,
//! stored only as SHA-256 hashes, checked by the broker (`auth` op) for a gateway that cannot
//! read the store.
//!
//! The store is `<state_dir>/tokens.json` ([`TOKENS_FILE`]):
//!
//! ```json
//! {"version":1,"tokens":[{"id":"1f2e3d4c","name":"laptop","scope":"operator",
//!   "sha256":"<64 lowercase hex>","created":"2026-11-21T13:20:07Z"}]}
//! ```
//!
//! - A token is `cpt_` followed by 32 random bytes (`getrandom`) in base64url without padding;
//!   only its SHA-256 (of the token's UTF-8 text, lowercase hex) is stored. The id is 8 random
//!   lowercase hex characters, unique in the store.
//! - Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
//!   directory; mode 0600) and writers are serialized with `flock` on the sibling
//!   `tokens.json.lock`, so concurrent `create`/`revoke` calls (threads or processes) never lose
//!   each other's changes. Readers need no lock: they see the old or the new file.
//! - A missing file is an empty store. A file that cannot be read or parsed is an error, never
//!   an empty store: fail closed.
//! - [`TokenStore::verify`] compares a presented hash with **every** stored hash in constant
//!   time (no early exit), so the answer's timing does not say how much of a hash matched or
//!   which entry did.
//!
//! Neither the token nor its hash is in [`TokenInfo`], in a `Debug` rendering or in an error.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use crate::durable::{ensure_dir, read_capped, write_atomic, DurableError};

/// File name of the token store in the state directory.
pub const TOKENS_FILE: &str = "tokens.json";
/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "cpt_";
/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Longest token name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Largest store file read.
const MAX_FILE_BYTES: u64 = 4 << 20;
/// Attempts at an id not yet in the store before giving up.
const ID_ATTEMPTS: usize = 64;

/// Errors of the token store. None carries a token or a hash.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token store {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("token store {path} is corrupt ({reason}); it was left untouched")]
    Corrupt { path: PathBuf, reason: String },
    #[error("bad token name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("unknown token scope {scope:?} (operator or client)")]
    BadScope { scope: String },
    #[error("no token with id or name {what:?}")]
    NotFound { what: String },
    #[error("{count} tokens are named {name:?} (ids {}); revoke one by its id", ids.join(", "))]
    Ambiguous {
        name: String,
        count: usize,
        ids: Vec<String>,
    },
    #[error("no random bytes from the kernel: {0}")]
    Random(String),
    #[error("token store {path}: no unused token id after {ID_ATTEMPTS} attempts")]
    NoFreeId { path: PathBuf },
}

/// What a token allows at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything a client may do, and approvals.
    Operator,
    /// Tools, messages, sessions, the agent; not approvals.
    Client,
}

impl Scope {
    /// Wire and file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Operator => "operator",
            Scope::Client => "client",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Scope, TokenError> {
        match s {
            "operator" => Ok(Scope::Operator),
            "client" => Ok(Scope::Client),
            _ => Err(TokenError::BadScope {
                scope: s.chars().take(64).collect(),
            }),
        }
    }
}

/// A token as shown: never its text nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// 8 lowercase hex characters, unique in the store.
    pub id: String,
    /// The operator's name for it (1 to 64 characters, no control characters).
    pub name: String,
    pub scope: Scope,
    /// RFC 3339 UTC, seconds.
    pub created: String,
}

/// One stored token (the file's entries).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    id: String,
    name: String,
    scope: Scope,
    sha256: String,
    created: String,
}

impl fmt::Debug for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stored")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl Stored {
    fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            scope: self.scope,
            created: self.created.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    tokens: Vec<Stored>,
}

/// SHA-256 of the token's UTF-8 bytes, lowercase hex (what the store keeps and `auth` sends).
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `s` is exactly 64 lowercase hex characters (the shape of a stored hash).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why `name` cannot name a token, if it cannot.
pub fn check_name(name: &str) -> Result<(), TokenError> {
    let bad = |reason| TokenError::BadName {
        name: name.chars().take(MAX_NAME_CHARS + 1).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(bad("longer than 64 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("control characters"));
    }
    Ok(())
}

fn is_id(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Base64url without padding (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random(buf: &mut [u8]) -> Result<(), TokenError> {
    getrandom::fill(buf).map_err(|e| TokenError::Random(e.to_string()))
}

/// A new token's text: `cpt_` + base64url of 32 random bytes.
fn new_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    random(&mut bytes)?;
    let token = format!("{TOKEN_PREFIX}{}", base64url(&bytes));
    bytes.fill(0);
    Ok(token)
}

/// Now, RFC 3339 UTC to the second (`YYYY-MM-DDTHH:MM:SSZ`).
fn now_rfc3339() -> String {
    crate::audit::rfc3339_utc_secs(SystemTime::now())
}

/// The token store of one state directory. Cheap; every call reads the file anew, so a token
/// created or revoked by `carapace token` counts at the next `verify` (no restart, no reload).
#[derive(Debug, Clone)]
pub struct TokenStore {
    path: PathBuf,
}

impl TokenStore {
    /// The store in the file `path` (normally `<state_dir>/tokens.json`). Nothing is read or
    /// created yet.
    pub fn new(path: impl Into<PathBuf>) -> TokenStore {
        TokenStore { path: path.into() }
    }

    /// The store of `state_dir` (`<state_dir>/tokens.json`).
    pub fn in_state_dir(state_dir: impl AsRef<Path>) -> TokenStore {
        TokenStore::new(state_dir.as_ref().join(TOKENS_FILE))
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> TokenError + '_ {
        move |source| TokenError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> TokenError {
        TokenError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Every stored token (a missing file: none). Checks the whole file.
    fn load(&self) -> Result<Vec<Stored>, TokenError> {
        let data = match read_capped(&self.path, MAX_FILE_BYTES) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(self.corrupt(e.to_string()))
            }
            Err(e) => return Err(self.io("read")(e)),
        };
        let file: StoreFile =
            serde_json::from_slice(&data).map_err(|e| self.corrupt(e.to_string()))?;
        if file.version != 1 {
            return Err(self.corrupt(format!("unknown version {}", file.version)));
        }
        for (i, t) in file.tokens.iter().enumerate() {
            if !is_id(&t.id) {
                return Err(self.corrupt(format!("token {i}: id is not 8 lowercase hex digits")));
            }
            if !is_sha256_hex(&t.sha256) {
                return Err(self.corrupt(format!(
                    "token {} ({i}): sha256 is not 64 lowercase hex digits",
                    t.id
                )));
            }
            if check_name(&t.name).is_err() {
                return Err(self.corrupt(format!("token {} ({i}): bad name", t.id)));
            }
            if file.tokens[..i].iter().any(|o| o.id == t.id) {
                return Err(self.corrupt(format!("token id {} appears twice", t.id)));
            }
        }
        Ok(file.tokens)
    }

    fn save(&self, tokens: &[Stored]) -> Result<(), TokenError> {
        let file = StoreFile {
            version: 1,
            tokens: tokens.to_vec(),
        };
        let mut data = serde_json::to_vec_pretty(&file)
            .map_err(|e| self.corrupt(format!("cannot encode: {e}")))?;
        data.push(b'\n');
        write_atomic(&self.path, &data)
            .map_err(|DurableError { op, path, source }| TokenError::Io { op, path, source })
    }

    /// Exclusive `flock` on `<file>.lock` (created 0600), held until the guard is dropped.
    fn lock(&self) -> Result<Flock<File>, TokenError> {
        let mut name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| TOKENS_FILE.into());
        name.push(".lock");
        let lock_path = self.dir().join(name);
        let io = |op, source| TokenError::Io {
            op,
            path: lock_path.clone(),
            source,
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| io("open", e))?;
        loop {
            match Flock::lock(f, FlockArg::LockExclusive) {
                Ok(g) => return Ok(g),
                Err((back, Errno::EINTR)) => f = back,
                Err((_, e)) => return Err(io("flock", io::Error::from(e))),
            }
        }
    }

    /// Makes a token named `name` with `scope` (the directory is created 0700 when missing).
    /// Returns what is stored about it and the token itself, which exists nowhere else: show
    /// it to the operator once.
    pub fn create(&self, name: &str, scope: Scope) -> Result<(TokenInfo, String), TokenError> {
        check_name(name)?;
        ensure_dir(self.dir()).map_err(self.io("mkdir"))?;
        let _guard = self.lock()?;
        let mut tokens = self.load()?;
        let mut id = None;
        for _ in 0..ID_ATTEMPTS {
            let mut b = [0u8; 4];
            random(&mut b)?;
            let candidate = hex::encode(b);
            if !tokens.iter().any(|t| t.id == candidate) {
                id = Some(candidate);
                break;
            }
        }
        let id = id.ok_or_else(|| TokenError::NoFreeId {
            path: self.path.clone(),
        })?;
        let token = new_token()?;
        let stored = Stored {
            id,
            name: name.to_string(),
            scope,
            sha256: token_sha256_hex(&token),
            created: now_rfc3339(),
        };
        let info = stored.info();
        tokens.push(stored);
        self.save(&tokens)?;
        Ok((info, token))
    }

    /// Every token, in the order they were made.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        Ok(self.load()?.iter().map(Stored::info).collect())
    }

    /// Whether the store holds no token (a missing file holds none).
    pub fn is_empty(&self) -> Result<bool, TokenError> {
        Ok(self.load()?.is_empty())
    }

    /// Removes the token with id `id_or_name`, or else the one token named `id_or_name`
    /// (several with that name: an error listing their ids; none: not found).
    pub fn revoke(&self, id_or_name: &str) -> Result<TokenInfo, TokenError> {
        let not_found = || TokenError::NotFound {
            what: id_or_name.chars().take(MAX_NAME_CHARS + 1).collect(),
        };
        // No directory: no store, nothing to revoke (and nowhere to put the lock file).
        if !self.dir().is_dir() {
            return Err(not_found());
        }
        let _guard = self.lock()?;
        let mut tokens = self.load()?;
        let at = match tokens.iter().position(|t| t.id == id_or_name) {
            Some(i) => i,
            None => {
                let named: Vec<usize> = tokens
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.name == id_or_name)
                    .map(|(i, _)| i)
                    .collect();
                match named.as_slice() {
                    [] => return Err(not_found()),
                    [i] => *i,
                    many => {
                        return Err(TokenError::Ambiguous {
                            name: id_or_name.to_string(),
                            count: many.len(),
                            ids: many.iter().map(|&i| tokens[i].id.clone()).collect(),
                        })
                    }
                }
            }
        };
        let removed = tokens.remove(at);
        self.save(&tokens)?;
        Ok(removed.info())
    }

    /// The token whose SHA-256 is `sha256_hex`, if one is stored. The presented hash is
    /// compared with every stored hash in constant time, without stopping at a match. A
    /// presented value that is not 64 lowercase hex characters matches nothing. An unreadable
    /// or corrupt store is an error (fail closed), whatever was presented.
    pub fn verify(&self, sha256_hex: &str) -> Result<Option<TokenInfo>, TokenError> {
        let tokens = self.load()?;
        if !is_sha256_hex(sha256_hex) {
            return Ok(None);
        }
        let presented = sha256_hex.as_bytes();
        let mut found = Choice::from(0u8);
        let mut index = 0u64;
        for (i, t) in tokens.iter().enumerate() {
            // Both sides are 64 bytes (checked above and at load): a full constant-time compare.
            let eq = t.sha256.as_bytes().ct_eq(presented);
            index.conditional_assign(&(i as u64), eq);
            found |= eq;
        }
        if !bool::from(found) {
            return Ok(None);
        }
        Ok(usize::try_from(index)
            .ok()
            .and_then(|i| tokens.get(i))
            .map(Stored::info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    fn store() -> (tempfile::TempDir, TokenStore) {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let s = TokenStore::in_state_dir(tmp.path().join("state"));
        (tmp, s)
    }

    fn ok<T, E: fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn base64url_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[0u8; 32]).len(), 43);
    }

    #[test]
    fn token_shape_and_hash() {
        let t = ok(new_token());
        assert!(t.starts_with("cpt_"));
        assert_eq!(t.len(), 4 + 43);
        assert!(t[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(t, ok(new_token()));
        // sha256("abc")
        assert_eq!(
            token_sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&token_sha256_hex(&t)));
        assert!(!is_sha256_hex(&token_sha256_hex(&t).to_uppercase()));
        assert!(!is_sha256_hex("abc"));
        assert!(!is_sha256_hex(&"g".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(65)));
    }

    #[test]
    fn scope_spellings() {
        assert_eq!(ok("operator".parse::<Scope>()), Scope::Operator);
        assert_eq!(ok("client".parse::<Scope>()), Scope::Client);
        assert!(matches!(
            "Operator".parse::<Scope>(),
            Err(TokenError::BadScope { .. })
        ));
        assert!("admin".parse::<Scope>().is_err());
        assert!("".parse::<Scope>().is_err());
        assert_eq!(Scope::Client.as_str(), "client");
        assert_eq!(ok(serde_json::to_string(&Scope::Operator)), "\"operator\"");
    }

    #[test]
    fn round_trip_create_list_verify_revoke() {
        let (_t, s) = store();
        assert!(ok(s.is_empty()), "a missing file is an empty store");
        assert!(ok(s.list()).is_empty());
        let (laptop, tok1) = ok(s.create("laptop", Scope::Operator));
        let (phone, tok2) = ok(s.create("phone", Scope::Client));
        assert!(!ok(s.is_empty()));
        assert!(is_id(&laptop.id) && is_id(&phone.id));
        assert_ne!(laptop.id, phone.id);
        assert_eq!(laptop.name, "laptop");
        assert_eq!(laptop.scope, Scope::Operator);
        assert_eq!(laptop.created.len(), "2026-01-01T00:00:00Z".len());
        assert!(laptop.created.ends_with('Z'));
        assert_eq!(ok(s.list()), vec![laptop.clone(), phone.clone()]);
        // Each token verifies as itself.
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok1))), Some(laptop.clone()));
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok2))), Some(phone.clone()));
        // Wrong, malformed and look-alike hashes match nothing.
        assert_eq!(ok(s.verify(&token_sha256_hex("cpt_nope"))), None);
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok1).to_uppercase())), None);
        assert_eq!(
            ok(s.verify(&tok1)),
            None,
            "the token itself is not its hash"
        );
        assert_eq!(ok(s.verify("")), None);
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok1)[..63])), None);
        // Revoked by id: no longer verifies; the other one still does.
        assert_eq!(ok(s.revoke(&laptop.id)), laptop);
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok1))), None);
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok2))), Some(phone.clone()));
        // Revoked by name.
        assert_eq!(ok(s.revoke("phone")), phone);
        assert_eq!(ok(s.verify(&token_sha256_hex(&tok2))), None);
        assert!(ok(s.is_empty()));
        assert!(matches!(
            s.revoke("phone"),
            Err(TokenError::NotFound { .. })
        ));
        // No state directory at all: nothing to revoke, and nothing is created.
        let nowhere = TokenStore::in_state_dir(s.dir().join("missing"));
        assert!(matches!(
            nowhere.revoke("x"),
            Err(TokenError::NotFound { .. })
        ));
        assert!(!s.dir().join("missing").exists());
    }

    #[test]
    fn ambiguous_names_are_revoked_by_id() {
        let (_t, s) = store();
        let (a, _) = ok(s.create("ci", Scope::Client));
        let (b, _) = ok(s.create("ci", Scope::Client));
        match s.revoke("ci") {
            Err(TokenError::Ambiguous { ids, count, .. }) => {
                assert_eq!(count, 2);
                assert_eq!(ids, vec![a.id.clone(), b.id.clone()]);
                let msg = s
                    .revoke("ci")
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert!(msg.contains(&a.id) && msg.contains(&b.id), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ok(s.list()).len(), 2, "nothing removed");
        assert_eq!(ok(s.revoke(&b.id)), b);
        assert_eq!(ok(s.revoke("ci")), a);
    }

    #[test]
    fn names_are_checked() {
        let (_t, s) = store();
        for bad in ["", "a\nb", "tab\there", "\u{7f}", &"x".repeat(65)] {
            assert!(
                matches!(
                    s.create(bad, Scope::Client),
                    Err(TokenError::BadName { .. })
                ),
                "{bad:?}"
            );
        }
        ok(s.create(&"é".repeat(64), Scope::Client));
        ok(s.create("my laptop (work)", Scope::Client));
        assert_eq!(ok(s.list()).len(), 2);
    }

    #[test]
    fn file_is_private_and_holds_no_token() {
        let (_t, s) = store();
        let (_, tok) = ok(s.create("laptop", Scope::Operator));
        let meta = ok(std::fs::metadata(s.path()));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir = ok(std::fs::metadata(s.dir()));
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        let text = ok(std::fs::read_to_string(s.path()));
        assert!(!text.contains(&tok), "the token is in the file");
        assert!(
            !text.contains(&tok[4..]),
            "the token's random part is in the file"
        );
        assert!(text.contains(&token_sha256_hex(&tok)));
        let v: serde_json::Value = ok(serde_json::from_str(&text));
        assert_eq!(v["version"], 1);
        assert_eq!(v["tokens"][0]["name"], "laptop");
        assert_eq!(v["tokens"][0]["scope"], "operator");
        // No temporary files left behind; the lock file is 0600.
        let names: Vec<String> = ok(std::fs::read_dir(s.dir()))
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["tokens.json", "tokens.json.lock"], "{names:?}");
        let lock = ok(std::fs::metadata(s.dir().join("tokens.json.lock")));
        assert_eq!(lock.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn debug_shows_no_hash() {
        let (_t, s) = store();
        let (info, tok) = ok(s.create("laptop", Scope::Client));
        let loaded = ok(s.load());
        let dbg = format!("{loaded:?} {info:?} {s:?}");
        assert!(!dbg.contains(&token_sha256_hex(&tok)), "{dbg}");
        assert!(!dbg.contains(&tok), "{dbg}");
        assert!(dbg.contains("laptop"));
    }

    #[test]
    fn corrupt_or_unreadable_store_is_an_error() {
        let (_t, s) = store();
        let (_, tok) = ok(s.create("laptop", Scope::Client));
        let good = ok(std::fs::read_to_string(s.path()));
        let h = token_sha256_hex(&tok);
        let cases = [
            "".to_string(),
            "{".to_string(),
            "[]".to_string(),
            good.replace("\"version\": 1", "\"version\": 2"),
            good.replace(&h, &h.to_uppercase()),
            good.replace(&h, &h[..60]),
            good.replace("\"scope\": \"client\"", "\"scope\": \"root\""),
            good.replace("\"scope\"", "\"extra\": 1, \"scope\""),
            good.replace("\"name\": \"laptop\"", "\"name\": \"\""),
        ];
        for bad in cases {
            ok(std::fs::write(s.path(), &bad));
            for r in [
                s.verify(&h).map(|_| ()),
                s.list().map(|_| ()),
                s.is_empty().map(|_| ()),
                s.create("x", Scope::Client).map(|_| ()),
                s.revoke("laptop").map(|_| ()),
            ] {
                assert!(
                    matches!(r, Err(TokenError::Corrupt { .. })),
                    "{bad:?}: {r:?}"
                );
            }
            // Left untouched.
            assert_eq!(ok(std::fs::read_to_string(s.path())), bad);
        }
        // Unreadable (a directory where the file should be): an error too, not "no tokens".
        ok(std::fs::remove_file(s.path()));
        ok(std::fs::create_dir(s.path()));
        assert!(matches!(s.verify(&h), Err(TokenError::Io { .. })));
        assert!(s.list().is_err());
    }

    #[test]
    fn a_symlinked_store_is_not_followed() {
        let (t, s) = store();
        ok(s.create("laptop", Scope::Client));
        let elsewhere = t.path().join("elsewhere.json");
        ok(std::fs::rename(s.path(), &elsewhere));
        ok(std::os::unix::fs::symlink(&elsewhere, s.path()));
        assert!(s.list().is_err());
    }

    #[test]
    fn concurrent_creates_all_survive() {
        let (_t, s) = store();
        let s = Arc::new(s);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..5)
                        .map(|i| s.create(&format!("t{t}-{i}"), Scope::Client))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut made = Vec::new();
        for t in threads {
            match t.join() {
                Ok(r) => made.extend(ok(r)),
                Err(_) => panic!("a creating thread panicked"),
            }
        }
        assert_eq!(made.len(), 40);
        let listed = ok(s.list());
        assert_eq!(listed.len(), 40, "a concurrent create was lost");
        for (info, tok) in &made {
            assert_eq!(ok(s.verify(&token_sha256_hex(tok))).as_ref(), Some(info));
        }
        let mut ids: Vec<&str> = listed.iter().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 40, "ids are unique");
    }
}
