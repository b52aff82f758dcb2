//! The operator's web console: one page, its script and its style sheet, embedded in the
//! binary and served at `GET /console` on the gateway's listener.
//!
//! The console holds no authority of its own: the operator pastes a token, the page keeps it in
//! the tab's `sessionStorage`, checks it with `gateway.status` over `POST /rpc` (bearer header)
//! and then talks to `/ws` like any other client, carrying the token in the
//! `Sec-WebSocket-Protocol` offer (browsers cannot set headers on a WebSocket; a token in the
//! URL would land in logs). Every method it calls is scope-checked as for any client.
//!
//! Every response under `/console` carries [`SECURITY_HEADERS`]: a Content-Security-Policy
//! that allows only the embedded script and style (no inline script, nothing from elsewhere,
//! no framing), `nosniff`, no referrer and no caching. The script writes data into the page
//! with `textContent` only.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The Content-Security-Policy of every console response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The headers of every console response.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// What the console is made of (served as `/console/NAME`; the page also as `/console`).
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("console/index.html"),
    },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("console/console.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("console/console.css"),
    },
];

/// The asset called `name`.
pub fn asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The console's routes, merged into the gateway's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/{name}", get(file))
}

async fn page() -> Response {
    serve(asset("index.html"))
}

async fn file(Path(name): Path<String>) -> Response {
    serve(asset(&name))
}

/// `asset` with the console's headers; 404 (with the same headers) when there is none.
fn serve(asset: Option<&'static Asset>) -> Response {
    let mut r = match asset {
        Some(a) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(a.content_type),
            )],
            a.body,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            "no such console file\n",
        )
            .into_response(),
    };
    let h = r.headers_mut();
    for (k, v) in SECURITY_HEADERS {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    async fn get_path(path: &str) -> Response {
        let req = Request::get(path)
            .body(Body::empty())
            .unwrap_or_else(|e| panic!("{e}"));
        routes::<()>()
            .oneshot(req)
            .await
            .unwrap_or_else(|e| match e {})
    }

    fn assert_headers(r: &Response) {
        for (k, v) in SECURITY_HEADERS {
            assert_eq!(
                r.headers().get(*k).and_then(|v| v.to_str().ok()),
                Some(*v),
                "{k}"
            );
        }
    }

    #[tokio::test]
    async fn every_console_response_has_the_security_headers() {
        for (path, status, ty) in [
            ("/console", 200, "text/html; charset=utf-8"),
            ("/console/", 200, "text/html; charset=utf-8"),
            ("/console/console.js", 200, "text/javascript; charset=utf-8"),
            ("/console/console.css", 200, "text/css; charset=utf-8"),
            ("/console/nothing.js", 404, "text/plain; charset=utf-8"),
            ("/console/..%2Fserver.rs", 404, "text/plain; charset=utf-8"),
        ] {
            let r = get_path(path).await;
            assert_eq!(r.status().as_u16(), status, "{path}");
            assert_eq!(
                r.headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok()),
                Some(ty),
                "{path}"
            );
            assert_headers(&r);
        }
    }

    #[test]
    fn the_policy_forbids_inline_script_framing_and_other_origins() {
        assert!(CSP.contains("script-src 'self';"));
        assert!(!CSP.contains("unsafe-inline") && !CSP.contains("unsafe-eval"));
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert!(CSP.starts_with("default-src 'none';"));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_the_script_no_inner_html() {
        let page = asset("index.html").map(|a| a.body).unwrap_or_default();
        assert!(page.contains(r#"<script src="/console/console.js""#));
        assert!(page.contains(r#"href="/console/console.css""#));
        // Every <script> has a src, there is no <style>, no style= or on*= attribute.
        assert_eq!(
            page.matches("<script").count(),
            page.matches("<script src=").count()
        );
        assert!(!page.contains("<style") && !page.contains(" style="));
        assert!(!page.contains(" onclick=") && !page.contains(" onload="));
        assert!(!page.contains("http://") && !page.contains("https://"));
        let js = asset("console.js").map(|a| a.body).unwrap_or_default();
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!js.contains(banned), "console.js uses {banned}");
        }
        assert!(!js.contains("?access_token"), "never a token in a URL");
    }
}
