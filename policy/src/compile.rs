//! Compiling a validated profile into a [`Plan`] for one kernel ([`Target`]).

use crate::plan::{
    CgroupLimits, EnvPlan, Forward, FsRights, LandlockPath, LandlockPlan, LandlockRule, Mount,
    Network, Plan, Rlimit, RlimitResource,
};
use crate::source::Source;
use crate::validate::{Access, Profile};
use crate::{seccomp, Diagnostic, Target};

fn rights(access: Access) -> FsRights {
    FsRights {
        read: true,
        write: access.writable(),
        execute: access.exec(),
        ioctl_dev: false,
    }
}

pub(crate) fn compile(
    p: &Profile,
    target: &Target,
    src: &Source<'_>,
) -> Result<Plan, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    if target.landlock_abi < p.min_abi {
        let have = if target.landlock_abi == 0 {
            "this kernel has no Landlock".to_string()
        } else {
            format!("this kernel's Landlock ABI is {}", target.landlock_abi)
        };
        errors.push(src.diag(
            &p.min_abi_span,
            format!(
                "profile `{}` requires Landlock ABI {} or newer, but {have}; refusing to run with weaker confinement",
                p.name, p.min_abi
            ),
            Some("a kernel with a newer Landlock, or a lower landlock.min_abi in the policy"),
        ));
    }

    // Mounts: binds, /proc, /dev, tmpfs, the workspace, in that order, then stably sorted by
    // depth so that parents are always mounted before their children; symlinks last.
    let mut mounts: Vec<Mount> = Vec::new();
    let mut rules: Vec<LandlockRule> = Vec::new();
    for m in &p.mounts {
        mounts.push(Mount::Bind {
            src: m.path.clone(),
            dst: m.path.clone(),
            writable: m.access.writable(),
            exec: m.access.exec(),
            optional: m.optional,
        });
        rules.push(LandlockRule {
            path: LandlockPath::Host(m.path.clone()),
            rights: rights(m.access),
        });
    }
    if p.proc {
        mounts.push(Mount::Proc {
            dst: "/proc".into(),
        });
        rules.push(LandlockRule {
            path: LandlockPath::Sandbox("/proc".into()),
            rights: FsRights {
                read: true,
                ..FsRights::default()
            },
        });
    }
    mounts.push(Mount::Dev {
        dst: "/dev".into(),
        pts: p.devpts,
    });
    rules.push(LandlockRule {
        path: LandlockPath::Sandbox("/dev".into()),
        rights: FsRights {
            read: true,
            write: true,
            execute: false,
            ioctl_dev: true,
        },
    });
    for t in &p.tmpfs {
        mounts.push(Mount::Tmpfs {
            dst: t.path.clone(),
            size_bytes: t.size,
            mode: t.mode,
            exec: t.exec,
        });
        rules.push(LandlockRule {
            path: LandlockPath::Sandbox(t.path.clone()),
            rights: FsRights {
                read: true,
                write: true,
                execute: t.exec,
                ioctl_dev: false,
            },
        });
    }
    let (ws_path, ws_access) = &p.workspace;
    mounts.push(Mount::Workspace {
        dst: ws_path.clone(),
        writable: ws_access.writable(),
        exec: ws_access.exec(),
    });
    rules.push(LandlockRule {
        path: LandlockPath::Workspace,
        rights: rights(*ws_access),
    });
    let network = network(p);
    if let Network::Brokered { forward } = &network {
        mounts.push(Mount::File {
            dst: "/etc/hosts".into(),
            contents: Network::hosts_file(forward),
        });
        rules.push(LandlockRule {
            path: LandlockPath::Sandbox("/etc/hosts".into()),
            rights: FsRights {
                read: true,
                ..FsRights::default()
            },
        });
    }
    mounts.sort_by_key(|m| m.dst().components().count());
    for (dst, target) in &p.symlinks {
        mounts.push(Mount::Symlink {
            dst: dst.clone(),
            target: target.clone(),
        });
    }

    let seccomp = match seccomp::compile(&p.seccomp, p.user) {
        Ok(s) => Some(s),
        Err(e) => {
            let d = src.diag(
                &src.line_span(p.line),
                format!("profile `{}`: seccomp filter: {e}", p.name),
                Some("a smaller allowlist"),
            );
            errors.push(d);
            None
        }
    };

    let mut rlimits = Vec::new();
    if let Some(n) = p.limits.open_files {
        rlimits.push(Rlimit {
            resource: RlimitResource::Nofile,
            value: n,
        });
    }
    if let Some(n) = p.limits.file_size {
        rlimits.push(Rlimit {
            resource: RlimitResource::Fsize,
            value: n,
        });
    }
    if !p.limits.core_dumps {
        rlimits.push(Rlimit {
            resource: RlimitResource::Core,
            value: 0,
        });
    }
    if let Some(secs) = p.limits.cpu_time {
        rlimits.push(Rlimit {
            resource: RlimitResource::Cpu,
            value: secs,
        });
    }
    if let Some(n) = p.limits.processes {
        rlimits.push(Rlimit {
            resource: RlimitResource::Nproc,
            value: n,
        });
    }

    let (Some(seccomp), true) = (seccomp, errors.is_empty()) else {
        return Err(errors);
    };
    Ok(Plan {
        profile: p.name.clone(),
        namespaces: p.namespaces,
        user: p.user,
        hostname: p.hostname.clone(),
        mounts,
        cwd: ws_path.clone(),
        landlock: LandlockPlan {
            min_abi: p.min_abi,
            rules,
            deny_tcp: target.landlock_abi >= 4,
            tcp_connect: tcp_connect(&network),
            scope_abstract_unix: target.landlock_abi >= 6,
            scope_signals: target.landlock_abi >= 6,
        },
        seccomp,
        cgroup: CgroupLimits {
            memory_bytes: p.limits.memory,
            pids: p.limits.pids,
            cpu_millis: p.limits.cpu_millis,
        },
        rlimits,
        wall_time: p.limits.wall_time,
        env: EnvPlan {
            pass: p.env_pass.clone(),
            set: p.env_set.clone(),
        },
        network,
    })
}

/// The profile's network: a brokered one gives each forwarded name a loopback address of its
/// own, 127.0.0.2 upwards in the order the names first appear (validation bounds the count).
fn network(p: &Profile) -> Network {
    if p.network.brokered.is_none() {
        return Network::None;
    }
    let mut names: Vec<&str> = Vec::new();
    let forward = p
        .network
        .forward
        .iter()
        .map(|(host, port)| {
            let i = names.iter().position(|n| n == host).unwrap_or_else(|| {
                names.push(host);
                names.len() - 1
            });
            // At most MAX_FORWARDS (200) names: 2 + i stays within one octet.
            let last = u8::try_from(2 + i).unwrap_or(u8::MAX);
            Forward {
                host: host.clone(),
                port: *port,
                addr: std::net::Ipv4Addr::new(127, 0, 0, last),
            }
        })
        .collect();
    Network::Brokered { forward }
}

/// The TCP ports a program may connect to: the forwarded ones, each once.
fn tcp_connect(network: &Network) -> Vec<u16> {
    let mut ports: Vec<u16> = network.forwards().iter().map(|f| f.port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
