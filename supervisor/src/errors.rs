//! Showing errors: the one place that turns an error and its sources into a line, for the CLI,
//! the service's log and the control replies alike.

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_joins_sources() {
        let e = carapace_sandbox::spawn::SpawnError::Sys {
            syscall: "clone",
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let s = error_chain(&e);
        assert!(s.starts_with("clone: "), "{s}");
        assert_eq!(s.matches("Operation not permitted").count(), 1, "{s}");
    }
}
