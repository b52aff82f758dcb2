//! carapace's broker: the only door out of a confined child.
//!
//! A child holds one end of a `SOCK_SEQPACKET` socketpair (fd 3, `CARAPACE_BROKER_FD`); the
//! broker holds the other and knows the child by *which socket* a request came on, never by what
//! the request claims. Every process of the child shares that socket, so a client that may run
//! concurrently with another first opens a `session` (a private socket with the same identity)
//! and talks on it. Spec: docs/protocol.md.

pub mod approvals;
pub mod audit;
pub mod client;
pub mod dlq;
pub mod durable;
pub mod ops;
pub mod protocol;
pub mod ratelimit;
pub mod redact;
pub mod server;
pub mod sync;
pub mod tokens;
