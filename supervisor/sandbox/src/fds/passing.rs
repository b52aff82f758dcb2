//! One message with descriptors over a `SOCK_SEQPACKET` socket (`SCM_RIGHTS`): the spawner's
//! channel to the supervisor and the exec socket of `carapace run` both speak it.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 32;

/// What [`recv`] got.
#[derive(Debug)]
pub enum Received {
    /// `n` bytes of the buffer, and the descriptors that came with them (owned, close-on-exec).
    Message(usize, Vec<OwnedFd>),
    /// The peer closed its end.
    Eof,
    /// The message or its descriptors did not fit and were cut (the descriptors that did
    /// arrive are closed).
    Truncated,
}

/// Send one message with `fds`. Never raises SIGPIPE; retried on EINTR.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message (at most {MAX_FDS})",
                fds.len()
            ),
        ));
    }
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// The length of the next message, waiting for one (as a receive would, timeout included);
/// 0 when the peer closed its end. Nothing is consumed.
pub fn next_len(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut one = [0u8; 1];
    loop {
        // MSG_TRUNC: the real length of a seqpacket message, even one longer than the buffer.
        match socket::recv(
            sock.as_raw_fd(),
            &mut one,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        ) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Receive one message of at most `max` bytes, with its descriptors, into a buffer of its
/// own length (no buffer of `max` bytes is made and zeroed for a short message).
pub fn recv_owned(sock: BorrowedFd<'_>, max: usize) -> io::Result<(Received, Vec<u8>)> {
    let n = next_len(sock)?;
    let mut buf = vec![0u8; n.clamp(1, max.max(1))];
    let got = recv(sock, &mut buf)?;
    if let Received::Message(len, _) = &got {
        buf.truncate(*len);
    }
    Ok((got, buf))
}

/// Receive one message into `buf`, with its descriptors. Retried on EINTR.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: SCM_RIGHTS installed these descriptors in our table just
                        // now; nothing else owns them.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            return Ok(Received::Truncated);
        }
        if msg.bytes == 0 {
            return Ok(Received::Eof);
        }
        return Ok(Received::Message(msg.bytes, fds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    fn pair() -> (OwnedFd, OwnedFd) {
        socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(a.as_fd(), b"hello", &[file.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 16];
        match recv(b.as_fd(), &mut buf).unwrap() {
            Received::Message(n, fds) => {
                assert_eq!(&buf[..n], b"hello");
                assert_eq!(fds.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_message_too_long_for_the_buffer_is_truncated_and_a_closed_peer_is_eof() {
        let (a, b) = pair();
        send(a.as_fd(), &[7u8; 64], &[]).unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(
            recv(b.as_fd(), &mut buf).unwrap(),
            Received::Truncated
        ));
        drop(a);
        assert!(matches!(recv(b.as_fd(), &mut buf).unwrap(), Received::Eof));
    }

    #[test]
    fn a_message_is_received_into_a_buffer_of_its_length_up_to_the_limit() {
        let (a, b) = pair();
        send(a.as_fd(), &[1u8; 300], &[]).unwrap();
        assert_eq!(next_len(b.as_fd()).unwrap(), 300);
        match recv_owned(b.as_fd(), 1000).unwrap() {
            (Received::Message(300, _), buf) => assert_eq!(buf, vec![1u8; 300]),
            other => panic!("{other:?}"),
        }
        send(a.as_fd(), &[2u8; 300], &[]).unwrap();
        assert!(matches!(
            recv_owned(b.as_fd(), 100).unwrap(),
            (Received::Truncated, _)
        ));
        drop(a);
        assert_eq!(next_len(b.as_fd()).unwrap(), 0);
        assert!(matches!(
            recv_owned(b.as_fd(), 100).unwrap(),
            (Received::Eof, _)
        ));
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) = pair();
        let fds = vec![a.as_raw_fd(); MAX_FDS + 1];
        assert!(send(a.as_fd(), b"x", &fds).is_err());
    }
}
