//! The configuration file as the validation reads it: the `toml` crate's spanned tables, once
//! checked and repaired against the schema ([`super::validate::CONFIG`], by the policy crate's
//! [`carapace_policy::toml_schema`] engine, which reports every unknown key and wrong type),
//! turned into a small tree ([`Table`], [`Entry`], [`Node`], [`Val`]), and typed getters that
//! report a located semantic error (a relative path, a bad duration, a number out of range)
//! instead of returning one. Every value has the type its key takes: the getters need not check.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use carapace_policy::toml_schema::integer;
use carapace_policy::{check_abs_path, Sink, DURATION_EXPECTED, PATH_EXPECTED};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// What a syntax error points to when the TOML reader says nothing more precise.
pub(super) const SYNTAX_EXPECTED: &str = "valid TOML (see docs/operations.md)";

// ---------------------------------------------------------------------------------------------
// The document: the `toml` crate's spanned tables, in the shapes the validation below reads.

#[derive(Debug, Clone)]
pub(super) enum Val {
    Str(String),
    Int(i64),
    Bool(bool),
    Array(Vec<Node>),
    Table(Table),
}

impl Val {
    pub(super) fn as_table(&self) -> Option<&Table> {
        match self {
            Val::Table(t) => Some(t),
            _ => None,
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

/// The repaired document as a tree. Floats and datetimes (no key takes one) and integers beyond
/// 64 bits were replaced by the schema check; should one remain, it is left out.
pub(super) fn table_of(t: &DeTable<'_>) -> Table {
    let entries = t
        .iter()
        .filter_map(|(k, v)| {
            Some(Entry {
                key: k.get_ref().to_string(),
                key_span: k.span(),
                node: node_of(v)?,
            })
        })
        .collect();
    Table { entries }
}

fn node_of(v: &Spanned<DeValue<'_>>) -> Option<Node> {
    let val = match v.get_ref() {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => Val::Int(integer(i)?),
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Float(_) | DeValue::Datetime(_) => return None,
        DeValue::Array(a) => Val::Array(a.iter().filter_map(node_of).collect()),
        DeValue::Table(t) => Val::Table(table_of(t)),
    };
    Some(Node {
        val,
        span: v.span(),
    })
}

/// A string key, with its entry; None when absent.
pub(super) fn get_str<'t>(t: &'t Table, key: &str) -> Option<(&'t str, &'t Entry)> {
    let e = t.get(key)?;
    match &e.node.val {
        Val::Str(s) => Some((s.as_str(), e)),
        _ => None,
    }
}

/// A boolean key; `default` when absent.
pub(super) fn get_bool(t: &Table, key: &str, default: bool) -> bool {
    match t.get(key).map(|e| &e.node.val) {
        Some(Val::Bool(b)) => *b,
        _ => default,
    }
}

/// A table key; None when absent.
pub(super) fn get_table<'t>(t: &'t Table, key: &str) -> Option<&'t Table> {
    t.get(key)?.node.val.as_table()
}

pub(super) fn get_path(cx: &mut Sink<'_>, t: &Table, key: &str) -> Option<PathBuf> {
    let (s, e) = get_str(t, key)?;
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
        _ => return Err("not a duration".to_string()),
    };
    carapace_policy::parse_duration(&v)
}

/// Longest duration accepted anywhere (a day): longer is a typo.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

pub(super) fn get_duration(cx: &mut Sink<'_>, t: &Table, key: &str, default: Duration) -> Duration {
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
    cx: &mut Sink<'_>,
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
        _ => None,
    }
}
