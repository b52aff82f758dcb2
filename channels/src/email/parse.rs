//! Turning a raw RFC 5322 message into what the adapter delivers (pure: no I/O).
//!
//! - sender: the first From address, lowercased;
//! - reply_to: the first Reply-To address, else the sender;
//! - id: the Message-ID without `<>` (else `uid:<uidvalidity>:<uid>`, chosen by the caller);
//! - conversation: the thread's root, the first of References, else In-Reply-To, else the id;
//! - body: `Subject: …`, a blank line, the text parts (an HTML-only message reduced to text by
//!   mail-parser's own conversion), then one `[attachment NAME (N bytes) refused]` line per
//!   attachment (attachments are never delivered), capped at [`MAX_BODY`] bytes.
//!
//! [`parse_message`] is the fuzz entry point: any input gives `Ok` or a [`ParseError`], never a
//! panic, and whatever it returns holds the invariants the broker checks (lengths, no control
//! characters in the ids and addresses).

use mail_parser::{HeaderValue, MessageParser, MimeHeaders};

/// Largest id, sender, conversation or reply_to the broker accepts (bytes).
pub const MAX_ID: usize = 256;
/// Largest body delivered (bytes of UTF-8); longer texts are cut with a note. Well below the
/// broker's 64 KiB frame even after JSON escaping.
pub const MAX_BODY: usize = 32 * 1024;
/// Longest subject kept (characters).
const MAX_SUBJECT: usize = 500;
/// Longest attachment name shown in a note (characters).
const MAX_NAME: usize = 120;
/// At most this many ids of a References header are kept (the root and the latest ones).
pub const MAX_REFERENCES: usize = 20;

/// What one e-mail message delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The Message-ID without `<>`, when it has a usable one.
    pub message_id: Option<String>,
    /// The From address, lowercased.
    pub sender: String,
    /// The Reply-To address (lowercased), else the sender.
    pub reply_to: String,
    /// The thread's root Message-ID (first of References, else In-Reply-To), when there is one.
    pub thread_root: Option<String>,
    /// The References of the message (without `<>`, at most [`MAX_REFERENCES`]), for threading
    /// an answer.
    pub references: Vec<String>,
    /// The subject (single line, control characters removed; empty when absent).
    pub subject: String,
    /// What the agent reads.
    pub body: String,
}

impl Parsed {
    /// The deliver id: the Message-ID, else `uid:<uidvalidity>:<uid>`.
    pub fn id(&self, uid_validity: u32, uid: u32) -> String {
        self.message_id
            .clone()
            .unwrap_or_else(|| format!("uid:{uid_validity}:{uid}"))
    }

    /// The conversation: the thread root, else the deliver id.
    pub fn conversation(&self, uid_validity: u32, uid: u32) -> String {
        self.thread_root
            .clone()
            .unwrap_or_else(|| self.id(uid_validity, uid))
    }

    /// Replace the body by a note (a message too big to fetch: only its header was parsed).
    pub fn replace_body_with_note(&mut self, note: &str) {
        self.body = format!("Subject: {}\n\n{note}", self.subject);
    }
}

/// Why a message cannot be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not an e-mail message (no header could be parsed)")]
    NotAMessage,
    #[error("the message has no From address")]
    NoSender,
    #[error("the From address {0:?} is not a usable address")]
    BadSender(String),
}

/// Parse one raw message (the fuzz entry point).
pub fn parse_message(raw: &[u8]) -> Result<Parsed, ParseError> {
    let msg = MessageParser::default()
        .parse(raw)
        .ok_or(ParseError::NotAMessage)?;
    if msg.headers().is_empty() {
        return Err(ParseError::NotAMessage);
    }
    let from = msg
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .ok_or(ParseError::NoSender)?;
    let sender = normalize_address(from).ok_or_else(|| ParseError::BadSender(clip(from, 80)))?;
    let reply_to = msg
        .reply_to()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .and_then(normalize_address)
        .unwrap_or_else(|| sender.clone());
    let message_id = msg.message_id().and_then(clean_id);
    let references = ids_of(msg.references());
    let in_reply_to = ids_of(msg.in_reply_to());
    let thread_root = references
        .first()
        .or_else(|| in_reply_to.first())
        .cloned()
        .or_else(|| message_id.clone());
    let subject = one_line(msg.subject().unwrap_or(""), MAX_SUBJECT);

    let mut text = String::new();
    for i in 0..msg.text_body_count() {
        if let Some(t) = msg.body_text(i) {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&t);
        }
    }
    let text = clean_text(&text);
    let mut notes = String::new();
    for part in msg.attachments() {
        let name = part
            .attachment_name()
            .map(|n| one_line(n, MAX_NAME))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "(unnamed)".to_string());
        notes.push_str(&format!(
            "\n[attachment {name} ({} bytes) refused]",
            part.contents().len()
        ));
    }
    let body = compose_body(&subject, &text, &notes);
    Ok(Parsed {
        message_id,
        sender,
        reply_to,
        thread_root,
        references: keep_references(references),
        subject,
        body,
    })
}

/// Fuzz entry point (`fuzz/fuzz_targets/email.rs`, corpus replayed by `cargo test`): parse,
/// and check that what parses holds the invariants the broker relies on.
pub fn fuzz_message(data: &[u8]) {
    let Ok(p) = parse_message(data) else {
        return;
    };
    let id_ok = |s: &str| !s.is_empty() && s.len() <= MAX_ID && !s.chars().any(|c| c.is_control());
    assert!(id_ok(&p.sender), "sender {:?}", p.sender);
    assert!(id_ok(&p.reply_to), "reply_to {:?}", p.reply_to);
    assert_eq!(
        normalize_address(&p.sender).as_deref(),
        Some(p.sender.as_str())
    );
    assert_eq!(
        normalize_address(&p.reply_to).as_deref(),
        Some(p.reply_to.as_str())
    );
    assert!(id_ok(&p.id(u32::MAX, u32::MAX)));
    assert!(id_ok(&p.conversation(u32::MAX, u32::MAX)));
    for r in &p.references {
        assert!(id_ok(r), "reference {r:?}");
    }
    assert!(p.references.len() <= MAX_REFERENCES);
    assert!(p.body.len() <= MAX_BODY, "body of {} bytes", p.body.len());
    assert!(!p.subject.contains(['\r', '\n']), "subject {:?}", p.subject);
}

/// `Subject: S`, a blank line, the text, the attachment notes; the text is cut (at a character
/// boundary, with a note) so that the whole stays within [`MAX_BODY`].
fn compose_body(subject: &str, text: &str, notes: &str) -> String {
    let head = format!("Subject: {subject}\n\n");
    let room = MAX_BODY.saturating_sub(head.len() + notes.len() + 64);
    let mut body = head;
    if text.len() <= room {
        body.push_str(text);
    } else {
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        body.push_str(&text[..cut]);
        body.push_str(&format!(
            "\n[message cut: {} more bytes not shown]",
            text.len() - cut
        ));
    }
    body.push_str(notes);
    if body.len() > MAX_BODY {
        // Only an absurd number of attachment notes gets here.
        let mut cut = MAX_BODY;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    body
}

/// The ids of a Message-ID list header (`<a@b> <c@d>`), without `<>`, unusable ones dropped.
fn ids_of(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => clean_id(t).into_iter().collect(),
        HeaderValue::TextList(l) => l.iter().filter_map(|t| clean_id(t)).collect(),
        _ => Vec::new(),
    }
}

/// The root and the last `MAX_REFERENCES - 1` ids (RFC 5322 3.6.4 suggests keeping the first).
fn keep_references(mut refs: Vec<String>) -> Vec<String> {
    if refs.len() > MAX_REFERENCES {
        let tail = refs.split_off(refs.len() - (MAX_REFERENCES - 1));
        refs.truncate(1);
        refs.extend(tail);
    }
    refs
}

/// A message id usable as a deliver id: `<>` and surrounding space removed, 1..=[`MAX_ID`]
/// bytes, no whitespace or control characters, no `<>`.
pub fn clean_id(raw: &str) -> Option<String> {
    let s = raw
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    let ok = !s.is_empty()
        && s.len() <= MAX_ID
        && !s
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>');
    ok.then(|| s.to_string())
}

/// An address usable as sender, reply_to and SMTP recipient: lowercased, one `@` with text on
/// both sides, at most [`MAX_ID`] bytes, no whitespace, control characters or characters that
/// are special in an SMTP path or header (`<>()[],;:"\`).
pub fn normalize_address(raw: &str) -> Option<String> {
    let s = raw.trim().to_lowercase();
    let (local, domain) = s.split_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && s.len() <= MAX_ID
        && !s
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "<>()[],;:\"\\".contains(c));
    ok.then_some(s)
}

/// One line: control characters (newlines included) become spaces, runs of spaces collapse,
/// at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.chars().count() >= max {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

/// Text for the agent: CRLF and CR become LF, other control characters except tab dropped,
/// trailing blank lines removed.
fn clean_text(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let out: String = s
        .chars()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .collect();
    out.trim_end().to_string()
}

fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
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
}
