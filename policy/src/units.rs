//! Parsing of sizes, durations, counts and paths written in a policy.

use std::time::Duration;

/// Why a path is not acceptable (relative, or not normalized: `.`, `..`, `//`, a trailing `/`,
/// a NUL byte), or Ok.
pub fn check_abs_path(p: &str) -> Result<(), &'static str> {
    if p.contains('\0') {
        return Err("the path contains a NUL byte");
    }
    if !p.starts_with('/') {
        return Err("the path is relative");
    }
    if p == "/" {
        return Ok(());
    }
    if p.ends_with('/') {
        return Err("the path ends with `/`");
    }
    for comp in p[1..].split('/') {
        match comp {
            "" => return Err("the path contains `//`"),
            "." => return Err("the path contains a `.` component"),
            ".." => return Err("the path contains a `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// What [`check_abs_path`] accepts, in words (the "expected" of a diagnostic).
pub const PATH_EXPECTED: &str =
    "an absolute, normalized path (starts with `/`; no `.`, `..`, `//`, trailing `/` or NUL)";

pub const SIZE_EXPECTED: &str =
    "a size: an integer number of bytes, or a string like \"64MiB\" (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)";

/// Parse a size: a positive integer (bytes) or "<integer><unit>".
pub fn parse_size(v: &toml::Value) -> Result<u64, String> {
    let bytes = match v {
        toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| format!("negative size {i}"))?,
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            if num.is_empty() {
                return Err(format!("`{s}` does not start with a number"));
            }
            let n: u64 = num.parse().map_err(|_| format!("`{num}` is too large"))?;
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "K" | "KiB" => 1 << 10,
                "M" | "MiB" => 1 << 20,
                "G" | "GiB" => 1 << 30,
                "T" | "TiB" => 1 << 40,
                "KB" => 1_000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                "TB" => 1_000_000_000_000,
                other => return Err(format!("unknown size unit `{other}`")),
            };
            n.checked_mul(mult)
                .ok_or_else(|| format!("`{s}` overflows 64 bits"))?
        }
        other => return Err(format!("a {} is not a size", other.type_str())),
    };
    if bytes == 0 {
        return Err("a size of 0 is impossible".into());
    }
    Ok(bytes)
}

/// What [`parse_duration`] accepts, in words (the "expected" of a diagnostic).
pub const DURATION_EXPECTED: &str =
    "a duration: an integer number of seconds, or a string like \"300s\", \"5m\", \"1h\", \"500ms\"";

/// Parse a duration: an integer number of seconds, or a string `"<integer><unit>"` with unit
/// `ms`, `s` (or none), `m`/`min` or `h`. Zero, negative and overflowing durations are refused;
/// the error says why.
pub fn parse_duration(v: &toml::Value) -> Result<Duration, String> {
    let d = match v {
        toml::Value::Integer(i) => {
            Duration::from_secs(u64::try_from(*i).map_err(|_| format!("negative duration {i}"))?)
        }
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            if num.is_empty() {
                return Err(format!("`{s}` does not start with a number"));
            }
            let n: u64 = num.parse().map_err(|_| format!("`{num}` is too large"))?;
            let secs = |mult: u64| {
                n.checked_mul(mult)
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("`{s}` is too long"))
            };
            match unit.trim() {
                "ms" => Duration::from_millis(n),
                "" | "s" => secs(1)?,
                "m" | "min" => secs(60)?,
                "h" => secs(3600)?,
                other => return Err(format!("unknown duration unit `{other}`")),
            }
        }
        other => return Err(format!("a {} is not a duration", other.type_str())),
    };
    if d.is_zero() {
        return Err("a duration of 0 is impossible".into());
    }
    Ok(d)
}

/// A positive integer count, at most `max`.
pub(crate) fn parse_count(v: &toml::Value, max: u64) -> Result<u64, String> {
    match v {
        toml::Value::Integer(i) => {
            let n = u64::try_from(*i).map_err(|_| format!("negative count {i}"))?;
            if n == 0 {
                Err("a count of 0 is impossible".into())
            } else if n > max {
                Err(format!("{n} is larger than the maximum {max}"))
            } else {
                Ok(n)
            }
        }
        other => Err(format!("a {} is not a count", other.type_str())),
    }
}

/// CPU cores (integer or float) to millicores.
pub(crate) fn parse_cpu(v: &toml::Value) -> Result<u64, String> {
    let cores = match v {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        other => return Err(format!("a {} is not a number of cores", other.type_str())),
    };
    if !cores.is_finite() || cores <= 0.0 {
        return Err(format!("{cores} cores is impossible"));
    }
    if cores > 4096.0 {
        return Err("more than 4096 cores".into());
    }
    let millis = (cores * 1000.0).round() as u64;
    if millis == 0 {
        return Err(format!("{cores} cores is less than one millicore"));
    }
    Ok(millis)
}

/// A file mode: an integer (TOML allows 0o1777) or an octal string ("1777", "0o1777").
pub(crate) fn parse_mode(v: &toml::Value) -> Result<u32, String> {
    let m = match v {
        toml::Value::Integer(i) => u32::try_from(*i).map_err(|_| format!("bad mode {i}"))?,
        toml::Value::String(s) => {
            let t = s.trim_start_matches("0o");
            u32::from_str_radix(t, 8).map_err(|_| format!("`{s}` is not an octal mode"))?
        }
        other => return Err(format!("a {} is not a mode", other.type_str())),
    };
    if m > 0o7777 {
        return Err(format!("mode {m:o} has bits beyond 07777"));
    }
    Ok(m)
}

/// Human form of a byte count.
pub(crate) fn fmt_bytes(b: u64) -> String {
    const UNITS: &[(u64, &str)] = &[
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (m, u) in UNITS {
        if b >= *m && b % m == 0 {
            return format!("{} {u}", b / m);
        }
    }
    format!("{b} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert!(check_abs_path("/usr/bin").is_ok());
        assert!(check_abs_path("/").is_ok());
        for bad in [
            "usr",
            "/usr/",
            "/usr//bin",
            "/usr/./bin",
            "/usr/../etc",
            "/a\0b",
            "",
        ] {
            assert!(check_abs_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        let s = |x: &str| parse_size(&toml::Value::String(x.into()));
        assert_eq!(s("64MiB"), Ok(64 << 20));
        assert_eq!(s("1K"), Ok(1024));
        assert_eq!(s("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size(&toml::Value::Integer(5)), Ok(5));
        assert!(s("0MiB").is_err());
        assert!(s("10XB").is_err());
        assert!(s("99999999999999999999").is_err());
        assert!(s("20000000TiB").is_err());
        assert!(s("MiB").is_err());
        assert!(parse_size(&toml::Value::Integer(-1)).is_err());
        assert!(parse_size(&toml::Value::Boolean(true)).is_err());
    }

    #[test]
    fn durations() {
        let d = |x: &str| parse_duration(&toml::Value::String(x.into()));
        assert_eq!(d("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert!(d("0s").is_err());
        assert!(d("soon").is_err());
        assert!(d("5 fortnights").is_err());
        assert!(parse_duration(&toml::Value::Integer(0)).is_err());
    }

    #[test]
    fn cpu_and_counts() {
        assert_eq!(parse_cpu(&toml::Value::Float(1.5)), Ok(1500));
        assert!(parse_cpu(&toml::Value::Float(0.0)).is_err());
        assert!(parse_cpu(&toml::Value::Float(f64::NAN)).is_err());
        assert!(parse_count(&toml::Value::Integer(0), 10).is_err());
        assert!(parse_count(&toml::Value::Integer(11), 10).is_err());
        assert_eq!(parse_mode(&toml::Value::String("1777".into())), Ok(0o1777));
    }
}
