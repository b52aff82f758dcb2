//! A brokered network's listeners: for each name the profile forwards, a TCP listener at the
//! name's loopback address *inside* the sandbox's network namespace, made by the parent after
//! clone and before the child may run its program (so no connection can come before the
//! listener is there). The sandbox's `/etc/hosts` (a [`carapace_policy::plan::Mount::File`])
//! gives each name that address; whoever owns the listeners (the service, see its `egress`
//! module) accepts there and forwards every connection through the broker's `connect`.
//!
//! Hand-written rather than through a netlink crate: bringing `lo` up is one `SIOCSIFFLAGS`
//! ioctl, and the listeners are plain `std` sockets made by a thread that has entered the
//! sandbox's network namespace (`setns` of the child's pidfd changes the namespace of the
//! calling thread only; the thread ends right after).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use carapace_policy::plan::Forward;

/// Errors of making a brokered network's listeners.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{syscall} (in the sandbox's network namespace): {source}")]
    Sys {
        syscall: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("listening on {addr} for {host} inside the sandbox: {source}")]
    Listen {
        host: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "a brokered network needs a supervisor running as root (entering the sandbox's network \
         namespace needs CAP_SYS_ADMIN); in rootless mode use network mode \"none\""
    )]
    Rootless,
    #[error("the thread making the sandbox's listeners panicked")]
    Thread,
}

/// One forwarded (host, port): the listener inside the sandbox where a program reaches it.
#[derive(Debug)]
pub struct Listener {
    pub host: String,
    pub port: u16,
    pub socket: TcpListener,
}

/// Bring the loopback interface of the network namespace of the process behind `pidfd` up and
/// make one listener per forward. Runs on a short-lived thread of its own.
pub fn listen_in(pidfd: BorrowedFd<'_>, forward: &[Forward]) -> Result<Vec<Listener>, EgressError> {
    if forward.is_empty() {
        return Ok(Vec::new());
    }
    let raw = pidfd.as_raw_fd();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("carapace-netns".into())
            .spawn_scoped(s, move || in_netns(raw, forward))
            .map_err(|source| EgressError::Sys {
                syscall: "pthread_create",
                source,
            })?
            .join()
            .map_err(|_| EgressError::Thread)?
    })
}

/// The thread body: enter the namespace (this thread only), lo up, the listeners.
fn in_netns(pidfd: RawFd, forward: &[Forward]) -> Result<Vec<Listener>, EgressError> {
    // SAFETY: setns on a valid pidfd with CLONE_NEWNET moves only the calling thread, which is
    // this short-lived one; it owns nothing that depends on its network namespace.
    if unsafe { libc::setns(pidfd, libc::CLONE_NEWNET) } != 0 {
        return Err(EgressError::Sys {
            syscall: "setns(CLONE_NEWNET)",
            source: io::Error::last_os_error(),
        });
    }
    loopback_up()?;
    forward
        .iter()
        .map(|f| {
            let addr = SocketAddr::V4(SocketAddrV4::new(f.addr, f.port));
            let socket = TcpListener::bind(addr).map_err(|source| EgressError::Listen {
                host: f.host.clone(),
                addr,
                source,
            })?;
            Ok(Listener {
                host: f.host.clone(),
                port: f.port,
                socket,
            })
        })
        .collect()
}

/// `ip link set lo up` in the calling thread's network namespace.
fn loopback_up() -> Result<(), EgressError> {
    let sys = |syscall| move |source| EgressError::Sys { syscall, source };
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("socket")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new socket owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in a valid ifreq into it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } != 0 {
        return Err(sys("ioctl(SIOCGIFFLAGS, lo)")(io::Error::last_os_error()));
    }
    // SAFETY: after SIOCGIFFLAGS the flags member is the one the kernel filled in.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS sets the flags of the interface named in a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } != 0 {
        return Err(sys("ioctl(SIOCSIFFLAGS, lo up)")(io::Error::last_os_error()));
    }
    Ok(())
}
