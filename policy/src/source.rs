//! Locating byte offsets of a policy text as file:line:column, and building [`Diagnostic`]s.

use std::ops::Range;
use std::sync::Arc;

use crate::Diagnostic;

/// A TOML text being validated (a policy, or the supervisor's configuration), with a line index
/// for turning byte spans into located [`Diagnostic`]s (`file:line:column`, and the text from
/// which the offending lines are shown).
#[derive(Debug)]
pub struct Source<'a> {
    text: &'a str,
    /// The same text, shared by every diagnostic of the file.
    shared: Arc<str>,
    file: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    /// Index `text`; `file` names it in diagnostics.
    pub fn new(text: &'a str, file: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source {
            text,
            shared: Arc::from(text),
            file,
            line_starts,
        }
    }

    /// 1-based (line, column in characters) of a byte offset; offsets past the end or inside a
    /// UTF-8 sequence are clamped to the nearest valid position before them.
    pub fn locate(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while offset > 0 && !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line_idx = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let start = self.line_starts.get(line_idx).copied().unwrap_or(0);
        let col = self
            .text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(0);
        (line_idx + 1, col + 1)
    }

    /// The text of a 1-based line, without its newline.
    pub fn line_text(&self, line: usize) -> Option<String> {
        let start = *self.line_starts.get(line.checked_sub(1)?)?;
        let rest = self.text.get(start..)?;
        let end = rest.find('\n').unwrap_or(rest.len());
        Some(rest[..end].trim_end_matches('\r').to_string())
    }

    /// The byte range of a 1-based line's text, leading blanks and the newline left out (a
    /// place to point at when only the line is known).
    pub fn line_span(&self, line: usize) -> Range<usize> {
        let Some(&start) = line.checked_sub(1).and_then(|i| self.line_starts.get(i)) else {
            return 0..0;
        };
        let rest = &self.text[start..];
        let end = start + rest.find('\n').unwrap_or(rest.len());
        let text = &self.text[start..end];
        let lead = text.len() - text.trim_start().len();
        let trail = text.len() - text.trim_end().len();
        (start + lead)..(end - trail).max(start + lead)
    }

    /// A diagnostic about `span` (a byte range of the text), located at its start.
    pub fn diag(
        &self,
        span: &Range<usize>,
        message: impl Into<String>,
        expected: Option<&str>,
    ) -> Diagnostic {
        let (line, column) = self.locate(span.start);
        Diagnostic {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
            expected: expected.map(str::to_string),
            span: Some(span.clone()),
            text: Some(self.shared.clone()),
            ..Default::default()
        }
    }

    /// A TOML syntax (or serde) error as a diagnostic at its span: a message "X, expected Y" is
    /// split into the message X and the expectation Y (else `fallback_expected`), and serde's
    /// "unknown field" is said "unknown key".
    pub fn toml_error(&self, e: &toml::de::Error, fallback_expected: &str) -> Diagnostic {
        let span = e.span().unwrap_or(0..0);
        let (msg, expected) = split_expected(e.message());
        let msg = if msg.starts_with("unknown field") {
            msg.replacen("unknown field", "unknown key", 1)
        } else {
            msg
        };
        let mut d = self.diag(&span, msg, None);
        d.expected = expected.or_else(|| Some(fallback_expected.to_string()));
        d
    }

    /// 1-based line of a byte offset.
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        self.locate(offset).0
    }
}

/// Split a serde/toml message "X, expected Y" into (X, Y).
fn split_expected(msg: &str) -> (String, Option<String>) {
    let msg = msg.trim();
    match msg.find(", expected ") {
        Some(i) => (
            msg[..i].to_string(),
            Some(msg[i + ", expected ".len()..].to_string()),
        ),
        None => (msg.to_string(), None),
    }
}

/// Collects the located diagnostics of one file (a policy, or the supervisor's configuration).
#[derive(Debug)]
pub struct Sink<'a> {
    pub src: &'a Source<'a>,
    pub diags: Vec<Diagnostic>,
}

impl<'a> Sink<'a> {
    pub fn new(src: &'a Source<'a>) -> Self {
        Sink {
            src,
            diags: Vec::new(),
        }
    }

    /// An error at the start of `span`, with what was expected there.
    pub fn err(&mut self, span: &Range<usize>, message: impl Into<String>, expected: &str) {
        let d = self.src.diag(span, message, Some(expected));
        self.diags.push(d);
    }

    /// An error with a `help:` suggestion when there is one.
    pub fn err_help(
        &mut self,
        span: &Range<usize>,
        message: impl Into<String>,
        expected: &str,
        help: Option<String>,
    ) {
        let mut d = self.src.diag(span, message, Some(expected));
        d.help = help;
        self.diags.push(d);
    }

    /// Merge the errors of a later pass (`self`) with the shape errors of
    /// [`crate::toml_schema::check_and_repair`]: a later error at the exact place of a shape
    /// error comes from the placeholder that replaced the wrong value, and is dropped.
    pub fn merge_shape(mut self, shape: Vec<Diagnostic>) -> Vec<Diagnostic> {
        self.diags.retain(|d| {
            !shape
                .iter()
                .any(|s| (s.line, s.column) == (d.line, d.column))
        });
        self.diags.extend(shape);
        self.diags
    }
}
