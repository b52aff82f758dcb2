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
mod tests;
