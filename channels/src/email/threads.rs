//! What an answer needs to know about the message it answers: a small durable map from the
//! deliver id of an inbound message to its subject, Message-ID and References, bounded to the
//! [`MAX_THREADS`] most recent entries and written atomically (`<state_dir>/email-threads.json`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::parse::Parsed;

/// Entries kept (the oldest go first).
pub const MAX_THREADS: usize = 2000;
/// Largest file read back (bytes); a bigger one is ignored (and rewritten on the next entry).
const MAX_FILE: u64 = 16 << 20;
/// The file's name in the state directory.
pub const THREADS_FILE: &str = "email-threads.json";

/// What is remembered of one inbound message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    /// The deliver id (Message-ID, or `uid:V:U`).
    pub id: String,
    pub subject: String,
    /// Its Message-ID, when it had one (the answer's In-Reply-To).
    pub message_id: Option<String>,
    /// Its References (the answer's References are these plus `message_id`).
    pub references: Vec<String>,
}

impl ThreadInfo {
    pub fn of(id: &str, p: &Parsed) -> ThreadInfo {
        ThreadInfo {
            id: id.to_string(),
            subject: p.subject.clone(),
            message_id: p.message_id.clone(),
            references: p.references.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    #[error(transparent)]
    Write(#[from] carapace_broker::durable::DurableError),
    #[error("encoding the thread map: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The map, in insertion order.
#[derive(Debug)]
pub struct Threads {
    path: PathBuf,
    entries: VecDeque<ThreadInfo>,
    cap: usize,
}

impl Threads {
    /// Read `<state_dir>/email-threads.json`; a missing, unreadable or malformed file starts an
    /// empty map (logged: answers then lose their threading, nothing else).
    pub fn load(state_dir: &Path) -> Threads {
        Threads::load_bounded(state_dir, MAX_THREADS)
    }

    fn load_bounded(state_dir: &Path, cap: usize) -> Threads {
        let path = state_dir.join(THREADS_FILE);
        let entries = match std::fs::metadata(&path) {
            Ok(m) if m.len() > MAX_FILE => {
                tracing::warn!(path = %path.display(), "thread map too big: starting empty");
                VecDeque::new()
            }
            Ok(_) => match std::fs::read(&path).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "thread map unreadable: starting empty");
                    VecDeque::new()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "thread map unreadable: starting empty");
                    VecDeque::new()
                }
            },
            Err(_) => VecDeque::new(),
        };
        let mut t = Threads { path, entries, cap };
        while t.entries.len() > t.cap {
            t.entries.pop_front();
        }
        t
    }

    pub fn get(&self, id: &str) -> Option<&ThreadInfo> {
        self.entries.iter().rev().find(|e| e.id == id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Remember `info` (replacing an entry of the same id) and write the map.
    pub fn remember(&mut self, info: ThreadInfo) -> Result<(), ThreadsError> {
        if self.get(&info.id) == Some(&info) {
            return Ok(());
        }
        self.entries.retain(|e| e.id != info.id);
        self.entries.push_back(info);
        while self.entries.len() > self.cap {
            self.entries.pop_front();
        }
        let bytes = serde_json::to_vec(&self.entries)?;
        carapace_broker::durable::write_atomic(&self.path, &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(i: usize) -> ThreadInfo {
        ThreadInfo {
            id: format!("m{i}@x"),
            subject: format!("s{i}"),
            message_id: Some(format!("m{i}@x")),
            references: vec![],
        }
    }

    #[test]
    fn survives_a_reload_and_stays_bounded() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Threads::load_bounded(d.path(), 10);
        assert!(t.is_empty());
        for i in 0..15 {
            t.remember(info(i)).unwrap();
        }
        assert_eq!(t.len(), 10);
        let t = Threads::load_bounded(d.path(), 10);
        assert_eq!(t.len(), 10);
        assert!(t.get("m4@x").is_none(), "the oldest went first");
        assert_eq!(t.get("m5@x"), Some(&info(5)));
        assert_eq!(t.get("m14@x"), Some(&info(14)));
    }

    #[test]
    fn a_broken_file_starts_empty() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(THREADS_FILE), b"{not json").unwrap();
        assert!(Threads::load(d.path()).is_empty());
    }
}
