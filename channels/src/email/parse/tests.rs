//! Unit tests of `parse`.

use super::*;

fn crlf(s: &str) -> Vec<u8> {
    s.replace('\n', "\r\n").into_bytes()
}

#[test]
fn plain_message() {
    let raw = crlf(
        "From: Alice Example <Alice@Example.COM>\n\
             To: bot@example.org\n\
             Subject: Lunch?\n\
             Message-ID: <m1@example.com>\n\
             \n\
             Shall we have lunch?\n",
    );
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.sender, "alice@example.com");
    assert_eq!(p.reply_to, "alice@example.com");
    assert_eq!(p.message_id.as_deref(), Some("m1@example.com"));
    assert_eq!(p.id(7, 3), "m1@example.com");
    assert_eq!(p.conversation(7, 3), "m1@example.com");
    assert_eq!(p.subject, "Lunch?");
    assert_eq!(p.body, "Subject: Lunch?\n\nShall we have lunch?");
    assert!(p.references.is_empty());
}

#[test]
fn reply_to_wins_over_from() {
    let raw = crlf("From: a@example.com\nReply-To: <Team@Example.com>\nSubject: x\n\nhi\n");
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.sender, "a@example.com");
    assert_eq!(p.reply_to, "team@example.com");
}

#[test]
fn html_only_is_reduced_to_text() {
    let raw = crlf(
        "From: a@example.com\nSubject: News\nContent-Type: text/html; charset=utf-8\n\n\
             <html><head><style>p {color: red}</style></head><body><p>Hello <b>world</b></p>\
             <script>alert(1)</script></body></html>\n",
    );
    let p = parse_message(&raw).unwrap();
    assert!(p.body.starts_with("Subject: News\n\n"), "{:?}", p.body);
    assert!(p.body.contains("Hello"), "{:?}", p.body);
    assert!(p.body.contains("world"), "{:?}", p.body);
    assert!(!p.body.contains("<b>"), "{:?}", p.body);
    assert!(!p.body.contains("<p>"), "{:?}", p.body);
}

#[test]
fn alternative_prefers_the_text_part() {
    let raw = crlf(
        "From: a@example.com\nSubject: alt\nMIME-Version: 1.0\n\
             Content-Type: multipart/alternative; boundary=\"b\"\n\n\
             --b\nContent-Type: text/plain\n\nplain version\n\
             --b\nContent-Type: text/html\n\n<p>html version</p>\n--b--\n",
    );
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.body, "Subject: alt\n\nplain version");
}

#[test]
fn attachments_are_refused_with_a_note() {
    let raw = crlf(
        "From: a@example.com\nSubject: report\nMIME-Version: 1.0\n\
             Content-Type: multipart/mixed; boundary=\"b\"\n\n\
             --b\nContent-Type: text/plain\n\nsee attached\n\
             --b\nContent-Type: application/pdf; name=\"q3.pdf\"\n\
             Content-Disposition: attachment; filename=\"q3.pdf\"\n\
             Content-Transfer-Encoding: base64\n\nAAECAwQFBgc=\n--b--\n",
    );
    let p = parse_message(&raw).unwrap();
    assert!(p.body.contains("see attached"), "{:?}", p.body);
    assert!(
        p.body.contains("[attachment q3.pdf (8 bytes) refused]"),
        "{:?}",
        p.body
    );
    assert!(!p.body.contains("AAECAwQFBgc"), "{:?}", p.body);
}

#[test]
fn thread_root_is_the_first_reference() {
    let raw = crlf(
        "From: a@example.com\nSubject: Re: plan\nMessage-ID: <m3@x>\n\
             In-Reply-To: <m2@x>\nReferences: <m1@x> <m2@x>\n\nok\n",
    );
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.thread_root.as_deref(), Some("m1@x"));
    assert_eq!(p.conversation(1, 1), "m1@x");
    assert_eq!(p.references, vec!["m1@x", "m2@x"]);
}

#[test]
fn thread_root_falls_back_to_in_reply_to_then_own_id() {
    let raw = crlf("From: a@example.com\nMessage-ID: <m3@x>\nIn-Reply-To: <m2@x>\n\nok\n");
    assert_eq!(
        parse_message(&raw).unwrap().thread_root.as_deref(),
        Some("m2@x")
    );
    let raw = crlf("From: a@example.com\nMessage-ID: <m3@x>\n\nok\n");
    assert_eq!(
        parse_message(&raw).unwrap().thread_root.as_deref(),
        Some("m3@x")
    );
}

#[test]
fn missing_headers() {
    // No Message-ID, no subject: the uid id, an empty subject line.
    let raw = crlf("From: a@example.com\n\nbody only\n");
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.message_id, None);
    assert_eq!(p.id(42, 9), "uid:42:9");
    assert_eq!(p.conversation(42, 9), "uid:42:9");
    assert_eq!(p.body, "Subject: \n\nbody only");
    // No From: refused.
    let raw = crlf("To: b@example.com\nSubject: who?\n\nx\n");
    assert_eq!(parse_message(&raw), Err(ParseError::NoSender));
}

#[test]
fn unusable_from_and_ids() {
    let raw = crlf("From: not-an-address\nSubject: x\n\nx\n");
    assert!(parse_message(&raw).is_err());
    let long = "x".repeat(300);
    let raw = crlf(&format!(
        "From: a@example.com\nMessage-ID: <{long}@x>\nReferences: <{long}@y>\n\nx\n"
    ));
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.message_id, None);
    assert_eq!(p.thread_root, None);
    assert_eq!(clean_id("<a b@c>"), None);
    assert_eq!(clean_id("<ab@c>").as_deref(), Some("ab@c"));
    assert_eq!(normalize_address("a@b\r\nRCPT TO:<x@y>"), None);
    assert_eq!(normalize_address("A@B.c").as_deref(), Some("a@b.c"));
    assert_eq!(normalize_address("@b"), None);
    assert_eq!(normalize_address("a@b@c"), None);
}

#[test]
fn garbage_never_panics() {
    for raw in [
        &b""[..],
        b"\0\0\0",
        b"\xff\xfe\xfd",
        b"From:",
        b"From: <>\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\nFrom: a@b\r\n\r\n--x\r\n--x\r\n",
    ] {
        let _ = parse_message(raw);
    }
    assert!(parse_message(b"").is_err());
}

#[test]
fn long_bodies_are_cut_within_the_cap() {
    let text = "é".repeat(40_000);
    let raw = crlf(&format!("From: a@example.com\nSubject: big\n\n{text}\n"));
    let p = parse_message(&raw).unwrap();
    assert!(p.body.len() <= MAX_BODY, "{}", p.body.len());
    assert!(p.body.contains("more bytes not shown]"));
    let raw = crlf("From: a@example.com\nSubject: small\n\nsmall\n");
    assert!(!parse_message(&raw).unwrap().body.contains("not shown"));
}

#[test]
fn subject_is_one_line_and_control_free() {
    let raw = b"From: a@example.com\r\nSubject: a\r\n b\x07c\r\n\r\nx\r\n";
    let p = parse_message(raw).unwrap();
    assert!(!p.subject.contains(['\n', '\r', '\x07']), "{:?}", p.subject);
}

#[test]
fn references_are_bounded_keeping_the_root() {
    let refs: Vec<String> = (0..50).map(|i| format!("<r{i}@x>")).collect();
    let raw = crlf(&format!(
        "From: a@example.com\nReferences: {}\n\nx\n",
        refs.join(" ")
    ));
    let p = parse_message(&raw).unwrap();
    assert_eq!(p.references.len(), MAX_REFERENCES);
    assert_eq!(p.references[0], "r0@x");
    assert_eq!(p.references[MAX_REFERENCES - 1], "r49@x");
    assert_eq!(p.thread_root.as_deref(), Some("r0@x"));
}
