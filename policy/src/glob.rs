//! A glob whose matcher is built the first time it is asked to match.
//!
//! `globset` turns a glob into a regex automaton (`compile_matcher`), which costs far more than
//! parsing it: with the default policy, building every rule's matcher was a visible part of a
//! one-shot `carapace exec`, whose decision usually stops at one of the first rules. The glob is
//! parsed (and its errors reported) when the policy is validated; the automaton is built once,
//! on first use, and shared by every thread that holds the policy.

use std::path::Path;
use std::sync::OnceLock;

use globset::{Glob, GlobMatcher};

/// A parsed glob and, once used, its matcher.
#[derive(Debug, Clone)]
pub struct LazyGlob {
    glob: Glob,
    matcher: OnceLock<GlobMatcher>,
}

impl LazyGlob {
    /// A glob that `GlobBuilder::build` accepted.
    pub fn new(glob: Glob) -> LazyGlob {
        LazyGlob {
            glob,
            matcher: OnceLock::new(),
        }
    }

    /// Whether `path` matches, exactly as `glob.compile_matcher().is_match(path)`.
    pub fn is_match(&self, path: impl AsRef<Path>) -> bool {
        self.matcher
            .get_or_init(|| self.glob.compile_matcher())
            .is_match(path)
    }

    /// Whether the matcher has been built (for tests).
    #[cfg(test)]
    fn built(&self) -> bool {
        self.matcher.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use globset::GlobBuilder;

    fn glob(s: &str, literal_separator: bool) -> LazyGlob {
        LazyGlob::new(
            GlobBuilder::new(s)
                .literal_separator(literal_separator)
                .backslash_escape(true)
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn matches_as_the_compiled_matcher_does_and_builds_it_once_on_first_use() {
        let g = glob("/usr/bin/*", true);
        assert!(!g.built());
        assert!(g.is_match("/usr/bin/ls"));
        assert!(g.built());
        assert!(!g.is_match("/usr/bin/x/ls"), "literal separator kept");
        assert!(!g.is_match("/usr/sbin/ls"));
        let args = glob("--out=*", false);
        assert!(args.is_match("--out=a/b"));
        assert!(!args.is_match("--in=a"));
        // A clone of a used glob keeps its matcher; a clone of an unused one builds its own.
        assert!(g.clone().built());
        let unused = glob("*.txt", false);
        let copy = unused.clone();
        assert!(copy.is_match("a.txt"));
        assert!(copy.built() && !unused.built());
    }
}
