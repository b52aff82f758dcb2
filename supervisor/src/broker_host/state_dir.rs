//! The supervisor's state directory: created 0700 and ours, or refused when it is a link, someone
//! else's or writable by others; where the broker's files live in it.

use super::*;

/// Default state directory when running as root.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/carapace";

/// The broker's files beneath the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// Create `root` (and its parents) if missing, mode 0700, owned by us; an existing
    /// directory must be a real directory (not a link) owned by us and not writable by others.
    pub fn open(root: &Path) -> Result<StateDir, BrokerHostError> {
        use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
        let err = |syscall, source| BrokerHostError::Io {
            syscall,
            path: root.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .map_err(|e| err("mkdir", e))?;
                // The umask may have narrowed it further; never widened. Make it exactly 0700.
                std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| err("chmod", e))?;
            }
            Err(e) => return Err(err("lstat", e)),
            Ok(m) => {
                let path = root.to_path_buf();
                if !m.file_type().is_dir() {
                    return Err(BrokerHostError::StateDirNotDir { path });
                }
                let me = rustix::process::geteuid().as_raw();
                if m.uid() != me {
                    return Err(BrokerHostError::StateDirNotOurs {
                        path,
                        uid: m.uid(),
                        me,
                    });
                }
                if m.mode() & 0o022 != 0 {
                    return Err(BrokerHostError::StateDirWritable {
                        path,
                        mode: m.mode() & 0o7777,
                    });
                }
            }
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root.join("audit.log")
    }

    pub fn dlq(&self) -> PathBuf {
        self.root.join("dlq")
    }

    /// Pending approvals offered to the operator (see [`FileApprover`]).
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
}
