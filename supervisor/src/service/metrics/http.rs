//! The HTTP listener for Prometheus (`[metrics] listen`): `GET /metrics` answers the
//! exposition, anything else 404. HTTP/1 only, one request per connection, and bounded so that
//! a slow or hostile client cannot hold it: the request head must arrive within
//! [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`] bytes, a whole connection lasts at most
//! [`CONNECTION_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once (more are closed
//! at once). The request body is never read.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

/// The request head (request line and headers) must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head read (hyper's smallest buffer limit).
pub const MAX_HEAD: usize = 8192;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Produces the exposition for a scrape; runs on a blocking thread. `Err` is answered 503.
pub type Scrape = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Why the listener could not be served.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("metrics listener: {op}: {source}")]
    Listener {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Serve `listener` on the current tokio runtime until the returned task is aborted.
pub fn serve(
    listener: TcpListener,
    scrape: Scrape,
) -> Result<tokio::task::JoinHandle<()>, HttpError> {
    listener
        .set_nonblocking(true)
        .map_err(|source| HttpError::Listener {
            op: "set_nonblocking",
            source,
        })?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| HttpError::Listener {
            op: "register with the runtime",
            source,
        })?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("metrics listener: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next() => continue,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics listener: too many connections; closed");
                continue;
            };
            let scrape = scrape.clone();
            // Dropped with this task: aborting it ends every connection.
            connections.spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| answer(req, scrape.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, "metrics connection: {e}"),
                    Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                }
            });
        }
    }))
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn answer(
    req: Request<Incoming>,
    scrape: Scrape,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found; try GET /metrics\n",
        ));
    }
    let text = tokio::task::spawn_blocking(move || scrape()).await;
    Ok(match text {
        Ok(Ok(text)) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(super::CONTENT_TYPE));
            r
        }
        Ok(Err(e)) => {
            tracing::warn!("metrics scrape: {e}");
            plain(StatusCode::SERVICE_UNAVAILABLE, "metrics unavailable\n")
        }
        Err(e) => {
            tracing::warn!("metrics scrape failed: {e}");
            plain(StatusCode::SERVICE_UNAVAILABLE, "metrics unavailable\n")
        }
    })
}
