//! One Web API exchange: a JSON POST with a bearer token through [`crate::http::exchange`], and
//! the answer's status, body and `Retry-After`. Errors never carry the token (it is only in a
//! header, which no error shows).

use std::time::Duration;

use hyper::body::Bytes;

use crate::broker::BrokerApi;
use crate::http::{HttpError, Request};
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
    let mut req = Request::post_json(path, body);
    req.headers = vec![
        ("content-type", "application/json; charset=utf-8".into()),
        ("authorization", authorization),
    ];
    let resp = crate::http::exchange(broker, url, req, timeout, cap).await?;
    let retry_after = resp
        .headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    Ok(Answer {
        status: resp.status,
        retry_after,
        body: resp.body,
    })
}
