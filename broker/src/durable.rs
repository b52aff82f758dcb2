//! Durable state: every file the broker keeps is written through here.
//!
//! - [`write_atomic`]: a whole file replaced atomically (temporary file in the same directory,
//!   fsync, rename, fsync of the directory): after a crash the file is wholly old or wholly new.
//! - [`Spool`]: a directory of JSON files, one per entry (put / get / list / remove), each
//!   written with [`write_atomic`]; ids sort by time and every id from outside is validated
//!   ([`valid_id`]). A file that cannot be read is reported by [`Spool::list`] and left alone.
//! - [`Journal`]: an append-only file of JSON lines, each appended and fsync'd before the
//!   caller goes on, compacted by rewriting it atomically with the records still live. A torn
//!   last line (a crash in the middle of an append) is cut off when the journal is opened; a
//!   line that is not a record is reported and skipped.
//! - [`ensure_dir`], [`read_capped`], [`sync_dir`]: the directory and read helpers the stores
//!   share.
//!
//! A [`Spool`] and a [`Journal`] can also live in memory only (no state directory: tests and
//! `carapace exec`), with the same behaviour except that nothing survives the process.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::sync::lock;

/// A failed durable write or read: what was being done, to which path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {op}: {source}")]
pub struct DurableError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl DurableError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> DurableError {
        DurableError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `path` atomically: a 0600 temporary file in the same directory (created
/// exclusively, never following a symlink), fsync, rename over `path`, fsync of the directory.
/// On error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), DurableError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> Result<(), DurableError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| DurableError::new("open", &tmp, e))?;
        f.write_all(data)
            .map_err(|e| DurableError::new("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| DurableError::new("fsync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| DurableError::new("rename", path, e))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir).map_err(|e| DurableError::new("fsync dir", dir, e))
}

/// fsync a directory (makes a rename or unlink in it durable).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) 0700 if missing; errors if it exists and is not a directory.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if !fs::metadata(dir)?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    Ok(())
}

/// Reads at most `max` bytes of a regular file, refusing symlinks.
pub fn read_capped(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(buf)
}

/// True if `id` is safe as a file name stem: ASCII letters, digits, `-` and `_`, the first
/// character alphanumeric, at most 80 bytes (no `/`, no `..`, no hidden files).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 80
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Errors of a [`Spool`].
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{0}")]
    Io(#[from] DurableError),
    #[error("id {id:?} is not valid (letters, digits, '-', '_'; at most 80 bytes)")]
    BadId { id: String },
    #[error("{dir}: no entry {id}")]
    NotFound { dir: String, id: String },
    #[error("{path}: not a readable entry: {reason}")]
    Corrupt { path: String, reason: String },
}

/// A file of a spool that could not be read as an entry (left in place).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub file: String,
    pub error: String,
}

/// What [`Spool::list`] found: the entries, oldest first, and the files it could not read.
#[derive(Debug)]
pub struct SpoolListing<T> {
    pub entries: Vec<(String, T)>,
    pub unreadable: Vec<Unreadable>,
}

#[derive(Debug)]
enum Backing {
    Dir(PathBuf),
    Memory(Mutex<BTreeMap<String, Vec<u8>>>),
}

/// A directory of JSON entries, one file `<id>.json` (mode 0600) each, in a directory created
/// 0700. Cheap to share (`&self` methods).
#[derive(Debug)]
pub struct Spool {
    backing: Backing,
    counter: AtomicU64,
    max_entry_bytes: u64,
}

/// Largest entry a [`Spool`] reads back.
pub const MAX_SPOOL_ENTRY: u64 = 16 << 20;

impl Spool {
    /// The spool in `dir`, created 0700 if missing.
    pub fn open(dir: impl AsRef<Path>) -> Result<Spool, SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        ensure_dir(&dir).map_err(|e| DurableError::new("mkdir", &dir, e))?;
        Ok(Spool {
            backing: Backing::Dir(dir),
            counter: AtomicU64::new(0),
            max_entry_bytes: MAX_SPOOL_ENTRY,
        })
    }

    /// A spool in memory (nothing survives the process).
    pub fn memory() -> Spool {
        Spool {
            backing: Backing::Memory(Mutex::new(BTreeMap::new())),
            counter: AtomicU64::new(0),
            max_entry_bytes: MAX_SPOOL_ENTRY,
        }
    }

    /// Where it lives (`(memory)` for a memory spool).
    pub fn location(&self) -> String {
        match &self.backing {
            Backing::Dir(d) => d.display().to_string(),
            Backing::Memory(_) => "(memory)".into(),
        }
    }

    /// A new id: `<ns since epoch, 20 digits>-<pid>-<counter>`, so ids sort by time.
    pub fn new_id(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!(
            "{nanos:020}-{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn check(&self, id: &str) -> Result<(), SpoolError> {
        if valid_id(id) {
            Ok(())
        } else {
            Err(SpoolError::BadId { id: id.to_string() })
        }
    }

    fn not_found(&self, id: &str) -> SpoolError {
        SpoolError::NotFound {
            dir: self.location(),
            id: id.to_string(),
        }
    }

    /// Stores `value` under a new id; when this returns the entry is on disk.
    pub fn put<T: Serialize>(&self, value: &T) -> Result<String, SpoolError> {
        let id = self.new_id();
        self.put_as(&id, value)?;
        Ok(id)
    }

    /// Stores `value` under `id`, replacing any entry of that id (atomically).
    pub fn put_as<T: Serialize>(&self, id: &str, value: &T) -> Result<(), SpoolError> {
        self.check(id)?;
        let data = serde_json::to_vec_pretty(value).map_err(|e| SpoolError::Corrupt {
            path: format!("{}/{id}.json", self.location()),
            reason: format!("cannot encode: {e}"),
        })?;
        match &self.backing {
            Backing::Dir(dir) => write_atomic(&dir.join(format!("{id}.json")), &data)?,
            Backing::Memory(m) => {
                lock(m).insert(id.to_string(), data);
            }
        }
        Ok(())
    }

    /// The entry `id`.
    pub fn get<T: DeserializeOwned>(&self, id: &str) -> Result<T, SpoolError> {
        self.check(id)?;
        let (data, path) = match &self.backing {
            Backing::Dir(dir) => {
                let path = dir.join(format!("{id}.json"));
                let data = read_capped(&path, self.max_entry_bytes).map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        self.not_found(id)
                    } else {
                        SpoolError::Io(DurableError::new("read", &path, e))
                    }
                })?;
                (data, path.display().to_string())
            }
            Backing::Memory(m) => {
                let data = lock(m).get(id).cloned().ok_or_else(|| self.not_found(id))?;
                (data, format!("(memory)/{id}.json"))
            }
        };
        serde_json::from_slice(&data).map_err(|e| SpoolError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Every entry, oldest first (by id), and the files that could not be read.
    pub fn list<T: DeserializeOwned>(&self) -> Result<SpoolListing<T>, SpoolError> {
        let mut out = SpoolListing {
            entries: Vec::new(),
            unreadable: Vec::new(),
        };
        let ids: Vec<String> = match &self.backing {
            Backing::Memory(m) => lock(m).keys().cloned().collect(),
            Backing::Dir(dir) => {
                let mut ids = Vec::new();
                let rd = fs::read_dir(dir).map_err(|e| DurableError::new("readdir", dir, e))?;
                for de in rd {
                    let de = de.map_err(|e| DurableError::new("readdir", dir, e))?;
                    let name = de.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('.') {
                        continue; // temporary files of writes in progress
                    }
                    match name.strip_suffix(".json").filter(|id| valid_id(id)) {
                        Some(id) => ids.push(id.to_string()),
                        None => out.unreadable.push(Unreadable {
                            file: de.path().display().to_string(),
                            error: "not an entry's file name".into(),
                        }),
                    }
                }
                ids
            }
        };
        for id in ids {
            match self.get(&id) {
                Ok(v) => out.entries.push((id, v)),
                // Removed by someone else meanwhile.
                Err(SpoolError::NotFound { .. }) => {}
                Err(e) => out.unreadable.push(Unreadable {
                    file: format!("{}/{id}.json", self.location()),
                    error: e.to_string(),
                }),
            }
        }
        out.entries.sort_by(|a, b| a.0.cmp(&b.0));
        out.unreadable.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(out)
    }

    /// Deletes entry `id` (readable or not).
    pub fn remove(&self, id: &str) -> Result<(), SpoolError> {
        self.check(id)?;
        match &self.backing {
            Backing::Memory(m) => lock(m)
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| self.not_found(id)),
            Backing::Dir(dir) => {
                let path = dir.join(format!("{id}.json"));
                fs::remove_file(&path).map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        self.not_found(id)
                    } else {
                        SpoolError::Io(DurableError::new("unlink", &path, e))
                    }
                })?;
                sync_dir(dir).map_err(|e| SpoolError::Io(DurableError::new("fsync dir", dir, e)))
            }
        }
    }
}

/// Errors of a [`Journal`].
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{0}")]
    Io(#[from] DurableError),
    #[error("journal {path}: cannot encode a record: {reason}")]
    Encode { path: String, reason: String },
}

/// What [`Journal::open`] read: the records, and the lines it skipped (1-based line number
/// and why), a torn last line included.
#[derive(Debug)]
pub struct JournalContents<T> {
    pub records: Vec<T>,
    pub skipped: Vec<(usize, String)>,
}

/// An append-only file of JSON lines (mode 0600).
#[derive(Debug)]
pub struct Journal {
    path: Option<PathBuf>,
    file: Option<File>,
    lines: usize,
}

/// Largest journal [`Journal::open`] reads.
pub const MAX_JOURNAL_BYTES: u64 = 256 << 20;

impl Journal {
    /// Opens (creating) the journal at `path` and reads its records. A last line without its
    /// newline (a torn append) is cut off the file; lines that do not parse are skipped and
    /// reported.
    pub fn open<T: DeserializeOwned>(
        path: impl AsRef<Path>,
    ) -> Result<(Journal, JournalContents<T>), JournalError> {
        let path = path.as_ref().to_path_buf();
        let err = |op| {
            let path = path.clone();
            move |e| JournalError::Io(DurableError::new(op, &path, e))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(err("open"))?;
        let mut data = Vec::new();
        (&mut file)
            .take(MAX_JOURNAL_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(err("read"))?;
        if data.len() as u64 > MAX_JOURNAL_BYTES {
            return Err(JournalError::Io(DurableError::new(
                "read",
                &path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("larger than {MAX_JOURNAL_BYTES} bytes"),
                ),
            )));
        }
        let mut contents = JournalContents {
            records: Vec::new(),
            skipped: Vec::new(),
        };
        let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut lines = 0;
        for (i, line) in data[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            lines += 1;
            match serde_json::from_slice::<T>(line) {
                Ok(r) => contents.records.push(r),
                Err(e) => contents.skipped.push((i + 1, e.to_string())),
            }
        }
        if complete < data.len() {
            let line = data[..complete].iter().filter(|&&b| b == b'\n').count() + 1;
            contents
                .skipped
                .push((line, "torn last line (no newline): cut off".into()));
            file.set_len(complete as u64).map_err(err("truncate"))?;
            file.sync_all().map_err(err("fsync"))?;
            file.seek(io::SeekFrom::End(0)).map_err(err("seek"))?;
        }
        Ok((
            Journal {
                path: Some(path),
                file: Some(file),
                lines,
            },
            contents,
        ))
    }

    /// A journal in memory: appends are counted, nothing is kept.
    pub fn memory() -> Journal {
        Journal {
            path: None,
            file: None,
            lines: 0,
        }
    }

    /// Lines in the file now (for deciding when to compact).
    pub fn lines(&self) -> usize {
        self.lines
    }

    fn encode<T: Serialize>(&self, records: &[T]) -> Result<Vec<u8>, JournalError> {
        let mut out = Vec::new();
        for r in records {
            serde_json::to_writer(&mut out, r).map_err(|e| JournalError::Encode {
                path: self
                    .path
                    .as_ref()
                    .map_or("(memory)".into(), |p| p.display().to_string()),
                reason: e.to_string(),
            })?;
            out.push(b'\n');
        }
        Ok(out)
    }

    /// Appends `record` as one line and fsyncs it; when this returns it is on disk.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), JournalError> {
        let data = self.encode(std::slice::from_ref(record))?;
        if let (Some(f), Some(path)) = (self.file.as_mut(), self.path.as_ref()) {
            f.write_all(&data)
                .map_err(|e| DurableError::new("append", path, e))?;
            f.sync_data()
                .map_err(|e| DurableError::new("fsync", path, e))?;
        }
        self.lines += 1;
        Ok(())
    }

    /// Replaces the whole journal with `records`, atomically.
    pub fn compact<T: Serialize>(&mut self, records: &[T]) -> Result<(), JournalError> {
        let data = self.encode(records)?;
        if let Some(path) = self.path.clone() {
            write_atomic(&path, &data)?;
            let f = OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| DurableError::new("open", &path, e))?;
            self.file = Some(f);
        }
        self.lines = records.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two, longer");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
        // A missing directory is an error naming the temporary file's open, not a panic.
        let e = write_atomic(&dir.path().join("nope/x.json"), b"x").unwrap_err();
        assert_eq!(e.op, "open");
    }

    #[test]
    fn read_capped_refuses_more_than_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"12345").unwrap();
        assert_eq!(read_capped(&p, 5).unwrap(), b"12345");
        assert_eq!(
            read_capped(&p, 4).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn spool_put_get_list_remove_on_disk_and_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        for spool in [Spool::open(dir.path().join("s")).unwrap(), Spool::memory()] {
            let a = spool.put(&Rec { n: 1 }).unwrap();
            let b = spool.put(&Rec { n: 2 }).unwrap();
            assert!(a < b, "ids sort by time: {a} {b}");
            assert_eq!(spool.get::<Rec>(&b).unwrap(), Rec { n: 2 });
            spool.put_as(&a, &Rec { n: 3 }).unwrap();
            let l = spool.list::<Rec>().unwrap();
            assert_eq!(
                l.entries,
                vec![(a.clone(), Rec { n: 3 }), (b.clone(), Rec { n: 2 })]
            );
            assert!(l.unreadable.is_empty());
            spool.remove(&a).unwrap();
            assert!(matches!(
                spool.get::<Rec>(&a),
                Err(SpoolError::NotFound { .. })
            ));
            assert!(matches!(spool.remove(&a), Err(SpoolError::NotFound { .. })));
            for bad in ["../x", ".h", "a/b", ""] {
                assert!(matches!(
                    spool.get::<Rec>(bad),
                    Err(SpoolError::BadId { .. })
                ));
                assert!(matches!(
                    spool.put_as(bad, &Rec { n: 0 }),
                    Err(SpoolError::BadId { .. })
                ));
            }
        }
    }

    #[test]
    fn spool_reports_and_skips_garbage_and_torn_files() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let good = spool.put(&Rec { n: 7 }).unwrap();
        fs::write(dir.path().join("0-torn.json"), b"{\"n\": 1").unwrap();
        fs::write(dir.path().join("1-garbage.json"), b"\xff\x00 nonsense").unwrap();
        fs::write(dir.path().join("stray name.txt"), b"x").unwrap();
        fs::write(dir.path().join(".x.json.tmp.1.2"), b"in progress").unwrap();
        let l = spool.list::<Rec>().unwrap();
        assert_eq!(l.entries, vec![(good, Rec { n: 7 })]);
        assert_eq!(l.unreadable.len(), 3, "{:?}", l.unreadable);
        // Left in place for the operator.
        assert!(dir.path().join("0-torn.json").exists());
    }

    #[test]
    fn journal_appends_survive_reopen_and_a_torn_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.jsonl");
        {
            let (mut j, c) = Journal::open::<Rec>(&p).unwrap();
            assert!(c.records.is_empty());
            j.append(&Rec { n: 1 }).unwrap();
            j.append(&Rec { n: 2 }).unwrap();
            assert_eq!(j.lines(), 2);
        }
        // A garbage line in the middle and a torn append at the end.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"not json\n{\"n\":3}\n{\"n\":4").unwrap();
        drop(f);
        let (mut j, c) = Journal::open::<Rec>(&p).unwrap();
        assert_eq!(c.records, vec![Rec { n: 1 }, Rec { n: 2 }, Rec { n: 3 }]);
        assert_eq!(c.skipped.len(), 2, "{:?}", c.skipped);
        assert!(c.skipped[1].1.contains("torn"));
        // The torn tail is gone: the next append is a line of its own.
        j.append(&Rec { n: 5 }).unwrap();
        drop(j);
        let (mut j, c) = Journal::open::<Rec>(&p).unwrap();
        assert_eq!(c.records.last(), Some(&Rec { n: 5 }));
        assert_eq!(c.skipped.len(), 1);
        // Compaction keeps only what it is given, and appends go on after it.
        j.compact(&[Rec { n: 9 }]).unwrap();
        j.append(&Rec { n: 10 }).unwrap();
        drop(j);
        let (_, c) = Journal::open::<Rec>(&p).unwrap();
        assert_eq!(c.records, vec![Rec { n: 9 }, Rec { n: 10 }]);
        assert!(c.skipped.is_empty());
    }
}
