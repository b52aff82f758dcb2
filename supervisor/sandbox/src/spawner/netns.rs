//! A network namespace made ahead, between requests, for the next sandbox (see
//! [`Launch::use_premade_netns`]).
//!
//! Cloning with `CLONE_NEWNET` registers a loopback device and the namespace's sysctls: the
//! largest single cost of the clone (~0.4 ms of the ~0.6 ms here). The spawner makes the next
//! sandbox's namespace while it waits for the request, so that cost is off the request's path.
//! Each namespace serves one sandbox, is never entered by anything else first, and is the
//! same a clone would make: owned by the initial user namespace, only `lo`, down. Root mode
//! only (a rootless sandbox's namespaces belong to the user namespace it is born in).

use super::*;

/// At most one fresh network namespace, waiting for the next sandbox.
#[derive(Debug)]
pub(super) struct PremadeNetns {
    /// The spawner's own network namespace, to return to after making one; None: disabled.
    home: Option<OwnedFd>,
    next: Option<OwnedFd>,
}

impl PremadeNetns {
    /// Enabled for a root spawner whose own namespace can be held.
    pub(super) fn new(root: bool) -> PremadeNetns {
        let home = if root {
            std::fs::File::open("/proc/self/ns/net")
                .ok()
                .map(OwnedFd::from)
        } else {
            None
        };
        PremadeNetns { home, next: None }
    }

    /// Make the next one if there is none. A failure turns this off for good (logged once):
    /// the sandboxes then clone their own, as without it.
    pub(super) fn refill(&mut self) {
        let Some(home) = &self.home else { return };
        if self.next.is_some() {
            return;
        }
        match make(home) {
            Ok(ns) => self.next = Some(ns),
            Err(e) => {
                tracing::debug!("tool spawner: no network namespaces made ahead: {e}");
                if let Err(e) = setns(home) {
                    // Still in a namespace of our own: harmless (the spawner uses no network,
                    // and every sandbox gets one of its own), but say so.
                    tracing::warn!("tool spawner: cannot return to its network namespace: {e}");
                }
                self.home = None;
            }
        }
    }

    /// The namespace made ahead, for a launch that can use it (else it stays for the next).
    pub(super) fn give(&mut self, launch: &mut Launch) {
        if !launch.wants_premade_netns() {
            return;
        }
        if let Some(ns) = self.next.take() {
            if let Err(ns) = launch.use_premade_netns(ns) {
                self.next = Some(ns);
            }
        }
    }
}

/// unshare a network namespace, keep a descriptor of it, and go back home.
fn make(home: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: an integer argument; only the calling thread's network namespace changes (the
    // spawner has one thread), and `setns` below moves it back.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let ns = std::fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from);
    setns(home)?;
    ns
}

/// Move the calling thread into the network namespace `ns`.
fn setns(ns: &OwnedFd) -> io::Result<()> {
    // SAFETY: `ns` is an open namespace descriptor; integer arguments only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
