//! Durable state: every file the broker keeps is written through here.
//!
//! - [`write_atomic`]: a whole file replaced atomically (temporary file in the same directory,
//!   fsync, rename, fsync of the directory): after a crash the file is wholly old or wholly new.
//! - [`ensure_dir`], [`read_capped`], [`sync_dir`]: the directory and read helpers the stores
//!   share.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
}
