//! The program of a run, opened once.
//!
//! [`OpenedProgram::open`] opens the canonical path the policy decided on (`openat2` refusing
//! symbolic links on the way, `O_RDONLY | O_CLOEXEC`), checks that it is an executable regular
//! file, and records what the file is ([`FileId`]: device, inode, size, modification and change
//! times). Everything after refers to that descriptor, never to the path again:
//!
//! - an approval hashes it ([`OpenedProgram::sha256`], read with `pread` from offset 0, computed
//!   once; the file's [`FileId`] is taken again around the reading and must not change during
//!   it, and becomes the program's [`OpenedProgram::id`]);
//! - the supervisor's child starts the same inode: it opens the program's path inside the
//!   sandbox, checks that what it got has this [`FileId`] (same inode, same size and times) and
//!   executes that descriptor (`execveat(fd, "", .., AT_EMPTY_PATH)`; a script in a mount the
//!   sandbox cannot write, by its path right after the check, so that it keeps its `$0`). A
//!   file renamed over the program is a different inode, and one written (or renamed, linked,
//!   chmod'ed: its change time moves) after it was hashed has other times: the start is
//!   refused.
//!
//! What this does not catch: a write into the same inode that leaves its size and both times as
//! they were (times have the kernel's clock-tick granularity, so a change within the tick of the
//! last one may leave them unchanged). Whoever can write the program file in place can do that;
//! see docs/threat-model.md.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use sha2::{Digest, Sha256};

/// Errors of opening and hashing a program.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("program {}: {op}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("program {}: not an executable regular file", path.display())]
    NotExecutable { path: PathBuf },
    #[error("program {} changed while it was being hashed; not run", path.display())]
    Changed { path: PathBuf },
}

/// What a file is, as far as `fstat` can tell: the inode (device and number), and its size,
/// modification and change times. Equal ids of an inode held open mean the same file, not
/// written since (up to the times' granularity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: i64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileId {
    /// The id in a `stat` record. Pure (no allocation): usable between clone and exec.
    pub fn of(st: &libc::stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// `fstat(fd)`'s id (an `O_PATH` descriptor will do). Errors are errnos: usable between
    /// clone and exec.
    pub fn of_fd(fd: libc::c_int) -> Result<FileId, i32> {
        // SAFETY: all-zero is a valid `stat`; fstat writes into it and touches nothing else.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out pointer; fstat is async-signal-safe.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
            return Err(unsafe { *libc::__errno_location() });
        }
        Ok(FileId::of(&st))
    }
}

/// A program opened for one run: the descriptor, the canonical path it was opened at, what the
/// file was then, whether it is a script (`#!`), and its SHA-256 once someone asked for it.
#[derive(Debug)]
pub struct OpenedProgram {
    fd: OwnedFd,
    path: PathBuf,
    /// At open.
    opened: FileId,
    script: bool,
    /// The hash and the file's id while it was read.
    sha256: OnceLock<(String, FileId)>,
}

impl OpenedProgram {
    /// Open the program at `path` (absolute, canonical: no symbolic link may be met on the way,
    /// which also keeps a link planted after the path was resolved from redirecting it). It must
    /// be a regular file with an execute bit.
    pub fn open(path: &Path) -> Result<OpenedProgram, ProgramError> {
        let err = |op| {
            move |source: io::Error| ProgramError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        if !path.is_absolute() {
            return Err(err("open")(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path",
            )));
        }
        // O_NONBLOCK: a FIFO planted at the path cannot stall the open (it is refused below).
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .mode(Mode::empty())
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
            Ok(fd) => fd,
            // Not readable by us (an execute-only program, the supervisor not root): a
            // descriptor that only names the file, enough to start it but not to hash it.
            Err(nix::errno::Errno::EACCES) => nix::fcntl::openat2(
                nix::fcntl::AT_FDCWD,
                path,
                how.flags(OFlag::O_PATH | OFlag::O_CLOEXEC),
            )
            .map_err(|e| err("openat2")(io::Error::from(e)))?,
            Err(e) => return Err(err("openat2")(io::Error::from(e))),
        };
        let id = FileId::of_fd(fd.as_raw_fd())
            .map_err(|e| err("fstat")(io::Error::from_raw_os_error(e)))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(err("fstat"))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(ProgramError::NotExecutable {
                    path: path.to_path_buf(),
                });
            }
        }
        let mut head = [0u8; 2];
        // EBADF: an O_PATH descriptor (see above); the kernel would not let the interpreter
        // of a script we cannot read read it either.
        let n = match read_at_full(&file, &mut head, 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => 0,
            Err(e) => return Err(err("read")(e)),
        };
        Ok(OpenedProgram {
            script: n == 2 && head == *b"#!",
            fd: OwnedFd::from(file),
            path: path.to_path_buf(),
            opened: id,
            sha256: OnceLock::new(),
        })
    }

    /// The program as the supervisor opened it, in the spawner process (see
    /// [`crate::spawner`]): its descriptor, path, identity, whether a script, and its hash
    /// when one was taken (with `id`, the file's identity while it was read).
    pub(crate) fn from_parts(
        fd: OwnedFd,
        path: PathBuf,
        id: FileId,
        script: bool,
        sha256: Option<String>,
    ) -> OpenedProgram {
        let hashed = OnceLock::new();
        if let Some(h) = sha256 {
            let _ = hashed.set((h, id));
        }
        OpenedProgram {
            fd,
            path,
            opened: id,
            script,
            sha256: hashed,
        }
    }

    /// The SHA-256 if it was taken already.
    pub fn sha256_if_known(&self) -> Option<&str> {
        self.sha256.get().map(|(s, _)| s.as_str())
    }

    /// The canonical path it was opened at (what the policy decided on).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor (`O_RDONLY | O_CLOEXEC`; `O_PATH` when we may not read the file).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// What the file is expected to be when it is started: as it was while it was hashed, or
    /// (never hashed) when it was opened.
    pub fn id(&self) -> FileId {
        self.sha256.get().map_or(self.opened, |(_, id)| *id)
    }

    /// Whether it starts with `#!` (the kernel then runs its interpreter on it).
    pub fn is_script(&self) -> bool {
        self.script
    }

    /// Hex SHA-256 of the content, read from this descriptor (from offset 0, whatever the
    /// descriptor's offset); computed on the first call. An error when the file changed while
    /// it was being read (its [`FileId`] before and after differ).
    pub fn sha256(&self) -> Result<&str, ProgramError> {
        if let Some((s, _)) = self.sha256.get() {
            return Ok(s);
        }
        let hashed = self.hash()?;
        Ok(&self.sha256.get_or_init(|| hashed).0)
    }

    /// Whether [`OpenedProgram::sha256`] has been computed (an approval was asked).
    pub fn sha256_known(&self) -> bool {
        self.sha256.get().is_some()
    }

    fn hash(&self) -> Result<(String, FileId), ProgramError> {
        let err = |op| {
            move |source: io::Error| ProgramError::Io {
                op,
                path: self.path.clone(),
                source,
            }
        };
        let before = self.stat()?;
        let file = File::from(self.fd.try_clone().map_err(err("dup"))?);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        loop {
            match file.read_at(&mut buf, off) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err("pread")(e)),
            }
        }
        if self.stat()? != before {
            return Err(ProgramError::Changed {
                path: self.path.clone(),
            });
        }
        Ok((format!("{:x}", h.finalize()), before))
    }

    fn stat(&self) -> Result<FileId, ProgramError> {
        FileId::of_fd(self.fd.as_raw_fd()).map_err(|e| ProgramError::Io {
            op: "fstat",
            path: self.path.clone(),
            source: io::Error::from_raw_os_error(e),
        })
    }
}

/// `pread` until `buf` is full or EOF; how many bytes were read.
fn read_at_full(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::{Seek as _, SeekFrom};
    use std::os::unix::fs::PermissionsExt as _;

    fn exe(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::canonicalize(&p).unwrap()
    }

    fn sha_of(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    #[test]
    fn hash_by_fd_is_the_content_hash_whatever_the_offset() {
        let t = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let p = exe(t.path(), "big", &body);
        let o = OpenedProgram::open(&p).unwrap();
        assert!(!o.is_script());
        // Move the descriptor's offset: the hash reads from 0 anyway.
        let mut f = File::from(o.fd().try_clone_to_owned().unwrap());
        f.seek(SeekFrom::Start(1234)).unwrap();
        assert_eq!(o.sha256().unwrap(), sha_of(&body));
        assert_eq!(o.sha256().unwrap(), sha_of(&body), "cached");
        assert_eq!(o.path(), p);
    }

    #[test]
    fn a_program_renamed_over_still_hashes_the_opened_content() {
        let t = tempfile::tempdir().unwrap();
        let p = exe(t.path(), "tool", b"#!/bin/sh\necho approved\n");
        let o = OpenedProgram::open(&p).unwrap();
        assert!(o.is_script());
        let other = exe(t.path(), "other", b"#!/bin/sh\necho swapped\n");
        std::fs::rename(&other, &p).unwrap();
        assert_eq!(
            o.sha256().unwrap(),
            sha_of(b"#!/bin/sh\necho approved\n"),
            "the opened inode, not what the path names now"
        );
        // Opened again, the path gives the other file.
        let again = OpenedProgram::open(&p).unwrap();
        assert_eq!(
            again.sha256().unwrap(),
            sha_of(b"#!/bin/sh\necho swapped\n")
        );
        assert_ne!(again.id().ino, o.id().ino);
    }

    #[test]
    fn the_id_to_start_is_the_one_hashed() {
        let t = tempfile::tempdir().unwrap();
        let p = exe(t.path(), "tool", b"#!/bin/sh\necho approved\n");
        let o = OpenedProgram::open(&p).unwrap();
        let at_open = o.id();
        std::fs::write(&p, b"#!/bin/sh\necho written in place, longer\n").unwrap();
        // Hashed after the write: the hash and the id are both of the written file.
        assert_eq!(
            o.sha256().unwrap(),
            sha_of(b"#!/bin/sh\necho written in place, longer\n")
        );
        assert_ne!(o.id(), at_open);
        assert_eq!(o.id(), FileId::of_fd(o.fd().as_raw_fd()).unwrap());
        // Written again after the hash: no longer the id to start.
        std::fs::write(&p, b"#!/bin/sh\necho and again\n").unwrap();
        assert_ne!(FileId::of_fd(o.fd().as_raw_fd()).unwrap(), o.id());
    }

    #[test]
    fn only_executable_regular_files_open() {
        let t = tempfile::tempdir().unwrap();
        let p = exe(t.path(), "tool", b"\x7fELF");
        OpenedProgram::open(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            OpenedProgram::open(&p),
            Err(ProgramError::NotExecutable { .. })
        ));
        let dir = std::fs::canonicalize(t.path()).unwrap();
        assert!(matches!(
            OpenedProgram::open(&dir),
            Err(ProgramError::NotExecutable { .. })
        ));
        assert!(matches!(
            OpenedProgram::open(Path::new("/dev/zero")),
            Err(ProgramError::NotExecutable { .. })
        ));
        assert!(OpenedProgram::open(&dir.join("missing")).is_err());
        assert!(OpenedProgram::open(Path::new("relative")).is_err());
        // A symbolic link anywhere on the way is refused.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&p, dir.join("link")).unwrap();
        let e = OpenedProgram::open(&dir.join("link")).unwrap_err();
        assert!(e.to_string().contains("openat2"), "{e}");
    }

    #[test]
    fn file_id_sees_a_write() {
        let t = tempfile::tempdir().unwrap();
        let p = exe(t.path(), "tool", b"one");
        let o = OpenedProgram::open(&p).unwrap();
        assert_eq!(FileId::of_fd(o.fd().as_raw_fd()).unwrap(), o.id());
        std::fs::write(&p, b"two, longer").unwrap();
        assert_ne!(FileId::of_fd(o.fd().as_raw_fd()).unwrap(), o.id());
    }
}
