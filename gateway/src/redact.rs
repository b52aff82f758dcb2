//! Answers redacted on the way out. Every answer of the agent — to `agent.run` callers (result
//! and `agent.step` events), the OpenAI-compatible endpoint, sessions' history and channel
//! replies — passes the broker's `redact` op before anyone sees it: the broker knows the
//! secret values (the gateway never does) and the gateway profile's `redact` patterns, and
//! answers with the byte ranges to hide; each becomes [`REPLACEMENT`].
//!
//! A text longer than one request ([`MAX_REDACT_TEXT`]) is asked about in windows of that
//! size that overlap by half, so a match up to [`OVERLAP`] bytes long is found wherever it
//! lies. When the broker cannot answer, the answer is withheld (an error), never sent as is.

use carapace_broker::protocol::MAX_REDACT_TEXT;
use serde_json::Value;

use crate::app::App;
use crate::rpc::RpcError;

/// What replaces each hidden range (as the broker writes it into tool output).
pub const REPLACEMENT: &str = "[REDACTED]";
/// Bytes each window shares with the next.
pub const OVERLAP: usize = MAX_REDACT_TEXT / 2;

/// The windows `(start, end)` of `text` asked about: at most `size` bytes each, on character
/// boundaries, each starting `size - overlap` bytes (or a little less) after the last.
pub fn windows(text: &str, size: usize, overlap: usize) -> Vec<(usize, usize)> {
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = floor((start + size).min(text.len()));
        out.push((start, end));
        if end >= text.len() {
            return out;
        }
        let next = floor(end.saturating_sub(overlap));
        // Always forward, even for a window of one wide character.
        start = if next > start { next } else { end };
    }
}

/// `text` with `ranges` (byte offsets, any order, possibly overlapping; widened to character
/// boundaries) replaced by [`REPLACEMENT`].
pub fn apply(text: &str, mut ranges: Vec<(usize, usize)>) -> String {
    let len = text.len();
    for r in &mut ranges {
        r.0 = r.0.min(len);
        r.1 = r.1.min(len);
        while !text.is_char_boundary(r.0) {
            r.0 -= 1;
        }
        while !text.is_char_boundary(r.1) {
            r.1 += 1;
        }
    }
    ranges.retain(|(a, b)| a < b);
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut out = String::with_capacity(len);
    let mut at = 0;
    for (a, b) in merged {
        out.push_str(&text[at..a]);
        out.push_str(REPLACEMENT);
        at = b;
    }
    out.push_str(&text[at..]);
    out
}

/// `text` as it may leave the gateway.
pub async fn text(app: &App, text: &str) -> Result<String, RpcError> {
    if text.is_empty() {
        return Ok(String::new());
    }
    let mut ranges = Vec::new();
    for (start, end) in windows(text, MAX_REDACT_TEXT, OVERLAP) {
        let piece = text[start..end].to_string();
        let found = app.broker.redact_ranges(piece).await.map_err(|e| {
            RpcError::new(
                e.kind,
                format!(
                    "the answer could not be checked for secrets, so it is withheld: {}",
                    e.message
                ),
            )
        })?;
        ranges.extend(
            found
                .into_iter()
                .map(|(a, b)| (start + a.min(end - start), start + b.min(end - start))),
        );
    }
    Ok(if ranges.is_empty() {
        text.to_string()
    } else {
        apply(text, ranges)
    })
}

/// A chat message's `content` as it may leave the gateway: a string, or the `text` of each
/// part; anything else as it is.
pub async fn content(app: &App, content: Value) -> Result<Value, RpcError> {
    match content {
        Value::String(s) => Ok(Value::String(text(app, &s).await?)),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for mut p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    let clean = text(app, t).await?;
                    p["text"] = Value::String(clean);
                }
                out.push(p);
            }
            Ok(Value::Array(out))
        }
        other => Ok(other),
    }
}

/// Tool calls as they may be shown and stored: each `function.arguments` text redacted.
pub async fn tool_calls(app: &App, calls: &[Value]) -> Result<Vec<Value>, RpcError> {
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let mut c = c.clone();
        if let Some(args) = c["function"]["arguments"].as_str() {
            let clean = text(app, args).await?;
            c["function"]["arguments"] = Value::String(clean);
        }
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_text_and_overlap() {
        assert_eq!(windows("", 10, 5), vec![(0, 0)]);
        assert_eq!(windows("abc", 10, 5), vec![(0, 3)]);
        assert_eq!(
            windows("abcdefghijklmnopqrst", 10, 5),
            vec![(0, 10), (5, 15), (10, 20)]
        );
        // Character boundaries: 'é' is two bytes.
        let t = "é".repeat(20);
        let w = windows(&t, 9, 4);
        for (a, b) in &w {
            assert!(t.is_char_boundary(*a) && t.is_char_boundary(*b));
            assert!(b - a <= 9);
        }
        assert_eq!(w.last().map(|x| x.1), Some(t.len()));
        // Any match up to `overlap` bytes lies wholly inside one window.
        let t = "x".repeat(100);
        let w = windows(&t, 16, 8);
        for s in 0..=92 {
            assert!(w.iter().any(|(a, b)| *a <= s && s + 8 <= *b), "{s}");
        }
    }

    #[test]
    fn ranges_are_replaced_merged_and_widened() {
        assert_eq!(apply("key abc end", vec![(4, 7)]), "key [REDACTED] end");
        assert_eq!(apply("abc", vec![(0, 3)]), "[REDACTED]");
        // Overlapping and touching ranges (from two windows) give one replacement.
        assert_eq!(
            apply("a SECRET b", vec![(2, 6), (4, 8), (2, 8)]),
            "a [REDACTED] b"
        );
        assert_eq!(apply("xx", vec![(5, 9)]), "xx", "out of range: ignored");
        // A range inside a character widens to the whole character.
        assert_eq!(apply("aéb", vec![(2, 3)]), "a[REDACTED]b");
        assert_eq!(apply("clean", vec![]), "clean");
        assert_eq!(
            apply("s1 and s2", vec![(7, 9), (0, 2)]),
            "[REDACTED] and [REDACTED]"
        );
    }
}
