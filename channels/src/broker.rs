//! The adapter's door out: the broker, as a trait the adapter loops are written against
//! ([`BrokerApi`]), and its implementation over the blocking client library ([`Broker`]).
//!
//! The client library carries one request at a time and blocks (an `outbox` long poll for up
//! to 25 s), so [`Broker`] keeps a few broker *sessions* (private sockets with the adapter's
//! identity, docs/protocol.md "Sessions") and runs each call on tokio's blocking pool: the
//! inbound loop, the outbound long poll and a `connect` never wait for each other. The channel
//! name is bound at construction; every call is about that channel.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use carapace_broker::client::{AckReply, Client, ClientError, DeliverArgs, DeliverReply};
use carapace_broker::protocol::{ErrorCode, OutboundMessage, SendOutcome};
use carapace_broker::sync::lock;
use tokio::sync::Semaphore;

/// Broker calls in flight at once (each on its own session).
const MAX_SESSIONS: usize = 8;

/// A message received from the service, as it is handed to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The service's id of the message, unique per channel (`update:42`).
    pub id: String,
    /// Who wrote it on the service.
    pub sender: String,
    /// The conversation it belongs to.
    pub conversation: String,
    /// Where a reply goes.
    pub reply_to: String,
    /// The text (untrusted).
    pub text: String,
}

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no broker: {0}")]
    NoBroker(String),
    #[error("the broker refused {op}: {code}: {message}")]
    Refused {
        op: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("broker {op}: {source}")]
    Transport {
        op: &'static str,
        #[source]
        source: ClientError,
    },
    #[error("broker {op}: the call's task failed: {why}")]
    Task { op: &'static str, why: String },
    #[error("reading secret {name}: {source}")]
    SecretRead {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl BrokerError {
    fn from_client(op: &'static str, e: ClientError) -> BrokerError {
        match e {
            ClientError::Refused(body) => BrokerError::Refused {
                op,
                code: body.code,
                message: body.message,
            },
            source => BrokerError::Transport { op, source },
        }
    }

    /// The broker's error code, when it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            BrokerError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Worth trying again later as it is: the broker is busy, the target unavailable, or the
    /// session broke. A refusal for cause (`denied`, `bad_request`, `too_large`, ...) is not.
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::Refused { code, .. } => matches!(
                code,
                ErrorCode::Busy
                    | ErrorCode::Unavailable
                    | ErrorCode::RateLimited
                    | ErrorCode::Internal
            ),
            BrokerError::Transport { .. } | BrokerError::Task { .. } => true,
            BrokerError::NoBroker(_) | BrokerError::SecretRead { .. } => false,
        }
    }
}

/// A credential read from the broker. Its `Debug` shows no byte of it.
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.fill(0);
        // Keep the zeroing from being optimised away as a dead store.
        std::hint::black_box(&self.0);
    }
}

/// What an adapter asks of the broker, for its one channel.
pub trait BrokerApi: Send + Sync + 'static {
    /// Hand a received message over (`deliver`). Only after this answered may the adapter
    /// advance its service cursor.
    fn deliver(
        &self,
        msg: &Inbound,
    ) -> impl Future<Output = Result<DeliverReply, BrokerError>> + Send;
    /// The due outbound messages, waiting up to `wait_ms` for one (`outbox`).
    fn outbox(
        &self,
        wait_ms: u64,
    ) -> impl Future<Output = Result<Vec<OutboundMessage>, BrokerError>> + Send;
    /// Report what became of outbound message `id` (`outbox_ack`).
    fn outbox_ack(
        &self,
        id: &str,
        outcome: SendOutcome,
    ) -> impl Future<Output = Result<AckReply, BrokerError>> + Send;
    /// Say whether the service is reachable (`channel_state`).
    fn channel_state(
        &self,
        connected: bool,
        error: Option<String>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// A credential by its policy name (`secret`).
    fn secret(&self, name: &str) -> impl Future<Output = Result<Secret, BrokerError>> + Send;
    /// A connected TCP socket to `host:port`, if the egress allowlist names it (`connect`).
    fn connect(
        &self,
        host: String,
        port: u16,
    ) -> impl Future<Output = Result<OwnedFd, BrokerError>> + Send;
}

/// The broker over the socket the adapter inherited.
#[derive(Debug)]
pub struct Broker {
    channel: String,
    shared: OwnedFd,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

impl Broker {
    /// For `channel`, over the inherited broker socket `shared`.
    pub fn new(channel: String, shared: OwnedFd) -> Broker {
        Broker {
            channel,
            shared,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_SESSIONS)),
        }
    }

    /// Run one blocking call on a session (opened when none is idle). A session that failed
    /// at the socket level is dropped; one that got a refusal (an answer) is kept.
    async fn call<R, F>(&self, op: &'static str, f: F) -> Result<R, BrokerError>
    where
        F: FnOnce(&mut Client, &str) -> Result<R, ClientError> + Send + 'static,
        R: Send + 'static,
    {
        let _permit =
            self.permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| BrokerError::Task {
                    op,
                    why: "the session pool is closed".into(),
                })?;
        let idle = lock(&self.idle).pop();
        let shared = match idle {
            Some(_) => None,
            None => Some(self.shared.try_clone().map_err(|e| BrokerError::Task {
                op,
                why: format!("dup of the broker socket: {e}"),
            })?),
        };
        let channel = self.channel.clone();
        let (client, res) = tokio::task::spawn_blocking(move || {
            let mut client = match (idle, shared) {
                (Some(c), _) => c,
                (None, Some(fd)) => match Client::open_session(fd.as_fd()) {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
                (None, None) => return (None, Err(ClientError::Closed)),
            };
            let r = f(&mut client, &channel);
            (Some(client), r)
        })
        .await
        .map_err(|e| BrokerError::Task {
            op,
            why: e.to_string(),
        })?;
        let healthy = match &res {
            Ok(_) => true,
            Err(e) => e.code().is_some(),
        };
        if let (Some(c), true) = (client, healthy) {
            lock(&self.idle).push(c);
        }
        res.map_err(|e| BrokerError::from_client(op, e))
    }
}

impl BrokerApi for Broker {
    async fn deliver(&self, msg: &Inbound) -> Result<DeliverReply, BrokerError> {
        let msg = msg.clone();
        self.call("deliver", move |c, channel| {
            c.deliver_message(&DeliverArgs {
                channel: channel.to_string(),
                sender: msg.sender,
                body: msg.text,
                id: Some(msg.id),
                conversation: Some(msg.conversation),
                reply_to: Some(msg.reply_to),
            })
        })
        .await
    }

    async fn outbox(&self, wait_ms: u64) -> Result<Vec<OutboundMessage>, BrokerError> {
        self.call("outbox", move |c, channel| c.outbox(channel, wait_ms))
            .await
    }

    async fn outbox_ack(&self, id: &str, outcome: SendOutcome) -> Result<AckReply, BrokerError> {
        let id = id.to_string();
        self.call("outbox_ack", move |c, channel| {
            c.outbox_ack(channel, &id, outcome)
        })
        .await
    }

    async fn channel_state(
        &self,
        connected: bool,
        error: Option<String>,
    ) -> Result<(), BrokerError> {
        self.call("channel_state", move |c, channel| {
            c.channel_state(channel, connected, error.as_deref())
        })
        .await
    }

    async fn secret(&self, name: &str) -> Result<Secret, BrokerError> {
        let n = name.to_string();
        let (fd, len) = self.call("secret", move |c, _| c.secret(&n)).await?;
        read_memfd(&fd, len)
            .map(Secret::new)
            .map_err(|source| BrokerError::SecretRead {
                name: name.to_string(),
                source,
            })
    }

    async fn connect(&self, host: String, port: u16) -> Result<OwnedFd, BrokerError> {
        self.call("connect", move |c, _| {
            c.connect(&host, port).map(|(fd, _)| fd)
        })
        .await
    }
}

/// Read `len` bytes of a sealed memfd from offset 0 (pread: its file offset is shared).
fn read_memfd(fd: &OwnedFd, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= 1 << 20)
        .ok_or_else(|| std::io::Error::other("the secret is over 1 MiB"))?;
    let file = std::fs::File::from(fd.try_clone()?);
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

#[cfg(test)]
pub mod fake {
    //! A broker in memory for the adapters' tests: records what is delivered, acknowledged
    //! and reported; `connect` connects for real (tests point services at loopback).

    use std::collections::{HashSet, VecDeque};
    use std::sync::Mutex;

    use carapace_broker::protocol::{AckStatus, DeliverStatus, ErrorBody};

    use super::*;

    #[derive(Debug, Default)]
    pub struct FakeState {
        pub delivered: Vec<Inbound>,
        /// Every deliver call, answered or not.
        pub attempts: usize,
        pub ids: HashSet<String>,
        /// Answers to the next deliver calls (then: queued, or duplicate for a known id).
        pub deliver_script: VecDeque<Result<DeliverStatus, ErrorCode>>,
        pub outbox: VecDeque<OutboundMessage>,
        pub acks: Vec<(String, SendOutcome)>,
        pub states: Vec<(bool, Option<String>)>,
        pub secrets: Vec<(String, Vec<u8>)>,
        pub connects: Vec<(String, u16)>,
    }

    #[derive(Debug, Default)]
    pub struct FakeBroker {
        pub state: Mutex<FakeState>,
    }

    impl FakeBroker {
        pub fn with_secret(name: &str, value: &[u8]) -> FakeBroker {
            let b = FakeBroker::default();
            b.st().secrets.push((name.into(), value.to_vec()));
            b
        }

        pub fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
            lock(&self.state)
        }
    }

    fn refused(op: &'static str, code: ErrorCode) -> BrokerError {
        BrokerError::from_client(
            op,
            ClientError::Refused(ErrorBody {
                code,
                message: format!("fake {}", code.as_str()),
            }),
        )
    }

    impl BrokerApi for FakeBroker {
        async fn deliver(&self, msg: &Inbound) -> Result<DeliverReply, BrokerError> {
            let mut st = self.st();
            st.attempts += 1;
            let scripted = st.deliver_script.pop_front();
            let status = match scripted {
                Some(Err(code)) => return Err(refused("deliver", code)),
                Some(Ok(s)) => s,
                None if st.ids.contains(&msg.id) => DeliverStatus::Duplicate,
                None => DeliverStatus::Queued,
            };
            if status != DeliverStatus::Duplicate {
                st.ids.insert(msg.id.clone());
                st.delivered.push(msg.clone());
            }
            let seq = st.delivered.len() as u64;
            Ok(DeliverReply {
                seq: if status == DeliverStatus::Queued {
                    seq
                } else {
                    0
                },
                status,
                held: (status == DeliverStatus::Held).then(|| format!("h{seq}")),
            })
        }

        async fn outbox(&self, wait_ms: u64) -> Result<Vec<OutboundMessage>, BrokerError> {
            let taken: Vec<_> = self.st().outbox.drain(..).collect();
            if taken.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(wait_ms.min(50))).await;
            }
            Ok(taken)
        }

        async fn outbox_ack(
            &self,
            id: &str,
            outcome: SendOutcome,
        ) -> Result<AckReply, BrokerError> {
            let status = match &outcome {
                SendOutcome::Sent { .. } => AckStatus::Done,
                SendOutcome::Failed { retry: true, .. } => AckStatus::Retrying,
                SendOutcome::Failed { retry: false, .. } => AckStatus::DeadLettered,
            };
            self.st().acks.push((id.to_string(), outcome));
            Ok(AckReply {
                status,
                dlq_id: None,
                retry_in_ms: None,
            })
        }

        async fn channel_state(
            &self,
            connected: bool,
            error: Option<String>,
        ) -> Result<(), BrokerError> {
            self.st().states.push((connected, error));
            Ok(())
        }

        async fn secret(&self, name: &str) -> Result<Secret, BrokerError> {
            self.st()
                .secrets
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| Secret::new(v.clone()))
                .ok_or_else(|| refused("secret", ErrorCode::NotFound))
        }

        async fn connect(&self, host: String, port: u16) -> Result<OwnedFd, BrokerError> {
            self.st().connects.push((host.clone(), port));
            let s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|_| refused("connect", ErrorCode::Unavailable))?;
            let s = s
                .into_std()
                .map_err(|_| refused("connect", ErrorCode::Internal))?;
            s.set_nonblocking(false)
                .map_err(|_| refused("connect", ErrorCode::Internal))?;
            Ok(OwnedFd::from(s))
        }
    }
}
