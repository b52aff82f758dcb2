//! [`Plan::explain`]: the confinement of a plan in plain words. Everything here is read from the
//! plan's own fields, so the text cannot claim a protection the supervisor does not apply.

use std::fmt::Write;

use crate::plan::{
    ArgCondition, ConditionalSyscall, FsRights, LandlockPath, Mount, Network, Plan, RlimitResource,
    SeccompAction,
};
use crate::tables::errno_name;
use crate::units::fmt_bytes;

fn action(a: &SeccompAction) -> String {
    match a {
        SeccompAction::Errno(e) => match errno_name(*e) {
            Some(n) => format!("fail with {n}"),
            None => format!("fail with errno {e}"),
        },
        SeccompAction::KillProcess => "kill the whole process".into(),
        SeccompAction::Log => "be allowed but logged by the kernel".into(),
        SeccompAction::Allow => "be allowed".into(),
    }
}

/// "allowed only when ...; otherwise fail with EPERM", from the condition itself.
fn conditional(c: &ConditionalSyscall) -> String {
    let verb = |a: &SeccompAction| match a {
        SeccompAction::Allow => "allowed".to_string(),
        SeccompAction::Log => "allowed but logged by the kernel".to_string(),
        other => action(other),
    };
    let (then, otherwise) = (verb(&c.then), verb(&c.otherwise));
    match &c.when {
        ArgCondition::OneOf { arg, what, values } => {
            let names: Vec<String> = values
                .iter()
                .map(|(n, v)| {
                    if n.starts_with(|ch: char| ch.is_ascii_uppercase()) {
                        n.clone()
                    } else {
                        format!("{n} ({v:#x})")
                    }
                })
                .collect();
            let which = if names.len() == 1 {
                format!("is {}", names[0])
            } else {
                format!("is one of {}", names.join(", "))
            };
            format!(
                "{then} only when the {what} (argument {arg}, low 32 bits compared) {which}; otherwise {otherwise}"
            )
        }
        ArgCondition::NoneOf { arg, what, flags } => {
            let names: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).collect();
            if c.otherwise != SeccompAction::Allow && c.then == SeccompAction::Allow {
                format!(
                    "{otherwise} when the {what} (argument {arg}) contains any of {}; otherwise {then}",
                    names.join(", ")
                )
            } else {
                format!(
                    "{then} only when the {what} (argument {arg}) contains none of {}; otherwise {otherwise}",
                    names.join(", ")
                )
            }
        }
        ArgCondition::EachOneOf {
            args,
            what,
            values,
            means,
        } => {
            let names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
            let which = match names.as_slice() {
                [] => "is nothing (never)".to_string(),
                [one] => format!("is {one}"),
                [rest @ .., last] => format!("is {} or {last}", rest.join(", ")),
            };
            let at = match args.as_slice() {
                [one] => format!("argument {one}"),
                many => format!(
                    "arguments {}",
                    many.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let each = if args.len() == 1 { "the" } else { "each" };
            format!(
                "{then} only when {each} {what} ({at}, low 32 bits compared) {which} ({means}); otherwise {otherwise}"
            )
        }
        ArgCondition::MaskedEq {
            arg,
            what,
            mask,
            value,
            means,
        } => {
            let names: Vec<&str> = mask.iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "{then} {means}: when the {what} (argument {arg}, low 32 bits) masked with {} is {}; otherwise {otherwise}",
                names.join("|"),
                value.0
            )
        }
    }
}

fn rights(r: &FsRights) -> String {
    let mut v = Vec::new();
    if r.read {
        v.push("read");
    }
    if r.write {
        v.push("write");
    }
    if r.execute {
        v.push("execute");
    }
    if r.ioctl_dev {
        v.push("device ioctl");
    }
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(" + ")
    }
}

fn onoff(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

pub(crate) fn explain(p: &Plan) -> String {
    let mut s = String::new();
    // `write!` to a String cannot fail; results are ignored on purpose.
    let _ = writeln!(s, "profile `{}`", p.profile);

    let ns = &p.namespaces;
    let _ = writeln!(s, "\nnamespaces (private to the sandbox):");
    let _ = writeln!(
        s,
        "  user {}, pid {}, mount {}, ipc {}, uts {}, net {}, cgroup {}",
        onoff(ns.user),
        onoff(ns.pid),
        onoff(ns.mount),
        onoff(ns.ipc),
        onoff(ns.uts),
        onoff(ns.net),
        onoff(ns.cgroup)
    );
    let _ = writeln!(
        s,
        "  runs as uid {} gid {} inside its user namespace (no capabilities on the host); hostname \"{}\"",
        p.user.uid, p.user.gid, p.hostname
    );

    let _ = writeln!(
        s,
        "\nfilesystem (a fresh root; nothing else of the host is visible):"
    );
    for m in &p.mounts {
        let line = match m {
            Mount::Bind {
                src,
                dst,
                writable,
                exec,
                optional,
            } => {
                let mut r = if *writable { "read-write" } else { "read-only" }.to_string();
                r.push_str(if *exec {
                    ", programs may run"
                } else {
                    ", no exec"
                });
                let opt = if *optional {
                    " (skipped if missing on the host)"
                } else {
                    ""
                };
                if src == dst {
                    format!("{}: host path, {r}{opt}", dst.display())
                } else {
                    format!("{}: host {}, {r}{opt}", dst.display(), src.display())
                }
            }
            Mount::Workspace {
                dst,
                writable,
                exec,
            } => format!(
                "{}: the workspace, {}, {}",
                dst.display(),
                if *writable { "read-write" } else { "read-only" },
                if *exec { "programs may run" } else { "no exec" }
            ),
            Mount::Tmpfs {
                dst,
                size_bytes,
                mode,
                exec,
            } => format!(
                "{}: empty tmpfs of {}, mode {mode:o}, {}",
                dst.display(),
                fmt_bytes(*size_bytes),
                if *exec { "programs may run" } else { "no exec" }
            ),
            Mount::Proc { dst } => format!(
                "{}: procfs of the sandbox's own pid namespace, read-only",
                dst.display()
            ),
            Mount::File { dst, contents } => format!(
                "{}: a read-only file written by carapace ({} lines)",
                dst.display(),
                contents.lines().count()
            ),
            Mount::Dev { dst, pts: false } => format!(
                "{}: minimal /dev (null, zero, full, random, urandom, tty-less)",
                dst.display()
            ),
            Mount::Dev { dst, pts: true } => format!(
                "{0}: minimal /dev (null, zero, full, random, urandom) and a private devpts \
                 instance at {0}/pts for pseudo-terminals of its own (no host terminal)",
                dst.display()
            ),
            Mount::Symlink { dst, target } => {
                format!("{} -> {} (symlink)", dst.display(), target.display())
            }
        };
        let _ = writeln!(s, "  {line}");
    }
    let _ = writeln!(s, "  working directory: {}", p.cwd.display());

    let ll = &p.landlock;
    let _ = writeln!(
        s,
        "\nLandlock (kernel ABI {} or newer required, else carapace refuses to run):",
        ll.min_abi
    );
    for r in &ll.rules {
        let path = match &r.path {
            LandlockPath::Host(h) => format!("host {}", h.display()),
            LandlockPath::Workspace => "the workspace".to_string(),
            LandlockPath::Sandbox(x) => format!("{} (inside the sandbox)", x.display()),
        };
        let _ = writeln!(s, "  {path}: {}", rights(&r.rights));
    }
    let _ = writeln!(s, "  everything else: no access");
    // What the plan proves about the kernel: min_abi is required; TCP rules exist only on ABI 4+,
    // scoping only on ABI 6+.
    let mut known = ll.min_abi;
    if ll.deny_tcp {
        known = known.max(4);
    }
    if ll.scope_abstract_unix || ll.scope_signals {
        known = known.max(6);
    }
    for (abi, what) in [
        (
            1u8,
            "reading, writing and executing files, listing and changing directories",
        ),
        (2, "renaming and linking files across directories"),
        (3, "truncating files"),
        (5, "ioctl on device files"),
    ] {
        if abi <= known {
            let _ = writeln!(s, "  controlled (ABI {abi}): {what}");
        } else {
            let _ = writeln!(
                s,
                "  controlled only on kernels with Landlock ABI {abi}+ (the profile requires {}): {what}",
                ll.min_abi
            );
        }
    }
    let _ = writeln!(
        s,
        "  TCP bind/connect: {}",
        if ll.deny_tcp {
            "denied by Landlock"
        } else {
            "not restricted by Landlock (kernel ABI < 4)"
        }
    );
    let _ = writeln!(
        s,
        "  abstract unix sockets and signals to outside processes: {}",
        match (ll.scope_abstract_unix, ll.scope_signals) {
            (true, true) => "blocked by Landlock scoping",
            (true, false) => "abstract unix blocked; signals not scoped by Landlock",
            (false, true) => "signals blocked; abstract unix not scoped by Landlock",
            (false, false) => "not scoped by Landlock (kernel ABI < 6)",
        }
    );

    let sc = &p.seccomp;
    let _ = writeln!(
        s,
        "\nseccomp ({} BPF instructions, applied last, just before exec):",
        sc.program.len()
    );
    let _ = writeln!(
        s,
        "  non-x86_64 (e.g. int 0x80) and x32 syscalls: kill the process"
    );
    let guard = &sc.setid_guard;
    for (name, a) in &sc.denied {
        if !guard.refused.contains(name) {
            let _ = writeln!(s, "  {name}: {}", action(a));
        }
    }
    for c in &sc.conditional {
        if !guard.mode_checked.contains(&c.syscall) {
            let _ = writeln!(s, "  {}: {}", c.syscall, conditional(c));
        }
    }
    let _ = writeln!(
        s,
        "  allowed ({}): {}",
        sc.allowed.len(),
        sc.allowed.join(" ")
    );
    let _ = writeln!(s, "  any other syscall: {}", action(&sc.default_action));
    // Counted from the program itself with the port of the kernel's cache emulation, so the
    // line cannot claim a cache the filter's shape does not give.
    let known = crate::tables::all_syscalls().count();
    let cached = crate::tables::all_syscalls()
        .filter(|(_, nr)| {
            u32::try_from(*nr).is_ok_and(|nr| crate::bpf::kernel_caches_allow(&sc.program, nr))
        })
        .count();
    let _ = writeln!(
        s,
        "  kernel action cache (Linux 5.11+): {cached} of {known} x86_64 syscalls are answered \
         without running the filter; the rest (argument checks, refusals) run it"
    );
    let _ = writeln!(
        s,
        "  set-id guard (always on: files the sandbox creates in the workspace land owned by the \
         workspace's owner, often root, so none may get a set-user-ID or set-group-ID bit):"
    );
    // Group the guard's mode checks that read the same.
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for c in &sc.conditional {
        if guard.mode_checked.contains(&c.syscall) {
            let text = conditional(c);
            match groups.iter_mut().find(|(t, _)| *t == text) {
                Some((_, names)) => names.push(&c.syscall),
                None => groups.push((text, vec![&c.syscall])),
            }
        }
    }
    for (text, names) in &groups {
        let _ = writeln!(s, "    {}: {text}", names.join(", "));
    }
    for (name, a) in &sc.denied {
        if guard.refused.contains(name) {
            let _ = writeln!(
                s,
                "    {name}: {} (its mode is in memory seccomp cannot read; libc falls back to openat)",
                action(a)
            );
        }
    }
    if groups.is_empty() && guard.refused.is_empty() {
        let _ = writeln!(
            s,
            "    this profile allows none of the syscalls that could set those bits"
        );
    }

    let _ = writeln!(s, "\nlimits:");
    let cg = &p.cgroup;
    let _ = writeln!(
        s,
        "  memory: {}",
        cg.memory_bytes.map_or("unlimited".into(), fmt_bytes)
    );
    let _ = writeln!(
        s,
        "  processes/threads (cgroup pids): {}",
        cg.pids.map_or("unlimited".into(), |n| n.to_string())
    );
    let _ = writeln!(
        s,
        "  cpu: {}",
        cg.cpu_millis.map_or("unlimited".into(), |m| format!(
            "{}.{:03} cores",
            m / 1000,
            m % 1000
        ))
    );
    let _ = writeln!(
        s,
        "  wall time: {}",
        p.wall_time.map_or("unlimited".into(), |d| format!(
            "{} ms, then the whole tree is killed",
            d.as_millis()
        ))
    );
    for r in &p.rlimits {
        let what = match r.resource {
            RlimitResource::Nofile => "open files".to_string(),
            RlimitResource::Fsize => format!("file size: {}", fmt_bytes(r.value)),
            RlimitResource::Core => "core dump size".to_string(),
            RlimitResource::Nproc => "processes of the user (RLIMIT_NPROC)".to_string(),
            RlimitResource::As => "address space".to_string(),
            RlimitResource::Stack => "stack".to_string(),
            RlimitResource::Cpu => format!(
                "cpu time: {} s per process, then SIGXCPU (SIGKILL one CPU second later)",
                r.value
            ),
            RlimitResource::Memlock => "locked memory".to_string(),
            RlimitResource::Msgqueue => "message queue bytes".to_string(),
        };
        match r.resource {
            RlimitResource::Fsize | RlimitResource::Cpu => {
                let _ = writeln!(s, "  {what}");
            }
            RlimitResource::Core if r.value == 0 => {
                let _ = writeln!(s, "  core dumps: off");
            }
            _ => {
                let _ = writeln!(s, "  {what}: {}", r.value);
            }
        }
    }

    let _ = writeln!(s, "\nenvironment (nothing else is inherited):");
    if p.env.pass.is_empty() {
        let _ = writeln!(s, "  passed from the caller: nothing");
    } else {
        let _ = writeln!(
            s,
            "  passed from the caller when set: {}",
            p.env.pass.join(", ")
        );
    }
    for (k, v) in &p.env.set {
        let _ = writeln!(s, "  {k}={v}");
    }

    let _ = writeln!(s, "\nnetwork:");
    match &p.network {
        Network::None => {
            let _ = writeln!(
                s,
                "  none: an empty network namespace (loopback down); no route anywhere"
            );
        }
        Network::Brokered { forward } => {
            let _ = writeln!(
                s,
                "  brokered: a network namespace of its own with only loopback; these names \
                 resolve (its /etc/hosts) to loopback addresses where the supervisor listens and \
                 forwards each connection through the broker's connect check to the real host:"
            );
            for f in forward {
                let _ = writeln!(s, "    {}:{} (at {}:{})", f.host, f.port, f.addr, f.port);
            }
            if !p.landlock.tcp_connect.is_empty() && p.landlock.deny_tcp {
                let ports: Vec<String> =
                    p.landlock.tcp_connect.iter().map(u16::to_string).collect();
                let _ = writeln!(
                    s,
                    "  Landlock: TCP connect only to port(s) {}; no TCP bind",
                    ports.join(", ")
                );
            }
        }
    }
    s
}
