//! Reaching a service: a broker `connect` (the policy's egress allowlist decides, and the broker
//! connects to the address it checked), then TLS inside the adapter — rustls, the Mozilla roots
//! of `webpki-roots`, the service's real host name verified. Plain TCP only to loopback hosts
//! (a local test server or bridge): `http://` anywhere else is refused when the URL is parsed.

use std::net::{IpAddr, TcpStream as StdTcpStream};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use carapace_gateway::llm::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::broker::{BrokerApi, BrokerError};

/// Why a service cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("connecting to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: BrokerError,
    },
    #[error("the socket for {host}:{port}: {source}")]
    Socket {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: not a TLS server name")]
    TlsName { host: String },
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
}

/// A service's base URL: `https://host[:port][/path]`, or `http://` to a loopback host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    ep: Endpoint,
}

impl ServiceUrl {
    /// Parse and check a URL (no credentials, query or fragment).
    pub fn parse(url: &str) -> Result<ServiceUrl, NetError> {
        let shown = crate::settings::shown(url);
        let ep = Endpoint::parse(url).map_err(|why| NetError::BadUrl {
            url: shown.clone(),
            why,
        })?;
        if !ep.https && !is_loopback(&ep.host) {
            return Err(NetError::BadUrl {
                url: shown,
                why: "plain http:// only to a loopback host; use https://".into(),
            });
        }
        Ok(ServiceUrl { ep })
    }

    pub fn https(&self) -> bool {
        self.ep.https
    }

    /// DNS name or IP literal (without brackets), lowercased.
    pub fn host(&self) -> &str {
        &self.ep.host
    }

    pub fn port(&self) -> u16 {
        self.ep.port
    }

    /// The path, without a trailing `/` (may be empty).
    pub fn path(&self) -> &str {
        &self.ep.prefix
    }

    /// The `Host` header's value.
    pub fn host_header(&self) -> String {
        let h = if self.ep.host.contains(':') {
            format!("[{}]", self.ep.host)
        } else {
            self.ep.host.clone()
        };
        let default = if self.ep.https { 443 } else { 80 };
        if self.ep.port == default {
            h
        } else {
            format!("{h}:{}", self.ep.port)
        }
    }
}

/// `localhost` or a loopback address.
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The client TLS configuration: the Mozilla roots (`webpki-roots`), built once (the gateway's,
/// shared).
pub fn tls_config() -> Result<Arc<rustls::ClientConfig>, NetError> {
    carapace_gateway::llm::mozilla_tls_config().map_err(NetError::TlsConfig)
}

/// A connection to a service: TLS, or plain to a loopback host.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connect to `url`'s host and port through the broker, with TLS for `https`.
pub async fn open<B: BrokerApi>(broker: &B, url: &ServiceUrl) -> Result<Conn, NetError> {
    let stream = connect_tcp(broker, url.host(), url.port()).await?;
    if !url.https() {
        return Ok(Conn::Plain(stream));
    }
    Ok(Conn::Tls(Box::new(start_tls(stream, url.host()).await?)))
}

/// A TCP connection to `host:port` through the broker (the policy's egress allowlist decides).
pub async fn connect_tcp<B: BrokerApi>(
    broker: &B,
    host: &str,
    port: u16,
) -> Result<TcpStream, NetError> {
    let fd: OwnedFd = broker
        .connect(host.to_string(), port)
        .await
        .map_err(|source| NetError::Connect {
            host: host.to_string(),
            port,
            source,
        })?;
    let socket_err = |source| NetError::Socket {
        host: host.to_string(),
        port,
        source,
    };
    let std_stream = StdTcpStream::from(fd);
    std_stream.set_nonblocking(true).map_err(socket_err)?;
    let stream = TcpStream::from_std(std_stream).map_err(socket_err)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// TLS over `stream` (from the first byte, or after a STARTTLS), `host`'s certificate verified
/// against the Mozilla roots.
pub async fn start_tls<S>(
    stream: S,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<S>, NetError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    start_tls_with(stream, host, tls_config()?).await
}

/// [`start_tls`] with the roots of `config` (the e-mail adapter's tests trust a certificate of
/// their own).
pub async fn start_tls_with<S>(
    stream: S,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<S>, NetError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| {
        NetError::TlsName {
            host: host.to_string(),
        }
    })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|source| NetError::Tls {
            host: host.to_string(),
            source,
        })
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ServiceUrl::parse("https://api.telegram.org").unwrap_or_else(|e| panic!("{e}"));
        assert!(u.https());
        assert_eq!(
            (u.host(), u.port(), u.path()),
            ("api.telegram.org", 443, "")
        );
        assert_eq!(u.host_header(), "api.telegram.org");
        let u = ServiceUrl::parse("http://127.0.0.1:8081/x/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.port(), u.path()), (8081, "/x"));
        assert_eq!(u.host_header(), "127.0.0.1:8081");
        let u = ServiceUrl::parse("http://[::1]:9/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.host_header(), "[::1]:9");
        assert!(ServiceUrl::parse("http://localhost/").is_ok());
        for bad in [
            "http://example.com/",
            "http://10.0.0.1/",
            "ftp://x",
            "https://u:p@h/",
            "https://h/?token=1",
        ] {
            assert!(ServiceUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
