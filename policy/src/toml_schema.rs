//! A declarative schema for TOML files (which keys exist, what type each value has), checked on
//! the `toml` crate's spanned document *before* anything reads it, so that every unknown key and
//! every wrong type of a file is reported at once, located. Both the policy (`schema.rs`) and
//! the supervisor's configuration describe their files with [`Kind`]s and run
//! [`check_and_repair`]; what remains for them is semantics.
//!
//! Unknown keys are removed and wrongly typed values replaced by placeholders of the right
//! type, so that the repaired document can be read on and its other errors reported too. A
//! placeholder's errors are located exactly where its type error is: callers drop them in favour
//! of it.

use std::borrow::Cow;
use std::ops::Range;

use toml::de::{DeArray, DeInteger, DeTable, DeValue};
use toml::Spanned;

use crate::source::Sink;

/// The keys of a table, each with the kind of its value.
pub type Fields = &'static [(&'static str, Kind)];

/// Expected shape of one value.
#[derive(Debug)]
pub enum Kind {
    Str,
    /// An integer that fits in 64 bits.
    Int,
    /// An integer from 0 to 4294967295.
    U32,
    Bool,
    /// An integer (of 64 bits) or a string (sizes, durations, modes, groups).
    IntOrStr,
    /// An integer or a float (cpu cores).
    Number,
    Array(&'static Kind),
    /// A value of this kind, or an array of them.
    OneOrArray(&'static Kind),
    /// A table with these keys only.
    Table(Fields),
    /// A table with any keys, each value of this kind.
    Map(&'static Kind),
    /// A table whose keys depend on the string value of its key `tag` (which `common` lists):
    /// the `common` keys, and those of the variant the tag names. Without the tag, a key of a
    /// variant is an error that names the variant; with a tag naming no variant (the caller
    /// reports that), the keys of every variant are accepted.
    Tagged {
        tag: &'static str,
        common: Fields,
        variants: &'static [(&'static str, Fields)],
    },
}

use Kind::*;

/// Expected text for an integer that does not fit in 64 bits.
const I64_EXPECTED: &str = "an integer from -9223372036854775808 to 9223372036854775807";

/// The value of a TOML integer, None when it does not fit in 64 bits.
pub fn integer(i: &DeInteger) -> Option<i64> {
    let digits = i.as_str().replace('_', "");
    i64::from_str_radix(digits.trim_start_matches('+'), i.radix()).ok()
}

/// The closest of `known` to `key`, when close enough to be a likely typo.
pub fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "string",
        DeValue::Integer(_) => "integer",
        DeValue::Float(_) => "float",
        DeValue::Boolean(_) => "boolean",
        DeValue::Datetime(_) => "datetime",
        DeValue::Array(_) => "array",
        DeValue::Table(_) => "table",
    }
}

fn expected(kind: &Kind) -> String {
    match kind {
        Str => "a string".into(),
        Int => "an integer".into(),
        U32 => "an integer from 0 to 4294967295".into(),
        Bool => "a boolean (true or false)".into(),
        IntOrStr => "an integer or a string".into(),
        Number => "a number".into(),
        Array(sub) => format!("an array of {}", plural(sub)),
        OneOrArray(sub) => format!("{}, or an array of them", expected(sub)),
        Table(_) | Map(_) | Tagged { .. } => "a table".into(),
    }
}

fn plural(kind: &Kind) -> &'static str {
    match kind {
        Str => "strings",
        Int | U32 => "integers",
        Bool => "booleans",
        IntOrStr => "integers or strings",
        Number => "numbers",
        Array(_) | OneOrArray(_) => "arrays",
        Table(_) | Map(_) | Tagged { .. } => "tables",
    }
}

/// Whether an integer value is out of the range of `kind` (which takes integers).
fn out_of_range(kind: &Kind, i: &DeInteger) -> bool {
    match kind {
        U32 => {
            let digits = i.as_str().replace('_', "");
            u32::from_str_radix(digits.trim_start_matches('+'), i.radix()).is_err()
        }
        Int | IntOrStr | Number => integer(i).is_none(),
        _ => false,
    }
}

fn type_ok(kind: &Kind, v: &DeValue<'_>) -> bool {
    matches!(
        (kind, v),
        (Str, DeValue::String(_))
            | (Int | U32, DeValue::Integer(_))
            | (Bool, DeValue::Boolean(_))
            | (IntOrStr, DeValue::Integer(_) | DeValue::String(_))
            | (Number, DeValue::Integer(_) | DeValue::Float(_))
            | (Array(_) | OneOrArray(_), DeValue::Array(_))
            | (Table(_) | Map(_) | Tagged { .. }, DeValue::Table(_))
    ) || matches!(kind, OneOrArray(sub) if type_ok(sub, v))
}

/// A value of the right type that stands in for a wrongly typed one.
fn placeholder(kind: &Kind) -> DeValue<'static> {
    match kind {
        Str | IntOrStr => DeValue::String(Cow::Borrowed("")),
        Bool => DeValue::Boolean(false),
        Int | U32 | Number => match DeValue::parse("0") {
            Ok(v) => v.into_inner(),
            Err(_) => DeValue::Boolean(false),
        },
        Array(_) | OneOrArray(_) => DeValue::Array(DeArray::new()),
        Table(_) | Map(_) | Tagged { .. } => DeValue::Table(DeTable::new()),
    }
}

/// Check `doc` against `schema` (a [`Kind::Table`] of the top level), reporting every unknown
/// key (with a "did you mean" when one is close) and every wrong type into `sink`; unknown keys
/// are removed and wrongly typed values replaced by placeholders.
pub fn check_and_repair(doc: &mut Spanned<DeTable<'_>>, schema: &Kind, sink: &mut Sink<'_>) {
    check_table(doc.get_mut(), schema, "the top level", "", sink);
}

/// A key as written in a table header: bare when it can be, else quoted.
fn header_key(k: &str) -> Cow<'_, str> {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Cow::Borrowed(k)
    } else {
        Cow::Owned(format!("{k:?}"))
    }
}

fn check_table(t: &mut DeTable<'_>, kind: &Kind, what: &str, path: &str, sink: &mut Sink<'_>) {
    let join = |key: &str| {
        if path.is_empty() {
            header_key(key).into_owned()
        } else {
            format!("{path}.{}", header_key(key))
        }
    };
    // The keys allowed here, and (for a tagged table without its tag) the variants' keys,
    // which are errors of their own.
    let (known, orphans): (Vec<&'static (&'static str, Kind)>, Option<(&str, _)>) = match kind {
        Table(fields) => (fields.iter().collect(), None),
        Tagged {
            tag,
            common,
            variants,
        } => {
            let value = t.get(*tag).map(|v| match v.get_ref() {
                DeValue::String(s) => Some(s.to_string()),
                _ => None,
            });
            let chosen = value
                .as_ref()
                .and_then(|v| variants.iter().find(|(n, _)| Some(*n) == v.as_deref()));
            let mut known: Vec<_> = common.iter().collect();
            match chosen {
                Some((_, fields)) => known.extend(fields.iter()),
                None => known.extend(variants.iter().flat_map(|(_, f)| f.iter())),
            }
            let orphans = value.is_none().then_some((*tag, *variants));
            (known, orphans)
        }
        Map(sub) => {
            for (k, v) in t.iter_mut() {
                let key: &str = k.get_ref();
                check_value(v, sub, key, &join(key), false, sink);
            }
            return;
        }
        _ => return,
    };
    let mut names: Vec<&str> = Vec::new();
    for (n, _) in &known {
        if !names.contains(n) {
            names.push(n);
        }
    }
    // (key, its span, message, expected, help)
    type Wrong = (String, Range<usize>, String, String, Option<String>);
    let mut wrong: Vec<Wrong> = Vec::new();
    for (k, _) in t.iter() {
        let key: &str = k.get_ref();
        if !names.contains(&key) {
            let list: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            wrong.push((
                key.to_string(),
                k.span(),
                format!("unknown key `{key}` in {what}"),
                format!("one of {}", list.join(", ")),
                did_you_mean(key, &names).map(|m| format!("did you mean `{m}`?")),
            ));
        } else if let Some((tag, variants)) = orphans {
            let common_key =
                matches!(kind, Tagged { common, .. } if common.iter().any(|(n, _)| *n == key));
            if let Some((variant, _)) = variants
                .iter()
                .find(|(_, f)| !common_key && f.iter().any(|(n, _)| *n == key))
            {
                wrong.push((
                    key.to_string(),
                    k.span(),
                    format!("`{key}` is a key of {tag} = \"{variant}\", and {what} has no `{tag}`"),
                    format!("{tag} = \"{variant}\" in {what}"),
                    Some(format!(
                        "set {tag} = \"{variant}\" in {what}, or remove `{key}`"
                    )),
                ));
            }
        }
    }
    for (key, span, msg, expected, help) in wrong {
        sink.err_help(&span, msg, &expected, help);
        t.remove(key.as_str());
    }
    for (k, v) in t.iter_mut() {
        let key: &str = k.get_ref();
        if let Some((_, sub)) = known.iter().find(|(name, _)| *name == key) {
            check_value(v, sub, key, &join(key), false, sink);
        }
    }
}

/// Check one value; `path` is its dotted path, `element` whether it is an item of an array.
fn check_value(
    v: &mut Spanned<DeValue<'_>>,
    kind: &Kind,
    key: &str,
    path: &str,
    element: bool,
    sink: &mut Sink<'_>,
) {
    let span: Range<usize> = v.span();
    let bad = match v.get_ref() {
        DeValue::Integer(i) if type_ok(kind, v.get_ref()) && out_of_range(kind, i) => {
            let want = if matches!(kind, U32) {
                expected(kind)
            } else {
                I64_EXPECTED.to_string()
            };
            Some((format!("integer {i} out of range for `{key}`"), want))
        }
        other if !type_ok(kind, other) => Some((
            format!("invalid type: {} for `{key}`", type_name(other)),
            expected(kind),
        )),
        _ => None,
    };
    if let Some((msg, want)) = bad {
        sink.err(&span, msg, &want);
        *v = Spanned::new(span, placeholder(kind));
        return;
    }
    if let OneOrArray(sub) = kind {
        if !matches!(v.get_ref(), DeValue::Array(_)) {
            return check_value(v, sub, key, path, element, sink);
        }
    }
    match (kind, v.get_mut()) {
        (Array(sub) | OneOrArray(sub), DeValue::Array(items)) => {
            for item in items.iter_mut() {
                check_value(item, sub, key, path, true, sink);
            }
        }
        (Table(_) | Map(_) | Tagged { .. }, DeValue::Table(t)) => {
            let what = if element {
                format!("[[{path}]]")
            } else {
                format!("[{path}]")
            };
            check_table(t, kind, &what, path, sink);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    const INNER: Kind = Table(&[("size", Int), ("name", Str)]);
    const ITEM: Kind = Table(&[("path", Str)]);
    const SHAPE: Kind = Table(&[
        ("inner", INNER),
        ("items", Array(&ITEM)),
        ("files", OneOrArray(&Str)),
        ("gid", U32),
        ("env", Map(&Str)),
        ("child", Map(&CHILD)),
    ]);
    const CHILD: Kind = Tagged {
        tag: "kind",
        common: &[("kind", Str), ("program", Str)],
        variants: &[
            ("mail", &[("smtp", Str), ("port", Int)]),
            ("hook", &[("listen", Str)]),
        ],
    };

    /// `line:column: message (expected)` of each error in order, and the repaired document.
    fn check(text: &str) -> (Vec<String>, String) {
        let src = Source::new(text, "t.toml");
        let mut sink = Sink::new(&src);
        let (mut doc, syntax) = DeTable::parse_recoverable(text);
        assert!(syntax.is_empty(), "{syntax:?}");
        check_and_repair(&mut doc, &SHAPE, &mut sink);
        // Tables are not ordered: the callers sort their diagnostics by place.
        sink.diags.sort_by_key(|d| (d.line, d.column));
        let errs = sink
            .diags
            .iter()
            .map(|d| {
                let want = d.expected.as_deref().unwrap_or("");
                let help = d
                    .help
                    .as_deref()
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                format!("{}:{}: {}{help} ({want})", d.line, d.column, d.message)
            })
            .collect();
        (errs, format!("{:?}", doc.get_ref()))
    }

    #[test]
    fn unknown_keys_are_named_with_their_table_and_a_close_key() {
        let (e, doc) = check("sise = 1\n[inner]\nsise = 1\nnmae = \"x\"\ncolour = 2\n");
        assert_eq!(
            e,
            vec![
                "1:1: unknown key `sise` in the top level (one of `inner`, `items`, `files`, \
                 `gid`, `env`, `child`)",
                "3:1: unknown key `sise` in [inner]; did you mean `size`? (one of `size`, `name`)",
                "4:1: unknown key `nmae` in [inner]; did you mean `name`? (one of `size`, `name`)",
                "5:1: unknown key `colour` in [inner] (one of `size`, `name`)",
            ]
        );
        // Removed from the document.
        assert!(!doc.contains("sise") && !doc.contains("colour"), "{doc}");
        let (e, _) = check("[[items]]\npaht = \"/x\"\n[child.\"a b\"]\nprogam = \"p\"\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("2:1: unknown key `paht` in [[items]]; did you mean `path`?"));
        assert!(
            e[1].starts_with(
                "4:1: unknown key `progam` in [child.\"a b\"]; did you mean `program`?"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_types_and_ranges_are_reported_and_replaced() {
        let (e, doc) = check(
            "gid = -1\nfiles = [1, \"a\"]\n[inner]\nsize = 99999999999999999999\nname = 1.5\n[env]\nA = true\nB = \"ok\"\n",
        );
        assert_eq!(
            e,
            vec![
                "1:7: integer -1 out of range for `gid` (an integer from 0 to 4294967295)",
                "2:10: invalid type: integer for `files` (a string)",
                "4:8: integer 99999999999999999999 out of range for `size` (an integer from \
                 -9223372036854775808 to 9223372036854775807)",
                "5:8: invalid type: float for `name` (a string)",
                "7:5: invalid type: boolean for `A` (a string)",
            ]
        );
        assert!(
            !doc.contains("99999999999999999999") && !doc.contains("1.5"),
            "{doc}"
        );
        // One value or an array of them; anything else names both.
        assert!(check("files = \"a\"\n").0.is_empty());
        assert!(check("files = [\"a\", \"b\"]\n").0.is_empty());
        assert_eq!(
            check("files = 3\n").0,
            vec!["1:9: invalid type: integer for `files` (a string, or an array of them)"]
        );
    }

    #[test]
    fn tagged_tables_take_the_keys_of_their_variant() {
        // The variant's keys, and the common ones.
        assert!(
            check("[child.a]\nkind = \"mail\"\nsmtp = \"s\"\nport = 25\nprogram = \"p\"\n")
                .0
                .is_empty()
        );
        // Another variant's key is unknown; a typo of the variant's key gets a suggestion; the
        // variant's keys are type-checked.
        let (e, _) =
            check("[child.a]\nkind = \"mail\"\nlisten = \"x\"\nsmpt = \"s\"\nport = \"25\"\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with(
                "3:1: unknown key `listen` in [child.a] (one of `kind`, `program`, `smtp`, `port`)"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("4:1: unknown key `smpt` in [child.a]; did you mean `smtp`?"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("5:8: invalid type: string for `port`"),
            "{e:?}"
        );
        // Without the tag, a variant's key says which variant it belongs to.
        let (e, doc) = check("[child.a]\nprogram = \"p\"\nlisten = \"x\"\n");
        assert_eq!(
            e,
            vec!["3:1: `listen` is a key of kind = \"hook\", and [child.a] has no `kind`; set kind = \"hook\" in [child.a], or remove `listen` (kind = \"hook\" in [child.a])"]
        );
        assert!(!doc.contains("listen"), "{doc}");
        // A tag naming no variant (the caller reports it): every variant's keys are accepted.
        assert!(
            check("[child.a]\nkind = \"irc\"\nlisten = \"x\"\nsmtp = \"s\"\n")
                .0
                .is_empty()
        );
        let (e, _) = check("[child.a]\nkind = 3\nbogus = 1\n");
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn did_you_mean_only_for_close_keys() {
        assert_eq!(did_you_mean("memroy", &["memory", "pids"]), Some("memory"));
        assert_eq!(did_you_mean("colour", &["memory", "pids"]), None);
        assert_eq!(
            did_you_mean("x", &["y"]),
            None,
            "a one-letter key is not a typo of another"
        );
    }
}
