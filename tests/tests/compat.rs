//! The compatibility suite: real programs doing real work under the profile the default policy
//! gives them, and the things each profile must refuse.
//!
//! Every case runs the real `carapace exec` binary on the embedded default policy with its
//! `ask` rules turned into `allow` (as if a person had approved every run: the profile, and so
//! the confinement, is exactly the default policy's). A case is a list of steps in one fresh
//! workspace; each step names the profile the default policy must choose for it (read from
//! `carapace exec --verbose`), and the case says whether its last step works or is refused, and
//! what its output must contain either way (a refusal must be the refusal we mean, not some
//! other failure). The suite prints a table (program, profile, expected, result) on stderr and
//! into `target/compat-table.txt`, and fails on any mismatch.
//!
//! What the cases need is installed by `.ci/test` (make, gcc, Debian's cargo, python3-venv,
//! python3-pytest, python3-wheel, nodejs, npm, git, zip, unzip, sqlite3, jq, patch, perl,
//! util-linux's `script`). A missing program is a failure that says what to install, never a
//! skip.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use carapace_tests::*;

/// One step's time limit: a cargo build of a small crate is the slowest.
const STEP_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Works,
    Refused,
}

impl Expect {
    fn word(self) -> &'static str {
        match self {
            Expect::Works => "works",
            Expect::Refused => "refused",
        }
    }
}

/// A step: the profile the default policy must choose, and the command.
type Step = (&'static str, &'static [&'static str]);

struct Case {
    /// What the table shows in its first column.
    name: &'static str,
    /// Programs the case needs on the host (checked first; a missing one fails the case).
    needs: &'static [&'static str],
    /// Workspace files: (relative path, content, executable).
    files: &'static [(&'static str, &'static str, bool)],
    /// Steps, run in order in the same workspace; all but the last must work.
    steps: &'static [Step],
    /// What the last step must do.
    expect: Expect,
    /// Texts the last step's stdout or stderr must all contain.
    shows: &'static [&'static str],
}

// ---- workspace files ---------------------------------------------------------------------

const HELLO_C: &str = r#"#include <stdio.h>
int main(void) { puts("hello from a program built in the workspace"); return 0; }
"#;

const MAKEFILE: &str = "\
# Recipes make runs through /bin/sh after its child's no-op setresuid.
all: hello
\t./hello
\techo recipe-$$((6 * 7)) | tr a-z A-Z

hello: hello.c
\tcc -O1 -Wall -o $@ $<

tmp:
\tcc -o /tmp/hello-tmp hello.c
\t/tmp/hello-tmp

tty:
\tscript -qec tty /dev/null

net:
\tpython3 net.py

mknod:
\tpython3 mknod.py

setuid:
\tpython3 setuid.py
";

const NET_PY: &str = r#"import socket
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2)
    print("CONNECTED")
except OSError as e:
    print("BLOCKED:", type(e).__name__, e.errno)
    raise SystemExit(1)
"#;

const MKNOD_PY: &str = r#"import os, stat
os.mkfifo("a-fifo")
print("fifo ok", stat.S_ISFIFO(os.stat("a-fifo").st_mode))
try:
    os.mknod("null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    print("DEVICE CREATED")
except OSError as e:
    print("BLOCKED:", type(e).__name__, e.errno)
    raise SystemExit(1)
"#;

const SETUID_PY: &str = r#"import os
os.setresuid(-1, os.getuid(), -1)
os.setuid(os.getuid())
print("same ids ok", os.getresuid())
try:
    os.setuid(0)
    print("BECAME ROOT")
except OSError as e:
    print("BLOCKED:", type(e).__name__, e.errno)
    raise SystemExit(1)
"#;

const CARGO_TOML: &str = r#"[package]
name = "compat"
version = "0.1.0"
edition = "2018"
build = "build.rs"

[dependencies]
"#;

const BUILD_RS: &str = r#"fn main() {
    // A build script is a program cargo compiles into target/ and runs.
    println!("cargo:rustc-env=COMPAT_BUILT_BY=build.rs");
}
"#;

const LIB_RS: &str = r#"pub fn answer() -> u32 {
    6 * 7
}

pub fn built_by() -> &'static str {
    env!("COMPAT_BUILT_BY")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit() {
        assert_eq!(super::answer(), 42);
        assert_eq!(super::built_by(), "build.rs");
    }

    #[test]
    fn threads_and_tempfiles() {
        let dir = std::env::temp_dir().join("compat-unit");
        std::fs::create_dir_all(&dir).unwrap();
        let h: Vec<_> = (0..4).map(|i| std::thread::spawn(move || i * 2)).collect();
        let sum: i32 = h.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(sum, 12);
    }
}
"#;

const IT_RS: &str = r#"#[test]
fn integration() {
    assert_eq!(compat::answer(), 42);
    // A test may run other programs.
    let out = std::process::Command::new("sh").arg("-c").arg("echo child").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "child\n");
}
"#;

const SETUP_PY: &str = r#"from setuptools import setup
setup(name="greet", version="1.0", py_modules=["greet"])
"#;

const GREET_PY: &str = r#"def greet(name):
    return f"hello, {name}"
"#;

const TEST_GREET_PY: &str = r#"import subprocess, sys
import greet

def test_greet():
    assert greet.greet("pytest") == "hello, pytest"

def test_tmp_path(tmp_path):
    (tmp_path / "f").write_text("x")
    assert (tmp_path / "f").read_text() == "x"

def test_subprocess():
    out = subprocess.run([sys.executable, "-c", "import greet; print(greet.__file__)"],
                         capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout
"#;

const PACKAGE_JSON: &str = r#"{
  "name": "compat",
  "version": "1.0.0",
  "private": true,
  "scripts": { "test": "node test.js && echo npm-script-ok" }
}
"#;

const NPMRC: &str = "offline=true\nupdate-notifier=false\nfund=false\naudit=false\n";

const TEST_JS: &str = r#"const { execFileSync, spawnSync } = require("child_process");
const out = execFileSync(process.execPath, ["-e", "console.log(6 * 7)"]).toString().trim();
if (out !== "42") { console.error("bad child output", out); process.exit(1); }
const sh = spawnSync("sh", ["-c", "echo from-sh"]);
if (sh.stdout.toString().trim() !== "from-sh") { console.error("sh failed", sh); process.exit(1); }
require("fs").writeFileSync("/tmp/node-tmp", "x");
console.log("node child processes ok:", out);
"#;

const GIT_SH: &str = r#"set -eu
export GIT_AUTHOR_NAME=compat GIT_AUTHOR_EMAIL=compat@example.invalid
export GIT_COMMITTER_NAME=compat GIT_COMMITTER_EMAIL=compat@example.invalid
git init -q -b main repo
cd repo
echo one > f && git add f && git commit -qm one
git checkout -qb topic
echo two >> f && git commit -qam two
git checkout -q main
echo other > g && git add g && git commit -qm other
git checkout -q topic
git rebase -q main
git log --oneline | wc -l | tr -d ' ' > /tmp/count
cd ..
git clone -q repo clone
cd clone && git gc -q && git fsck 2>/dev/null
echo "git ok: $(cat /tmp/count) commits after rebase, clone has $(git rev-list --count HEAD)"
"#;

const FEATURES_SH: &str = r#"set -eu
# pipes
n=$(seq 1 100 | grep -c 7)
# process substitution
diff <(printf 'a\nb\n') <(printf 'a\nb\n')
# coproc
coproc UP { tr a-z A-Z; }
echo hello >&"${UP[1]}"
exec {UP[1]}>&-
read -r shout <&"${UP[0]}"
wait
# mkfifo
mkfifo /tmp/pipe
( echo through-fifo > /tmp/pipe ) &
read -r via < /tmp/pipe
wait
# job control without a terminal: a job, listed, killed by its job number (in a shell of its
# own, whose job table holds only that job: the jobs above may still be listed as done here)
st=$(bash -c 'set -m; sleep 30 & jobs > /tmp/jobs; kill %1; st=0; wait %1 || st=$?; echo $st')
echo "features ok: $n $shout $via $(wc -l < /tmp/jobs) $st"
"#;

const PY_SH: &str = r#"import asyncio, multiprocessing, sqlite3, subprocess, tempfile, threading

def square(x):
    return x * x

async def main():
    await asyncio.sleep(0.01)
    p = await asyncio.create_subprocess_exec("echo", "async", stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    return out.decode().strip()

if __name__ == "__main__":
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(i)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(square, range(5))
    q = multiprocessing.Queue()
    pr = multiprocessing.Process(target=q.put, args=("from-process",))
    pr.start(); msg = q.get(); pr.join()
    sub = subprocess.run(["sh", "-c", "echo sub"], capture_output=True, text=True).stdout.strip()
    db = sqlite3.connect(tempfile.mktemp(dir="/tmp"))
    db.execute("create table t (x)"); db.execute("insert into t values (42)")
    (x,) = db.execute("select x from t").fetchone()
    print("python ok:", len(results), sum(squares), msg, sub, asyncio.run(main()), x)
"#;

const FIX_DIFF: &str = "--- notes.txt\n+++ notes.txt\n@@ -1 +1 @@\n-old line\n+new line\n";

const DATA_JSON: &str = r#"{"tools": [{"name": "jq", "ok": true}, {"name": "sed", "ok": false}]}"#;

// ---- the cases ---------------------------------------------------------------------------

const CASES: &[Case] = &[
    // The build profile: build tools, and what they build runs.
    Case {
        name: "make: recipes compile a C program and run it",
        needs: &["make", "cc"],
        files: &[("Makefile", MAKEFILE, false), ("hello.c", HELLO_C, false)],
        steps: &[("build", &["make"])],
        expect: Expect::Works,
        shows: &["hello from a program built in the workspace"],
    },
    Case {
        name: "make: a program compiled into /tmp runs from there",
        needs: &["make", "cc"],
        files: &[("Makefile", MAKEFILE, false), ("hello.c", HELLO_C, false)],
        steps: &[("build", &["make", "tmp"])],
        expect: Expect::Works,
        shows: &["hello from a program built in the workspace"],
    },
    Case {
        name: "cc: compile, then make runs the binary",
        needs: &["make", "cc"],
        files: &[("Makefile", MAKEFILE, false), ("hello.c", HELLO_C, false)],
        steps: &[
            ("build", &["cc", "-o", "hello", "hello.c"]),
            ("build", &["make", "all"]),
        ],
        expect: Expect::Works,
        shows: &["RECIPE-42"],
    },
    Case {
        name: "cargo: build script, unit and integration tests, offline",
        needs: &["/usr/bin/cargo"],
        files: &[
            ("Cargo.toml", CARGO_TOML, false),
            ("build.rs", BUILD_RS, false),
            ("src/lib.rs", LIB_RS, false),
            ("tests/it.rs", IT_RS, false),
        ],
        steps: &[("build", &["/usr/bin/cargo", "test", "--offline"])],
        expect: Expect::Works,
        shows: &["test result: ok. 1 passed"],
    },
    Case {
        name: "python: venv, build and install a local wheel, pytest",
        needs: &["python3"],
        files: &[
            ("greet/setup.py", SETUP_PY, false),
            ("greet/greet.py", GREET_PY, false),
            ("tests/test_greet.py", TEST_GREET_PY, false),
        ],
        steps: &[
            ("build", &["python3", "-m", "venv", "--system-site-packages", "venv"]),
            (
                "build",
                &[
                    "venv/bin/python3",
                    "-m",
                    "pip",
                    "wheel",
                    "--no-index",
                    "--no-build-isolation",
                    "--no-deps",
                    "-w",
                    "dist",
                    "./greet",
                ],
            ),
            (
                "build",
                &[
                    "venv/bin/python3",
                    "-m",
                    "pip",
                    "install",
                    "--no-index",
                    "dist/greet-1.0-py3-none-any.whl",
                ],
            ),
            ("build", &["venv/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]),
        ],
        expect: Expect::Works,
        shows: &["3 passed"],
    },
    Case {
        name: "node: child_process (node, sh) and /tmp",
        needs: &["node"],
        files: &[("test.js", TEST_JS, false)],
        steps: &[("build", &["node", "test.js"])],
        expect: Expect::Works,
        shows: &["node child processes ok: 42"],
    },
    Case {
        name: "npm: an npm script, offline",
        needs: &["npm", "node"],
        files: &[
            ("package.json", PACKAGE_JSON, false),
            (".npmrc", NPMRC, false),
            ("test.js", TEST_JS, false),
        ],
        steps: &[("build", &["npm", "test"])],
        expect: Expect::Works,
        shows: &["npm-script-ok"],
    },
    Case {
        name: "a program built in the workspace, started on its own",
        needs: &["cc"],
        files: &[("hello.c", HELLO_C, false)],
        steps: &[
            ("build", &["cc", "-o", "hello", "hello.c"]),
            ("build", &["./hello"]),
        ],
        expect: Expect::Works,
        shows: &["hello from a program built in the workspace"],
    },
    Case {
        name: "a script in the workspace, started on its own",
        needs: &["sh"],
        files: &[("run.sh", "#!/bin/sh\necho \"SCRIPT RAN as $0\"\n", true)],
        steps: &[("build", &["./run.sh"])],
        expect: Expect::Works,
        shows: &["SCRIPT RAN as /dev/fd/"],
    },
    Case {
        name: "script: a pseudo-terminal from the private devpts",
        needs: &["make", "script"],
        files: &[("Makefile", MAKEFILE, false)],
        steps: &[("build", &["make", "-s", "tty"])],
        expect: Expect::Works,
        shows: &["/dev/pts/"],
    },
    Case {
        name: "python: FIFOs yes, device nodes no (build)",
        needs: &["make", "python3"],
        files: &[("Makefile", MAKEFILE, false), ("mknod.py", MKNOD_PY, false)],
        steps: &[("build", &["make", "-s", "mknod"])],
        expect: Expect::Refused,
        shows: &["fifo ok True", "BLOCKED: PermissionError"],
    },
    Case {
        name: "python: same-id set*id yes, setuid(0) no (build)",
        needs: &["make", "python3"],
        files: &[("Makefile", MAKEFILE, false), ("setuid.py", SETUID_PY, false)],
        steps: &[("build", &["make", "-s", "setuid"])],
        expect: Expect::Refused,
        shows: &["same ids ok (1000, 1000, 1000)", "BLOCKED: PermissionError"],
    },
    Case {
        name: "network from a build (127.0.0.1)",
        needs: &["make", "python3"],
        files: &[("Makefile", MAKEFILE, false), ("net.py", NET_PY, false)],
        steps: &[("build", &["make", "-s", "net"])],
        expect: Expect::Refused,
        shows: &["BLOCKED: PermissionError"],
    },
    // The strict tool profile: everyday tools work; nothing written can run.
    Case {
        name: "git: init, commit, rebase, clone, gc, fsck",
        needs: &["bash", "git"],
        files: &[("git.sh", GIT_SH, false)],
        steps: &[("tool", &["bash", "git.sh"])],
        expect: Expect::Works,
        shows: &["git ok: 3 commits after rebase, clone has 3"],
    },
    Case {
        name: "bash: pipes, <(), coproc, mkfifo, job control without a tty",
        needs: &["bash"],
        files: &[("features.sh", FEATURES_SH, false)],
        steps: &[("tool", &["bash", "features.sh"])],
        expect: Expect::Works,
        shows: &["features ok: 19 HELLO through-fifo 1 143"],
    },
    Case {
        name: "python: threads, multiprocessing, asyncio, subprocess, sqlite3",
        needs: &["python3"],
        files: &[("py.py", PY_SH, false)],
        steps: &[("tool", &["python3", "py.py"])],
        expect: Expect::Works,
        shows: &["python ok: 8 30 from-process sub async 42"],
    },
    Case {
        name: "perl: fork and wait",
        needs: &["perl"],
        files: &[],
        steps: &[(
            "tool",
            &[
                "perl",
                "-e",
                "my $p = fork(); if ($p == 0) { exit 7 } waitpid($p, 0); print 'perl ok: ', $? >> 8, \"\\n\"",
            ],
        )],
        expect: Expect::Works,
        shows: &["perl ok: 7"],
    },
    Case {
        name: "tar: create and list a compressed archive",
        needs: &["tar", "gzip"],
        files: &[("data/a.txt", "alpha\n", false), ("data/b.txt", "beta\n", false)],
        steps: &[
            ("tool", &["tar", "czf", "a.tgz", "data"]),
            ("tool", &["tar", "tzf", "a.tgz"]),
        ],
        expect: Expect::Works,
        shows: &["data/b.txt"],
    },
    Case {
        name: "zip and unzip",
        needs: &["zip", "unzip"],
        files: &[("data/a.txt", "alpha\n", false)],
        steps: &[
            ("tool", &["zip", "-qr", "a.zip", "data"]),
            ("tool", &["unzip", "-o", "-d", "out", "a.zip"]),
        ],
        expect: Expect::Works,
        shows: &["out/data/a.txt"],
    },
    Case {
        name: "sqlite3: create, insert, query",
        needs: &["sqlite3"],
        files: &[],
        steps: &[(
            "tool",
            &[
                "sqlite3",
                "db.sqlite",
                "create table t (x); insert into t values (6 * 7); select 'sqlite ok: ' || x from t;",
            ],
        )],
        expect: Expect::Works,
        shows: &["sqlite ok: 42"],
    },
    Case {
        name: "jq: filter a JSON file",
        needs: &["jq"],
        files: &[("data.json", DATA_JSON, false)],
        steps: &[("tool", &["jq", "-r", ".tools[] | select(.ok) | \"jq ok: \" + .name", "data.json"])],
        expect: Expect::Works,
        shows: &["jq ok: jq"],
    },
    Case {
        name: "patch: apply a unified diff",
        needs: &["patch"],
        files: &[("notes.txt", "old line\n", false), ("fix.diff", FIX_DIFF, false)],
        steps: &[
            ("tool", &["patch", "-i", "fix.diff"]),
            ("tool", &["cat", "notes.txt"]),
        ],
        expect: Expect::Works,
        shows: &["new line"],
    },
    Case {
        name: "a program written to the workspace cannot run (tool)",
        needs: &["sh", "cc"],
        files: &[("hello.c", HELLO_C, false)],
        steps: &[("tool", &["sh", "-c", "cc -o hello hello.c && ./hello"])],
        expect: Expect::Refused,
        shows: &["Permission denied"],
    },
    Case {
        name: "a script in the workspace cannot run (tool)",
        needs: &["sh"],
        files: &[("run.sh", "#!/bin/sh\necho SCRIPT RAN\n", true)],
        steps: &[("tool", &["sh", "-c", "./run.sh"])],
        expect: Expect::Refused,
        shows: &["Permission denied"],
    },
    Case {
        name: "a program copied to /tmp cannot run (tool)",
        needs: &["sh"],
        files: &[],
        steps: &[("tool", &["sh", "-c", "cp /usr/bin/true /tmp/t && /tmp/t"])],
        expect: Expect::Refused,
        shows: &["Permission denied"],
    },
    Case {
        name: "network (tool)",
        needs: &["python3"],
        files: &[("net.py", NET_PY, false)],
        steps: &[("tool", &["python3", "net.py"])],
        expect: Expect::Refused,
        shows: &["BLOCKED: PermissionError"],
    },
    Case {
        name: "no pseudo-terminal in the tool profile",
        needs: &["script"],
        files: &[],
        steps: &[("tool", &["script", "-qec", "tty", "/dev/null"])],
        expect: Expect::Refused,
        shows: &["script: "],
    },
];

// ---- running them ------------------------------------------------------------------------

/// The default policy with every `ask` turned into `allow`: the profiles and the rules' choice
/// of profile are exactly the default's.
fn approved_policy(dir: &Path) -> PathBuf {
    let text = default_policy_text();
    let asks = text.matches("approval = \"ask\"").count();
    assert!(asks > 0, "the default policy has no `ask` rule to approve");
    let path = dir.join("approved.toml");
    fs::write(
        &path,
        text.replace("approval = \"ask\"", "approval = \"allow\""),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn on_host(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    ["/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).is_file())
}

/// The profile `carapace exec --verbose` says it chose.
fn chosen_profile(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("profile: "))
        .map(str::trim)
}

struct Row {
    name: &'static str,
    program: String,
    profile: String,
    expected: Expect,
    result: String,
    ok: bool,
    detail: String,
}

fn run_case(case: &Case, policy: &Path) -> Row {
    let mut programs: Vec<&str> = Vec::new();
    for (_, argv) in case.steps {
        if !programs.contains(&argv[0]) {
            programs.push(argv[0]);
        }
    }
    let program = programs.join(", ");
    let mut row = Row {
        name: case.name,
        program,
        profile: String::new(),
        expected: case.expect,
        result: String::new(),
        ok: false,
        detail: String::new(),
    };
    let missing: Vec<&str> = case.needs.iter().copied().filter(|p| !on_host(p)).collect();
    if !missing.is_empty() {
        row.result = "missing".into();
        row.detail = format!(
            "not installed on this host: {} (.ci/test installs them)",
            missing.join(", ")
        );
        return row;
    }
    let ws = tempdir("carapace-compat-");
    for (rel, content, exec) in case.files {
        let p = ws.path().join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        let mode = if *exec { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
    }
    for (i, (profile, argv)) in case.steps.iter().enumerate() {
        let last = i + 1 == case.steps.len();
        let mut cmd = carapace_exec(Some(policy), ws.path(), &["--verbose"], argv[0], &argv[1..]);
        cmd.current_dir(ws.path());
        let out = run(&mut cmd, STEP_LIMIT);
        let chosen = chosen_profile(&out.stderr).unwrap_or("?").to_string();
        row.profile = chosen.clone();
        if chosen != *profile {
            row.result = format!("ran in profile {chosen}");
            row.detail = format!(
                "step {} ({}) should run in profile {profile}\n{}",
                i + 1,
                argv.join(" "),
                out.describe()
            );
            return row;
        }
        let worked = out.code == Some(0) && !out.hung;
        let shown = case
            .shows
            .iter()
            .all(|t| out.stdout.contains(t) || out.stderr.contains(t));
        if !last {
            if !worked {
                row.result = format!("step {} failed", i + 1);
                row.detail = format!("step {} ({})\n{}", i + 1, argv.join(" "), out.describe());
                return row;
            }
            continue;
        }
        row.result = match (worked, out.hung) {
            (_, true) => "hung".into(),
            (true, _) => "works".into(),
            (false, _) => match out.code {
                Some(c) => format!("refused (exit {c})"),
                None => format!("refused (signal {:?})", out.signal),
            },
        };
        row.ok = match case.expect {
            Expect::Works => worked && shown,
            Expect::Refused => !worked && !out.hung && shown,
        };
        if !row.ok {
            row.detail = format!(
                "last step ({}) should be {} and show {:?}\n{}",
                argv.join(" "),
                case.expect.word(),
                case.shows,
                out.describe()
            );
        }
    }
    row
}

fn table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let wp = rows
        .iter()
        .map(|r| r.program.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w$}  {:<wp$}  {:<7}  {:<8}  {:<20}  match",
        "case", "program", "profile", "expected", "result"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<w$}  {:<wp$}  {:<7}  {:<8}  {:<20}  {}",
            r.name,
            r.program,
            r.profile,
            r.expected.word(),
            r.result,
            if r.ok { "yes" } else { "NO" }
        );
    }
    s
}

#[test]
fn real_tools_under_the_default_policy() {
    if !privileged() {
        return;
    }
    let scratch = tempdir("carapace-compat-policy-");
    let policy = approved_policy(scratch.path());
    let rows: Vec<Row> = CASES.iter().map(|c| run_case(c, &policy)).collect();
    let text = table(&rows);
    eprintln!("\n{text}");
    let out = repo_root().join("target/compat-table.txt");
    if let Err(e) = fs::write(&out, &text) {
        eprintln!("(could not write {}: {e})", out.display());
    }
    let failures: Vec<String> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("== {} ==\n{}", r.name, r.detail))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} compatibility cases do not match their expectation:\n\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n\n")
    );
}
