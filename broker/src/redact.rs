//! Redaction of known secret values (and configured patterns) in outbound data: tool output, sent
//! messages. Every occurrence becomes `[REDACTED]`.
//!
//! What is matched, for each secret value (empty values are ignored), and for the value
//! without its trailing whitespace (a key file's newline):
//! - the raw bytes;
//! - lowercase and uppercase hex of the bytes;
//! - its percent-encoding (URLs, form bodies) and, for UTF-8 values, its JSON string escaping;
//! - standard and URL-safe base64 of the bytes, without padding (so both padded and unpadded
//!   forms are caught), *when the secret stands alone* in the encoded text (base64 of a longer
//!   string that contains the secret, e.g. `user:secret` in HTTP basic auth, is not caught).
//!
//! Patterns are regular expressions over bytes (UTF-8 aware where the text is UTF-8).
//!
//! This is a backstop, not the boundary: a confined child can always encode a secret some other
//! way (reverse it, split it). Process isolation keeps secrets from children that are not
//! entitled to them; redaction keeps entitled tools from leaking them *by accident*.
//!
//! Streaming ([`StreamRedactor`]): secrets split across chunk boundaries are caught by holding
//! back the last `max_secret_len - 1` bytes. Patterns have no length bound, so while patterns are
//! configured the stream also holds back an incomplete last line (up to [`LINE_HOLD_MAX`] bytes):
//! a pattern match that does not span a newline and is shorter than that is caught.

use std::borrow::Cow;

use regex::bytes::{NoExpand, Regex, RegexBuilder};

/// What replaces each match.
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// Longest incomplete line a [`StreamRedactor`] holds back for patterns.
pub const LINE_HOLD_MAX: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    #[error("redaction pattern {pattern:?} does not compile over bytes: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("secret values do not compile into one matcher: {source}")]
    Secrets {
        #[source]
        source: regex::Error,
    },
}

/// Redacts known secret values and patterns.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// One alternation of every form of every secret, longest first; None if there are none.
    secrets: Option<Regex>,
    patterns: Vec<Regex>,
    /// Longest needle in `secrets` (bytes).
    max_len: usize,
}

/// Unpadded base64 of `data` in `engine`'s alphabet, as bytes.
fn base64(data: &[u8], engine: &base64::engine::GeneralPurpose) -> Vec<u8> {
    base64::Engine::encode(engine, data).into_bytes()
}

const B64_STD: &base64::engine::GeneralPurpose = &base64::engine::general_purpose::STANDARD_NO_PAD;
const B64_URL: &base64::engine::GeneralPurpose = &base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Percent-encoding of every byte outside RFC 3986's unreserved set (uppercase hex). Written
/// out rather than taken from a crate: it is one loop over one fixed set, and the form searched
/// for must be exactly this one.
fn percent(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for &b in data {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// The forms of one secret that are searched for.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let lower = hex::encode(secret).into_bytes();
    let upper = hex::encode_upper(secret).into_bytes();
    let mut v = vec![
        secret.to_vec(),
        lower,
        upper,
        base64(secret, B64_STD),
        base64(secret, B64_URL),
        percent(secret),
    ];
    // As it appears inside a JSON string (quotes, backslashes, control characters escaped).
    if let Ok(text) = std::str::from_utf8(secret) {
        if let Ok(json) = serde_json::to_string(text) {
            let inner = &json.as_bytes()[1..json.len() - 1];
            v.push(inner.to_vec());
        }
    }
    v
}

/// A regex (Unicode off) matching exactly `needle`'s bytes. `regex::escape` works on `str` and
/// cannot express a byte that is not UTF-8, hence the `\xNN` escape of every other byte.
fn escape_bytes(needle: &[u8], out: &mut String) {
    for &b in needle {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
}

impl Redactor {
    /// `patterns` are compiled again over bytes (same syntax), so they also apply to output that
    /// is not UTF-8.
    pub fn new(
        secrets: Vec<Vec<u8>>,
        patterns: Vec<regex::Regex>,
    ) -> Result<Redactor, RedactError> {
        let patterns = patterns
            .iter()
            .map(|p| {
                Regex::new(p.as_str()).map_err(|source| RedactError::Pattern {
                    pattern: p.as_str().to_string(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::with_byte_patterns(secrets, patterns)
    }

    /// As [`new`](Self::new) with patterns already compiled over bytes.
    pub fn with_byte_patterns(
        secrets: Vec<Vec<u8>>,
        patterns: Vec<Regex>,
    ) -> Result<Redactor, RedactError> {
        // A value read from a file often ends with a newline that is no part of it (a key
        // file, `echo KEY > file`): the value without its trailing whitespace is searched too.
        let mut needles: Vec<Vec<u8>> = secrets
            .iter()
            .flat_map(|s| {
                let trimmed = s.trim_ascii_end();
                let mut both = vec![s.as_slice()];
                if trimmed.len() != s.len() {
                    both.push(trimmed);
                }
                both
            })
            .filter(|s| !s.is_empty())
            .flat_map(forms)
            .collect();
        // Longest first: the alternation is leftmost-first, so a longer secret that starts where
        // a shorter one does wins (nothing of it is left behind).
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        needles.dedup();
        let max_len = needles.first().map_or(0, Vec::len);
        let secrets = if needles.is_empty() {
            None
        } else {
            let mut pat = String::from("(?-u)");
            for (i, n) in needles.iter().enumerate() {
                if i > 0 {
                    pat.push('|');
                }
                escape_bytes(n, &mut pat);
            }
            let re = RegexBuilder::new(&pat)
                .unicode(false)
                .size_limit(64 << 20)
                .build()
                .map_err(|source| RedactError::Secrets { source })?;
            Some(re)
        };
        Ok(Redactor {
            secrets,
            patterns,
            max_len,
        })
    }

    /// Length of the longest form of any secret: the stream tail is one less.
    pub fn max_secret_len(&self) -> usize {
        self.max_len
    }

    /// True if there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_none() && self.patterns.is_empty()
    }

    /// True if `data` holds a secret or a pattern match.
    pub fn finds(&self, data: &[u8]) -> bool {
        self.secrets.as_ref().is_some_and(|re| re.is_match(data))
            || self.patterns.iter().any(|re| re.is_match(data))
    }

    /// `data` with every secret form and pattern match replaced by `[REDACTED]`; borrowed when
    /// nothing matched.
    pub fn redact<'a>(&self, data: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out: Cow<'a, [u8]> = Cow::Borrowed(data);
        let all = self.secrets.iter().chain(self.patterns.iter());
        for re in all {
            let replaced = match re.replace_all(&out, NoExpand(REPLACEMENT)) {
                Cow::Owned(v) => Some(v),
                Cow::Borrowed(_) => None,
            };
            if let Some(v) = replaced {
                out = Cow::Owned(v);
            }
        }
        out
    }

    /// The byte ranges of `data` that [`redact`](Self::redact) would hide (secret forms and
    /// pattern matches), sorted, with overlapping and touching ranges merged.
    pub fn ranges(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut all: Vec<(usize, usize)> = self
            .secrets
            .iter()
            .chain(self.patterns.iter())
            .flat_map(|re| re.find_iter(data).map(|m| (m.start(), m.end())))
            .filter(|(a, b)| a < b)
            .collect();
        all.sort_unstable();
        let mut out: Vec<(usize, usize)> = Vec::with_capacity(all.len());
        for (a, b) in all {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    }

    /// A streaming redactor over this one.
    pub fn stream(&self) -> StreamRedactor<'_> {
        StreamRedactor {
            redactor: self,
            buf: Vec::new(),
        }
    }
}

/// Redacts a stream given in chunks (tool stdout/stderr). Feed chunks with
/// [`push`](Self::push); what it returns is safe to forward; call [`finish`](Self::finish) at EOF
/// for the rest.
#[derive(Debug)]
pub struct StreamRedactor<'r> {
    redactor: &'r Redactor,
    /// Bytes not yet emitted.
    buf: Vec<u8>,
}

impl StreamRedactor<'_> {
    /// Adds a chunk; returns the redacted bytes that can be emitted now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(chunk);
        let hold = self.redactor.max_len.saturating_sub(1);
        if self.buf.len() <= hold {
            return Vec::new();
        }
        let mut cut = self.buf.len() - hold;
        if !self.redactor.patterns.is_empty() {
            match self.buf[..cut].iter().rposition(|&b| b == b'\n') {
                Some(nl) => cut = nl + 1,
                None if self.buf.len() < LINE_HOLD_MAX => return Vec::new(),
                None => {}
            }
        }
        // A secret that starts before the cut lies wholly in the buffer (it is at most max_len
        // long); if it ends after the cut, emit it whole now.
        if let Some(re) = &self.redactor.secrets {
            for m in re.find_iter(&self.buf) {
                if m.start() >= cut {
                    break;
                }
                if m.end() > cut {
                    cut = m.end();
                    break;
                }
            }
        }
        let out = self.redactor.redact(&self.buf[..cut]).into_owned();
        self.buf.drain(..cut);
        out
    }

    /// End of stream: the redacted remainder.
    pub fn finish(self) -> Vec<u8> {
        self.redactor.redact(&self.buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(secrets: &[&str], patterns: &[&str]) -> Redactor {
        Redactor::new(
            secrets.iter().map(|s| s.as_bytes().to_vec()).collect(),
            patterns
                .iter()
                .map(|p| regex::Regex::new(p).unwrap())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_value_with_a_trailing_newline_is_also_found_without_it() {
        let red = r(&["sk-key-123\n"], &[]);
        assert_eq!(
            red.redact(b"say sk-key-123 now").as_ref(),
            b"say [REDACTED] now"
        );
        assert_eq!(
            red.redact(b"line sk-key-123\nnext").as_ref(),
            b"line [REDACTED]next"
        );
        let b64 = base64(b"sk-key-123", B64_STD);
        assert!(red.finds(&b64));
        assert_eq!(red.ranges(b"a sk-key-123 b"), vec![(2, 12)]);
    }

    #[test]
    fn ranges_are_what_redact_hides() {
        let red = r(&["abc", "bcd"], &["x+"]);
        assert_eq!(red.ranges(b"abcd xx abc"), vec![(0, 3), (5, 7), (8, 11)]);
        assert_eq!(
            red.redact(b"abcd xx abc").as_ref(),
            b"[REDACTED]d [REDACTED] [REDACTED]"
        );
        assert!(red.ranges(b"clean").is_empty());
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b"", B64_STD), b"");
        assert_eq!(base64(b"f", B64_STD), b"Zg");
        assert_eq!(base64(b"fo", B64_STD), b"Zm8");
        assert_eq!(base64(b"foo", B64_STD), b"Zm9v");
        assert_eq!(base64(b"foobar", B64_STD), b"Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff], B64_STD), b"+/8");
        assert_eq!(base64(&[0xfb, 0xff], B64_URL), b"-_8");
    }

    #[test]
    fn raw_secret_is_replaced_everywhere_and_clean_data_is_borrowed() {
        let red = r(&["hunter2"], &[]);
        let out = red.redact(b"pw=hunter2; again hunter2.");
        assert_eq!(&*out, b"pw=[REDACTED]; again [REDACTED].");
        let clean = red.redact(b"nothing here hunter");
        assert!(matches!(clean, Cow::Borrowed(_)));
        assert!(red.finds(b"xhunter2x"));
        assert!(!red.finds(b"hunter"));
    }

    #[test]
    fn encoded_forms_are_replaced() {
        let red = r(&["s3cr3t!"], &[]);
        let hex = hex::encode(b"s3cr3t!");
        let text = format!(
            "a {hex} b {} c {} d",
            hex.to_uppercase(),
            "czNjcjN0IQ==" // base64("s3cr3t!")
        );
        let out = red.redact(text.as_bytes());
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "a [REDACTED] b [REDACTED] c [REDACTED]== d"
        );
    }

    #[test]
    fn percent_and_json_escaped_forms_are_replaced() {
        let red = r(&["p@ss \"w/rd\""], &[]);
        let out =
            red.redact(b"url ?pw=p%40ss%20%22w%2Frd%22&x json {\"pw\":\"p@ss \\\"w/rd\\\"\"}");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "url ?pw=[REDACTED]&x json {\"pw\":\"[REDACTED]\"}"
        );
        assert_eq!(percent(b"a-b_c.d~e/f"), b"a-b_c.d~e%2Ff");
    }

    #[test]
    fn non_utf8_secret_and_regex_metacharacters() {
        let red = Redactor::new(vec![vec![0xff, b'.', b'*', 0x00]], vec![]).unwrap();
        let out = red.redact(&[b'a', 0xff, b'.', b'*', 0x00, b'b', 0xff, b'x', b'*', 0x00]);
        assert_eq!(&*out, b"a[REDACTED]b\xffx*\x00");
    }

    #[test]
    fn longer_secret_wins_over_its_prefix() {
        let red = r(&["abc", "abcdef"], &[]);
        assert_eq!(&*red.redact(b"xabcdefx abcx"), b"x[REDACTED]x [REDACTED]x");
    }

    #[test]
    fn patterns_apply_and_empty_secrets_are_ignored() {
        let red = Redactor::new(
            vec![Vec::new()],
            vec![regex::Regex::new("sk-[A-Za-z0-9]{20,}").unwrap()],
        )
        .unwrap();
        assert_eq!(red.max_secret_len(), 0);
        let out = red.redact(b"key sk-abcdefghijklmnopqrstuvwxyz end");
        assert_eq!(&*out, b"key [REDACTED] end");
        assert!(matches!(red.redact(b"sk-short"), Cow::Borrowed(_)));
        assert!(r(&[], &[]).is_empty());
    }

    fn stream_all(red: &Redactor, chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = red.stream();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn stream_catches_a_secret_split_across_chunks() {
        let red = r(&["TOPSECRET"], &[]);
        let out = stream_all(&red, &[b"hello TOPS", b"ECRET world"]);
        assert_eq!(out, b"hello [REDACTED] world");
        // Split byte by byte.
        let data = b"xx TOPSECRET yy TOPSECRET";
        let chunks: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(stream_all(&red, &chunks), b"xx [REDACTED] yy [REDACTED]");
        // Without the tail, per-chunk redaction would miss it (the test can fail).
        let naive: Vec<u8> = [&b"hello TOPS"[..], b"ECRET world"]
            .iter()
            .flat_map(|c| red.redact(c).into_owned())
            .collect();
        assert_eq!(naive, b"hello TOPSECRET world");
    }

    #[test]
    fn stream_emits_early_and_holds_only_the_tail() {
        let red = r(&["0123456789"], &[]);
        // The longest form is the hex one: 20 bytes, so 19 are held back.
        assert_eq!(red.max_secret_len(), 20);
        let mut s = red.stream();
        assert_eq!(s.push(b"abcdefghijklmnopqrstuvwxyz"), b"abcdefg");
        assert_eq!(s.push(b"0123"), b"hijk");
        assert_eq!(s.finish(), b"lmnopqrstuvwxyz0123");
    }

    #[test]
    fn stream_secret_straddling_the_cut_is_emitted_whole() {
        let red = r(&["abc", "abcdefgh"], &[]);
        assert_eq!(red.max_secret_len(), 16);
        // 27 bytes, 15 held: the cut is at 12, inside "abc" (10..13).
        let mut s = red.stream();
        assert_eq!(
            s.push(b"0123456789abcXYZWVUTSRQPONM"),
            b"0123456789[REDACTED]"
        );
        assert_eq!(s.finish(), b"XYZWVUTSRQPONM");
    }

    #[test]
    fn stream_patterns_within_a_line_are_caught_across_chunks() {
        let red = r(&[], &["password=\\S+"]);
        let out = stream_all(&red, &[b"line1\npass", b"word=abc", b"def\nline3\n"]);
        assert_eq!(out, b"line1\n[REDACTED]\nline3\n");
    }

    #[test]
    fn stream_equals_whole_redaction_for_every_split_point() {
        let red = r(&["secret", "s3cr3t-long-value"], &[]);
        let data = b"a secret and s3cr3t-long-value, and ssecret s3cr3t-long-valu";
        let whole = red.redact(data).into_owned();
        for i in 0..=data.len() {
            for j in i..=data.len() {
                let got = stream_all(&red, &[&data[..i], &data[i..j], &data[j..]]);
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
    }
}
