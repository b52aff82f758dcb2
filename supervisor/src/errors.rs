//! Showing errors: the one place that turns an error and its sources into a line, for the CLI,
//! the service's log and the control replies alike.

/// An error and its sources, joined with ": " (the sandbox crate's, so that the spawner's
/// answers read the same).
pub use carapace_sandbox::error_chain;

/// The policy or configuration diagnostics behind an error, if it is (or wraps) them.
pub fn diagnostics_in<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e carapace_policy::Diagnostics> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<carapace_policy::Diagnostics>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

/// Whether output on stderr is for a person who wants colour: stderr is a terminal and
/// `NO_COLOR` (no-color.org) is unset.
pub fn stderr_wants_colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// An error for a person: located policy or configuration errors drawn rustc-style (in colour
/// when `colour`), anything else as its [`error_chain`].
pub fn for_a_person(e: &(dyn std::error::Error + 'static), colour: bool) -> String {
    match diagnostics_in(e) {
        Some(d) => d.render(colour),
        None => error_chain(e),
    }
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

    #[test]
    fn located_errors_are_found_behind_the_errors_that_carry_them() {
        let text = "version = 1\nbogus = 3\n";
        let d = carapace_policy::Policy::parse(text, "p.toml").unwrap_err();
        let e = crate::service::ServiceError::Policy(d);
        assert!(diagnostics_in(&e).is_some());
        let shown = for_a_person(&e, false);
        assert!(shown.starts_with("error: unknown key `bogus`"), "{shown}");
        assert!(for_a_person(&e, true).contains('\x1b'));
        // Anything else is its chain.
        let io = std::io::Error::other("boom");
        assert!(diagnostics_in(&io).is_none());
        assert_eq!(for_a_person(&io, true), "boom");
    }
}
