//! Where the supervisor keeps things by default, as root (a system service) and as an
//! unprivileged user (rootless mode, see docs/architecture.md).

use std::path::{Path, PathBuf};

use carapace_sandbox::Privilege;

/// Default configuration file of `carapace run`; when it does not exist the embedded default
/// configuration is used.
pub const DEFAULT_CONFIG: &str = "/etc/carapace/carapace.toml";
/// Name of the control socket in the runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The gateway's client tokens (hashed), in the state directory: `carapace token` writes it,
/// the broker's `auth` reads it; the gateway's sandbox never sees it.
pub const TOKENS_FILE: &str = "tokens.json";
/// Where a first start without a terminal leaves the operator token it created (0600).
pub const INITIAL_TOKEN_FILE: &str = "initial-operator-token";
/// Environment variable naming the control socket (overridden by `--socket`).
pub const CONTROL_SOCKET_ENV: &str = "CARAPACE_CONTROL_SOCKET";

/// Whether this process is a root supervisor (its defaults are the system's directories).
fn is_root() -> bool {
    Privilege::of_this_process().is_root()
}

fn euid() -> u32 {
    carapace_sandbox::namespaces::own_ids().uid
}

/// An absolute directory from the environment variable `name`, if set to one.
fn env_dir(name: &str) -> Option<PathBuf> {
    let v = std::env::var_os(name)?;
    let p = PathBuf::from(v);
    p.is_absolute().then_some(p)
}

/// State directory: `/var/lib/carapace` as root; else `$XDG_STATE_HOME/carapace`, else
/// `$HOME/.local/state/carapace`, else `/tmp/carapace-<uid>/state`.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/carapace");
    }
    if let Some(d) = env_dir("XDG_STATE_HOME") {
        return d.join("carapace");
    }
    if let Some(h) = env_dir("HOME") {
        return h.join(".local/state/carapace");
    }
    PathBuf::from(format!("/tmp/carapace-{}/state", euid()))
}

/// Runtime directory (control socket): `/run/carapace` as root; else
/// `$XDG_RUNTIME_DIR/carapace`, else `/tmp/carapace-<uid>/run`.
pub fn default_runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/carapace");
    }
    if let Some(d) = env_dir("XDG_RUNTIME_DIR") {
        return d.join("carapace");
    }
    PathBuf::from(format!("/tmp/carapace-{}/run", euid()))
}

/// The state directory: `arg` (`--state-dir`), else the default.
pub fn state_dir_or_default(arg: Option<&Path>) -> PathBuf {
    arg.map_or_else(default_state_dir, Path::to_path_buf)
}

/// The control socket the operator CLI talks to: `$CARAPACE_CONTROL_SOCKET`, else
/// `<default runtime dir>/control.sock`.
pub fn default_control_socket() -> PathBuf {
    env_dir(CONTROL_SOCKET_ENV).unwrap_or_else(|| default_runtime_dir().join(CONTROL_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_absolute() {
        assert!(default_state_dir().is_absolute());
        assert!(default_runtime_dir().is_absolute());
        assert!(
            default_control_socket().ends_with(CONTROL_SOCKET)
                || std::env::var_os(CONTROL_SOCKET_ENV).is_some()
        );
        if is_root() {
            assert_eq!(default_state_dir(), PathBuf::from("/var/lib/carapace"));
            assert_eq!(default_runtime_dir(), PathBuf::from("/run/carapace"));
        }
    }
}
