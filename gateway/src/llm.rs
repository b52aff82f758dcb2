//! An OpenAI-compatible chat-completions client (hosted APIs, llama.cpp's server, Ollama, vLLM).
//!
//! The gateway has no network of its own: every call asks the broker for a connection to the
//! endpoint's host and port (the policy's egress allowlist decides, and the broker connects to
//! the address it checked), then speaks HTTP/1.1 over it — through TLS (rustls, the Mozilla
//! roots of `webpki-roots`, the endpoint's host name verified) for `https` endpoints. The API
//! key comes from a broker secret and goes only into the `Authorization` header.

use std::net::TcpStream as StdTcpStream;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::broker::Broker;
use crate::rpc::{Kind, RpcError};
use crate::sessions::Usage;

/// Largest response body read from the endpoint.
const MAX_RESPONSE: usize = 8 << 20;

/// Where the model is: `http(s)://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// DNS name or IP literal (without brackets).
    pub host: String,
    pub port: u16,
    /// Path before `/chat/completions`, without a trailing `/` (may be empty).
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "{url:?}: expected http://HOST[:PORT][/PATH] or https://..."
            ));
        };
        if url.contains(['?', '#', ' ', '\\']) || url.chars().any(char::is_control) {
            return Err(format!(
                "{url:?}: no query, fragment, spaces or control characters"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "{url:?}: credentials in the URL are not accepted (use api_key_secret)"
            ));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{url:?}: unexpected text after the host")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(format!("{url:?}: no host or port 0"));
        }
        Ok(Endpoint {
            https,
            host: host.to_ascii_lowercase(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// One answer of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatReply {
    /// `choices[0].message` as sent (role, content, tool_calls).
    pub message: Value,
    pub usage: Usage,
}

fn fail(msg: impl Into<String>) -> RpcError {
    RpcError::new(Kind::Unavailable, msg)
}

/// The client TLS configuration shared by everything a confined child reaches over TLS (the
/// model here, a channel's service in `carapace-channels`): the Mozilla roots
/// (`webpki-roots`), ring, safe default versions; built once.
pub fn mozilla_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| e.to_string())
        })
        .clone()
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, RpcError> {
    mozilla_tls_config().map_err(|e| RpcError::internal(format!("TLS configuration: {e}")))
}

/// POST `body` to `<endpoint>/chat/completions` and read the first choice.
pub async fn chat(
    broker: &Broker,
    ep: &Endpoint,
    api_key: Option<&str>,
    body: &Value,
    timeout: Duration,
) -> Result<ChatReply, RpcError> {
    match tokio::time::timeout(timeout, chat_inner(broker, ep, api_key, body)).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!(
            "the model did not answer within {} s",
            timeout.as_secs()
        ))),
    }
}

async fn chat_inner(
    broker: &Broker,
    ep: &Endpoint,
    api_key: Option<&str>,
    body: &Value,
) -> Result<ChatReply, RpcError> {
    let fd: OwnedFd = broker
        .connect(ep.host.clone(), ep.port)
        .await
        .map_err(|e| {
            let kind = e.kind;
            RpcError::new(
                kind,
                format!(
                    "connecting to the model at {}:{}: {}",
                    ep.host, ep.port, e.message
                ),
            )
        })?;
    let std_stream = StdTcpStream::from(fd);
    std_stream
        .set_nonblocking(true)
        .map_err(|e| RpcError::internal(format!("socket: {e}")))?;
    let stream = tokio::net::TcpStream::from_std(std_stream)
        .map_err(|e| RpcError::internal(format!("socket: {e}")))?;
    let payload = Bytes::from(body.to_string());
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri(format!("{}/chat/completions", ep.prefix))
        .header("host", ep.host_header())
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header(
            "user-agent",
            concat!("carapace-gateway/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(key) = api_key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(payload))
        .map_err(|e| RpcError::internal(format!("building the request: {e}")))?;
    let resp = if ep.https {
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
            .map_err(|e| fail(format!("{}: not a TLS server name: {e}", ep.host)))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, stream)
            .await
            .map_err(|e| fail(format!("TLS with {}: {e}", ep.host)))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(stream), req).await?
    };
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| fail(format!("reading the model's answer: {e}")))?
        .to_bytes();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes);
        return Err(fail(format!(
            "the model endpoint answered {status}: {}",
            crate::rpc::shown(text.trim())
        )));
    }
    parse_reply(&bytes)
}

async fn send<T>(
    io: TokioIo<T>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, RpcError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| fail(format!("HTTP with the model: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "model connection ended");
        }
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| fail(format!("HTTP with the model: {e}")))
}

/// The first choice's message and the usage of a chat-completions answer.
pub fn parse_reply(bytes: &[u8]) -> Result<ChatReply, RpcError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| fail(format!("the model's answer is not JSON: {e}")))?;
    let message = v
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("message"))
        .filter(|m| m.is_object())
        .cloned()
        .ok_or_else(|| fail("the model's answer has no choices[0].message"))?;
    let usage = v
        .get("usage")
        .and_then(|u| serde_json::from_value::<UsageWire>(u.clone()).ok())
        .map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u
                .total_tokens
                .unwrap_or(u.prompt_tokens.saturating_add(u.completion_tokens)),
        })
        .unwrap_or_default();
    Ok(ChatReply { message, usage })
}

#[derive(Debug, serde::Deserialize)]
struct UsageWire {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("https://api.openai.com/v1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            e,
            Endpoint {
                https: true,
                host: "api.openai.com".into(),
                port: 443,
                prefix: "/v1".into()
            }
        );
        assert_eq!(e.host_header(), "api.openai.com");
        let e = Endpoint::parse("http://127.0.0.1:8080/v1/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((e.port, e.prefix.as_str()), (8080, "/v1"));
        assert_eq!(e.host_header(), "127.0.0.1:8080");
        let e = Endpoint::parse("http://[::1]:11434").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (e.host.as_str(), e.port, e.prefix.as_str()),
            ("::1", 11434, "")
        );
        assert_eq!(e.host_header(), "[::1]:11434");
        for bad in [
            "ftp://x",
            "api.openai.com",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:99999",
            "http://u:p@h/",
            "http://h/?q=1",
            "http://h/#f",
            "http://[::1/",
            "http://h x/",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies() {
        let r = parse_reply(
            br#"{"choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.message["content"], "hi");
        assert_eq!(r.usage.total_tokens, 5);
        let r = parse_reply(br#"{"choices":[{"message":{"role":"assistant","content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.usage.total_tokens, 5);
        let r = parse_reply(br#"{"choices":[{"message":{"content":"x"}}]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.usage, Usage::default());
        for bad in [
            &b"nope"[..],
            b"{}",
            br#"{"choices":[]}"#,
            br#"{"choices":[{"message":"x"}]}"#,
        ] {
            assert_eq!(
                parse_reply(bad).map_err(|e| e.kind).err(),
                Some(Kind::Unavailable)
            );
        }
    }
}
