//! The configuration file as the validation reads it: the `toml` crate's spanned tables turned
//! into a small tree ([`Table`], [`Entry`], [`Node`], [`Val`]), the diagnostics collected while
//! reading it ([`Cx`]), and typed getters that report a located error (with a "did you mean"
//! for unknown keys) instead of returning one.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use carapace_policy::{check_abs_path, Diagnostic, Source, DURATION_EXPECTED, PATH_EXPECTED};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

// ---------------------------------------------------------------------------------------------
// Diagnostics.

/// What a syntax error points to when the TOML reader says nothing more precise.
pub(super) const SYNTAX_EXPECTED: &str = "valid TOML (see docs/operations.md)";

/// Collects the diagnostics of one file.
#[derive(Debug)]
pub(super) struct Cx<'a> {
    pub(super) src: &'a Source<'a>,
    pub(super) diags: Vec<Diagnostic>,
}

impl Cx<'_> {
    pub(super) fn err(&mut self, span: &Range<usize>, message: impl Into<String>, expected: &str) {
        let expected = (!expected.is_empty()).then_some(expected);
        self.diags.push(self.src.diag(span, message, expected));
    }
}

// ---------------------------------------------------------------------------------------------
// The document: the `toml` crate's spanned tables, in the shapes the validation below reads.

#[derive(Debug, Clone)]
pub(super) enum Val {
    Str(String),
    Int(i64),
    Bool(bool),
    /// No key takes one: kept only to say so, located.
    Float,
    /// No key takes one: kept only to say so, located.
    Datetime,
    Array(Vec<Node>),
    Table(Table),
}

impl Val {
    pub(super) fn type_name(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Bool(_) => "a boolean",
            Val::Float => "a float",
            Val::Datetime => "a datetime",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) val: Val,
    /// Byte range of the value in the file.
    pub(super) span: Range<usize>,
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) key_span: Range<usize>,
    pub(super) node: Node,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Table {
    pub(super) entries: Vec<Entry>,
}

impl Table {
    pub(super) fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

/// Deepest nesting of arrays and tables accepted (no key needs more than 3).
pub(super) const MAX_DEPTH: usize = 32;

/// Read `text` as TOML: every syntax error is reported (located), and then nothing else.
pub(super) fn read_document(text: &str, cx: &mut Cx<'_>) -> Table {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in &syntax {
            let d = cx.src.toml_error(e, SYNTAX_EXPECTED);
            cx.diags.push(d);
        }
        return Table::default();
    }
    table_of(doc.get_ref(), cx, 0)
}

pub(super) fn table_of(t: &DeTable<'_>, cx: &mut Cx<'_>, depth: usize) -> Table {
    let entries = t
        .iter()
        .filter_map(|(k, v)| {
            Some(Entry {
                key: k.get_ref().to_string(),
                key_span: k.span(),
                node: node_of(v, cx, depth)?,
            })
        })
        .collect();
    Table { entries }
}

/// A value; None (and an error) for an integer beyond 64 bits or nesting beyond [`MAX_DEPTH`].
pub(super) fn node_of(v: &Spanned<DeValue<'_>>, cx: &mut Cx<'_>, depth: usize) -> Option<Node> {
    let span = v.span();
    if depth > MAX_DEPTH {
        cx.err(
            &span,
            "values nested too deeply",
            "at most 32 levels of arrays and tables",
        );
        return None;
    }
    let val = match v.get_ref() {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(digits.trim_start_matches('+'), i.radix()) {
                Ok(n) => Val::Int(n),
                Err(_) => {
                    cx.err(
                        &span,
                        format!("`{i}` is not an integer that fits in 64 bits"),
                        "an integer from -9223372036854775808 to 9223372036854775807",
                    );
                    return None;
                }
            }
        }
        DeValue::Float(_) => Val::Float,
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Datetime(_) => Val::Datetime,
        DeValue::Array(a) => {
            Val::Array(a.iter().filter_map(|n| node_of(n, cx, depth + 1)).collect())
        }
        DeValue::Table(t) => Val::Table(table_of(t, cx, depth + 1)),
    };
    Some(Node { val, span })
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// The closest of `known` to `key`, when close enough to be a likely typo.
pub(super) fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Report every key of `t` not in `known`.
pub(super) fn unknown_keys(cx: &mut Cx<'_>, t: &Table, known: &[&str], what: &str) {
    for e in &t.entries {
        if known.contains(&e.key.as_str()) {
            continue;
        }
        let msg = match did_you_mean(&e.key, known) {
            Some(k) => format!("unknown key `{}` in {what}; did you mean `{k}`?", e.key),
            None => format!("unknown key `{}` in {what}", e.key),
        };
        let names: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        cx.err(&e.key_span, msg, &format!("one of {}", names.join(", ")));
    }
}

/// `e` as a table, or an error.
pub(super) fn as_table<'t>(cx: &mut Cx<'_>, e: &'t Entry, what: &str) -> Option<&'t Table> {
    match &e.node.val {
        Val::Table(t) => Some(t),
        other => {
            cx.err(
                &e.node.span,
                format!("{what} must be a table, not {}", other.type_name()),
                &format!("a [{what}] table"),
            );
            None
        }
    }
}

pub(super) fn type_err(cx: &mut Cx<'_>, e: &Entry, expected: &str) {
    cx.err(
        &e.node.span,
        format!("invalid type: {} for `{}`", e.node.val.type_name(), e.key),
        expected,
    );
}

pub(super) fn get_str<'t>(
    cx: &mut Cx<'_>,
    t: &'t Table,
    key: &str,
    expected: &str,
) -> Option<(&'t str, &'t Entry)> {
    let e = t.get(key)?;
    match &e.node.val {
        Val::Str(s) => Some((s.as_str(), e)),
        _ => {
            type_err(cx, e, expected);
            None
        }
    }
}

pub(super) fn get_bool(cx: &mut Cx<'_>, t: &Table, key: &str, default: bool) -> bool {
    match t.get(key) {
        None => default,
        Some(Entry {
            node: Node {
                val: Val::Bool(b), ..
            },
            ..
        }) => *b,
        Some(e) => {
            type_err(cx, e, "true or false");
            default
        }
    }
}

pub(super) fn get_path(cx: &mut Cx<'_>, t: &Table, key: &str) -> Option<PathBuf> {
    let (s, e) = get_str(cx, t, key, PATH_EXPECTED)?;
    match check_abs_path(s) {
        Ok(()) => Some(PathBuf::from(s)),
        Err(why) => {
            cx.err(
                &e.node.span,
                format!("`{key}` = {s:?}: {why}"),
                PATH_EXPECTED,
            );
            None
        }
    }
}

/// A duration: integer seconds, or "<integer><ms|s|m|min|h>"; zero is refused.
pub(super) fn parse_duration(v: &Val) -> Result<Duration, String> {
    let v = match v {
        Val::Int(i) => toml::Value::Integer(*i),
        Val::Str(s) => toml::Value::String(s.clone()),
        other => return Err(format!("{} is not a duration", other.type_name())),
    };
    carapace_policy::parse_duration(&v)
}

/// Longest duration accepted anywhere (a day): longer is a typo.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

pub(super) fn get_duration(cx: &mut Cx<'_>, t: &Table, key: &str, default: Duration) -> Duration {
    let Some(e) = t.get(key) else {
        return default;
    };
    match parse_duration(&e.node.val) {
        Ok(d) if d <= MAX_DURATION => d,
        Ok(_) => {
            cx.err(
                &e.node.span,
                format!("`{key}` is longer than a day"),
                "a duration of at most 24h",
            );
            default
        }
        Err(why) => {
            cx.err(&e.node.span, format!("`{key}`: {why}"), DURATION_EXPECTED);
            default
        }
    }
}

/// An integer in `range`, or None (and an error) when written wrong; None when absent.
pub(super) fn get_int(
    cx: &mut Cx<'_>,
    t: &Table,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Option<i64> {
    let e = t.get(key)?;
    let expected = format!("an integer from {} to {}", range.start(), range.end());
    match &e.node.val {
        Val::Int(i) if range.contains(i) => Some(*i),
        Val::Int(i) => {
            cx.err(
                &e.node.span,
                format!("`{key}` = {i} is out of range"),
                &expected,
            );
            None
        }
        _ => {
            type_err(cx, e, &expected);
            None
        }
    }
}
