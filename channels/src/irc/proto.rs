//! The IRC wire format: one line (RFC 1459 / RFC 2812 framing, IRCv3 message tags) parsed
//! strictly into a [`Message`], and the outbound line builders.
//!
//! A line is `[@tags SPACE] [:prefix SPACE] command [params] [SPACE :trailing]`, at most
//! [`MAX_TAGS`] bytes of tags and [`MAX_LINE`] bytes of the rest (CR LF included). Anything else
//! is a [`ProtoError`], never a panic: the connection logs it and reads on.

/// Longest line without its tags, CR LF included (RFC 1459 2.3).
pub const MAX_LINE: usize = 512;
/// Longest tag section, `@` and the space after it included (IRCv3 message tags).
pub const MAX_TAGS: usize = 8191;
/// Most parameters a message has (RFC 1459: 14 middle + the trailing).
pub const MAX_PARAMS: usize = 15;

/// Why a line is not an IRC message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("an empty line")]
    Empty,
    #[error("a line of {0} bytes (at most {MAX_LINE} without tags)")]
    TooLong(usize),
    #[error("a tag section of {0} bytes (at most {MAX_TAGS})")]
    TagsTooLong(usize),
    #[error("a NUL, CR or LF inside the line")]
    ControlByte,
    #[error("tags without a command")]
    NoCommandAfterTags,
    #[error("a malformed tag: {0}")]
    BadTag(String),
    #[error("an empty prefix or a prefix without a command")]
    BadPrefix,
    #[error("a malformed command {0:?}")]
    BadCommand(String),
    #[error("more than {MAX_PARAMS} parameters")]
    TooManyParams,
}

/// Who sent a message: a server name, or `nick[!user][@host]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    /// The nick, or the server's name.
    pub nick: String,
    pub user: Option<String>,
    pub host: Option<String>,
}

impl Prefix {
    fn parse(s: &str) -> Result<Prefix, ProtoError> {
        if s.is_empty() {
            return Err(ProtoError::BadPrefix);
        }
        let (rest, host) = match s.split_once('@') {
            Some((r, h)) => (r, Some(h.to_string())),
            None => (s, None),
        };
        let (nick, user) = match rest.split_once('!') {
            Some((n, u)) => (n, Some(u.to_string())),
            None => (rest, None),
        };
        if nick.is_empty()
            || user.as_deref().is_some_and(str::is_empty)
            || host.as_deref().is_some_and(str::is_empty)
        {
            return Err(ProtoError::BadPrefix);
        }
        Ok(Prefix {
            nick: nick.to_string(),
            user,
            host,
        })
    }
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// IRCv3 tags, unescaped, in the order sent (a key without a value has "").
    pub tags: Vec<(String, String)>,
    pub prefix: Option<Prefix>,
    /// Upper-cased letters, or three digits.
    pub command: String,
    pub params: Vec<String>,
}

impl Message {
    /// The value of tag `key`, if present (a later duplicate wins, as the spec says).
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parameter `i`, or "".
    pub fn param(&self, i: usize) -> &str {
        self.params.get(i).map_or("", String::as_str)
    }

    /// The sender's nick, when the prefix names one.
    pub fn nick(&self) -> Option<&str> {
        self.prefix.as_ref().map(|p| p.nick.as_str())
    }
}

/// Unescape an IRCv3 tag value (`\:` `;`, `\s` space, `\\`, `\r`, `\n`; a lone trailing `\`
/// is dropped; an unknown escape is the character itself).
fn unescape_tag(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(':') => out.push(';'),
            Some('s') => out.push(' '),
            Some('\\') => out.push('\\'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

fn parse_tags(s: &str) -> Result<Vec<(String, String)>, ProtoError> {
    let mut out = Vec::new();
    for item in s.split(';') {
        if item.is_empty() {
            continue;
        }
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        let name = key.strip_prefix('+').unwrap_or(key);
        // vendor/name: the vendor a host name, the name letters, digits and hyphens.
        let (vendor, bare) = match name.rsplit_once('/') {
            Some((v, n)) => (Some(v), n),
            None => (None, name),
        };
        let name_ok =
            !bare.is_empty() && bare.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let vendor_ok = vendor.is_none_or(|v| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        });
        if !name_ok || !vendor_ok {
            return Err(ProtoError::BadTag(crate::settings::shown(key)));
        }
        out.push((key.to_string(), unescape_tag(value)));
    }
    Ok(out)
}

/// Parse one line (without its CR LF; a trailing CR or LF is tolerated and removed).
pub fn parse_line(line: &str) -> Result<Message, ProtoError> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(ProtoError::ControlByte);
    }
    let mut rest = line;
    let mut tags = Vec::new();
    if let Some(after) = rest.strip_prefix('@') {
        let (t, r) = after
            .split_once(' ')
            .ok_or(ProtoError::NoCommandAfterTags)?;
        if t.len() + 2 > MAX_TAGS {
            return Err(ProtoError::TagsTooLong(t.len() + 2));
        }
        tags = parse_tags(t)?;
        rest = r.trim_start_matches(' ');
    }
    if rest.len() + 2 > MAX_LINE {
        return Err(ProtoError::TooLong(rest.len() + 2));
    }
    let mut prefix = None;
    if let Some(after) = rest.strip_prefix(':') {
        let (p, r) = after.split_once(' ').ok_or(ProtoError::BadPrefix)?;
        prefix = Some(Prefix::parse(p)?);
        rest = r.trim_start_matches(' ');
    }
    let (command, mut rest) = match rest.split_once(' ') {
        Some((c, r)) => (c, r),
        None => (rest, ""),
    };
    if command.is_empty() {
        return Err(ProtoError::Empty);
    }
    let numeric = command.len() == 3 && command.bytes().all(|b| b.is_ascii_digit());
    if !numeric && !command.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ProtoError::BadCommand(crate::settings::shown(command)));
    }
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        if params.len() == MAX_PARAMS {
            return Err(ProtoError::TooManyParams);
        }
        if let Some(trailing) = rest.strip_prefix(':') {
            params.push(trailing.to_string());
            break;
        }
        let (p, r) = rest.split_once(' ').unwrap_or((rest, ""));
        params.push(p.to_string());
        rest = r;
    }
    Ok(Message {
        tags,
        prefix,
        command: command.to_ascii_uppercase(),
        params,
    })
}

/// IRC's case mapping (`rfc1459`): ASCII letters, and `[]\~` as the upper case of `{}|^`.
pub fn irc_lowercase(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '[' => '{',
            ']' => '}',
            '\\' => '|',
            '~' => '^',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// A nick, account or channel name the adapter accepts from settings and sends in commands:
/// no space, comma, NUL/CR/LF/BEL or other control character, not starting with `:`.
pub fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(':')
        && !s.chars().any(|c| c.is_control() || c == ' ' || c == ',')
}

/// Whether `target` names a channel (`#`, `&`, `+` or `!` first).
pub fn is_channel(target: &str) -> bool {
    target.starts_with(['#', '&', '+', '!'])
}

/// Split `text` into PRIVMSG bodies of at most `max` bytes each: one piece per line of the
/// text, a longer line cut at the last space in its second half if there is one, else at a
/// character boundary. CR and NUL are dropped (IRC cannot carry them), empty pieces skipped.
pub fn split_text(text: &str, max: usize) -> Vec<String> {
    let max = max.max(4);
    let mut out = Vec::new();
    for line in text.split('\n') {
        let clean: String = line.chars().filter(|c| !matches!(c, '\r' | '\0')).collect();
        let mut rest = clean.as_str().trim_end();
        while rest.len() > max {
            let mut limit = max;
            while !rest.is_char_boundary(limit) {
                limit -= 1;
            }
            let cut = rest[..limit]
                .rfind(' ')
                .filter(|i| *i >= limit / 2 && *i > 0)
                .unwrap_or(limit);
            let piece = rest[..cut].trim_end();
            if !piece.is_empty() {
                out.push(piece.to_string());
            }
            rest = rest[cut..].trim_start_matches(' ');
        }
        if !rest.trim().is_empty() {
            out.push(rest.to_string());
        }
    }
    out
}

/// The fuzz entry point for the IRC parser (`fuzz/fuzz_targets/irc.rs`): every line of `data`
/// parsed; nothing may panic and what parses must hold its invariants. The splitter too.
pub fn fuzz_line(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        if let Ok(m) = parse_line(line) {
            assert!(!m.command.is_empty());
            assert!(m.params.len() <= MAX_PARAMS);
            assert!(
                m.command.bytes().all(|b| b.is_ascii_uppercase())
                    || (m.command.len() == 3 && m.command.bytes().all(|b| b.is_ascii_digit()))
            );
            for p in &m.params {
                assert!(!p.contains(['\r', '\n', '\0']));
            }
            if let Some(p) = &m.prefix {
                assert!(!p.nick.is_empty());
            }
        }
    }
    for p in split_text(&text, 100) {
        assert!(!p.is_empty() && p.len() <= 100);
        assert!(!p.contains(['\r', '\n', '\0']));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Message {
        parse_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn parses_the_shapes_servers_send() {
        let m = ok(":alice!~a@host.example PRIVMSG #chan :hello there :)\r\n");
        assert_eq!(m.command, "PRIVMSG");
        assert_eq!(m.params, ["#chan", "hello there :)"]);
        assert_eq!(
            m.prefix,
            Some(Prefix {
                nick: "alice".into(),
                user: Some("~a".into()),
                host: Some("host.example".into())
            })
        );
        let m = ok("PING :irc.example.net");
        assert_eq!(
            (m.command.as_str(), m.param(0)),
            ("PING", "irc.example.net")
        );
        assert!(m.prefix.is_none());
        let m = ok(":irc.example 001 bot :Welcome to the network bot!u@h");
        assert_eq!(m.command, "001");
        assert_eq!(m.nick(), Some("irc.example"));
        let m = ok(
            "@msgid=abc123;time=2026-01-01T00:00:00.000Z;account=al\\sice;+draft/x :a!b@c PRIVMSG bot :hi",
        );
        assert_eq!(m.tag("msgid"), Some("abc123"));
        assert_eq!(m.tag("account"), Some("al ice"));
        assert_eq!(m.tag("+draft/x"), Some(""));
        assert_eq!(m.tag("nope"), None);
        let m = ok("CAP * LS * :sasl=PLAIN,EXTERNAL message-tags");
        assert_eq!(
            m.params,
            ["*", "LS", "*", "sasl=PLAIN,EXTERNAL message-tags"]
        );
        // A trailing that is empty, and lower-case commands.
        let m = ok("privmsg bot :");
        assert_eq!((m.command.as_str(), m.params.len()), ("PRIVMSG", 2));
        assert_eq!(m.param(1), "");
        assert_eq!(m.param(7), "");
    }

    #[test]
    fn refuses_what_is_not_irc() {
        for bad in [
            "",
            "\r\n",
            ":onlyprefix",
            ": PRIVMSG x :y",
            "@tags-only",
            "@bad tag=1 PING",
            "PRIV-MSG x",
            "12 x",
            "1234 x",
            ":a!@h PRIVMSG x :y",
            "PRIVMSG x :a\0b",
            "PRIVMSG x :a\rb",
            "A 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?} parsed");
        }
        let long = format!("PRIVMSG x :{}", "a".repeat(600));
        assert_eq!(parse_line(&long), Err(ProtoError::TooLong(613)));
        let tags = format!("@a={} PING", "b".repeat(9000));
        assert!(matches!(parse_line(&tags), Err(ProtoError::TagsTooLong(_))));
        // Long text is fine when it is in the tags, not the message.
        let ok_tags = format!("@a={} PING :x", "b".repeat(4000));
        assert!(parse_line(&ok_tags).is_ok());
    }

    #[test]
    fn tag_escapes() {
        assert_eq!(unescape_tag("a\\:b\\sc\\\\d\\re\\nf\\"), "a;b c\\d\re\nf");
        assert_eq!(unescape_tag("\\x"), "x");
    }

    #[test]
    fn case_mapping_and_words() {
        assert_eq!(irc_lowercase("Alice[Bot]\\~"), "alice{bot}|^");
        assert!(is_word("alice") && is_word("#chan"));
        for bad in ["", "a b", "a,b", ":a", "a\u{7}", &"x".repeat(65)] {
            assert!(!is_word(bad), "{bad:?}");
        }
        assert!(is_channel("#x") && is_channel("&x") && !is_channel("alice"));
    }

    #[test]
    fn splitting_keeps_every_word_and_the_limit() {
        assert_eq!(split_text("hello\r\n\nworld", 100), ["hello", "world"]);
        let long = "word ".repeat(50);
        let pieces = split_text(&long, 40);
        assert!(pieces.iter().all(|p| p.len() <= 40 && !p.is_empty()));
        assert_eq!(pieces.join(" "), long.trim_end());
        // Multi-byte characters are never cut.
        let pieces = split_text(&"é".repeat(30), 7);
        assert!(pieces.iter().all(|p| p.len() <= 7));
        assert_eq!(pieces.concat(), "é".repeat(30));
        assert!(split_text("\n\r\n", 10).is_empty());
        assert!(split_text("a\0b", 10) == ["ab"]);
    }
}
