//! A small HTTP/1.1 client: one request per connection ([`crate::net::open`]), hyper's client
//! over it, one deadline for everything (connect, TLS, request, the whole answer) and a cap on
//! the answer's body. Errors never carry the request's path (a Telegram path holds the token).

use std::time::Duration;

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::broker::BrokerApi;
use crate::net::{NetError, ServiceUrl};

/// A failed exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("no complete answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("building the request: {0}")]
    Build(#[source] hyper::http::Error),
    #[error("the answer's body is over {0} bytes")]
    TooLarge(usize),
    #[error("reading the answer's body: {0}")]
    Body(String),
}

/// An answer: its status, headers and whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The answer's headers (a service's rate-limit headers, for one).
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// One request. Its `Debug` leaves the path out (a Telegram path holds the bot token).
#[derive(Clone)]
pub struct Request {
    pub method: hyper::Method,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Extra headers (`host`, `user-agent`, `content-length` and `connection` are set).
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &format_args!("<{} bytes>", self.path.len()))
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

impl Request {
    /// A POST of a JSON body.
    pub fn post_json(path: String, body: Vec<u8>) -> Request {
        Request {
            method: hyper::Method::POST,
            path,
            headers: vec![("content-type", "application/json".into())],
            body,
        }
    }
}

/// Send `req` to `url`'s host and read the answer, all within `timeout`, the body at most
/// `cap` bytes.
pub async fn exchange<B: BrokerApi>(
    broker: &B,
    url: &ServiceUrl,
    req: Request,
    timeout: Duration,
    cap: usize,
) -> Result<Response, HttpError> {
    tokio::time::timeout(timeout, exchange_inner(broker, url, req, cap))
        .await
        .unwrap_or(Err(HttpError::Timeout(timeout)))
}

async fn exchange_inner<B: BrokerApi>(
    broker: &B,
    url: &ServiceUrl,
    req: Request,
    cap: usize,
) -> Result<Response, HttpError> {
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(req.path)
        .header("host", url.host_header())
        .header(
            "user-agent",
            concat!("carapace-channel/", env!("CARGO_PKG_VERSION")),
        )
        .header("connection", "close");
    for (k, v) in req.headers {
        builder = builder.header(k, v);
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body)))
        .map_err(HttpError::Build)?;
    let conn = crate::net::open(broker, url).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(HttpError::Http)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "service connection ended");
        }
    });
    let result = async {
        let resp = sender
            .send_request(request)
            .await
            .map_err(HttpError::Http)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > cap as u64) {
            return Err(HttpError::TooLarge(cap));
        }
        let body = Limited::new(resp.into_body(), cap)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    HttpError::TooLarge(cap)
                } else {
                    HttpError::Body(e.to_string())
                }
            })?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_path_header_value_or_body() {
        let mut r = Request::post_json("/bot1:secret-token/getMe".into(), b"{\"k\":1}".to_vec());
        r.headers
            .push(("x-carapace-signature", "sha256=abc".into()));
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("abc") && !shown.contains("\"k\""),
            "{shown}"
        );
        assert!(
            shown.contains("POST") && shown.contains("x-carapace-signature"),
            "{shown}"
        );
    }
}
