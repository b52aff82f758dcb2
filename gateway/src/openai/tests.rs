//! Unit tests of `openai`.

use super::*;
use crate::sessions::Usage;
use carapace_broker::tokens::Scope;

fn caller() -> Caller {
    Caller {
        token_id: "ab12cd34".into(),
        name: "n".into(),
        scope: Scope::Client,
    }
}

#[test]
fn requests_are_read_leniently_but_checked() {
    let r = parse_request(&json!({
        "model": "anything", "temperature": 0.2,
        "messages": [{"role":"system","content":"ignored"},{"role":"user","content":"hi"}],
    }));
    assert_eq!(
        r.ok(),
        Some(ChatRequest {
            message: "hi".into(),
            ..ChatRequest::default()
        })
    );
    let r = parse_request(&json!({
        "messages": [{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
        "stream": true, "stream_options": {"include_usage": true}, "user": "s-1",
    }));
    assert_eq!(
        r.ok(),
        Some(ChatRequest {
            message: "ab".into(),
            stream: true,
            include_usage: true,
            user: Some("s-1".into()),
        })
    );
    for bad in [
        json!([]),
        json!({}),
        json!({"messages": []}),
        json!({"messages": [{"role":"assistant","content":"x"}]}),
        json!({"messages": [{"role":"user","content":""}]}),
        json!({"messages": [{"role":"user","content":7}]}),
        json!({"messages": [{"role":"user","content":"x"}], "stream": "yes"}),
        json!({"messages": [{"role":"user","content":"x"}], "user": "a b/../c"}),
        json!({"messages": [{"role":"user","content":"x".repeat(agent::MAX_MESSAGE + 1)}]}),
    ] {
        let e = parse_request(&bad).err();
        assert_eq!(e.map(|e| e.kind), Some(Kind::InvalidRequest), "{bad}");
    }
}

#[test]
fn the_session_is_the_header_then_user_then_the_tokens_own() {
    let req = ChatRequest {
        user: Some("from-user".into()),
        ..ChatRequest::default()
    };
    let mut h = HeaderMap::new();
    assert_eq!(
        session_of(&h, &ChatRequest::default(), &caller()).ok(),
        Some("oai-ab12cd34".into())
    );
    assert_eq!(
        session_of(&h, &req, &caller()).ok(),
        Some("from-user".into())
    );
    h.insert(SESSION_HEADER, HeaderValue::from_static("from-header"));
    assert_eq!(
        session_of(&h, &req, &caller()).ok(),
        Some("from-header".into())
    );
    h.insert(SESSION_HEADER, HeaderValue::from_static("../etc"));
    assert_eq!(
        session_of(&h, &req, &caller()).err().map(|e| e.kind),
        Some(Kind::InvalidRequest)
    );
}

#[test]
fn errors_have_openais_shape_and_status() {
    for (kind, status, ty) in [
        (Kind::Unauthorized, 401, "authentication_error"),
        (Kind::InvalidRequest, 400, "invalid_request_error"),
        (Kind::RateLimited, 429, "rate_limit_error"),
        (Kind::NotFound, 404, "not_found_error"),
        (Kind::Unavailable, 503, "server_error"),
    ] {
        let e = RpcError::new(kind, "why");
        let r = error_response(&e);
        assert_eq!(r.status().as_u16(), status);
        let v = error_json(&e);
        assert_eq!(v["error"]["type"], ty);
        assert_eq!(v["error"]["message"], "why");
        assert_eq!(v["error"]["code"], kind.as_str());
    }
}

#[test]
fn answers_and_their_pieces() {
    let end = |stopped, last: Value, reply: Value| RunEnd {
        reply,
        last,
        turns: 3,
        stopped,
        usage: Usage::default(),
    };
    assert_eq!(
        answer_of(&end("done", json!("fine"), json!("fine"))),
        ("fine".to_string(), "stop")
    );
    let (t, f) = answer_of(&end("turn_limit", Value::Null, json!("partial")));
    assert_eq!(f, "length");
    assert!(t.starts_with("partial") && t.contains("turn limit"), "{t}");
    let text = "é".repeat(300) + "abc";
    let p = pieces(&text, 256);
    assert!(p.len() > 2 && p.iter().all(|x| x.len() <= 256));
    assert_eq!(p.concat(), text);
    assert!(pieces("", 256).is_empty());
}
