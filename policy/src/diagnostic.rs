//! Located errors in a policy or configuration file, and their rendering in the style of rustc:
//! the message, `--> file:line:column`, the offending source lines with the span underlined and
//! labelled, secondary labels ("first used here") and a `help:` line. The layout is drawn by
//! `annotate-snippets` (the renderer rustc and cargo use), plain or in colour.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};

/// Another place in the same file that a [`Diagnostic`] refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Byte range in the file's text.
    pub span: Range<usize>,
    pub message: String,
}

/// One located error in a policy or configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
    /// What was expected there, in words (e.g. "an absolute, normalized path"); the label under
    /// the underlined span.
    pub expected: Option<String>,
    /// The bytes of the file the error is about, underlined when shown (None: the error has no
    /// place in the file, e.g. a profile name given on the command line).
    pub span: Option<Range<usize>>,
    /// Other places the error refers to, each underlined with its own label.
    pub labels: Vec<Label>,
    /// A suggestion shown as `help:` (e.g. "did you mean `memory`?").
    pub help: Option<String>,
    /// The file's text (shared by every diagnostic of the file) from which the lines are shown.
    pub text: Option<Arc<str>>,
}

impl Diagnostic {
    /// With a secondary label at `span`.
    pub fn with_label(mut self, span: Range<usize>, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: message.into(),
        });
        self
    }

    /// With a `help:` line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// The diagnostic as JSON for scripts: `file`, `line`, `column`, `message`, `expected`,
    /// `help`, `span` (`[start, end)` bytes or null) and `labels` (each `span` and `message`).
    pub fn to_json(&self) -> serde_json::Value {
        let span = |r: &Range<usize>| serde_json::json!({ "start": r.start, "end": r.end });
        serde_json::json!({
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "message": self.message,
            "expected": self.expected,
            "help": self.help,
            "span": self.span.as_ref().map(span),
            "labels": self.labels.iter().map(|l| serde_json::json!({
                "span": span(&l.span),
                "message": l.message,
            })).collect::<Vec<_>>(),
        })
    }

    /// The diagnostic drawn rustc-style; `colour` adds ANSI colours (only for a terminal).
    pub fn render(&self, colour: bool) -> String {
        let renderer = if colour {
            Renderer::styled()
        } else {
            Renderer::plain()
        };
        let origin = format!("{}:{}:{}", self.file, self.line, self.column);
        let title = Level::ERROR.primary_title(self.message.as_str());
        let shown = match (&self.text, &self.span) {
            (Some(text), Some(span)) => Some((text, self.visible(text, span))),
            _ => None,
        };
        let mut groups: Vec<Group<'_>> = Vec::new();
        match shown {
            Some((text, span)) => {
                let mut primary = AnnotationKind::Primary.span(span);
                if let Some(e) = &self.expected {
                    primary = primary.label(format!("expected {e}"));
                }
                let mut snippet = Snippet::source(&**text)
                    .path(self.file.as_str())
                    .fold(true)
                    .annotation(primary);
                for l in &self.labels {
                    let span = self.visible(text, &l.span);
                    snippet = snippet
                        .annotation(AnnotationKind::Context.span(span).label(l.message.as_str()));
                }
                groups.push(title.element(snippet));
            }
            None => {
                // No line to show: the place and the expectation as plain notes.
                let mut g = title.element(Level::NOTE.message(format!("in {origin}")));
                if let Some(e) = &self.expected {
                    g = g.element(Level::NOTE.message(format!("expected {e}")));
                }
                groups.push(g);
            }
        }
        if let Some(h) = &self.help {
            groups.push(Group::with_title(Level::HELP.secondary_title(h.as_str())));
        }
        renderer.render(&groups)
    }

    /// `span` made safe to draw: within the text, on char boundaries, and cut at the end of its
    /// first line (a span over a whole table would otherwise draw the table).
    fn visible(&self, text: &str, span: &Range<usize>) -> Range<usize> {
        let clamp = |mut i: usize| {
            i = i.min(text.len());
            while i > 0 && !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        let start = clamp(span.start);
        let mut end = clamp(span.end.max(span.start));
        if let Some(nl) = text[start..end].find('\n') {
            end = start + nl;
        }
        start..end
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostic {}

/// All errors found in one file (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Every diagnostic drawn rustc-style, a blank line between them.
    pub fn render(&self, colour: bool) -> String {
        self.0
            .iter()
            .map(|d| d.render(colour))
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, needle: &str) -> Range<usize> {
        let i = text.find(needle).unwrap();
        i..i + needle.len()
    }

    fn diag(text: &str, needle: &str, message: &str) -> Diagnostic {
        let span = at(text, needle);
        let before = &text[..span.start];
        Diagnostic {
            file: "p.toml".into(),
            line: before.matches('\n').count() + 1,
            column: before.rsplit('\n').next().unwrap().chars().count() + 1,
            message: message.into(),
            expected: Some("a size".into()),
            span: Some(span),
            text: Some(text.into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_span_is_underlined_under_its_line_with_the_expectation() {
        let text = "[profiles.p.limits]\nmemory = \"12 parsecs\"\n";
        let d = diag(text, "\"12 parsecs\"", "unknown size unit `parsecs`");
        let shown = d.to_string();
        assert_eq!(
            shown,
            "error: unknown size unit `parsecs`\n --> p.toml:2:10\n  |\n2 | memory = \"12 parsecs\"\n  |          ^^^^^^^^^^^^ expected a size"
        );
    }

    #[test]
    fn secondary_labels_and_help_are_shown() {
        let text = "a = 1\nb = 2\nc = 3\n";
        let d = diag(text, "c", "duplicate")
            .with_label(at(text, "a"), "first used here")
            .with_help("did you mean `d`?");
        let shown = d.to_string();
        assert!(shown.contains("1 | a = 1"), "{shown}");
        assert!(shown.contains("- first used here"), "{shown}");
        assert!(shown.contains("^ expected a size"), "{shown}");
        assert!(shown.ends_with("help: did you mean `d`?"), "{shown}");
    }

    #[test]
    fn json_carries_the_place_the_help_and_the_labels() {
        let text = "a = 1\nb = 2\n";
        let d = diag(text, "b", "dup")
            .with_label(at(text, "a"), "first used here")
            .with_help("rename it");
        let j = d.to_json();
        assert_eq!(j["line"], 2);
        assert_eq!(j["column"], 1);
        assert_eq!(j["span"]["start"], 6);
        assert_eq!(j["help"], "rename it");
        assert_eq!(j["labels"][0]["message"], "first used here");
        assert_eq!(j["labels"][0]["span"]["end"], 1);
    }

    #[test]
    fn colour_only_when_asked() {
        let text = "x = 1\n";
        let d = diag(text, "1", "bad");
        assert!(!d.render(false).contains('\x1b'));
        assert!(d.render(true).contains('\x1b'));
    }

    #[test]
    fn spans_outside_the_text_or_over_lines_are_drawn_safely() {
        let text = "[t]\nk = \"é\"\n";
        let mut d = diag(text, "[t]", "whole table");
        d.span = Some(0..text.len());
        let shown = d.to_string();
        assert!(shown.contains("^^^"), "{shown}");
        assert!(!shown.contains("k = "), "only the first line: {shown}");
        d.span = Some(1000..2000);
        let _ = d.to_string();
        let i = text.find('é').unwrap() + 1;
        d.span = Some(i..i + 1);
        let _ = d.to_string();
    }

    #[test]
    fn without_a_place_in_the_file_it_says_where_and_what() {
        let d = Diagnostic {
            file: "p.toml".into(),
            line: 1,
            column: 1,
            message: "no profile named `x`".into(),
            expected: Some("one of: a, b".into()),
            ..Default::default()
        };
        let shown = d.to_string();
        assert!(shown.starts_with("error: no profile named `x`"), "{shown}");
        assert!(shown.contains("p.toml:1:1"), "{shown}");
        assert!(shown.contains("expected one of: a, b"), "{shown}");
    }
}
