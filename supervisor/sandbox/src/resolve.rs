//! Program resolution in the parent: a bare name is searched in PATH (the plan's PATH, else
//! [`DEFAULT_PATH`]); a name with a slash is taken relative to the current directory. The result
//! is canonicalized (symlinks resolved), because the policy decides on the canonical path.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Search path used when the plan sets no PATH.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{name}: command not found in PATH {path}")]
    NotFound { name: String, path: String },
    #[error("{}: {source}", path.display())]
    Canonicalize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an executable regular file", path.display())]
    NotExecutable { path: PathBuf },
    #[error("empty program name")]
    Empty,
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The directories of a PATH value, in order; empty and relative entries are skipped (they
/// would mean "the current directory", which is not where trusted programs live).
pub fn path_dirs(path: &str) -> impl Iterator<Item = &Path> {
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(Path::new)
}

/// Resolve `name` to a canonical absolute path.
pub fn resolve(name: &OsStr, path: &str, cwd: &Path) -> Result<PathBuf, ResolveError> {
    if name.is_empty() {
        return Err(ResolveError::Empty);
    }
    let candidate = if name.as_bytes().contains(&b'/') {
        let p = Path::new(name);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        }
    } else {
        path_dirs(path)
            .map(|d| d.join(name))
            .find(|c| is_executable_file(c))
            .ok_or_else(|| ResolveError::NotFound {
                name: name.to_string_lossy().into_owned(),
                path: path.to_string(),
            })?
    };
    let canon = std::fs::canonicalize(&candidate).map_err(|source| ResolveError::Canonicalize {
        path: candidate.clone(),
        source,
    })?;
    if !is_executable_file(&canon) {
        return Err(ResolveError::NotExecutable { path: canon });
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn searches_path_in_order_and_canonicalizes() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let real = exe(&b, "tool");
        // A non-executable file earlier in PATH is skipped.
        std::fs::write(a.join("tool"), "").unwrap();
        let path = format!("{}:{}", a.display(), b.display());
        let got = resolve(OsStr::new("tool"), &path, Path::new("/")).unwrap();
        assert_eq!(got, std::fs::canonicalize(&real).unwrap());
        // Symlinks resolve to their target.
        symlink(&real, a.join("link")).unwrap();
        let got = resolve(OsStr::new("link"), &path, Path::new("/")).unwrap();
        assert_eq!(got, std::fs::canonicalize(&real).unwrap());
    }

    #[test]
    fn relative_and_absolute_names() {
        let t = tempfile::tempdir().unwrap();
        let real = exe(t.path(), "x");
        let canon = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            resolve(OsStr::new("./x"), "", t.path()).unwrap(),
            canon.clone()
        );
        assert_eq!(
            resolve(real.as_os_str(), "", Path::new("/")).unwrap(),
            canon
        );
    }

    #[test]
    fn failures() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            resolve(OsStr::new("no-such-tool-xyz"), DEFAULT_PATH, t.path()),
            Err(ResolveError::NotFound { .. })
        ));
        assert!(matches!(
            resolve(OsStr::new(""), DEFAULT_PATH, t.path()),
            Err(ResolveError::Empty)
        ));
        std::fs::write(t.path().join("data"), "").unwrap();
        assert!(matches!(
            resolve(OsStr::new("./data"), "", t.path()),
            Err(ResolveError::NotExecutable { .. })
        ));
        // Relative PATH entries are ignored, even if the file is there.
        exe(t.path(), "here");
        assert!(resolve(OsStr::new("here"), ".:", t.path()).is_err());
        assert_eq!(path_dirs("/a::b:/c").count(), 2);
    }

    #[test]
    fn resolves_real_tools() {
        let ls = resolve(OsStr::new("ls"), DEFAULT_PATH, Path::new("/")).unwrap();
        assert!(ls.is_absolute());
        assert!(ls.ends_with("ls"));
    }
}
