//! Unit tests of `webhook`.

use carapace_broker::protocol::ErrorCode;
use carapace_tests::{FakeLlm, Scripted};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::broker::fake::FakeBroker;

const KEY: &[u8] = b"k3y-for-tests";

#[test]
fn signatures_both_ways() {
    let body = br#"{"id":"1","sender":"a","text":"hi"}"#;
    let sig = sign(KEY, body).unwrap_or_default();
    assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64, "{sig}");
    assert!(verify(KEY, body, Some(sig.as_bytes())));
    assert!(verify(
        KEY,
        body,
        Some(
            sig.to_ascii_uppercase()
                .replace("SHA256=", "sha256=")
                .as_bytes()
        )
    ));
    // A changed body, another key, a cut, missing or malformed signature: refused.
    assert!(!verify(KEY, b"{}", Some(sig.as_bytes())));
    assert!(!verify(b"other", body, Some(sig.as_bytes())));
    assert!(!verify(KEY, body, Some(&sig.as_bytes()[..sig.len() - 2])));
    assert!(!verify(KEY, body, None));
    assert!(!verify(
        KEY,
        body,
        Some(sig.trim_start_matches("sha256=").as_bytes())
    ));
    assert!(!verify(
        KEY,
        body,
        Some(format!("sha256={}", "zz".repeat(32)).as_bytes())
    ));
    assert!(!verify(
        KEY,
        body,
        Some(format!("sha1={}", &sig[7..]).as_bytes())
    ));
    // RFC 4231 test case 2.
    assert_eq!(
        sign(b"Jefe", b"what do ya want for nothing?").as_deref(),
        Some("sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    );
}

#[test]
fn bodies() {
    let m = parse_body(br#"{"id":"m1","sender":"alice","text":"hi"}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        m,
        Inbound {
            id: "m1".into(),
            sender: "alice".into(),
            conversation: "alice".into(),
            reply_to: "alice".into(),
            text: "hi".into()
        }
    );
    let m = parse_body(br#"{"id":"m2","sender":"a","conversation":"room","text":""}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (m.conversation.as_str(), m.reply_to.as_str()),
        ("room", "room")
    );
    let long = "x".repeat(257);
    for bad in [
        "".to_string(),
        "{".into(),
        "[]".into(),
        r#"{"sender":"a","text":"x"}"#.into(),
        r#"{"id":"1","text":"x"}"#.into(),
        r#"{"id":"1","sender":"a"}"#.into(),
        r#"{"id":"","sender":"a","text":"x"}"#.into(),
        r#"{"id":"1","sender":"a\nb","text":"x"}"#.into(),
        r#"{"id":"1","sender":"a","conversation":"","text":"x"}"#.into(),
        r#"{"id":1,"sender":"a","text":"x"}"#.into(),
        r#"{"id":"1","sender":"a","text":"x","extra":true}"#.into(),
        format!(r#"{{"id":"{long}","sender":"a","text":"x"}}"#),
    ] {
        assert!(parse_body(bad.as_bytes()).is_err(), "{bad}");
    }
}

async fn server(broker: Arc<FakeBroker>) -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let ctx = Arc::new(Ctx::new("hook".into(), "/nonexistent".into(), broker));
    tokio::spawn(serve(
        ctx,
        Arc::new(Secret::new(KEY.to_vec())),
        "/hook".into(),
        l,
    ));
    addr
}

async fn request(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "{head}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The server may answer (413) before the whole body is written.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string()),
    )
}

async fn post(addr: std::net::SocketAddr, body: &[u8], sig: Option<String>) -> (u16, String) {
    let head = match sig {
        Some(s) => format!("POST /hook HTTP/1.1\r\n{SIGNATURE_HEADER}: {s}"),
        None => "POST /hook HTTP/1.1".to_string(),
    };
    request(addr, &head, body).await
}

#[tokio::test]
async fn the_server_answers_for_each_case() {
    let broker = Arc::new(FakeBroker::default());
    let addr = server(broker.clone()).await;
    let body = br#"{"id":"e1","sender":"ci","text":"build failed"}"#;
    let signed = || sign(KEY, body);
    assert_eq!(
        post(addr, body, signed()).await,
        (202, r#"{"status":"queued"}"#.into())
    );
    assert_eq!(
        post(addr, body, signed()).await,
        (202, r#"{"status":"duplicate"}"#.into())
    );
    assert_eq!(broker.st().delivered.len(), 1);
    assert_eq!(broker.st().delivered[0].reply_to, "ci");
    // Held by the broker: 202 too.
    broker
        .st()
        .deliver_script
        .push_back(Ok(carapace_broker::protocol::DeliverStatus::Held));
    let b2 = br#"{"id":"e2","sender":"x","text":"?"}"#;
    assert_eq!(post(addr, b2, sign(KEY, b2)).await.0, 202);
    // Busy / unavailable: 503 and the message is not lost (a retry is delivered).
    let b3 = br#"{"id":"e3","sender":"ci","text":"again"}"#;
    broker.st().deliver_script.push_back(Err(ErrorCode::Busy));
    let (status, _) = post(addr, b3, sign(KEY, b3)).await;
    assert_eq!(status, 503);
    broker
        .st()
        .deliver_script
        .push_back(Err(ErrorCode::Unavailable));
    assert_eq!(post(addr, b3, sign(KEY, b3)).await.0, 503);
    assert_eq!(
        post(addr, b3, sign(KEY, b3)).await,
        (202, r#"{"status":"queued"}"#.into())
    );
    // The broker finds it too large / malformed.
    broker
        .st()
        .deliver_script
        .push_back(Err(ErrorCode::TooLarge));
    let b4 = br#"{"id":"e4","sender":"ci","text":"big"}"#;
    assert_eq!(post(addr, b4, sign(KEY, b4)).await.0, 413);
    // Signatures.
    assert_eq!(post(addr, body, None).await.0, 401);
    assert_eq!(post(addr, body, sign(b"wrong", body)).await.0, 401);
    assert_eq!(post(addr, b"{}", signed()).await.0, 401);
    // Bad JSON, signed.
    let bad = br#"{"id":"e5","text":"no sender"}"#;
    let (status, text) = post(addr, bad, sign(KEY, bad)).await;
    assert_eq!(status, 400);
    assert!(text.contains("sender"), "{text}");
    // Too large: by its declared length and by what arrives.
    let huge = vec![b'x'; MAX_BODY + 1];
    assert_eq!(post(addr, &huge, sign(KEY, &huge)).await.0, 413);
    // Other paths and methods.
    assert_eq!(request(addr, "POST /other HTTP/1.1", body).await.0, 404);
    assert_eq!(request(addr, "GET /hook HTTP/1.1", b"").await.0, 405);
    // What was delivered: e1, e2 (held), e3.
    let ids: Vec<String> = broker.st().delivered.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, ["e1", "e2", "e3"]);
}

#[tokio::test]
async fn chunked_bodies_over_the_cap_are_refused() {
    let broker = Arc::new(FakeBroker::default());
    let addr = server(broker.clone()).await;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"POST /hook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..20 {
        let head = format!("{:x}\r\n", chunk.len());
        if s.write_all(head.as_bytes()).await.is_err()
            || s.write_all(&chunk).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(broker.st().delivered.is_empty());
}

fn outbound(id: &str) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        recipient: "ops".into(),
        body: "done".into(),
        in_reply_to: Some("e1".into()),
        attempt: 1,
        buttons: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_posts_are_signed_and_mapped() {
    let receiver = FakeLlm::start(vec![
        Scripted::http_error(503, "later"),
        Scripted::http_error(429, "slow"),
        Scripted::http_error(400, "no"),
    ]);
    let url = ServiceUrl::parse(&format!("{}/chat/completions", receiver.base_url()))
        .unwrap_or_else(|e| panic!("{e}"));
    let poster = Poster::new(
        Arc::new(FakeBroker::default()),
        Some(url),
        Arc::new(Secret::new(KEY.to_vec())),
    );
    let kinds: Vec<FailureKind> = [
        poster.send(&outbound("o1")).await,
        poster.send(&outbound("o1")).await,
        poster.send(&outbound("o1")).await,
    ]
    .into_iter()
    .map(|r| r.err().map_or(FailureKind::Rejected, |e| e.kind))
    .collect();
    assert_eq!(
        kinds,
        [
            FailureKind::Unreachable,
            FailureKind::Throttled,
            FailureKind::Rejected
        ]
    );
    assert_eq!(poster.send(&outbound("o2")).await, Ok(None));
    let reqs = receiver.requests();
    assert_eq!(reqs.len(), 4);
    let last = &reqs[3];
    assert_eq!(last.path, "/v1/chat/completions");
    assert_eq!(
        last.body,
        json!({"id": "o2", "recipient": "ops", "text": "done", "in_reply_to": "e1"})
    );
    let sig = last.header(SIGNATURE_HEADER).unwrap_or_default();
    assert!(
        verify(KEY, last.body.to_string().as_bytes(), Some(sig.as_bytes())),
        "{sig}"
    );
    // Nowhere to send: refused for good.
    let nowhere = Poster::new(
        Arc::new(FakeBroker::default()),
        None,
        Arc::new(Secret::new(KEY.to_vec())),
    );
    let e = nowhere
        .send(&outbound("o3"))
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert!(!e.retry());
    // Unreachable: the receiver is gone.
    let addr = receiver.addr();
    drop(receiver);
    let gone = Poster::new(
        Arc::new(FakeBroker::default()),
        Some(ServiceUrl::parse(&format!("http://{addr}/")).unwrap_or_else(|e| panic!("{e}"))),
        Arc::new(Secret::new(KEY.to_vec())),
    );
    let e = gone
        .send(&outbound("o4"))
        .await
        .err()
        .unwrap_or_else(|| panic!("sent"));
    assert_eq!(e.kind, FailureKind::Unreachable);
}
