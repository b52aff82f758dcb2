//! The little HTTP/1.1 the stand-in gateway speaks: one request per connection (the response
//! closes it), `Content-Length` bodies only, hard caps on the head and the body.

use std::io::{self, Read, Write};

/// Longest request head (request line + headers + blank line).
pub const MAX_HEAD: usize = 8 * 1024;
/// Longest request body.
pub const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read; each maps to a status code.
#[derive(Debug)]
pub enum HttpError {
    /// The peer closed the connection before sending anything (no response is due).
    Empty,
    /// 400, with the reason.
    Bad(String),
    /// 413: head or body over its cap.
    TooLarge(&'static str),
    /// 408: the peer was too slow.
    Timeout,
    /// Any other read error (no response can be sent).
    Io(io::Error),
}

impl HttpError {
    /// Status code and message of the error response, if one is due.
    pub fn response(&self) -> Option<(u16, String)> {
        match self {
            HttpError::Empty | HttpError::Io(_) => None,
            HttpError::Bad(why) => Some((400, why.clone())),
            HttpError::TooLarge(what) => Some((413, format!("the request {what} is too large"))),
            HttpError::Timeout => Some((408, "timed out reading the request".into())),
        }
    }
}

fn read_err(e: io::Error) -> HttpError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout,
        _ => HttpError::Io(e),
    }
}

/// Position of the end of the head (`\r\n\r\n` or `\n\n`), i.e. where the body starts,
/// looking from `from` on.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    for i in from..buf.len() {
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some(i + 4);
        }
        if buf[i..].starts_with(b"\n\n") {
            return Some(i + 2);
        }
    }
    None
}

/// Read one request from `r`: the head up to [`MAX_HEAD`], then exactly `Content-Length`
/// bytes of body, at most [`MAX_BODY`].
pub fn read_request(r: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut scanned = 0;
    let body_start = loop {
        if let Some(end) = head_end(&buf, scanned) {
            break end;
        }
        // The terminator may straddle reads: look again at the last 3 bytes.
        scanned = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD {
            return Err(HttpError::TooLarge("head"));
        }
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                HttpError::Empty
            } else {
                HttpError::Bad("the connection closed inside the request head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if body_start > MAX_HEAD {
        return Err(HttpError::TooLarge("head"));
    }
    let (method, path, length) = parse_head(&buf[..body_start])?;
    if length > MAX_BODY {
        return Err(HttpError::TooLarge("body"));
    }
    let mut body = buf.split_off(body_start);
    if body.len() > length {
        return Err(HttpError::Bad(
            "more data than Content-Length (one request per connection)".into(),
        ));
    }
    while body.len() < length {
        let want = (length - body.len()).min(chunk.len());
        let n = match r.read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        if n == 0 {
            return Err(HttpError::Bad(format!(
                "the body ended after {} of {length} bytes",
                body.len()
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Request { method, path, body })
}

/// Method, path and body length of a request head.
fn parse_head(head: &[u8]) -> Result<(String, String, usize), HttpError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| HttpError::Bad("the request head is not UTF-8".into()))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Bad(format!(
            "malformed request line {:?}",
            truncate(request_line)
        )));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Bad(format!(
            "malformed method {:?}",
            truncate(method)
        )));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Bad(format!(
            "unsupported protocol {:?}",
            truncate(version)
        )));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Bad(format!(
            "the target {:?} is not a path",
            truncate(target)
        )));
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let mut length: Option<usize> = None;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Bad(format!(
                "malformed header line {:?}",
                truncate(line)
            )));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(HttpError::Bad(format!(
                "malformed header name {:?}",
                truncate(name)
            )));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Bad(format!(
                    "Content-Length {:?} is not a number",
                    truncate(value)
                )));
            }
            // Over the cap (or over usize) is too large, whatever the exact number.
            let n = value.parse::<usize>().unwrap_or(usize::MAX);
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::Bad("conflicting Content-Length headers".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Bad(
                "Transfer-Encoding is not supported; send a Content-Length".into(),
            ));
        }
    }
    Ok((method.to_string(), path.to_string(), length.unwrap_or(0)))
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A response: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
    /// `Allow:` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn json(status: u16, body: serde_json::Value) -> Response {
        Response {
            status,
            body,
            allow: None,
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, serde_json::json!({ "error": message.into() }))
    }
}

/// Reason phrase of the codes this server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Write `resp` (and close: `Connection: close`).
pub fn write_response(w: &mut impl Write, resp: &Response) -> io::Result<()> {
    let body = resp.body.to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        body.len() + 1
    );
    if let Some(a) = resp.allow {
        head.push_str(&format!("Allow: {a}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.write_all(body.as_bytes())?;
    w.write_all(b"\n")?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read(s: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut Cursor::new(s.to_vec()))
    }

    /// A reader that hands out one byte per read (requests split anywhere).
    struct Trickle(Vec<u8>, usize);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.get(self.1), buf.first_mut()) {
                (Some(b), Some(out)) => {
                    *out = *b;
                    self.1 += 1;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn parses_get_and_post() {
        let r = read(b"GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/health"));
        assert!(r.body.is_empty());
        let req = b"POST /exec HTTP/1.1\r\nContent-Type: application/json\r\ncontent-length: 16\r\n\r\n{\"argv\":[\"/x\"]}\n";
        let r = read(&req[..]).unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.body, b"{\"argv\":[\"/x\"]}\n");
        let r = read_request(&mut Trickle(req.to_vec(), 0)).unwrap();
        assert_eq!(r.body.len(), 16);
        // Bare LF line ends and HTTP/1.0 are accepted.
        let r = read(b"GET /status HTTP/1.0\n\n").unwrap();
        assert_eq!(r.path, "/status");
    }

    fn status_of(s: &[u8]) -> Option<u16> {
        match read(s) {
            Ok(r) => panic!("accepted {r:?}"),
            Err(e) => e.response().map(|(c, _)| c),
        }
    }

    #[test]
    fn refuses_bad_requests() {
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET / HTTP/2\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\ntoo long",
            b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a",
        ] {
            assert_eq!(
                status_of(bad),
                Some(400),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(read(b""), Err(HttpError::Empty)));
        assert_eq!(status_of(b""), None);
    }

    #[test]
    fn caps_head_and_body() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status_of(&big), Some(413));
        // Never terminated: stops reading at the cap, not at the end of the stream.
        let endless = vec![b'a'; MAX_HEAD * 4];
        assert_eq!(status_of(&endless), Some(413));
        let body = format!(
            "POST /exec HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(status_of(body.as_bytes()), Some(413));
        let huge = "POST /exec HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(status_of(huge.as_bytes()), Some(413));
        let ok = format!("POST /exec HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n");
        let mut ok = ok.into_bytes();
        ok.extend(std::iter::repeat_n(b'x', MAX_BODY));
        assert_eq!(read(&ok).unwrap().body.len(), MAX_BODY);
    }

    #[test]
    fn random_requests_never_panic() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = b"POST /exec?x HTTP/1.1\r\nContent-Length: 12\r\nHost: a\r\n\r\n{\"argv\":[]}\n";
        let alphabet = b" :\r\n/0123456789-?#\xff\x00Aa";
        for _ in 0..5000 {
            let mut t = base.to_vec();
            for _ in 0..(1 + next() % 4) {
                let i = (next() as usize) % t.len();
                match next() % 3 {
                    0 => {
                        t.remove(i);
                    }
                    1 => t.insert(i, t[i]),
                    _ => t[i] = alphabet[(next() as usize) % alphabet.len()],
                }
            }
            match read_request(&mut Trickle(t, 0)) {
                Ok(r) => assert!(r.body.len() <= MAX_BODY && r.path.starts_with('/')),
                Err(e) => {
                    if let Some((code, _)) = e.response() {
                        assert!(code == 400 || code == 413, "{code}");
                    }
                }
            }
        }
    }

    #[test]
    fn timeouts_map_to_408() {
        struct Slow;
        impl Read for Slow {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let e = read_request(&mut Slow).unwrap_err();
        assert_eq!(e.response().map(|r| r.0), Some(408));
    }

    #[test]
    fn writes_a_closing_json_response() {
        let mut out = Vec::new();
        let mut r = Response::error(405, "use GET");
        r.allow = Some("GET");
        write_response(&mut out, &r).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{s}");
        assert!(s.contains("\r\nAllow: GET\r\n"), "{s}");
        assert!(s.contains("\r\nConnection: close\r\n"), "{s}");
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{s}"
        );
        assert_eq!(body, "{\"error\":\"use GET\"}\n");
    }
}
