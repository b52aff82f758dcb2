//! From the raw TOML shape to the validated model: resolve `extends`, check every value, and
//! collect every error with its location.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::GlobBuilder;

use crate::glob::LazyGlob;

use crate::model::*;
use crate::plan::{Namespaces, SandboxUser, SeccompAction};
use crate::source::Sink;
use crate::tables;
use crate::units::*;
use crate::Approval;

/// Filesystem access written for a mount or the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    ReadExec,
    ReadWrite,
    ReadWriteExec,
}

impl Access {
    pub(crate) fn writable(self) -> bool {
        matches!(self, Access::ReadWrite | Access::ReadWriteExec)
    }
    pub(crate) fn exec(self) -> bool {
        matches!(self, Access::ReadExec | Access::ReadWriteExec)
    }
}

const ACCESS_EXPECTED: &str = "one of \"read\", \"read-exec\", \"read-write\", \"read-write-exec\"";

fn parse_access(s: &str) -> Option<Access> {
    Some(match s {
        "read" => Access::Read,
        "read-exec" => Access::ReadExec,
        "read-write" => Access::ReadWrite,
        "read-write-exec" => Access::ReadWriteExec,
        _ => return None,
    })
}

/// A mount's or the workspace's `access`, or an error at its span when the word is unknown.
fn access_of(sink: &mut Sink<'_>, a: &S<String>) -> Option<Access> {
    let r = parse_access(a.get_ref());
    if r.is_none() {
        sink.err(
            &a.span(),
            format!("unknown access `{}`", a.get_ref()),
            ACCESS_EXPECTED,
        );
    }
    r
}

#[derive(Debug, Clone)]
pub(crate) struct MountSpec {
    pub path: PathBuf,
    pub access: Access,
    pub optional: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct TmpfsSpec {
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub exec: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub wall_time: Option<Duration>,
    /// CPU seconds each process may use (RLIMIT_CPU).
    pub cpu_time: Option<u64>,
    pub open_files: Option<u64>,
    pub file_size: Option<u64>,
    pub core_dumps: bool,
    pub processes: Option<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct SeccompSpec {
    pub default_action: SeccompAction,
    /// Allowed syscall names (groups expanded), sorted, deduplicated.
    pub allow: BTreeSet<String>,
    pub deny: Vec<(String, SeccompAction)>,
    pub socket_domains: Vec<(String, u32)>,
    pub ioctl_requests: Vec<(String, u32)>,
    pub clone_deny: Vec<(String, u64)>,
}

/// A validated profile, `extends` already applied.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub name: String,
    pub why: String,
    pub line: usize,
    pub hostname: String,
    pub user: SandboxUser,
    pub namespaces: Namespaces,
    pub mounts: Vec<MountSpec>,
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    pub tmpfs: Vec<TmpfsSpec>,
    pub workspace: (PathBuf, Access),
    pub proc: bool,
    /// A private devpts instance at /dev/pts (and /dev/ptmx, /dev/tty).
    pub devpts: bool,
    pub limits: Limits,
    pub min_abi: u8,
    /// Where `min_abi` was written (or the profile header), for compile-time diagnostics.
    pub min_abi_span: Range<usize>,
    pub seccomp: SeccompSpec,
    pub env_pass: Vec<String>,
    pub env_set: Vec<(String, String)>,
    /// `[profiles.NAME.broker]`, if present.
    pub broker: Option<crate::broker::BrokerSection>,
    pub network: NetworkSpec,
}

/// `[profiles.NAME.network]`, validated.
#[derive(Debug, Clone, Default)]
pub(crate) struct NetworkSpec {
    /// Where `mode = "brokered"` was written; None: mode "none".
    pub brokered: Option<Range<usize>>,
    /// The hosts a brokered network forwards (from the broker section's `connect` rules,
    /// see [`resolve_forwards`]), in rule order, each (host, port) once.
    pub forward: Vec<(String, u16)>,
}

/// At most this many (host, port) pairs are forwarded: each name takes a loopback address
/// of its own (127.0.0.2 upwards).
pub(crate) const MAX_FORWARDS: usize = 200;

#[derive(Debug, Clone)]
pub(crate) enum ProgramPat {
    Literal {
        written: PathBuf,
        resolved: Option<PathBuf>,
    },
    Glob {
        text: String,
        matcher: LazyGlob,
    },
    /// `$WORKSPACE/...`: a path or glob beneath the run's workspace directory (whatever host
    /// directory that is); `matcher` matches the part after `$WORKSPACE`, from its `/`.
    Workspace {
        text: String,
        matcher: LazyGlob,
    },
}

/// The prefix of a program pattern that stands for the run's workspace directory.
pub const WORKSPACE_VAR: &str = "$WORKSPACE";

#[derive(Debug, Clone)]
pub(crate) enum ArgPat {
    /// `**`: zero or more remaining arguments.
    Rest,
    Literal(String),
    Glob(LazyGlob),
}

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub line: usize,
    pub span: Range<usize>,
    pub why: String,
    pub programs: Vec<ProgramPat>,
    pub args: Option<Vec<ArgPat>>,
    pub profile: Option<String>,
    pub approval: Approval,
}

#[derive(Debug, Clone)]
pub(crate) struct Example {
    pub line: usize,
    pub command: Vec<String>,
    pub expect: Approval,
    pub profile: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Validated {
    pub profiles: BTreeMap<String, Profile>,
    pub secrets: BTreeMap<String, crate::broker::SecretSpec>,
    pub channels: BTreeMap<String, crate::broker::ChannelSpec>,
    pub rules: Vec<Rule>,
    pub tests: Vec<Example>,
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

pub(crate) fn parse_approval(s: &str) -> Option<Approval> {
    Some(match s {
        "allow" => Approval::Allow,
        "ask" => Approval::Ask,
        "deny" => Approval::Deny,
        _ => return None,
    })
}

const APPROVAL_EXPECTED: &str = "one of \"allow\", \"ask\", \"deny\"";

/// Validate the raw policy. Diagnostics go to `sink`; the returned model contains what could be
/// validated (it is only used when the sink stays empty).
pub(crate) fn validate(raw: RawPolicy, sink: &mut Sink<'_>) -> Validated {
    let mut out = Validated::default();
    let whole = 0..0;
    match &raw.version {
        None => sink.err(
            &whole,
            "missing required key `version`",
            "`version = 1` at the top of the file",
        ),
        Some(v) => match v.get_ref() {
            toml::Value::Integer(1) => {}
            toml::Value::Integer(n) => sink.err(
                &v.span(),
                format!("unsupported policy version {n}"),
                "version 1 (the only version this carapace knows)",
            ),
            other => sink.err(
                &v.span(),
                format!("invalid type: {} for `version`", other.type_str()),
                "the integer 1",
            ),
        },
    }

    // Broker tables: secrets and channels, referenced by name from profiles' broker sections.
    let secret_names: BTreeSet<String> = raw.secrets.keys().map(|k| k.get_ref().clone()).collect();
    let channel_names: BTreeSet<String> =
        raw.channels.keys().map(|k| k.get_ref().clone()).collect();
    out.secrets = crate::broker::lower_secrets(raw.secrets, sink);
    out.channels = crate::broker::lower_channels(raw.channels, sink);

    // Profiles: own checks, then extends resolution, then lowering of the merged profile.
    let raw_profiles: BTreeMap<String, (Range<usize>, Range<usize>, RawProfile)> = raw
        .profiles
        .into_iter()
        .map(|(k, v)| {
            let kspan = k.span();
            let vspan = v.span();
            (k.into_inner(), (kspan, vspan, v.into_inner()))
        })
        .collect();
    for (name, (kspan, _, p)) in &raw_profiles {
        match &p.why {
            None => sink.err(
                kspan,
                format!("missing required key `why` in profile `{name}`"),
                "why = \"...\": a sentence saying what the profile is for",
            ),
            Some(w) if w.get_ref().trim().is_empty() => sink.err(
                &w.span(),
                format!("empty `why` in profile `{name}`"),
                "a sentence saying what the profile is for",
            ),
            Some(_) => {}
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            sink.err(
                kspan,
                format!("bad profile name `{name}`"),
                "letters, digits, `-` and `_`",
            );
        }
    }
    for (name, (kspan, vspan, _)) in &raw_profiles {
        if let Some(merged) = resolve_extends(name, &raw_profiles, sink) {
            let span = if vspan.is_empty() {
                kspan.clone()
            } else {
                vspan.clone()
            };
            let broker = merged.broker.as_ref().and_then(|b| {
                crate::broker::lower_broker(b, name, &secret_names, &channel_names, sink)
            });
            if let Some(mut p) = lower_profile(name, &span, merged, sink) {
                p.broker = broker;
                resolve_forwards(&mut p, sink);
                out.profiles.insert(name.clone(), p);
            }
        }
    }

    // Exec rules.
    for (index, r) in raw.exec.into_iter().enumerate() {
        let span = r.span();
        let line = sink.src.line_of(span.start);
        if let Some(rule) = lower_rule(index, line, &span, r.into_inner(), &raw_profiles, sink) {
            out.rules.push(rule);
        }
    }
    check_shadowing(&out.rules, sink);
    for r in &out.rules {
        let Some(p) = r.profile.as_ref().and_then(|p| out.profiles.get(p)) else {
            continue;
        };
        if p.network.brokered.is_some() {
            sink.err(
                &r.span,
                format!(
                    "this rule runs programs in profile `{}`, whose network mode is \"brokered\": \
                     only children of `carapace run` (adapters, daemons) get a brokered network",
                    p.name
                ),
                "a profile with network mode \"none\" (a tool reaches the network through the broker's `connect`)",
            );
        }
    }

    // Tests.
    for t in raw.test {
        let span = t.span();
        let line = sink.src.line_of(span.start);
        let t = t.into_inner();
        let mut ok = true;
        let mut command = Vec::new();
        match &t.command {
            None => {
                sink.err(
                    &span,
                    "missing required key `command` in [[test]]",
                    "command = [\"/usr/bin/ls\", \"-l\"]",
                );
                ok = false;
            }
            Some(c) => {
                command = c.get_ref().iter().map(|s| s.get_ref().clone()).collect();
                match c.get_ref().first() {
                    None => {
                        sink.err(
                            &c.span(),
                            "empty test command",
                            "an absolute program path followed by its arguments",
                        );
                        ok = false;
                    }
                    Some(p)
                        if !p.get_ref().starts_with('/')
                            && !p.get_ref().starts_with(&format!("{WORKSPACE_VAR}/")) =>
                    {
                        sink.err(
                            &p.span(),
                            format!("test program `{}` is relative", p.get_ref()),
                            "an absolute program path (as the supervisor resolves it), or \
                             `$WORKSPACE/PATH`",
                        );
                        ok = false;
                    }
                    Some(_) => {}
                }
            }
        }
        let expect = match &t.expect {
            None => {
                sink.err(
                    &span,
                    "missing required key `expect` in [[test]]",
                    APPROVAL_EXPECTED,
                );
                None
            }
            Some(e) => {
                let a = parse_approval(e.get_ref());
                if a.is_none() {
                    sink.err(
                        &e.span(),
                        format!("unknown decision `{}`", e.get_ref()),
                        APPROVAL_EXPECTED,
                    );
                }
                a
            }
        };
        if let Some(p) = &t.profile {
            if !raw_profiles.contains_key(p.get_ref()) {
                sink.err(
                    &p.span(),
                    format!(
                        "test expects profile `{}`, which does not exist",
                        p.get_ref()
                    ),
                    "the name of a profile defined under [profiles]",
                );
            }
        }
        if let (true, Some(expect)) = (ok, expect) {
            out.tests.push(Example {
                line,
                command,
                expect,
                profile: t.profile.map(|p| p.into_inner()),
            });
        }
    }
    out
}

/// Follow the `extends` chain of `name` and merge it (parent first). None when the chain is
/// broken (missing profile or cycle); the error is reported here.
fn resolve_extends(
    name: &str,
    all: &BTreeMap<String, (Range<usize>, Range<usize>, RawProfile)>,
    sink: &mut Sink<'_>,
) -> Option<RawProfile> {
    let mut chain: Vec<&str> = vec![name];
    let mut cur = name;
    loop {
        let (_, _, p) = all.get(cur)?;
        let Some(ext) = &p.extends else { break };
        let parent = ext.get_ref().as_str();
        if !all.contains_key(parent) {
            if cur == name {
                sink.err(
                    &ext.span(),
                    format!("profile `{cur}` extends `{parent}`, which does not exist"),
                    "the name of a profile defined under [profiles]",
                );
            }
            return None;
        }
        if let Some(pos) = chain.iter().position(|c| *c == parent) {
            if pos == 0 {
                let mut cycle: Vec<&str> = chain.clone();
                cycle.push(parent);
                let (_, _, first) = all.get(name)?;
                let span = first.extends.as_ref().map(|e| e.span()).unwrap_or(0..0);
                sink.err(
                    &span,
                    format!("`extends` cycle: {}", cycle.join(" -> ")),
                    "a chain of `extends` that ends at a profile without `extends`",
                );
            }
            return None;
        }
        chain.push(parent);
        cur = parent;
    }
    // Merge from the root ancestor down.
    let mut merged: Option<RawProfile> = None;
    for n in chain.iter().rev() {
        let (_, _, p) = all.get(*n)?;
        merged = Some(match merged {
            None => p.clone(),
            Some(parent) => merge_profile(parent, p.clone()),
        });
    }
    merged
}

fn or<T>(child: Option<T>, parent: Option<T>) -> Option<T> {
    child.or(parent)
}

fn merge_table<T>(
    parent: Option<S<T>>,
    child: Option<S<T>>,
    f: impl FnOnce(T, T) -> T,
) -> Option<S<T>> {
    match (parent, child) {
        (Some(p), Some(c)) => {
            let span = c.span();
            Some(S::new(span, f(p.into_inner(), c.into_inner())))
        }
        (p, c) => c.or(p),
    }
}

fn append<T>(parent: Option<Vec<T>>, child: Option<Vec<T>>) -> Option<Vec<T>> {
    match (parent, child) {
        (Some(mut p), Some(c)) => {
            p.extend(c);
            Some(p)
        }
        (p, c) => c.or(p),
    }
}

/// `append`, except that a child entry whose `path` a parent entry already has replaces that
/// entry in place: a profile can change how a parent's mount is made (`/tmp` executable in a
/// build profile) without the duplicate-destination error a second entry would be.
fn append_by_path<T>(
    parent: Option<Vec<S<T>>>,
    child: Option<Vec<S<T>>>,
    path: impl Fn(&T) -> Option<&str>,
) -> Option<Vec<S<T>>> {
    match (parent, child) {
        (Some(mut p), Some(c)) => {
            for entry in c {
                let same = path(entry.get_ref())
                    .and_then(|want| p.iter().position(|e| path(e.get_ref()) == Some(want)));
                match same {
                    Some(i) => p[i] = entry,
                    None => p.push(entry),
                }
            }
            Some(p)
        }
        (p, c) => c.or(p),
    }
}

/// Child keys override the parent's; seccomp allow/deny append; mounts/symlinks/tmpfs append,
/// an entry for a path the parent has replacing the parent's (see [`append_by_path`]).
fn merge_profile(p: RawProfile, c: RawProfile) -> RawProfile {
    RawProfile {
        why: or(c.why, p.why),
        extends: c.extends,
        hostname: or(c.hostname, p.hostname),
        user: merge_table(p.user, c.user, |p, c| RawUser {
            uid: or(c.uid, p.uid),
            gid: or(c.gid, p.gid),
        }),
        namespaces: merge_table(p.namespaces, c.namespaces, |p, c| RawNamespaces {
            user: or(c.user, p.user),
            pid: or(c.pid, p.pid),
            mount: or(c.mount, p.mount),
            ipc: or(c.ipc, p.ipc),
            uts: or(c.uts, p.uts),
            net: or(c.net, p.net),
            cgroup: or(c.cgroup, p.cgroup),
        }),
        filesystem: merge_table(p.filesystem, c.filesystem, |p, c| RawFilesystem {
            mounts: append_by_path(p.mounts, c.mounts, |m| {
                m.path.as_ref().map(|x| x.get_ref().as_str())
            }),
            symlinks: append_by_path(p.symlinks, c.symlinks, |m| {
                m.path.as_ref().map(|x| x.get_ref().as_str())
            }),
            tmpfs: append_by_path(p.tmpfs, c.tmpfs, |m| {
                m.path.as_ref().map(|x| x.get_ref().as_str())
            }),
            workspace: or(c.workspace, p.workspace),
            proc: or(c.proc, p.proc),
            devpts: or(c.devpts, p.devpts),
        }),
        network: merge_table(p.network, c.network, |p, c| RawNetwork {
            mode: or(c.mode, p.mode),
        }),
        limits: merge_table(p.limits, c.limits, |p, c| RawLimits {
            memory: or(c.memory, p.memory),
            pids: or(c.pids, p.pids),
            cpu: or(c.cpu, p.cpu),
            wall_time: or(c.wall_time, p.wall_time),
            cpu_time: or(c.cpu_time, p.cpu_time),
            open_files: or(c.open_files, p.open_files),
            file_size: or(c.file_size, p.file_size),
            core_dumps: or(c.core_dumps, p.core_dumps),
            processes: or(c.processes, p.processes),
        }),
        landlock: merge_table(p.landlock, c.landlock, |p, c| RawLandlock {
            min_abi: or(c.min_abi, p.min_abi),
        }),
        seccomp: merge_table(p.seccomp, c.seccomp, |p, c| RawSeccomp {
            default_action: or(c.default_action, p.default_action),
            errno: or(c.errno, p.errno),
            allow: append(p.allow, c.allow),
            deny: append(p.deny, c.deny),
            socket_domains: or(c.socket_domains, p.socket_domains),
            ioctl_requests: or(c.ioctl_requests, p.ioctl_requests),
            clone_deny_flags: or(c.clone_deny_flags, p.clone_deny_flags),
        }),
        environment: merge_table(p.environment, c.environment, |p, c| RawEnvironment {
            pass: or(c.pass, p.pass),
            set: match (p.set, c.set) {
                (Some(mut ps), Some(cs)) => {
                    for (k, v) in cs {
                        ps.insert(k, v);
                    }
                    Some(ps)
                }
                (ps, cs) => cs.or(ps),
            },
        }),
        broker: merge_table(p.broker, c.broker, crate::broker::merge_broker),
    }
}

fn path_of(sink: &mut Sink<'_>, s: &S<String>) -> Option<PathBuf> {
    match check_abs_path(s.get_ref()) {
        Ok(()) => Some(PathBuf::from(s.get_ref())),
        Err(why) => {
            sink.err(
                &s.span(),
                format!("bad path `{}`: {why}", s.get_ref().escape_debug()),
                PATH_EXPECTED,
            );
            None
        }
    }
}

fn required<'a, T>(
    sink: &mut Sink<'_>,
    v: &'a Option<S<T>>,
    span: &Range<usize>,
    key: &str,
    what: &str,
    expected: &str,
) -> Option<&'a S<T>> {
    if v.is_none() {
        sink.err(
            span,
            format!("missing required key `{key}` in {what}"),
            expected,
        );
    }
    v.as_ref()
}

fn lower_profile(
    name: &str,
    span: &Range<usize>,
    p: RawProfile,
    sink: &mut Sink<'_>,
) -> Option<Profile> {
    let before = sink.diags.len();
    let line = sink.src.line_of(span.start);
    let hostname = lower_hostname(&p, sink);
    let user = lower_user(&p, sink);
    let namespaces = lower_namespaces(&p, sink);
    let network = lower_network(&p, sink);
    let fs = lower_filesystem(&p, span, sink);
    if network.brokered.is_some() {
        check_hosts_file_free(&fs, &p, sink);
    }
    let limits = lower_limits(&p, sink);
    let (min_abi, min_abi_span) = lower_landlock(&p, span, sink);
    let mut seccomp = lower_seccomp(&p, sink);
    if network.brokered.is_some() {
        // The program opens its own TCP sockets to the forwarded names.
        for (name, n) in tables::SOCKET_DOMAINS {
            if matches!(*name, "AF_INET" | "AF_INET6")
                && !seccomp.socket_domains.iter().any(|(_, v)| v == n)
            {
                seccomp.socket_domains.push((name.to_string(), *n));
            }
        }
    }
    let (env_pass, env_set) = lower_environment(&p, sink);
    if sink.diags.len() != before {
        return None;
    }
    Some(Profile {
        name: name.to_string(),
        why: p.why.map(|w| w.into_inner()).unwrap_or_default(),
        line,
        hostname,
        user,
        namespaces,
        mounts: fs.mounts,
        symlinks: fs.symlinks,
        tmpfs: fs.tmpfs,
        workspace: fs.workspace,
        proc: fs.proc,
        devpts: fs.devpts,
        limits,
        min_abi,
        min_abi_span,
        seccomp,
        env_pass,
        env_set,
        broker: None,
        network,
    })
}

/// `hostname`: "carapace" unless given; 1 to 64 letters, digits, `-`, `.`.
fn lower_hostname(p: &RawProfile, sink: &mut Sink<'_>) -> String {
    match &p.hostname {
        None => "carapace".to_string(),
        Some(h) => {
            let v = h.get_ref();
            if v.is_empty()
                || v.len() > 64
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                sink.err(
                    &h.span(),
                    format!("bad hostname `{}`", v.escape_debug()),
                    "1 to 64 characters: letters, digits, `-`, `.`",
                );
            }
            v.clone()
        }
    }
}

/// `user`: the ids inside the sandbox (1000:1000 unless given); never `(uid_t)-1`.
fn lower_user(p: &RawProfile, sink: &mut Sink<'_>) -> SandboxUser {
    match &p.user {
        None => SandboxUser {
            uid: 1000,
            gid: 1000,
        },
        Some(u) => {
            let u = u.get_ref();
            for id in [&u.uid, &u.gid].into_iter().flatten() {
                if *id.get_ref() == u32::MAX {
                    sink.err(
                        &id.span(),
                        "id 4294967295 is (uid_t)-1, which the kernel reads as \"unchanged\"",
                        "an id from 0 to 4294967294",
                    );
                }
            }
            SandboxUser {
                uid: u.uid.as_ref().map_or(1000, |v| *v.get_ref()),
                gid: u.gid.as_ref().map_or(1000, |v| *v.get_ref()),
            }
        }
    }
}

/// Namespaces: all on by default; user/pid/mount cannot be turned off, nor net while the
/// network mode is "none".
fn lower_namespaces(p: &RawProfile, sink: &mut Sink<'_>) -> Namespaces {
    let mut namespaces = Namespaces {
        user: true,
        pid: true,
        mount: true,
        ipc: true,
        uts: true,
        net: true,
        cgroup: true,
    };
    if let Some(ns) = &p.namespaces {
        let ns = ns.get_ref();
        for (key, v, locked) in [
            ("user", &ns.user, true),
            ("pid", &ns.pid, true),
            ("mount", &ns.mount, true),
        ] {
            if let Some(v) = v {
                if !*v.get_ref() && locked {
                    sink.err(
                        &v.span(),
                        format!("the {key} namespace cannot be disabled"),
                        "true (or leave the key out): carapace's confinement depends on it",
                    );
                }
            }
        }
        namespaces.ipc = ns.ipc.as_ref().is_none_or(|v| *v.get_ref());
        namespaces.uts = ns.uts.as_ref().is_none_or(|v| *v.get_ref());
        namespaces.cgroup = ns.cgroup.as_ref().is_none_or(|v| *v.get_ref());
        if let Some(net) = &ns.net {
            if !*net.get_ref() {
                sink.err(
                    &net.span(),
                    "the net namespace cannot be disabled: every network mode is a namespace of its own",
                    "true (or leave the key out)",
                );
            }
        }
    }
    namespaces
}

/// Network: mode "none" (the default) or "brokered".
fn lower_network(p: &RawProfile, sink: &mut Sink<'_>) -> NetworkSpec {
    let mut spec = NetworkSpec::default();
    if let Some(m) = p.network.as_ref().and_then(|n| n.get_ref().mode.as_ref()) {
        match m.get_ref().as_str() {
            "none" => {}
            "brokered" => spec.brokered = Some(m.span()),
            other => sink.err(
                &m.span(),
                format!("unsupported network mode `{other}`"),
                "\"none\" (no network) or \"brokered\" (only the profile's `connect` hosts, through the broker)",
            ),
        }
    }
    spec
}

/// A brokered network writes the sandbox's own `/etc/hosts`: no mount of the profile may be
/// there.
fn check_hosts_file_free(fs: &FilesystemSpec, p: &RawProfile, sink: &mut Sink<'_>) {
    let hosts = Path::new("/etc/hosts");
    let taken = fs.mounts.iter().any(|m| m.path == hosts)
        || fs.tmpfs.iter().any(|t| t.path == hosts)
        || fs.symlinks.iter().any(|(d, _)| d == hosts)
        || fs.workspace.0 == hosts;
    if taken {
        let span = p
            .network
            .as_ref()
            .and_then(|n| n.get_ref().mode.as_ref())
            .map(|m| m.span())
            .unwrap_or_default();
        sink.err(
            &span,
            "network mode \"brokered\" writes the sandbox's /etc/hosts, and this profile mounts something there",
            "no mount at /etc/hosts in a profile with a brokered network",
        );
    }
}

/// The hosts a brokered network forwards: every `connect` rule of the profile's broker
/// section, which must name its host exactly (a program in the sandbox connects to a name;
/// the sandbox's `/etc/hosts` gives that name a loopback address where the supervisor
/// listens).
pub(crate) fn resolve_forwards(p: &mut Profile, sink: &mut Sink<'_>) {
    let Some(mode_span) = p.network.brokered.clone() else {
        return;
    };
    let rules = p
        .broker
        .as_ref()
        .map(|b| b.connect.as_slice())
        .unwrap_or(&[]);
    if rules.is_empty() {
        sink.err(
            &mode_span,
            format!(
                "profile `{}` has network mode \"brokered\" but no `connect` rule: there is nothing to forward",
                p.name
            ),
            "[profiles.NAME.broker] connect = [{ host = \"...\", port = ..., why = \"...\" }], or mode = \"none\"",
        );
        return;
    }
    let mut forward: Vec<(String, u16)> = Vec::new();
    for r in rules {
        match &r.host {
            crate::broker::HostPattern::Exact(h) => {
                if !forward.iter().any(|(fh, fp)| fh == h && *fp == r.port) {
                    forward.push((h.clone(), r.port));
                }
            }
            other => sink.err(
                &sink.src.line_span(r.line),
                format!(
                    "`{other}` cannot be forwarded by a brokered network: the sandbox's /etc/hosts needs the exact name a program will connect to"
                ),
                "one connect rule per exact host name (e.g. \"chat.example.org\")",
            ),
        }
    }
    let names: BTreeSet<&str> = forward.iter().map(|(h, _)| h.as_str()).collect();
    if names.len() > MAX_FORWARDS {
        sink.err(
            &mode_span,
            format!(
                "a brokered network forwards at most {MAX_FORWARDS} host names; profile `{}` names {}",
                p.name,
                names.len()
            ),
            "fewer connect rules",
        );
        return;
    }
    p.network.forward = forward;
}

/// The filesystem view of a profile, validated.
struct FilesystemSpec {
    mounts: Vec<MountSpec>,
    symlinks: Vec<(PathBuf, PathBuf)>,
    tmpfs: Vec<TmpfsSpec>,
    workspace: (PathBuf, Access),
    proc: bool,
    devpts: bool,
}

/// Filesystem: binds, symlinks, tmpfs, the workspace, /proc, /dev (and devpts); every
/// destination used once, nothing beneath a symlink.
fn lower_filesystem(p: &RawProfile, span: &Range<usize>, sink: &mut Sink<'_>) -> FilesystemSpec {
    let mut mounts = Vec::new();
    let mut symlinks = Vec::new();
    let mut tmpfs = Vec::new();
    let mut workspace = (PathBuf::from("/workspace"), Access::ReadWrite);
    let mut proc = true;
    // Every destination, with where it was written, for the duplicate check.
    let mut dests: Vec<(PathBuf, Range<usize>)> = Vec::new();
    let mut symlink_spans: Vec<(PathBuf, Range<usize>)> = Vec::new();
    let fs = p
        .filesystem
        .as_ref()
        .map(|f| f.get_ref().clone())
        .unwrap_or_default();
    if let Some(pr) = &fs.proc {
        proc = *pr.get_ref();
    }
    if proc {
        dests.push((PathBuf::from("/proc"), span.clone()));
    }
    dests.push((PathBuf::from("/dev"), span.clone()));
    let devpts = fs.devpts.as_ref().is_some_and(|d| *d.get_ref());
    if devpts {
        for p in ["/dev/pts", "/dev/ptmx", "/dev/tty"] {
            dests.push((PathBuf::from(p), span.clone()));
        }
    }
    for m in fs.mounts.iter().flatten() {
        let mspan = m.span();
        let m = m.get_ref();
        let path = required(sink, &m.path, &mspan, "path", "a mount", PATH_EXPECTED)
            .and_then(|s| path_of(sink, s).map(|p| (p, s.span())));
        let access = required(
            sink,
            &m.access,
            &mspan,
            "access",
            "a mount",
            ACCESS_EXPECTED,
        )
        .and_then(|a| access_of(sink, a));
        if let (Some((path, pspan)), Some(access)) = (path, access) {
            if path == std::path::Path::new("/") {
                sink.err(
                    &pspan,
                    "the host root cannot be mounted",
                    "a specific directory or file",
                );
            }
            if path.starts_with("/proc") || path.starts_with("/sys") {
                sink.err(
                    &pspan,
                    format!(
                        "`{}` would expose the host's kernel interfaces inside the sandbox",
                        path.display()
                    ),
                    "no binds of host /proc or /sys (the sandbox gets its own /proc: `proc = true`)",
                );
            }
            dests.push((path.clone(), pspan));
            mounts.push(MountSpec {
                path,
                access,
                optional: m.optional.as_ref().is_some_and(|o| *o.get_ref()),
            });
        }
    }
    for s in fs.symlinks.iter().flatten() {
        let sspan = s.span();
        let s = s.get_ref();
        let path = required(sink, &s.path, &sspan, "path", "a symlink", PATH_EXPECTED)
            .and_then(|x| path_of(sink, x).map(|p| (p, x.span())));
        let target = required(
            sink,
            &s.target,
            &sspan,
            "target",
            "a symlink",
            "the link's target, e.g. \"usr/bin\"",
        )
        .and_then(|t| {
            let v = t.get_ref();
            if v.is_empty() || v.contains('\0') {
                sink.err(
                    &t.span(),
                    "bad symlink target",
                    "a non-empty path without NUL",
                );
                None
            } else {
                Some(PathBuf::from(v))
            }
        });
        if let (Some((path, pspan)), Some(target)) = (path, target) {
            symlink_spans.push((path.clone(), pspan.clone()));
            dests.push((path.clone(), pspan));
            symlinks.push((path, target));
        }
    }
    for t in fs.tmpfs.iter().flatten() {
        let tspan = t.span();
        let t = t.get_ref();
        let path = required(sink, &t.path, &tspan, "path", "a tmpfs", PATH_EXPECTED)
            .and_then(|x| path_of(sink, x).map(|p| (p, x.span())));
        let size =
            required(sink, &t.size, &tspan, "size", "a tmpfs", SIZE_EXPECTED).and_then(|s| {
                match parse_size(s.get_ref()) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        sink.err(&s.span(), format!("impossible size: {e}"), SIZE_EXPECTED);
                        None
                    }
                }
            });
        let mode = match &t.mode {
            None => Some(0o1777),
            Some(m) => match parse_mode(m.get_ref()) {
                Ok(v) => Some(v),
                Err(e) => {
                    sink.err(
                        &m.span(),
                        format!("bad mode: {e}"),
                        "an octal mode like \"1777\" or 0o1777",
                    );
                    None
                }
            },
        };
        if let (Some((path, pspan)), Some(size), Some(mode)) = (path, size, mode) {
            if path == std::path::Path::new("/") {
                sink.err(
                    &pspan,
                    "a tmpfs cannot replace the sandbox root",
                    "a directory below /",
                );
            }
            dests.push((path.clone(), pspan));
            tmpfs.push(TmpfsSpec {
                path,
                size,
                mode,
                exec: t.exec.as_ref().is_some_and(|e| *e.get_ref()),
            });
        }
    }
    if let Some(w) = &fs.workspace {
        let wspan = w.span();
        let w = w.get_ref();
        let path = match &w.path {
            None => Some((PathBuf::from("/workspace"), wspan.clone())),
            Some(x) => path_of(sink, x).map(|p| (p, x.span())),
        };
        let access = match &w.access {
            None => Some(Access::ReadWrite),
            Some(a) => access_of(sink, a),
        };
        if let (Some((path, pspan)), Some(access)) = (path, access) {
            if path == std::path::Path::new("/") {
                sink.err(
                    &pspan,
                    "the workspace cannot be the sandbox root",
                    "a directory below /, e.g. /workspace",
                );
            }
            dests.push((path.clone(), pspan));
            workspace = (path, access);
        }
    } else {
        dests.push((workspace.0.clone(), span.clone()));
    }
    // Symlinks are created last, in the new root: nothing may be mounted beneath one.
    for (link, _) in &symlink_spans {
        for (path, dspan) in &dests {
            if path != link && path.starts_with(link) {
                sink.err(
                    dspan,
                    format!(
                        "`{}` is beneath the symlink `{}`",
                        path.display(),
                        link.display()
                    ),
                    "mounts beside symlinks, not beneath them (use the link's target path)",
                );
            }
        }
    }
    let mut seen: BTreeMap<PathBuf, &Range<usize>> = BTreeMap::new();
    for (path, dspan) in &dests {
        match seen.get(path) {
            Some(first) => {
                let d = sink
                    .src
                    .diag(
                        dspan,
                        format!("duplicate mount destination `{}`", path.display()),
                        Some("each path in the sandbox mounted, linked or created once (/proc, /dev and the workspace included)"),
                    )
                    .with_label((*first).clone(), "first used here");
                sink.diags.push(d);
            }
            None => {
                seen.insert(path.clone(), dspan);
            }
        }
    }
    FilesystemSpec {
        mounts,
        symlinks,
        tmpfs,
        workspace,
        proc,
        devpts,
    }
}

/// Limits: sizes, counts, cpu, wall time, core dumps.
fn lower_limits(p: &RawProfile, sink: &mut Sink<'_>) -> Limits {
    let mut limits = Limits::default();
    if let Some(l) = &p.limits {
        let l = l.get_ref();
        let mut size = |v: &Option<S<toml::Value>>, min: u64, what: &str| -> Option<u64> {
            let v = v.as_ref()?;
            match parse_size(v.get_ref()) {
                Ok(b) if b < min => {
                    sink.err(
                        &v.span(),
                        format!(
                            "impossible {what}: {} is below the minimum of {}",
                            fmt_bytes(b),
                            fmt_bytes(min)
                        ),
                        SIZE_EXPECTED,
                    );
                    None
                }
                Ok(b) => Some(b),
                Err(e) => {
                    sink.err(&v.span(), format!("impossible {what}: {e}"), SIZE_EXPECTED);
                    None
                }
            }
        };
        limits.memory = size(&l.memory, 1 << 20, "memory limit");
        limits.file_size = size(&l.file_size, 1, "file size limit");
        let mut count = |v: &Option<S<toml::Value>>, max: u64, what: &str| -> Option<u64> {
            let v = v.as_ref()?;
            match parse_count(v.get_ref(), max) {
                Ok(n) => Some(n),
                Err(e) => {
                    sink.err(
                        &v.span(),
                        format!("impossible {what}: {e}"),
                        &format!("a positive integer up to {max}"),
                    );
                    None
                }
            }
        };
        limits.pids = count(&l.pids, 4_194_304, "pids limit");
        limits.open_files = count(&l.open_files, 1 << 20, "open_files limit");
        limits.processes = count(&l.processes, 4_194_304, "processes limit");
        if let Some(c) = &l.cpu {
            match parse_cpu(c.get_ref()) {
                Ok(m) => limits.cpu_millis = Some(m),
                Err(e) => sink.err(
                    &c.span(),
                    format!("impossible cpu limit: {e}"),
                    "a positive number of cores, e.g. 1.0 or 0.5",
                ),
            }
        }
        if let Some(w) = &l.wall_time {
            // "unlimited" says so explicitly, also over a parent's limit (`extends`).
            if w.get_ref().as_str() == Some("unlimited") {
                limits.wall_time = None;
            } else {
                match parse_duration(w.get_ref()) {
                    Ok(d) => limits.wall_time = Some(d),
                    Err(e) => sink.err(&w.span(), format!("bad wall_time: {e}"), DURATION_EXPECTED),
                }
            }
        }
        if let Some(t) = &l.cpu_time {
            // Whole CPU seconds (RLIMIT_CPU's unit), at least one; "unlimited" as for wall_time.
            if t.get_ref().as_str() == Some("unlimited") {
                limits.cpu_time = None;
            } else {
                match parse_duration(t.get_ref()) {
                    Ok(d) if d.as_secs() >= 1 && d.subsec_nanos() == 0 => {
                        limits.cpu_time = Some(d.as_secs());
                    }
                    Ok(_) => sink.err(
                        &t.span(),
                        "impossible cpu_time: the kernel counts CPU time in whole seconds",
                        "a whole number of seconds, at least 1, e.g. \"120s\" or \"2m\"",
                    ),
                    Err(e) => sink.err(&t.span(), format!("bad cpu_time: {e}"), DURATION_EXPECTED),
                }
            }
        }
        limits.core_dumps = l.core_dumps.as_ref().is_some_and(|c| *c.get_ref());
    }
    limits
}

/// Landlock: the minimum ABI (1 unless given) and where it was written (for compile-time
/// diagnostics; the profile header when not written).
fn lower_landlock(p: &RawProfile, span: &Range<usize>, sink: &mut Sink<'_>) -> (u8, Range<usize>) {
    let mut min_abi = 1u8;
    let mut min_abi_span = span.clone();
    if let Some(l) = &p.landlock {
        if let Some(m) = &l.get_ref().min_abi {
            min_abi_span = m.span();
            match m.get_ref() {
                toml::Value::Integer(n) if (1..=7).contains(n) => min_abi = *n as u8,
                toml::Value::Integer(n) => sink.err(
                    &m.span(),
                    format!("landlock min_abi {n} is out of range"),
                    "an integer from 1 to 7 (the Landlock ABI versions that exist)",
                ),
                other => sink.err(
                    &m.span(),
                    format!("invalid type: {} for min_abi", other.type_str()),
                    "an integer from 1 to 7",
                ),
            }
        }
    }
    (min_abi, min_abi_span)
}

/// Seccomp: default action, allow list (groups expanded), deny entries, the argument lists;
/// clone3 fails with ENOSYS unless the policy decides otherwise.
fn lower_seccomp(p: &RawProfile, sink: &mut Sink<'_>) -> SeccompSpec {
    let sc = p
        .seccomp
        .as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_default();
    let errno_of = |sink: &mut Sink<'_>, e: &S<String>| -> Option<u32> {
        let v = tables::errno_value(e.get_ref());
        if v.is_none() {
            sink.err(
                &e.span(),
                format!("unknown errno `{}`", e.get_ref()),
                "an errno name such as EPERM, EACCES, ENOSYS",
            );
        }
        v
    };
    let default_errno = sc
        .errno
        .as_ref()
        .map_or(Some(libc::EPERM as u32), |e| errno_of(sink, e))
        .unwrap_or(libc::EPERM as u32);
    let default_action = match sc.default_action.as_ref() {
        None => SeccompAction::Errno(default_errno),
        Some(a) => match a.get_ref().as_str() {
            "errno" => SeccompAction::Errno(default_errno),
            "kill" => SeccompAction::KillProcess,
            "log" => SeccompAction::Log,
            other => {
                sink.err(
                    &a.span(),
                    format!("unknown seccomp default_action `{other}`"),
                    "one of \"errno\", \"kill\", \"log\"",
                );
                SeccompAction::Errno(default_errno)
            }
        },
    };
    let mut allow = BTreeSet::new();
    match &sc.allow {
        None => {
            if let Some(g) = tables::group("@default") {
                allow.extend(g.syscalls.iter().map(|s| s.to_string()));
            }
        }
        Some(list) => {
            for a in list {
                let n = a.get_ref();
                if let Some(gname) = n.strip_prefix('@') {
                    match tables::group(n) {
                        Some(g) => allow.extend(g.syscalls.iter().map(|s| s.to_string())),
                        None => {
                            let groups: Vec<&str> = tables::GROUPS.iter().map(|g| g.name).collect();
                            sink.err_help(
                                &a.span(),
                                format!("unknown syscall group `@{gname}`"),
                                &format!("one of {}", groups.join(", ")),
                                syscall_help(n, &groups),
                            )
                        }
                    }
                } else if tables::syscall_nr(n).is_some() {
                    allow.insert(n.clone());
                } else {
                    sink.err_help(
                        &a.span(),
                        format!("unknown syscall `{n}`"),
                        "an x86_64 syscall name (as in unistd_64.h) or a group such as @default",
                        syscall_help(n, &tables::syscall_names()),
                    );
                }
            }
        }
    }
    let mut deny: Vec<(String, SeccompAction)> = Vec::new();
    for d in sc.deny.iter().flatten() {
        let dspan = d.span();
        let d = d.get_ref();
        let Some(name) = required(
            sink,
            &d.syscall,
            &dspan,
            "syscall",
            "a deny entry",
            "syscall = \"name\"",
        ) else {
            continue;
        };
        if tables::syscall_nr(name.get_ref()).is_none() {
            sink.err_help(
                &name.span(),
                format!("unknown syscall `{}`", name.get_ref()),
                "an x86_64 syscall name (as in unistd_64.h)",
                syscall_help(name.get_ref(), &tables::syscall_names()),
            );
            continue;
        }
        let errno = d
            .errno
            .as_ref()
            .map_or(Some(default_errno), |e| errno_of(sink, e));
        let action = match d.action.as_ref().map(|a| (a, a.get_ref().as_str())) {
            None | Some((_, "errno")) => errno.map(SeccompAction::Errno),
            Some((_, "kill")) => Some(SeccompAction::KillProcess),
            Some((_, "log")) => Some(SeccompAction::Log),
            Some((a, other)) => {
                sink.err(
                    &a.span(),
                    format!("unknown deny action `{other}`"),
                    "one of \"errno\", \"kill\", \"log\"",
                );
                None
            }
        };
        if let Some(action) = action {
            if deny.iter().any(|(n, _)| n == name.get_ref()) {
                sink.err(
                    &name.span(),
                    format!("syscall `{}` denied twice", name.get_ref()),
                    "one deny entry per syscall",
                );
            } else {
                deny.push((name.get_ref().clone(), action));
            }
        }
    }
    let named_list = |sink: &mut Sink<'_>,
                      list: &Option<S<Vec<S<String>>>>,
                      default: &[&str],
                      table: &[(&str, u32)],
                      what: &str|
     -> Vec<(String, u32)> {
        match list {
            None => default
                .iter()
                .filter_map(|n| tables::lookup(table, n).map(|v| (n.to_string(), v)))
                .collect(),
            Some(l) => {
                let mut out: Vec<(String, u32)> = Vec::new();
                for n in l.get_ref() {
                    match tables::lookup(table, n.get_ref()) {
                        Some(v) => {
                            if !out.iter().any(|(x, _)| x == n.get_ref()) {
                                out.push((n.get_ref().clone(), v));
                            }
                        }
                        None => sink.err(
                            &n.span(),
                            format!("unknown {what} `{}`", n.get_ref()),
                            &format!("one of {}", tables::names(table)),
                        ),
                    }
                }
                out
            }
        }
    };
    let socket_domains = named_list(
        sink,
        &sc.socket_domains,
        tables::DEFAULT_SOCKET_DOMAINS,
        tables::SOCKET_DOMAINS,
        "socket domain",
    );
    let ioctl_requests = named_list(
        sink,
        &sc.ioctl_requests,
        tables::DEFAULT_IOCTLS,
        tables::IOCTL_REQUESTS,
        "ioctl request",
    );
    let clone_deny: Vec<(String, u64)> = match &sc.clone_deny_flags {
        None => tables::DEFAULT_CLONE_DENY
            .iter()
            .filter_map(|n| tables::lookup(tables::CLONE_FLAGS, n).map(|v| (n.to_string(), v)))
            .collect(),
        Some(l) => {
            let mut out: Vec<(String, u64)> = Vec::new();
            for n in l.get_ref() {
                match tables::lookup(tables::CLONE_FLAGS, n.get_ref()) {
                    Some(v) => {
                        if !out.iter().any(|(x, _)| x == n.get_ref()) {
                            out.push((n.get_ref().clone(), v));
                        }
                    }
                    None => sink.err(
                        &n.span(),
                        format!("unknown clone flag `{}`", n.get_ref()),
                        &format!("one of {}", tables::names(tables::CLONE_FLAGS)),
                    ),
                }
            }
            out
        }
    };
    // clone3 cannot be argument-filtered (its flags live in memory): unless the policy decides
    // otherwise, it fails with ENOSYS so that libc falls back to clone(2), which is filtered.
    if !allow.contains("clone3") && !deny.iter().any(|(n, _)| n == "clone3") {
        deny.push((
            "clone3".to_string(),
            SeccompAction::Errno(libc::ENOSYS as u32),
        ));
    }
    SeccompSpec {
        default_action,
        allow,
        deny,
        socket_domains,
        ioctl_requests,
        clone_deny,
    }
}

/// Environment: names passed from the supervisor's environment, and fixed variables.
fn lower_environment(p: &RawProfile, sink: &mut Sink<'_>) -> (Vec<String>, Vec<(String, String)>) {
    let mut env_pass = Vec::new();
    let mut env_set = Vec::new();
    let env_name_ok = |s: &str| !s.is_empty() && !s.contains(['=', '\0']);
    if let Some(e) = &p.environment {
        let e = e.get_ref();
        for n in e.pass.iter().flat_map(|p| p.get_ref().iter()) {
            if env_name_ok(n.get_ref()) {
                if !env_pass.contains(n.get_ref()) {
                    env_pass.push(n.get_ref().clone());
                }
            } else {
                sink.err(
                    &n.span(),
                    format!(
                        "bad environment variable name `{}`",
                        n.get_ref().escape_debug()
                    ),
                    "a non-empty name without `=` or NUL",
                );
            }
        }
        for (k, v) in e.set.iter().flatten() {
            if !env_name_ok(k.get_ref()) {
                sink.err(
                    &k.span(),
                    format!(
                        "bad environment variable name `{}`",
                        k.get_ref().escape_debug()
                    ),
                    "a non-empty name without `=` or NUL",
                );
            } else if v.get_ref().contains('\0') {
                sink.err(
                    &v.span(),
                    "environment value contains NUL",
                    "a value without NUL",
                );
            } else {
                env_set.push((k.get_ref().clone(), v.get_ref().clone()));
            }
        }
    }
    (env_pass, env_set)
}

fn glob_err(sink: &mut Sink<'_>, span: &Range<usize>, text: &str, e: &globset::Error) {
    sink.err(
        span,
        format!("bad glob `{text}`: {}", e.kind()),
        "a glob: `*` (within one path component), `**`, `?`, `[abc]`, `{a,b}`",
    );
}

fn lower_rule(
    index: usize,
    line: usize,
    span: &Range<usize>,
    r: RawExec,
    profiles: &BTreeMap<String, (Range<usize>, Range<usize>, RawProfile)>,
    sink: &mut Sink<'_>,
) -> Option<Rule> {
    let before = sink.diags.len();
    let what = format!("[[exec]] rule #{}", index + 1);
    let why = required(
        sink,
        &r.why,
        span,
        "why",
        &what,
        "why = \"...\": a sentence saying why the rule exists",
    )
    .map(|w| {
        if w.get_ref().trim().is_empty() {
            sink.err(
                &w.span(),
                format!("empty `why` in {what}"),
                "a sentence saying why the rule exists",
            );
        }
        w.get_ref().clone()
    });
    let approval = required(
        sink,
        &r.approval,
        span,
        "approval",
        &what,
        APPROVAL_EXPECTED,
    )
    .and_then(|a| {
        let v = parse_approval(a.get_ref());
        if v.is_none() {
            sink.err(
                &a.span(),
                format!("unknown approval `{}`", a.get_ref()),
                APPROVAL_EXPECTED,
            );
        }
        v
    });
    let profile = match (&r.profile, approval) {
        (None, Some(Approval::Deny)) => None,
        (None, _) => {
            sink.err(
                span,
                format!("missing required key `profile` in {what}"),
                "profile = \"NAME\" (a profile under [profiles]; only `deny` rules may omit it)",
            );
            None
        }
        (Some(p), _) => {
            if !profiles.contains_key(p.get_ref()) {
                sink.err(
                    &p.span(),
                    format!("rule uses profile `{}`, which does not exist", p.get_ref()),
                    "the name of a profile defined under [profiles]",
                );
            }
            Some(p.get_ref().clone())
        }
    };
    let mut texts: Vec<&S<String>> = Vec::new();
    match (&r.program, &r.programs) {
        (None, None) => sink.err(
            span,
            format!("missing required key `program` in {what}"),
            "program = \"/usr/bin/NAME\" (or programs = [...])",
        ),
        (Some(p), Some(_)) => sink.err(
            &p.span(),
            "both `program` and `programs` given",
            "one of them",
        ),
        (Some(p), None) => texts.push(p),
        (None, Some(ps)) => {
            if ps.get_ref().is_empty() {
                sink.err(
                    &ps.span(),
                    "empty program list: this rule can never match",
                    "at least one program path or glob",
                );
            }
            texts.extend(ps.get_ref().iter());
        }
    }
    let mut programs = Vec::new();
    for t in texts {
        let s = t.get_ref();
        if let Some(rest) = s.strip_prefix(WORKSPACE_VAR) {
            let check = rest.replace(['*', '?', '[', ']', '{', '}', ','], "x");
            let bad = if !rest.starts_with('/') || rest == "/" {
                Some("`$WORKSPACE` must be followed by `/` and a path or glob beneath it".into())
            } else {
                check_abs_path(&check).err().map(str::to_string)
            };
            if let Some(why) = bad {
                sink.err(
                    &t.span(),
                    format!("bad program pattern `{}`: {why}", s.escape_debug()),
                    "\"$WORKSPACE/**\" (anything in the workspace) or \"$WORKSPACE/PATH\"",
                );
                continue;
            }
            match GlobBuilder::new(rest)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
            {
                Ok(g) => programs.push(ProgramPat::Workspace {
                    text: s.clone(),
                    matcher: LazyGlob::new(g),
                }),
                Err(e) => glob_err(sink, &t.span(), s, &e),
            }
            continue;
        }
        if s.starts_with('$') {
            sink.err(
                &t.span(),
                format!("unknown variable in program `{}`", s.escape_debug()),
                "an absolute path, a glob, or `$WORKSPACE/...`",
            );
            continue;
        }
        if is_glob(s) {
            // The pattern's fixed parts must still be a normalized absolute path.
            let check = s.replace(['*', '?', '[', ']', '{', '}', ','], "x");
            if let Err(why) = check_abs_path(&check) {
                sink.err(
                    &t.span(),
                    format!("bad program glob `{}`: {why}", s.escape_debug()),
                    PATH_EXPECTED,
                );
                continue;
            }
            match GlobBuilder::new(s)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
            {
                Ok(g) => programs.push(ProgramPat::Glob {
                    text: s.clone(),
                    matcher: LazyGlob::new(g),
                }),
                Err(e) => glob_err(sink, &t.span(), s, &e),
            }
        } else if let Some(p) = path_of(sink, t) {
            programs.push(ProgramPat::Literal {
                written: p,
                resolved: None,
            });
        }
    }
    let args = match &r.args {
        None => None,
        Some(a) => {
            let mut out = Vec::new();
            for x in a.get_ref() {
                let s = x.get_ref();
                if s == "**" {
                    out.push(ArgPat::Rest);
                } else if is_glob(s) {
                    match GlobBuilder::new(s)
                        .literal_separator(false)
                        .backslash_escape(true)
                        .build()
                    {
                        Ok(g) => out.push(ArgPat::Glob(LazyGlob::new(g))),
                        Err(e) => glob_err(sink, &x.span(), s, &e),
                    }
                } else {
                    out.push(ArgPat::Literal(s.clone()));
                }
            }
            Some(out)
        }
    };
    if sink.diags.len() != before {
        return None;
    }
    Some(Rule {
        line,
        span: span.clone(),
        why: why.unwrap_or_default(),
        programs,
        args,
        profile,
        approval: approval.unwrap_or(Approval::Deny),
    })
}

fn args_unrestricted(r: &Rule) -> bool {
    match &r.args {
        None => true,
        Some(a) => matches!(a.as_slice(), [ArgPat::Rest]),
    }
}

fn literal_prefix_of_rest(glob: &str) -> Option<&str> {
    let prefix = glob.strip_suffix("/**")?;
    if is_glob(prefix) || prefix.contains('\\') {
        None
    } else {
        Some(prefix)
    }
}

/// Does program pattern `a` match everything `b` can match?
fn covers(a: &ProgramPat, b: &ProgramPat) -> bool {
    match (a, b) {
        (ProgramPat::Literal { written: x, .. }, ProgramPat::Literal { written: y, .. }) => x == y,
        (ProgramPat::Glob { matcher, .. }, ProgramPat::Literal { written, .. }) => {
            matcher.is_match(written)
        }
        (ProgramPat::Glob { text: x, .. }, ProgramPat::Glob { text: y, .. }) => {
            x == y || literal_prefix_of_rest(x).is_some_and(|p| y.starts_with(&format!("{p}/")))
        }
        (ProgramPat::Literal { .. }, ProgramPat::Glob { .. }) => false,
        // A workspace is some absolute directory: only the catch-all covers all of it.
        (ProgramPat::Glob { text, .. }, ProgramPat::Workspace { .. }) => text == "/**",
        (ProgramPat::Workspace { text: x, .. }, ProgramPat::Workspace { text: y, .. }) => {
            x == y
                || x.strip_suffix("/**")
                    .is_some_and(|p| !is_glob(p) && y.starts_with(&format!("{p}/")))
        }
        (ProgramPat::Workspace { .. }, _) | (_, ProgramPat::Workspace { .. }) => false,
    }
}

fn check_shadowing(rules: &[Rule], sink: &mut Sink<'_>) {
    for (j, later) in rules.iter().enumerate() {
        if later.programs.is_empty() {
            continue;
        }
        for (i, earlier) in rules[..j].iter().enumerate() {
            if args_unrestricted(earlier)
                && later
                    .programs
                    .iter()
                    .all(|b| earlier.programs.iter().any(|a| covers(a, b)))
            {
                sink.err(
                    &later.span,
                    format!(
                        "[[exec]] rule #{} can never match: rule #{} (line {}) matches all its programs with any arguments, and the first match wins",
                        j + 1,
                        i + 1,
                        earlier.line
                    ),
                    "more specific rules before broader ones",
                );
                break;
            }
        }
    }
}

/// "did you mean" for a misspelt syscall or group name, when one is close.
fn syscall_help(name: &str, known: &[&str]) -> Option<String> {
    crate::toml_schema::did_you_mean(name, known).map(|m| format!("did you mean `{m}`?"))
}
