//! `connect`: egress by allowlist. The broker resolves the name itself, drops every address the
//! rule does not allow (non-public ones unless `allow_private`), and connects to one of the
//! *checked* addresses: no second resolution, so DNS rebinding cannot swap the address between
//! the check and the connection.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::time::Duration;

use carapace_policy::broker::{is_non_public, ConnectRule};

use crate::protocol::{ErrorCode, OkReply};
use crate::server::{Identity, Response};

use super::{rule_ref, shown, Audited, Ops};

/// Why a name gave no usable address.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {host} took longer than {timeout:?}")]
    ResolveTimeout { host: String, timeout: Duration },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("{host} resolves only to addresses this rule refuses ({refused})")]
    OnlyRefused { host: String, refused: String },
}

/// An IP literal as a child may write it (`1.2.3.4`, `::1`, `[::1]`).
pub(crate) fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// True when `rule` does not let the broker connect to `ip`.
pub fn is_refused_address(rule: &ConnectRule, ip: IpAddr) -> bool {
    !rule.allow_private && is_non_public(ip)
}

/// Resolve `host` (getaddrinfo on a blocking thread, bounded by `timeout`; IP literals are not
/// resolved) and keep the addresses `rule` allows, in resolver order. Errors when nothing is
/// left.
pub async fn resolve_checked(
    rule: &ConnectRule,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let all: Vec<SocketAddr> = match ip_literal(host) {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => {
            let name = host.to_string();
            let task = tokio::task::spawn_blocking(move || {
                (name.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>())
            });
            match tokio::time::timeout(timeout, task).await {
                Err(_) => {
                    return Err(ConnectError::ResolveTimeout {
                        host: host.to_string(),
                        timeout,
                    })
                }
                Ok(Err(join)) => {
                    return Err(ConnectError::Resolve {
                        host: host.to_string(),
                        source: std::io::Error::other(join.to_string()),
                    })
                }
                Ok(Ok(Err(e))) => {
                    return Err(ConnectError::Resolve {
                        host: host.to_string(),
                        source: e,
                    })
                }
                Ok(Ok(Ok(a))) => a,
            }
        }
    };
    if all.is_empty() {
        return Err(ConnectError::NoAddress {
            host: host.to_string(),
        });
    }
    let (ok, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = all
        .into_iter()
        .partition(|a| !is_refused_address(rule, a.ip()));
    if ok.is_empty() {
        let refused: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
        return Err(ConnectError::OnlyRefused {
            host: host.to_string(),
            refused: refused.join(", "),
        });
    }
    Ok(ok)
}

/// Connect to the first of `addrs` that answers within `timeout` each; the socket is returned
/// in blocking mode (the child shares the file description).
async fn connect_first(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(SocketAddr, OwnedFd), String> {
    let mut errors = Vec::new();
    for a in addrs {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(*a)).await {
            Ok(Ok(s)) => {
                let std = s.into_std().map_err(|e| format!("{a}: into_std: {e}"))?;
                std.set_nonblocking(false)
                    .map_err(|e| format!("{a}: fcntl(O_NONBLOCK): {e}"))?;
                return Ok((*a, OwnedFd::from(std)));
            }
            Ok(Err(e)) => errors.push(format!("{a}: {e}")),
            Err(_) => errors.push(format!("{a}: timed out after {timeout:?}")),
        }
    }
    Err(errors.join("; "))
}

impl Ops {
    /// The `connect` operation.
    pub async fn connect(&self, who: &Identity, host: &str, port: u16) -> Response {
        let target = format!("{}:{port}", shown(host));
        let rules = match self.rules_for(who, "connect", &target).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let Some(rule) = rules.connect_allowed(host, port).cloned() else {
            return self
                .refuse(
                    who,
                    Audited::of("connect", target.clone())
                        .deny("refused", "no connect rule matches"),
                    ErrorCode::Denied,
                    format!(
                        "connect to {target}: no rule of profile `{}` allows it",
                        who.profile
                    ),
                )
                .await;
        };
        let rref = rule_ref(rule.line, &rule.why);
        let addrs = match resolve_checked(&rule, host, port, self.cfg.resolve_timeout).await {
            Ok(a) => a,
            Err(e @ ConnectError::OnlyRefused { .. }) => {
                return self
                    .refuse(
                        who,
                        Audited::of("connect", target.clone())
                            .by(rref)
                            .deny("refused", e.to_string()),
                        ErrorCode::Denied,
                        format!("connect to {target}: {e}"),
                    )
                    .await;
            }
            Err(e) => {
                return self
                    .refuse(
                        who,
                        Audited::of("connect", target.clone())
                            .by(rref)
                            .error("not resolved", e.to_string()),
                        ErrorCode::Unavailable,
                        format!("connect to {target}: {e}"),
                    )
                    .await;
            }
        };
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        if let Err(resp) = self
            .allow(
                who,
                Audited::of("connect", target.clone()).by(rref).allow(
                    "connecting",
                    format!("checked addresses: {}", list.join(", ")),
                ),
            )
            .await
        {
            return resp;
        }
        match connect_first(&addrs, self.cfg.connect_timeout).await {
            Ok((peer, fd)) => Response::ok(OkReply::Connect {
                peer: peer.to_string(),
            })
            .with_fds(vec![fd]),
            Err(e) => Response::err(
                ErrorCode::Unavailable,
                format!("connect to {target} failed: {e}"),
            ),
        }
    }
}
