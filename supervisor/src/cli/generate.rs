//! `carapace completions SHELL` and `carapace manpages DIR`: shell completions and manual pages
//! generated from the clap definitions of [`Cli`], so they cannot drift from the real options.
//! The Debian package (supervisor/packaging/build-deb) ships what these write.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;
use crate::errors::error_chain;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write completions for
    #[arg(value_name = "SHELL")]
    pub shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// Directory the pages are written to (created if missing)
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Why manual pages could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot create the directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot render the manual page {name}: {source}")]
    Render {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The clap command as the generators see it: built (so every subcommand has its display name,
/// `carapace-policy-check`, ...) and without clap's own `help` subcommand.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The completion script for `shell`, as text.
pub fn completions_script(shell: Shell) -> Vec<u8> {
    let mut cmd = command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "carapace", &mut out);
    out
}

/// `carapace completions SHELL`: the script on stdout.
pub fn completions(a: CompletionsArgs) -> i32 {
    let script = completions_script(a.shell);
    let mut out = io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("carapace: completions: {e}");
            1
        }
    }
}

/// Every manual page: `carapace.1`, then one per visible subcommand at any depth
/// (`carapace-exec.1`, `carapace-policy-check.1`, ...), as (file name, roff text).
pub fn manpages_render() -> Result<Vec<(String, Vec<u8>)>, GenerateError> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, Vec<u8>)>) -> Result<(), GenerateError> {
        // Every page says which carapace it documents (a subcommand has no version of its own).
        let man = clap_mangen::Man::new(cmd.clone())
            .source(format!("carapace {}", env!("CARGO_PKG_VERSION")))
            .manual("carapace manual");
        let name = man.get_filename();
        let mut text = Vec::new();
        man.render(&mut text)
            .map_err(|source| GenerateError::Render {
                name: name.clone(),
                source,
            })?;
        out.push((name, text));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out)?;
        }
        Ok(())
    }
    let mut pages = Vec::new();
    walk(&command(), &mut pages)?;
    Ok(pages)
}

/// Write every page of [`manpages_render`] into `dir`; returns the files written.
pub fn write_manpages(dir: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    std::fs::create_dir_all(dir).map_err(|source| GenerateError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, text) in manpages_render()? {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| GenerateError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// `carapace manpages DIR`: the pages written, one path a line on stdout.
pub fn manpages(a: ManpagesArgs) -> i32 {
    match write_manpages(&a.dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            0
        }
        Err(e) => {
            eprintln!("carapace: manpages: {}", error_chain(&e));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = String::from_utf8(completions_script(shell)).unwrap();
            for sub in ["exec", "policy", "run", "approvals", "completions"] {
                assert!(s.contains(sub), "{shell}: no {sub} in\n{s}");
            }
            // The generator's own `help` subcommand is left out (`--help` is there).
            assert!(!s.contains("carapace__help"), "{shell}");
        }
    }

    #[test]
    fn manpages_one_per_subcommand_with_a_title_header() {
        let pages = manpages_render().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "carapace.1",
            "carapace-exec.1",
            "carapace-policy.1",
            "carapace-policy-check.1",
            "carapace-run.1",
            "carapace-completions.1",
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        assert!(!names.contains(&"carapace-manpages.1"), "hidden: {names:?}");
        let version = format!("\"carapace {}\"", env!("CARGO_PKG_VERSION"));
        for (name, text) in &pages {
            let t = String::from_utf8_lossy(text);
            let th = t
                .lines()
                .find(|l| l.starts_with(".TH "))
                .unwrap_or_default();
            let title = name.trim_end_matches(".1");
            assert!(th.starts_with(&format!(".TH {title} 1 ")), "{name}: {th}");
            assert!(th.contains(&version), "{name}: {th}");
        }
    }

    #[test]
    fn manpages_written_to_a_directory_or_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("man1");
        let files = write_manpages(&dir).unwrap();
        assert!(files.len() > 10, "{files:?}");
        assert!(dir.join("carapace-exec.1").is_file());

        // A file where the directory should be.
        let blocked = tmp.path().join("file");
        std::fs::write(&blocked, "x").unwrap();
        let e = write_manpages(&blocked.join("man1")).unwrap_err();
        assert!(matches!(e, GenerateError::CreateDir { .. }), "{e}");
        assert!(error_chain(&e).contains("file/man1"), "{}", error_chain(&e));
    }
}
