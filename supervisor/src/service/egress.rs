//! A brokered network's forwarding: what a child's program connects to inside its sandbox (a
//! forwarded name's loopback address, see [`carapace_sandbox::egress`]) is accepted here and
//! joined to a connection the broker makes with its `connect` op, as the child, under the
//! child's own profile: the same allowlist decision, the same resolution (non-public
//! addresses refused unless the rule allows them), the same audit record and rate limit as
//! an adapter's own `connect`. Bytes are copied both ways unchanged, so TLS stays end to end
//! between the program and the real host (its SNI and certificate check name the host).
//!
//! Threads, not the async runtime: a forwarded child (signal-cli) holds a handful of
//! long-lived connections, and a blocking copy per direction is the simplest correct relay
//! (half-close included). At most [`MAX_CONNECTIONS`] are relayed at once per child.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use carapace_broker::client::Client;
use carapace_broker::server::Identity;
use carapace_sandbox::egress::Listener;

use crate::broker_host::PeerServer;

/// Connections relayed at once for one child; more are closed at once (and logged).
pub(super) const MAX_CONNECTIONS: usize = 128;

/// Errors of starting a child's forwarding.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("a socket pair for the forwarder's broker connection: {0}")]
    Socket(#[source] carapace_broker::protocol::SocketError),
    #[error("the forwarder's broker connection is not served (the broker has no handler yet)")]
    NotServed,
    #[error("a pipe for stopping the forwarder: {0}")]
    Pipe(#[source] io::Error),
    #[error("starting the forwarder's thread: {0}")]
    Thread(#[source] io::Error),
}

/// A running forwarder; dropping it stops accepting (the listeners close) and lets the
/// connections being relayed run to their end.
pub(super) struct Forwarder {
    /// Closing it wakes the accept loop, which then ends.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Serve a broker socket as `who` (the child's identity) and accept on `listeners`.
    pub(super) fn start(
        child: &str,
        listeners: Vec<Listener>,
        peers: &PeerServer,
        who: Identity,
    ) -> Result<Forwarder, EgressError> {
        let (mine, broker_end) =
            carapace_broker::protocol::seqpacket_pair().map_err(EgressError::Socket)?;
        peers.serve(mine, who).ok_or(EgressError::NotServed)?;
        let client = Arc::new(Mutex::new(Client::new(broker_end)));
        let (stop_read, stop_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| EgressError::Pipe(e.into()))?;
        let child = child.to_string();
        let thread = std::thread::Builder::new()
            .name("carapace-egress".into())
            .spawn(move || accept_loop(&child, &listeners, &stop_read, &client))
            .map_err(EgressError::Thread)?;
        Ok(Forwarder {
            stop: Some(stop_write),
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accept on every listener until `stop` is closed; each connection is relayed on threads
/// of its own.
fn accept_loop(child: &str, listeners: &[Listener], stop: &OwnedFd, client: &Arc<Mutex<Client>>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| l.socket.as_raw_fd())
            .chain([stop.as_raw_fd()])
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live array of pollfd of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(%child, "forwarder: poll: {e}; no more connections are forwarded");
            return;
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (l, p) in listeners.iter().zip(&fds) {
            if p.revents == 0 {
                continue;
            }
            let stream = match l.socket.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(%child, host = %l.host, port = l.port, "forwarder: accept: {e}");
                    continue;
                }
            };
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                tracing::warn!(
                    %child, host = %l.host, port = l.port,
                    "forwarder: {MAX_CONNECTIONS} connections already open; this one is closed"
                );
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let job = Job {
                child: child.to_string(),
                host: l.host.clone(),
                port: l.port,
                client: client.clone(),
                active: active.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name("carapace-egress-conn".into())
                .spawn(move || job.run(stream));
            if let Err(e) = spawned {
                active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(%child, "forwarder: a thread for a connection: {e}");
            }
        }
    }
}

/// One accepted connection: ask the broker, then relay.
struct Job {
    child: String,
    host: String,
    port: u16,
    client: Arc<Mutex<Client>>,
    active: Arc<AtomicUsize>,
}

impl Job {
    fn run(self, inside: TcpStream) {
        let Job {
            child, host, port, ..
        } = &self;
        // A session of its own, so that a slow connect does not hold up the others.
        let session = match self.client.lock() {
            Ok(mut c) => c.session(),
            Err(_) => {
                tracing::error!(%child, "forwarder: the broker client's lock is poisoned");
                return;
            }
        };
        let upstream = session.and_then(|mut s| s.connect(host, *port));
        match upstream {
            Ok((fd, peer)) => {
                tracing::debug!(%child, %host, port, %peer, "forwarding a connection");
                relay(inside, TcpStream::from(fd));
            }
            Err(e) => {
                // The broker's refusal is in its audit log; the program sees its connection
                // closed, as it would for a host that refused it.
                tracing::warn!(%child, %host, port, "forwarder: the broker did not connect: {e}");
            }
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copy both ways until both directions have ended; an end of one direction is passed on as
/// a half-close (`shutdown(SHUT_WR)`), an error closes both.
fn relay(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let back = std::thread::Builder::new()
        .name("carapace-egress-copy".into())
        .spawn(move || copy_half(b2, a2));
    copy_half(a, b);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

fn copy_half(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}
