//! An adapter's cursor in its service's stream (the Telegram offset, IMAP UIDVALIDITY and
//! UID): one small JSON file in the state directory, replaced atomically
//! ([`carapace_broker::durable::write_atomic`]) after the broker took the message before it.
//!
//! A cursor that cannot be read is logged and ignored: the adapter then reads from the
//! service's start again, and the broker answers `duplicate` for what it already has (deliver
//! is idempotent on the message id).

use std::path::{Path, PathBuf};

use carapace_broker::durable::{read_capped, write_atomic, DurableError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest cursor file read.
const MAX_CURSOR: u64 = 64 * 1024;

/// Why a cursor was not read or saved.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("{path}: reading the cursor: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a cursor: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the cursor: {0}")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Write(#[from] DurableError),
}

/// The file `<state_dir>/<name>.cursor.json`.
#[derive(Debug, Clone)]
pub struct CursorStore {
    path: PathBuf,
}

impl CursorStore {
    /// `name`: the adapter's kind (one adapter per sandbox, so one cursor per kind).
    pub fn new(state_dir: &Path, name: &str) -> CursorStore {
        CursorStore {
            path: state_dir.join(format!("{name}.cursor.json")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved cursor; None when there is none yet.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<T>, CursorError> {
        let bytes = match read_capped(&self.path, MAX_CURSOR) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CursorError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CursorError::Parse {
                path: self.path.clone(),
                source,
            })
    }

    /// [`CursorStore::load`], an unreadable cursor logged and taken as none.
    pub fn load_or_warn<T: DeserializeOwned>(&self) -> Option<T> {
        match self.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the saved cursor is unusable: reading from the service's start (the broker drops duplicates)");
                None
            }
        }
    }

    /// Save `cursor` atomically.
    pub fn store<T: Serialize>(&self, cursor: &T) -> Result<(), CursorError> {
        let bytes = serde_json::to_vec(cursor).map_err(CursorError::Encode)?;
        write_atomic(&self.path, &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct C {
        offset: i64,
    }

    #[test]
    fn round_trip_and_unusable_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = CursorStore::new(dir.path(), "telegram");
        assert_eq!(s.path(), dir.path().join("telegram.cursor.json"));
        assert_eq!(s.load::<C>().unwrap_or_else(|e| panic!("{e}")), None);
        s.store(&C { offset: 42 }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.load::<C>().unwrap_or_else(|e| panic!("{e}")),
            Some(C { offset: 42 })
        );
        std::fs::write(s.path(), b"{not json").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s.load::<C>(), Err(CursorError::Parse { .. })));
        assert_eq!(s.load_or_warn::<C>(), None);
        std::fs::write(s.path(), vec![b' '; 70_000]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s.load::<C>(), Err(CursorError::Read { .. })));
        // No temporary file is left beside it.
        s.store(&C { offset: 1 }).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|e| e.map(|e| e.file_name()).unwrap_or_default())
            .collect();
        assert_eq!(names, ["telegram.cursor.json"]);
    }
}
