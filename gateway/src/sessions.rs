//! Conversation sessions: one JSON-lines file per session beneath the gateway's state directory
//! (`<state_dir>/sessions/<name>.jsonl`, the sandbox's only writable place).
//!
//! A line is `{"ts":RFC3339,"kind":"message","message":{..}}` (an OpenAI-style chat message:
//! `role`, `content`, `tool_calls`, `tool_call_id`) or `{"ts":..,"kind":"usage","usage":
//! {"prompt_tokens":..,"completion_tokens":..,"total_tokens":..},"turns":N,"stopped":WHY}` (one
//! per `agent.run`). Lines are appended with `O_APPEND` and `fdatasync`ed before the call
//! answers; a torn last line (a crash mid-write) is skipped when reading, never fatal.
//!
//! Sessions that answer channel messages ([`crate::inbound`]) tag their lines with the inbound
//! message's id: the user message line carries `"inbound":{"id","seq","channel","sender",
//! "conversation"}`, the run's usage line `"inbound_id"`, and a last line
//! `{"ts":..,"kind":"inbound_done","inbound_id":ID,"outcome":..,"status":..}` says the message
//! is finished (answered, or not, and why). [`inbound_state`] reads them back, so that a message
//! read again after a restart is neither run nor answered twice.
//!
//! Compaction (see `methods/agent.rs`) appends `{"ts":..,"kind":"summary","covers":[FIRST,LAST],
//! "summary":TEXT,"usage":{..}}`: a summary, made by the model, of the messages on lines FIRST
//! to LAST (1-based line numbers of this file, a previous summary included). The lines it
//! covers stay in the file; [`Sessions::context`] gives the last summary and the messages after
//! what it covers, which is what the model is sent.
//!
//! `sessions.reset` archives: the file moves to `<state_dir>/sessions/archive/<name>.<stamp>.jsonl`
//! (a rename, the directories fsync'd), where [`Sessions::archived`] lists it and
//! [`Sessions::restore`] brings it back, never over a live session.
//!
//! **Owners.** A session belongs to whoever made it: `<name>.meta.json` beside its lines holds
//! `{"owner": OWNER}` ([`Owner`]: `token:<id>` for a client token, `channel:<name>:<conversation>`
//! for a channel conversation, `job:<name>` for a scheduled job), written atomically when the session is first claimed and kept
//! when the session is reset (the name stays its owner's). A session without one (written
//! before owners were recorded) belongs to nobody: only operators see it.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use carapace_broker::sync::lock;
use serde_json::{json, Value};

use crate::owner::Owner;
use crate::rpc::{Kind, RpcError};

/// Why a session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid session name {0:?}: use 1 to 64 characters of A-Z a-z 0-9 _ -")]
    BadName(String),
    #[error("invalid archive name {0:?}: expected NAME.STAMP as `sessions.archived` lists it")]
    BadArchive(String),
    #[error("no archived session {0:?}")]
    NoArchive(String),
    #[error("session {0:?} exists: reset or rename it before restoring an archive over it")]
    Live(String),
    #[error("{what} {}: {source}", path.display())]
    Durable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: carapace_broker::durable::DurableError,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<SessionError> for RpcError {
    fn from(e: SessionError) -> RpcError {
        match e {
            SessionError::BadName(_) | SessionError::BadArchive(_) | SessionError::Live(_) => {
                RpcError::invalid_params(e.to_string())
            }
            SessionError::NoArchive(_) => RpcError::new(Kind::NotFound, e.to_string()),
            SessionError::Io { .. } | SessionError::Durable { .. } => {
                RpcError::new(Kind::Internal, e.to_string())
            }
        }
    }
}

/// Token counts as chat-completions endpoints report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, o: &Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.total_tokens = self.total_tokens.saturating_add(o.total_tokens);
    }
}

/// Whether `claim` found the session free (or already the owner's) or someone else's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The session is the owner's (it was just claimed, or already was).
    Mine,
    /// It belongs to someone else, or to nobody (a session older than owners).
    Taken,
}

/// Largest meta file read.
const MAX_META: u64 = 64 * 1024;

/// The sessions of one gateway.
#[derive(Debug)]
pub struct Sessions {
    dir: PathBuf,
    /// One writer per session at a time (an `agent.run` appends several lines).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn now() -> String {
    carapace_broker::audit::rfc3339_utc(SystemTime::now())
}

/// A session's lines as read: the parsed ones, and how many could not be read.
#[derive(Debug, Default)]
pub struct Lines {
    pub lines: Vec<Value>,
    pub unreadable: usize,
    /// The 1-based line number in the file of each of `lines`.
    pub numbers: Vec<usize>,
}

/// What the model is sent of a session: the last summary and the messages after it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Context {
    pub summary: Option<Summary>,
    /// (line number, chat message), oldest first.
    pub messages: Vec<(usize, Value)>,
}

/// A `summary` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub text: String,
    /// The first and last line numbers it covers.
    pub covers: [usize; 2],
}

impl Sessions {
    /// Sessions beneath `state_dir/sessions` (created on first write).
    pub fn new(state_dir: &Path) -> Sessions {
        Sessions {
            dir: state_dir.join("sessions"),
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, SessionError> {
        if valid_name(name) {
            Ok(self.dir.join(format!("{name}.jsonl")))
        } else {
            Err(SessionError::BadName(name.to_string()))
        }
    }

    fn meta_path(&self, name: &str) -> Result<PathBuf, SessionError> {
        if valid_name(name) {
            Ok(self.dir.join(format!("{name}.meta.json")))
        } else {
            Err(SessionError::BadName(name.to_string()))
        }
    }

    /// The stored owner of a session (None: none recorded).
    pub fn owner(&self, name: &str) -> Result<Option<String>, SessionError> {
        let path = self.meta_path(name)?;
        let bytes = match carapace_broker::durable::read_capped(&path, MAX_META) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SessionError::Io {
                    what: "reading session owner",
                    path,
                    source: e,
                })
            }
        };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| SessionError::Io {
            what: "reading session owner",
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        Ok(v["owner"].as_str().map(str::to_string))
    }

    /// Claim session `name` for `owner`: a session nobody has made yet becomes the owner's
    /// (its meta file written atomically); one already the owner's stays so; any other is
    /// [`Claim::Taken`]. The caller holds the session's lock.
    pub fn claim(&self, name: &str, owner: &Owner) -> Result<Claim, SessionError> {
        let key = owner.key();
        match self.owner(name)? {
            Some(o) if o == key => return Ok(Claim::Mine),
            Some(_) => return Ok(Claim::Taken),
            None if self.exists(name)? => return Ok(Claim::Taken),
            None => {}
        }
        carapace_broker::durable::ensure_dir(&self.dir).map_err(|e| SessionError::Io {
            what: "creating the sessions directory",
            path: self.dir.clone(),
            source: e,
        })?;
        let path = self.meta_path(name)?;
        let body = json!({"owner": key, "created": now()}).to_string();
        carapace_broker::durable::write_atomic(&path, body.as_bytes()).map_err(|e| {
            SessionError::Durable {
                what: "writing session owner",
                path,
                source: e,
            }
        })?;
        Ok(Claim::Mine)
    }

    /// Serialize the writers of one session: hold the guard while appending a run's lines.
    pub async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut g = lock(&self.locks);
            if g.len() > 1024 {
                g.retain(|_, m| Arc::strong_count(m) > 1);
            }
            g.entry(name.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    /// Append a chat message.
    pub fn append_message(&self, name: &str, message: &Value) -> Result<(), SessionError> {
        self.append(
            name,
            &json!({"ts": now(), "kind": "message", "message": message}),
        )
    }

    /// Append a chat message with the fields of `tag` added to its line (e.g. `inbound`).
    pub fn append_tagged_message(
        &self,
        name: &str,
        message: &Value,
        tag: &serde_json::Map<String, Value>,
    ) -> Result<(), SessionError> {
        let mut line = json!({"ts": now(), "kind": "message", "message": message});
        if let Some(o) = line.as_object_mut() {
            for (k, v) in tag {
                o.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        self.append(name, &line)
    }

    /// Append the usage record of one run; `inbound_id`: the channel message it answered.
    pub fn append_usage(
        &self,
        name: &str,
        usage: &Usage,
        turns: u32,
        stopped: &str,
        inbound_id: Option<&str>,
    ) -> Result<(), SessionError> {
        let mut line = json!({"ts": now(), "kind": "usage", "usage": usage, "turns": turns, "stopped": stopped});
        if let Some(id) = inbound_id {
            line["inbound_id"] = id.into();
        }
        self.append(name, &line)
    }

    /// Record that channel message `inbound_id` is finished: `outcome` says how, `detail`
    /// (e.g. the broker's send status) is kept beside it.
    pub fn append_inbound_done(
        &self,
        name: &str,
        inbound_id: &str,
        outcome: &str,
        detail: Value,
    ) -> Result<(), SessionError> {
        self.append(
            name,
            &json!({"ts": now(), "kind": "inbound_done", "inbound_id": inbound_id, "outcome": outcome, "detail": detail}),
        )
    }

    fn append(&self, name: &str, line: &Value) -> Result<(), SessionError> {
        let path = self.path(name)?;
        let io = |what, source| SessionError::Io {
            what,
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(|e| SessionError::Io {
            what: "creating the sessions directory",
            path: self.dir.clone(),
            source: e,
        })?;
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("opening session", e))?;
        f.write_all(&bytes)
            .map_err(|e| io("appending to session", e))?;
        f.sync_data().map_err(|e| io("syncing session", e))
    }

    /// Whether the session has a file.
    pub fn exists(&self, name: &str) -> Result<bool, SessionError> {
        Ok(self.path(name)?.is_file())
    }

    /// Every line of a session (empty when it does not exist).
    pub fn read(&self, name: &str) -> Result<Lines, SessionError> {
        read_lines(&self.path(name)?)
    }

    /// The chat messages of a session, oldest first.
    pub fn messages(&self, name: &str) -> Result<Vec<Value>, SessionError> {
        Ok(self
            .read(name)?
            .lines
            .into_iter()
            .filter(|l| l["kind"] == "message")
            .filter_map(|mut l| l.get_mut("message").map(Value::take))
            .collect())
    }

    /// The last summary of a session and the chat messages after what it covers (every
    /// message when there is no summary).
    pub fn context(&self, name: &str) -> Result<Context, SessionError> {
        let lines = self.read(name)?;
        let mut out = Context::default();
        for (l, n) in lines.lines.into_iter().zip(lines.numbers) {
            match l["kind"].as_str() {
                Some("summary") => {
                    let covers = [
                        l["covers"][0].as_u64().unwrap_or(0),
                        l["covers"][1].as_u64().unwrap_or(0),
                    ];
                    let (Some(text), [Ok(first), Ok(last)]) =
                        (l["summary"].as_str(), covers.map(usize::try_from))
                    else {
                        continue;
                    };
                    out.messages.retain(|(at, _)| *at > last);
                    out.summary = Some(Summary {
                        text: text.to_string(),
                        covers: [first, last],
                    });
                }
                Some("message") => {
                    if let Some(mut m) = l.get("message").cloned() {
                        out.messages.push((n, m.take()));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Append a summary of the messages on lines `covers[0]..=covers[1]`; `usage`: what making
    /// it cost.
    pub fn append_summary(
        &self,
        name: &str,
        covers: [usize; 2],
        summary: &str,
        usage: &Usage,
    ) -> Result<(), SessionError> {
        self.append(
            name,
            &json!({"ts": now(), "kind": "summary", "covers": covers, "summary": summary, "usage": usage}),
        )
    }

    fn archive_dir(&self) -> PathBuf {
        self.dir.join("archive")
    }

    /// Archive a session (`sessions.reset`): its file moves to
    /// `archive/<name>.<stamp>.jsonl`. The archive's name, or None when there was no session.
    pub fn reset(&self, name: &str) -> Result<Option<String>, SessionError> {
        let path = self.path(name)?;
        if !path.is_file() {
            return Ok(None);
        }
        let dir = self.archive_dir();
        let io = |what, path: &Path, source| SessionError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        carapace_broker::durable::ensure_dir(&dir)
            .map_err(|e| io("creating the archive directory", &dir, e))?;
        let stamp = archive_stamp(SystemTime::now());
        let mut n = 0u32;
        loop {
            let id = if n == 0 {
                format!("{name}.{stamp}")
            } else {
                format!("{name}.{stamp}-{n}")
            };
            let target = dir.join(format!("{id}.jsonl"));
            // A link first: it never replaces an archive of the same name.
            match fs::hard_link(&path, &target) {
                Ok(()) => {
                    fs::remove_file(&path).map_err(|e| io("removing session", &path, e))?;
                    carapace_broker::durable::sync_dir(&dir)
                        .map_err(|e| io("syncing the archive directory", &dir, e))?;
                    carapace_broker::durable::sync_dir(&self.dir)
                        .map_err(|e| io("syncing the sessions directory", &self.dir, e))?;
                    return Ok(Some(id));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(io("archiving session", &target, e)),
            }
        }
    }

    fn archive_path(&self, id: &str) -> Result<(String, PathBuf), SessionError> {
        match parse_archive_id(id) {
            Some((name, _)) => Ok((
                name.to_string(),
                self.archive_dir().join(format!("{id}.jsonl")),
            )),
            None => Err(SessionError::BadArchive(id.to_string())),
        }
    }

    /// Every archived session: its archive name, session, when it was archived (the stamp),
    /// message count and size, oldest first.
    pub fn archived(&self) -> Result<Vec<Value>, SessionError> {
        let dir = self.archive_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(SessionError::Io {
                    what: "listing archived sessions",
                    path: dir,
                    source: e,
                })
            }
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let id = n.strip_suffix(".jsonl")?.to_string();
                parse_archive_id(&id).is_some().then_some(id)
            })
            .collect();
        ids.sort_by(|a, b| {
            let key = |id: &str| parse_archive_id(id).map(|(n, s)| (s.to_string(), n.to_string()));
            key(a).cmp(&key(b))
        });
        let mut out = Vec::new();
        for id in ids {
            let Some((name, stamp)) = parse_archive_id(&id) else {
                continue;
            };
            let path = dir.join(format!("{id}.jsonl"));
            let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let messages = read_lines(&path)?
                .lines
                .iter()
                .filter(|l| l["kind"] == "message")
                .count();
            out.push(json!({"archive": id, "session": name, "archived": stamp, "messages": messages, "bytes": bytes}));
        }
        Ok(out)
    }

    /// The lines of an archived session.
    pub fn read_archived(&self, id: &str) -> Result<Lines, SessionError> {
        let (_, path) = self.archive_path(id)?;
        if !path.is_file() {
            return Err(SessionError::NoArchive(id.to_string()));
        }
        read_lines(&path)
    }

    /// Bring an archived session back under its name; refused while a session of that name
    /// exists. The session's name.
    pub fn restore(&self, id: &str) -> Result<String, SessionError> {
        let (name, from) = self.archive_path(id)?;
        let to = self.path(&name)?;
        let io = |what, path: &Path, source| SessionError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        // A link never replaces a file: a live session is never overwritten.
        match fs::hard_link(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SessionError::NoArchive(id.to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SessionError::Live(name))
            }
            Err(e) => return Err(io("restoring session", &to, e)),
        }
        fs::remove_file(&from).map_err(|e| io("removing the archive", &from, e))?;
        carapace_broker::durable::sync_dir(&self.dir)
            .map_err(|e| io("syncing the sessions directory", &self.dir, e))?;
        let dir = self.archive_dir();
        carapace_broker::durable::sync_dir(&dir)
            .map_err(|e| io("syncing the archive directory", &dir, e))?;
        Ok(name)
    }

    /// Every session: name, message count, last write, total usage.
    pub fn list(&self) -> Result<Vec<Value>, SessionError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(SessionError::Io {
                    what: "listing sessions",
                    path: self.dir.clone(),
                    source: e,
                })
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let stem = n.strip_suffix(".jsonl")?.to_string();
                valid_name(&stem).then_some(stem)
            })
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let lines = self.read(&name)?;
            let mut usage = Usage::default();
            let mut messages = 0u64;
            let mut updated = Value::Null;
            for l in &lines.lines {
                match l["kind"].as_str() {
                    Some("message") => messages += 1,
                    Some("usage") | Some("summary") => {
                        if let Ok(u) = serde_json::from_value::<Usage>(l["usage"].clone()) {
                            usage.add(&u);
                        }
                    }
                    _ => {}
                }
                if l["ts"].is_string() {
                    updated = l["ts"].clone();
                }
            }
            let owner = self.owner(&name).ok().flatten();
            out.push(
                json!({"name": name, "messages": messages, "updated": updated, "usage": usage, "owner": owner}),
            );
        }
        Ok(out)
    }
}

/// The lines of a session file (empty when it does not exist).
fn read_lines(path: &Path) -> Result<Lines, SessionError> {
    let path = path.to_path_buf();
    let f = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lines::default()),
        Err(e) => {
            return Err(SessionError::Io {
                what: "opening session",
                path,
                source: e,
            })
        }
    };
    let mut out = Lines::default();
    for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
        let line = line.map_err(|e| SessionError::Io {
            what: "reading session",
            path: path.clone(),
            source: e,
        })?;
        match serde_json::from_slice::<Value>(&line) {
            Ok(v) if v.is_object() => {
                out.lines.push(v);
                out.numbers.push(i + 1);
            }
            _ if line.is_empty() => {}
            _ => out.unreadable += 1,
        }
    }
    Ok(out)
}

/// `YYYYMMDDTHHMMSS.ffffffZ` (UTC) of `t`: sorts as time does, and holds no `:`.
fn archive_stamp(t: SystemTime) -> String {
    carapace_broker::audit::rfc3339_utc(t).replace(['-', ':'], "")
}

/// `NAME.STAMP` of an archive: the session name and the stamp.
pub fn parse_archive_id(id: &str) -> Option<(&str, &str)> {
    let (name, stamp) = id.split_once('.')?;
    let ok = valid_name(name)
        && stamp.starts_with(|c: char| c.is_ascii_digit())
        && stamp.len() <= 40
        && stamp
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !stamp.contains("..");
    ok.then_some((name, stamp))
}

/// Where the answer to channel message `id` stands in a session's lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundState {
    /// Not in the session: run the agent.
    New,
    /// Its user message is stored but the run did not end (a crash or a failure): run on from
    /// the stored history.
    Started,
    /// The run ended; `reply` is its final assistant text (None: the run stopped at a limit, or
    /// ended without text). The reply may or may not have been sent.
    Ran {
        stopped: String,
        reply: Option<String>,
    },
    /// Finished (an `inbound_done` line).
    Done,
}

/// The text of a chat message's `content`: a string, or the `text` parts of a list of parts.
pub fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let t: String = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            Some(t)
        }
        _ => None,
    }
}

/// Where the answer to channel message `id` stands, from a session's lines (oldest first).
pub fn inbound_state(lines: &[Value], id: &str) -> InboundState {
    if lines
        .iter()
        .any(|l| l["kind"] == "inbound_done" && l["inbound_id"] == id)
    {
        return InboundState::Done;
    }
    let Some(start) = lines
        .iter()
        .rposition(|l| l["kind"] == "message" && l["inbound"]["id"] == id)
    else {
        return InboundState::New;
    };
    let mut last: Option<&Value> = None;
    for l in &lines[start + 1..] {
        match l["kind"].as_str() {
            Some("message") => last = Some(&l["message"]),
            Some("usage") if l["inbound_id"] == id => {
                let stopped = l["stopped"].as_str().unwrap_or("").to_string();
                if stopped == "error" {
                    // A failed attempt: what it stored stays, the run goes on from there.
                    continue;
                }
                let reply = last
                    .filter(|_| stopped == "done")
                    .filter(|m| m["role"] == "assistant")
                    .and_then(|m| content_text(&m["content"]));
                return InboundState::Ran { stopped, reply };
            }
            _ => {}
        }
    }
    // A final assistant answer stored just before a crash (no usage line yet) is the answer.
    match last {
        Some(m)
            if m["role"] == "assistant"
                && m.get("tool_calls").is_none_or(Value::is_null)
                && content_text(&m["content"]).is_some() =>
        {
            InboundState::Ran {
                stopped: "done".into(),
                reply: content_text(&m["content"]),
            }
        }
        _ => InboundState::Started,
    }
}

#[cfg(test)]
mod tests;
