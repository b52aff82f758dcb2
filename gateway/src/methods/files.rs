//! `files.list`, `files.read`, `files.write`, `files.search`: the files of a workspace the
//! operator granted (`[workspaces.NAME]`), for clients and for the agent's file tools. The
//! gateway cannot reach them by itself: every file and every directory is opened by the
//! broker's `open` (the workspace's directory joined with a relative path, resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), so the profile's `open` rules decide each
//! one (allow, ask: wait for an operator, deny) and each is audited.
//!
//! Bounds: a read returns at most [`MAX_READ`] bytes, a write takes at most [`MAX_WRITE`]; a
//! listing at most [`MAX_LIST`] entries; a search visits at most [`MAX_SEARCH_DIRS`]
//! directories and [`MAX_SEARCH_FILES`] files (each read up to [`MAX_READ`]) and returns at most
//! [`MAX_MATCHES`] lines.

use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;

use carapace_broker::protocol::Access;
use serde_json::{json, Value};

use crate::app::App;
use crate::rpc::{params, Kind, RpcError};

/// Largest file content returned by a read (and read by a search).
pub const MAX_READ: u64 = 1 << 20;
/// Largest content a write takes.
pub const MAX_WRITE: usize = 1 << 20;
/// Most entries a listing returns.
pub const MAX_LIST: usize = 1000;
/// Most directories a search opens.
pub const MAX_SEARCH_DIRS: usize = 64;
/// Most files a search reads.
pub const MAX_SEARCH_FILES: usize = 256;
/// Most matching lines a search returns.
pub const MAX_MATCHES: usize = 200;
/// Longest matching line returned (longer ones are cut).
const MAX_LINE: usize = 512;
/// Longest search pattern.
const MAX_PATTERN: usize = 1024;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub workspace: String,
    /// A directory relative to the workspace; default `.`, the workspace itself.
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    pub workspace: String,
    pub path: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteParams {
    pub workspace: String,
    pub path: String,
    /// The whole new content (the file is replaced, or created).
    pub content: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    pub workspace: String,
    /// A substring, or a regular expression with `regex = true`.
    pub pattern: String,
    #[serde(default)]
    pub regex: bool,
    /// The directory searched, relative to the workspace; default `.`.
    #[serde(default)]
    pub path: Option<String>,
}

/// Why a path given to a file method is refused before the broker is asked: the same check
/// the broker applies ([`carapace_broker::ops::check_relative_path`]), for a clearer error.
fn relative(p: &str) -> Result<String, RpcError> {
    carapace_broker::ops::check_relative_path(p)
        .map(|_| p.to_string())
        .map_err(|why| RpcError::invalid_params(format!("path {p:?}: {why}")))
}

fn join(dir: &str, name: &str) -> String {
    if dir == "." {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

pub async fn list(app: &App, p: Value) -> Result<Value, RpcError> {
    let p: ListParams = params(p)?;
    let dir = relative(p.path.as_deref().unwrap_or("."))?;
    let (entries, truncated) = list_dir(app, &p.workspace, &dir).await?;
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| json!({"name": e.name, "kind": e.kind, "size": e.size}))
        .collect();
    Ok(json!({"workspace": p.workspace, "path": dir, "entries": entries, "truncated": truncated}))
}

pub async fn read(app: &App, p: Value) -> Result<Value, RpcError> {
    let p: ReadParams = params(p)?;
    let path = relative(&p.path)?;
    let (bytes, truncated) = read_file(app, &p.workspace, &path).await?;
    Ok(json!({
        "workspace": p.workspace,
        "path": path,
        "content": String::from_utf8_lossy(&bytes),
        "bytes": bytes.len(),
        "truncated": truncated,
    }))
}

pub async fn write(app: &App, p: Value) -> Result<Value, RpcError> {
    let p: WriteParams = params(p)?;
    let path = relative(&p.path)?;
    if p.content.len() > MAX_WRITE {
        return Err(RpcError::new(
            Kind::TooLarge,
            format!("content of {} bytes: at most {MAX_WRITE}", p.content.len()),
        ));
    }
    // An existing file is opened for writing and replaced; a missing one is created.
    let (file, created) = match app
        .broker
        .open_in(p.workspace.clone(), path.clone(), Access::Write)
        .await
    {
        Ok(f) => (f, false),
        Err(e) if e.kind == Kind::NotFound => (
            app.broker
                .open_in(p.workspace.clone(), path.clone(), Access::Create)
                .await?,
            true,
        ),
        Err(e) => return Err(e),
    };
    let len = p.content.len();
    super::blocking(move || {
        let mut file = file;
        file.set_len(0)
            .and_then(|()| file.write_all(p.content.as_bytes()))
            .and_then(|()| file.sync_data())
            .map_err(|e| RpcError::new(Kind::Unavailable, format!("writing {path}: {e}")))
    })
    .await?;
    Ok(json!({"bytes": len, "created": created}))
}

pub async fn search(app: &App, p: Value) -> Result<Value, RpcError> {
    let p: SearchParams = params(p)?;
    let root = relative(p.path.as_deref().unwrap_or("."))?;
    let matcher = Matcher::new(&p.pattern, p.regex)?;
    let mut matches: Vec<Value> = Vec::new();
    let mut queue = std::collections::VecDeque::from([root]);
    let (mut dirs, mut files) = (0usize, 0usize);
    let mut truncated = false;
    'walk: while let Some(dir) = queue.pop_front() {
        if dirs == MAX_SEARCH_DIRS {
            truncated = true;
            break;
        }
        dirs += 1;
        let (entries, cut) = list_dir(app, &p.workspace, &dir).await?;
        truncated |= cut;
        for e in entries {
            let path = join(&dir, &e.name);
            match e.kind {
                "dir" => queue.push_back(path),
                "file" => {
                    if files == MAX_SEARCH_FILES {
                        truncated = true;
                        break 'walk;
                    }
                    files += 1;
                    // A file that cannot be opened (refused, gone) is skipped, not fatal.
                    let Ok((bytes, _)) = read_file(app, &p.workspace, &path).await else {
                        continue;
                    };
                    if bytes.contains(&0) {
                        continue; // binary
                    }
                    let text = String::from_utf8_lossy(&bytes);
                    for (n, line) in text.lines().enumerate() {
                        if matcher.is_match(line) {
                            if matches.len() == MAX_MATCHES {
                                truncated = true;
                                break 'walk;
                            }
                            matches.push(json!({
                                "path": path,
                                "line": n + 1,
                                "text": clip_line(line),
                            }));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(json!({
        "workspace": p.workspace,
        "matches": matches,
        "files_searched": files,
        "truncated": truncated,
    }))
}

fn clip_line(line: &str) -> &str {
    if line.len() <= MAX_LINE {
        return line;
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// A substring or a regular expression (size-limited: no pattern can blow up).
enum Matcher {
    Substring(String),
    Regex(regex::Regex),
}

impl Matcher {
    fn new(pattern: &str, is_regex: bool) -> Result<Matcher, RpcError> {
        if pattern.is_empty() || pattern.len() > MAX_PATTERN {
            return Err(RpcError::invalid_params(format!(
                "`pattern`: 1 to {MAX_PATTERN} bytes"
            )));
        }
        if !is_regex {
            return Ok(Matcher::Substring(pattern.to_string()));
        }
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map(Matcher::Regex)
            .map_err(|e| RpcError::invalid_params(format!("`pattern`: {e}")))
    }

    fn is_match(&self, line: &str) -> bool {
        match self {
            Matcher::Substring(s) => line.contains(s.as_str()),
            Matcher::Regex(r) => r.is_match(line),
        }
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    pub size: u64,
}

/// The entries of `dir` (sorted by name, at most [`MAX_LIST`]) and whether some were left out.
async fn list_dir(app: &App, workspace: &str, dir: &str) -> Result<(Vec<Entry>, bool), RpcError> {
    let fd = app
        .broker
        .open_in(workspace.to_string(), dir.to_string(), Access::List)
        .await?;
    let dir_s = dir.to_string();
    super::blocking(move || {
        read_entries(fd)
            .map_err(|e| RpcError::new(Kind::Unavailable, format!("listing {dir_s}: {e}")))
    })
    .await
}

/// Read a directory's entries from its descriptor (`getdents` on that very descriptor: a
/// reopening would be a new open, which the sandbox refuses); each entry's kind from the
/// directory, its size from `fstatat(AT_SYMLINK_NOFOLLOW)` beneath it when that is allowed.
pub fn read_entries(dir: std::fs::File) -> std::io::Result<(Vec<Entry>, bool)> {
    use rustix::fs::{statat, AtFlags, FileType};
    let stat_fd = dir.try_clone()?;
    let mut out = Vec::new();
    let mut truncated = false;
    let mut d = rustix::fs::Dir::new(dir)?;
    while let Some(e) = d.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if out.len() == MAX_LIST {
            truncated = true;
            break;
        }
        let st = statat(stat_fd.as_fd(), e.file_name(), AtFlags::SYMLINK_NOFOLLOW).ok();
        let ft = match (e.file_type(), &st) {
            (FileType::Unknown, Some(st)) => FileType::from_raw_mode(st.st_mode),
            (t, _) => t,
        };
        let kind = match ft {
            FileType::RegularFile => "file",
            FileType::Directory => "dir",
            FileType::Symlink => "symlink",
            _ => "other",
        };
        out.push(Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            kind,
            size: st.map_or(0, |st| u64::try_from(st.st_size).unwrap_or(0)),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, truncated))
}

/// A file's content (at most [`MAX_READ`] bytes) and whether it was longer.
async fn read_file(app: &App, workspace: &str, path: &str) -> Result<(Vec<u8>, bool), RpcError> {
    let file = app
        .broker
        .open_in(workspace.to_string(), path.to_string(), Access::Read)
        .await?;
    let path = path.to_string();
    super::blocking(move || {
        let mut bytes = Vec::new();
        file.take(MAX_READ + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| RpcError::new(Kind::Unavailable, format!("reading {path}: {e}")))?;
        let truncated = bytes.len() as u64 > MAX_READ;
        bytes.truncate(usize::try_from(MAX_READ).unwrap_or(usize::MAX));
        Ok((bytes, truncated))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_both_ways() {
        assert!(relative("src/main.rs").is_ok());
        assert!(relative(".").is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../b", "a\0b", "", "a//b"] {
            let e = relative(bad).unwrap_err();
            assert_eq!(e.kind, Kind::InvalidParams, "{bad:?}");
        }
    }

    #[test]
    fn matchers() {
        let m = Matcher::new("needle", false).unwrap();
        assert!(m.is_match("a needle here"));
        assert!(!m.is_match("a haystack"));
        let m = Matcher::new("^fn [a-z]+\\(", true).unwrap();
        assert!(m.is_match("fn main() {"));
        assert!(!m.is_match("  fn main() {"));
        assert!(Matcher::new("(", true).is_err());
        assert!(Matcher::new("", false).is_err());
        // A literal pattern is not a regex.
        assert!(Matcher::new("(", false).unwrap().is_match("f("));
    }

    #[test]
    fn entries_of_a_directory() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("b.txt"), "12345").unwrap();
        std::fs::create_dir(t.path().join("a")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("c")).unwrap();
        let (e, cut) = read_entries(std::fs::File::open(t.path()).unwrap()).unwrap();
        assert!(!cut);
        let got: Vec<(&str, &str, u64)> = e
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    e.kind,
                    if e.kind == "file" { e.size } else { 0 },
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("a", "dir", 0), ("b.txt", "file", 5), ("c", "symlink", 0)]
        );
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let l = "é".repeat(400);
        let c = clip_line(&l);
        assert!(c.len() <= MAX_LINE);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}
