//! Unit tests of `mounts`.

use super::*;

fn ids() -> HostIds {
    HostIds::NOBODY
}

fn bind(src: &str, exec: bool, optional: bool) -> Mount {
    Mount::Bind {
        src: src.into(),
        dst: src.into(),
        writable: false,
        exec,
        optional,
    }
}

fn texts(b: &Built) -> Vec<String> {
    b.ops.iter().map(|o| o.to_string()).collect()
}

#[test]
fn bind_mounts_are_ro_nosuid_nodev_noexec_unless_said() {
    let b = build(
        &[bind("/usr", true, false), bind("/etc", false, false)],
        None,
        ids(),
    )
    .unwrap();
    let t = texts(&b);
    assert!(
        t.contains(&"rbind /oldroot/usr /newroot/usr".to_string()),
        "{t:?}"
    );
    assert!(t.contains(&"mount_setattr /newroot/usr ro,nosuid,nodev".to_string()));
    assert!(t.contains(&"mount_setattr /newroot/etc ro,nosuid,nodev,noexec".to_string()));
    // The new root is made read-only and the host root detached at the end.
    let end = &t[t.len() - 6..];
    assert_eq!(end[0], "mount_setattr /newroot ro,nosuid,nodev,noexec");
    assert_eq!(end[1], "umount -l /oldroot");
    assert_eq!(end[3], "pivot_root . .");
}

#[test]
fn missing_sources_fail_unless_optional() {
    assert!(matches!(
        build(&[bind("/no/such/dir", false, false)], None, ids()),
        Err(MountError::MissingSource { .. })
    ));
    let b = build(&[bind("/no/such/dir", false, true)], None, ids()).unwrap();
    assert!(b.views.is_empty());
    assert!(!texts(&b).iter().any(|t| t.contains("/no/such")));
}

#[test]
fn file_binds_get_file_mount_points_and_parents() {
    let b = build(
        &[Mount::Bind {
            src: "/etc/passwd".into(),
            dst: "/etc/passwd".into(),
            writable: false,
            exec: false,
            optional: false,
        }],
        None,
        ids(),
    )
    .unwrap();
    let t = texts(&b);
    assert!(t.contains(&"mkdir /newroot/etc".to_string()));
    assert!(t.contains(&"create mount point /newroot/etc/passwd".to_string()));
}

#[test]
fn workspace_requires_tree() {
    let ws = Mount::Workspace {
        dst: "/workspace".into(),
        writable: true,
        exec: false,
    };
    assert!(matches!(
        build(&[ws], None, ids()),
        Err(MountError::NoWorkspace)
    ));
}

/// A program in the workspace counts as replaceable even where this profile may only read
/// the workspace (other runs share it, read-write); a read-only bind does not.
#[test]
fn the_workspace_is_always_a_writable_view() {
    let t = tempfile::tempdir().unwrap();
    let tree = prepare_workspace_plain(t.path(), false, true).unwrap();
    let b = build(
        &[
            bind("/usr", true, false),
            Mount::Workspace {
                dst: "/workspace".into(),
                writable: false,
                exec: true,
            },
        ],
        Some(&tree),
        ids(),
    )
    .unwrap();
    let host = std::fs::canonicalize(t.path()).unwrap();
    let inside = program_inside(&b.views, &host.join("run.sh")).unwrap();
    assert_eq!(inside.path, Path::new("/workspace/run.sh"));
    assert!(inside.writable);
    let usr = program_inside(&b.views, Path::new("/usr/bin/ls")).unwrap();
    assert!(!usr.writable);
}

/// A tmpfs beneath /dev (python's sem_open needs /dev/shm) is mounted before /dev is made
/// read-only, and that read-only change is not recursive (the tmpfs stays writable);
/// /proc's read-only change comes after the mounts too. Host binds keep theirs at once.
#[test]
fn attributes_of_created_mounts_come_after_mounts_beneath() {
    let b = build(
        &[
            bind("/usr", true, false),
            Mount::Proc {
                dst: "/proc".into(),
            },
            Mount::Dev {
                dst: "/dev".into(),
                pts: false,
            },
            Mount::Tmpfs {
                dst: "/dev/shm".into(),
                size_bytes: 1 << 20,
                mode: 0o1777,
                exec: false,
            },
        ],
        None,
        ids(),
    )
    .unwrap();
    let t = texts(&b);
    let pos = |s: &str| {
        t.iter()
            .position(|x| x.starts_with(s))
            .unwrap_or_else(|| panic!("{s} missing in {t:#?}"))
    };
    let shm_dir = pos("mkdir /newroot/dev/shm");
    let shm = pos("mount -t tmpfs /newroot/dev/shm");
    let dev_ro = pos("mount_setattr /newroot/dev ro");
    assert!(shm_dir < dev_ro && shm < dev_ro, "{t:#?}");
    assert!(pos("mount_setattr /newroot/proc ro") > shm, "{t:#?}");
    assert!(
        pos("mount_setattr /newroot/usr ro") < pos("mount -t proc"),
        "{t:#?}"
    );
    let dev_attr = b
        .ops
        .iter()
        .find_map(|o| match o {
            Op::SetAttr {
                path, recursive, ..
            } if path.as_bytes() == b"/newroot/dev" => Some(*recursive),
            _ => None,
        })
        .unwrap();
    assert!(
        !dev_attr,
        "the /dev read-only change must not reach /dev/shm"
    );
    let shm_flags = b
        .ops
        .iter()
        .find_map(|o| match o {
            Op::Mount { dst, flags, .. } if dst.as_bytes() == b"/newroot/dev/shm" => Some(*flags),
            _ => None,
        })
        .unwrap();
    assert_ne!(shm_flags & libc::MS_NOEXEC, 0, "/dev/shm is noexec");
    // The new root is still made read-only last, after the deferred ones.
    assert!(pos("mount_setattr /newroot ro") > dev_ro);
}

#[test]
fn dev_and_proc_and_tmpfs() {
    let b = build(
        &[
            Mount::Proc {
                dst: "/proc".into(),
            },
            Mount::Dev {
                dst: "/dev".into(),
                pts: false,
            },
            Mount::Tmpfs {
                dst: "/tmp".into(),
                size_bytes: 1 << 20,
                mode: 0o1777,
                exec: false,
            },
            Mount::Symlink {
                dst: "/bin".into(),
                target: "usr/bin".into(),
            },
        ],
        None,
        ids(),
    )
    .unwrap();
    let t = texts(&b);
    assert!(t.contains(&"mount -t proc /newroot/proc ()".to_string()));
    assert!(t.contains(&"mount_setattr /newroot/proc ro".to_string()));
    assert!(t.contains(&"bind /oldroot/dev/null /newroot/dev/null".to_string()));
    assert!(t.contains(&"symlink /newroot/dev/fd -> /proc/self/fd".to_string()));
    assert!(t.contains(
        &"mount -t tmpfs /newroot/tmp (size=1048576,mode=1777,uid=65534,gid=65534)".to_string()
    ));
    assert!(t.contains(&"symlink /newroot/bin -> usr/bin".to_string()));
    let tmp = b
        .ops
        .iter()
        .find_map(|o| match o {
            Op::Mount { dst, flags, .. } if dst.as_bytes() == b"/newroot/tmp" => Some(*flags),
            _ => None,
        })
        .unwrap();
    assert_ne!(tmp & libc::MS_NOEXEC, 0);
    assert_ne!(tmp & libc::MS_NOSUID, 0);
}

#[test]
fn devpts_only_when_asked_and_a_new_instance() {
    let dev = |pts| {
        texts(
            &build(
                &[Mount::Dev {
                    dst: "/dev".into(),
                    pts,
                }],
                None,
                ids(),
            )
            .unwrap(),
        )
    };
    let without = dev(false);
    assert!(!without
        .iter()
        .any(|t| t.contains("devpts") || t.contains("ptmx")));
    let with = dev(true);
    assert!(
        with.contains(
            &"mount -t devpts /newroot/dev/pts (newinstance,ptmxmode=0666,mode=0620)".to_string()
        ),
        "{with:#?}"
    );
    assert!(with.contains(&"symlink /newroot/dev/ptmx -> pts/ptmx".to_string()));
    assert!(with.contains(&"bind /oldroot/dev/tty /newroot/dev/tty".to_string()));
    let pos = |s: &str| with.iter().position(|x| x.starts_with(s)).unwrap();
    assert!(
        pos("mount -t devpts") < pos("mount_setattr /newroot/dev ro"),
        "mounted before /dev turns read-only"
    );
}

#[test]
fn program_must_be_in_an_exec_mount() {
    let views = vec![
        View {
            host: Some("/usr".into()),
            dst: "/usr".into(),
            exec: true,
            writable: false,
        },
        View {
            host: Some("/home/u/proj".into()),
            dst: "/workspace".into(),
            exec: false,
            writable: true,
        },
        View {
            host: None,
            dst: "/usr/local".into(),
            exec: false,
            writable: true,
        },
        View {
            host: Some("/srv/build".into()),
            dst: "/build".into(),
            exec: true,
            writable: true,
        },
    ];
    assert_eq!(
        program_inside(&views, Path::new("/usr/bin/ls")),
        Ok(ProgramInside {
            path: PathBuf::from("/usr/bin/ls"),
            writable: false
        })
    );
    assert_eq!(
        program_inside(&views, Path::new("/srv/build/t")),
        Ok(ProgramInside {
            path: PathBuf::from("/build/t"),
            writable: true
        })
    );
    let e = program_inside(&views, Path::new("/home/u/proj/evil")).unwrap_err();
    assert!(
        matches!(&e, ProgramOutside::NotExecutable { mount, .. } if mount == Path::new("/workspace")),
        "{e:?}"
    );
    assert!(e.to_string().contains("not executable"), "{e}");
    let e = program_inside(&views, Path::new("/opt/x")).unwrap_err();
    assert_eq!(
        e,
        ProgramOutside::NotVisible {
            program: PathBuf::from("/opt/x")
        }
    );
    assert!(e.to_string().contains("not visible"), "{e}");
    let e = program_inside(&views, Path::new("/usr/local/bin/x")).unwrap_err();
    assert!(matches!(e, ProgramOutside::Hidden { .. }), "{e:?}");
    assert!(e.to_string().contains("hidden"), "{e}");
}

#[test]
fn workspace_guard() {
    for bad in [
        "/",
        "/etc",
        "/etc/ssh",
        "/usr/lib",
        "/var/lib/x",
        "/home",
        "/root",
        "/proc/1",
    ] {
        assert!(check_workspace_dir(Path::new(bad)).is_err(), "{bad}");
    }
    for ok in [
        "/home/u/proj",
        "/root/proj",
        "/work/main",
        "/tmp/x",
        "/srv/data",
        "/variable",
    ] {
        assert!(check_workspace_dir(Path::new(ok)).is_ok(), "{ok}");
    }
}

#[test]
fn under_joins() {
    assert_eq!(under("/newroot", Path::new("/")), PathBuf::from("/newroot"));
    assert_eq!(
        under("/newroot", Path::new("/a/b")),
        PathBuf::from("/newroot/a/b")
    );
}

#[test]
fn managed_workspaces_are_allowed_strictly_beneath_the_state_dir() {
    let m = Some(Path::new("/var/lib/carapace"));
    assert!(check_workspace_dir_in(Path::new("/var/lib/carapace/gateway"), m).is_ok());
    assert!(check_workspace_dir_in(Path::new("/var/lib/carapace/tools"), m).is_ok());
    assert!(check_workspace_dir_in(Path::new("/var/lib/carapace"), m).is_err());
    assert!(check_workspace_dir_in(Path::new("/var/lib/carapacex"), m).is_err());
    assert!(check_workspace_dir_in(Path::new("/var/lib"), m).is_err());
    assert!(check_workspace_dir_in(Path::new("/etc"), m).is_err());
    assert!(check_workspace_dir_in(Path::new("/var/lib/carapace/gateway"), None).is_err());
}

#[test]
fn the_supervisor_binary_is_covered_wherever_a_bind_shows_it() {
    let view = |host: &str, dst: &str| View {
        host: Some(host.into()),
        dst: dst.into(),
        exec: true,
        writable: false,
    };
    let views = [
        view("/usr", "/usr"),
        view("/opt/tools", "/tools"),
        view("/etc", "/etc"),
        View {
            host: None,
            dst: "/tmp".into(),
            exec: false,
            writable: true,
        },
    ];
    let texts = |exe: &str| {
        let mut ops = Vec::new();
        hide_supervisor(Path::new(exe), &views, &mut ops).unwrap();
        ops.iter().map(|o| o.to_string()).collect::<Vec<_>>()
    };
    // A packaged install: /usr/bin/carapace under the /usr bind.
    assert_eq!(
        texts("/usr/bin/carapace"),
        [
            "bind /oldroot/dev/null /newroot/usr/bin/carapace",
            "mount_setattr /newroot/usr/bin/carapace ro,nosuid,noexec",
        ]
    );
    // Shown under another name inside.
    assert_eq!(
        texts("/opt/tools/carapace")[0],
        "bind /oldroot/dev/null /newroot/tools/carapace"
    );
    // Not beneath any bind (a build directory): nothing to hide.
    assert!(texts("/work/target/debug/carapace").is_empty());
    // A prefix of a name is not a parent directory.
    assert!(texts("/usrlocal/carapace").is_empty());
}

#[test]
fn written_files_come_from_the_scratch_tmpfs_and_are_bound_read_only() {
    let b = build(
        &[
            Mount::File {
                dst: "/etc/hosts".into(),
                contents: "127.0.0.2\texample.org\n".into(),
            },
            Mount::File {
                dst: "/etc/other".into(),
                contents: String::new(),
            },
        ],
        None,
        ids(),
    )
    .unwrap();
    let t = texts(&b);
    let at = |s: &str| {
        t.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("no `{s}` in {t:?}"))
    };
    // Written once, in the scratch root (after the first pivot, before the second), never
    // beneath the new root; each file its own name.
    let write = at("write /carapace-file-0 (22 bytes)");
    assert!(write > at("pivot_root . oldroot"));
    at("write /carapace-file-1 (0 bytes)");
    let bind = at("bind /carapace-file-0 /newroot/etc/hosts");
    assert!(at("mkdir /newroot/etc") < bind);
    assert!(at("create mount point /newroot/etc/hosts") < bind);
    assert_eq!(
        t[bind + 1],
        "mount_setattr /newroot/etc/hosts ro,nosuid,nodev,noexec"
    );
    assert!(!t.iter().any(|x| x.starts_with("write /newroot")), "{t:?}");
    let v = b.views.iter().find(|v| v.dst == Path::new("/etc/hosts"));
    assert!(v.is_some_and(|v| v.host.is_none() && !v.writable && !v.exec));
}
