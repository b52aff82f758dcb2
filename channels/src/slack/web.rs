//! One Web API exchange: a JSON POST with a bearer token, and the answer's status, body and
//! `Retry-After` (which [`crate::http::exchange`] does not keep). One request per connection
//! ([`crate::net::open`]), one deadline for all of it, a cap on the body. Errors never carry
//! the token (it is only in a header, which no error shows).

use std::time::Duration;

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::broker::BrokerApi;
use crate::http::HttpError;
use crate::net::ServiceUrl;

/// A Web API answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After` in seconds, when given as a number.
    pub retry_after: Option<u64>,
    pub body: Bytes,
}

/// POST `body` (JSON) to `path` on `url`'s host with `Authorization: <authorization>`.
pub async fn post_json<B: BrokerApi>(
    broker: &B,
    url: &ServiceUrl,
    path: String,
    authorization: String,
    body: Vec<u8>,
    timeout: Duration,
    cap: usize,
) -> Result<Answer, HttpError> {
    tokio::time::timeout(
        timeout,
        post_inner(broker, url, path, authorization, body, cap),
    )
    .await
    .unwrap_or(Err(HttpError::Timeout(timeout)))
}

async fn post_inner<B: BrokerApi>(
    broker: &B,
    url: &ServiceUrl,
    path: String,
    authorization: String,
    body: Vec<u8>,
    cap: usize,
) -> Result<Answer, HttpError> {
    let request = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(path)
        .header("host", url.host_header())
        .header(
            "user-agent",
            concat!("carapace-channel/", env!("CARGO_PKG_VERSION")),
        )
        .header("connection", "close")
        .header("content-type", "application/json; charset=utf-8")
        .header("authorization", authorization)
        .body(Full::new(Bytes::from(body)))
        .map_err(HttpError::Build)?;
    let conn = crate::net::open(broker, url).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(HttpError::Http)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "slack connection ended");
        }
    });
    let result = async {
        let resp = sender
            .send_request(request)
            .await
            .map_err(HttpError::Http)?;
        let status = resp.status().as_u16();
        let header = |name: hyper::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let retry_after = header(hyper::header::RETRY_AFTER);
        if header(hyper::header::CONTENT_LENGTH).is_some_and(|n| n > cap as u64) {
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
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
    .await;
    driver.abort();
    result
}
