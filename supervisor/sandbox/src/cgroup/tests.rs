//! Unit and privileged tests of `cgroup` (the layout, plans on fake trees, and the real
//! hierarchy of this host).

use super::*;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, Command, Stdio};

const HASH: &str = "2cb2d3fde3e0dceb745b2e3907963f31";

/// /proc/self/cgroup and mountinfo of the hybrid build machines.
fn hybrid_texts() -> (String, String) {
    let cg = format!(
        "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
             4:memory:/process_api/{HASH}\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n"
    );
    let mi = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"
    .to_string();
    (cg, mi)
}

const V2_MOUNT: &str =
        "25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

fn all_limits() -> CgroupLimits {
    CgroupLimits {
        memory_bytes: Some(64 << 20),
        pids: Some(16),
        cpu_millis: Some(500),
    }
}

fn put(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, text).expect("write");
}

/// A fake delegated v2 cgroup `own` (relative to the mount) with the given files.
fn fake_v2(root: &Path, own: &str, controllers: &str, procs: &str) -> PathBuf {
    let dir = root.join("sys/fs/cgroup").join(own);
    put(&dir.join("cgroup.controllers"), controllers);
    put(&dir.join("cgroup.subtree_control"), "");
    put(&dir.join("cgroup.procs"), procs);
    put(&dir.join("cgroup.type"), "domain\n");
    dir
}

fn writes(l: &LeafPlan) -> Vec<(&str, &str)> {
    l.writes
        .iter()
        .map(|w| (w.file, w.value.as_str()))
        .collect()
}

#[test]
fn hybrid_layout_is_per_controller() {
    let (cg, mi) = hybrid_texts();
    let root = Path::new("/fake");
    let l = Layout::from_parts(root, &cg, &mi).expect("layout");
    assert_eq!(
        l.v1_own(Controller::Memory),
        Some(Path::new(&format!(
            "/fake/sys/fs/cgroup/memory/process_api/{HASH}"
        )))
    );
    assert_eq!(
        l.v1_own(Controller::Pids),
        Some(Path::new("/fake/sys/fs/cgroup/pids"))
    );
    assert_eq!(
        l.v1_own(Controller::Freezer),
        Some(Path::new("/fake/sys/fs/cgroup/freezer"))
    );
    assert_eq!(
        l.unified.as_deref(),
        Some(Path::new("/fake/sys/fs/cgroup/unified"))
    );
    // name=systemd has no controller and is ignored; 8 controller hierarchies remain.
    assert_eq!(l.v1.len(), 8);
}

#[test]
fn hybrid_plan_creates_beneath_own_cgroup_in_each_hierarchy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (cg, mi) = hybrid_texts();
    let l = Layout::from_parts(tmp.path(), &cg, &mi).expect("layout");
    let p = l.plan("run-1", &all_limits()).expect("plan");
    let mem = &p.leaves[0];
    assert_eq!(
        mem.dir,
        tmp.path().join(format!(
            "sys/fs/cgroup/memory/process_api/{HASH}/carapace/run-1"
        ))
    );
    assert_eq!(mem.version, Version::V1);
    assert_eq!(
        writes(mem),
        vec![
            ("memory.limit_in_bytes", "67108864"),
            ("memory.memsw.limit_in_bytes", "67108864")
        ]
    );
    assert!(mem.writes[1].optional && !mem.writes[0].optional);
    let pids = &p.leaves[1];
    assert_eq!(
        pids.dir,
        tmp.path().join("sys/fs/cgroup/pids/carapace/run-1")
    );
    assert_eq!(writes(pids), vec![("pids.max", "16")]);
    let cpu = &p.leaves[2];
    assert_eq!(
        writes(cpu),
        vec![
            ("cpu.cfs_period_us", "100000"),
            ("cpu.cfs_quota_us", "50000")
        ]
    );
    // The v2 mirror exists for cgroup.kill but enables nothing.
    let v2 = &p.leaves[3];
    assert_eq!(v2.version, Version::V2);
    assert_eq!(
        v2.dir,
        tmp.path().join("sys/fs/cgroup/unified/carapace/run-1")
    );
    assert!(v2.controllers.is_empty() && v2.writes.is_empty());
    assert!(p.enable.is_empty());
    assert!(p.move_self.is_none());
    // No cpuacct cgroup: the v2 leaf's cpu.stat gives the CPU time.
    assert_eq!(p.leaves.len(), 4);
    assert!(p.freezer_fallback.is_some());
    for leaf in &p.leaves {
        assert!(leaf.dir.parent().is_some_and(|d| d.ends_with(PARENT_DIR)));
        assert!(p
            .parents
            .contains(&leaf.dir.parent().expect("parent").to_path_buf()));
    }
}

#[test]
fn hybrid_without_limits_creates_only_what_stats_and_kill_need() {
    let (cg, mi) = hybrid_texts();
    let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
    let p = l.plan("x", &CgroupLimits::default()).expect("plan");
    let ctrls: Vec<_> = p.leaves.iter().map(|l| l.controllers.clone()).collect();
    assert_eq!(ctrls, vec![vec![Controller::Memory], vec![]]);
    assert!(p.leaves.iter().all(|l| l.writes.is_empty()));
}

#[test]
fn missing_v1_controller_fails_closed_naming_it() {
    let (cg, mi) = hybrid_texts();
    let mi: String = mi
        .lines()
        .filter(|l| !l.contains("rw,pids"))
        .map(|l| format!("{l}\n"))
        .collect();
    let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
    let e = l.plan("x", &all_limits()).expect_err("pids is not mounted");
    assert!(matches!(
        e,
        CgroupError::ControllerUnavailable {
            controller: "pids",
            ..
        }
    ));
    let msg = e.to_string();
    assert!(
        msg.contains("`pids`") && msg.contains("mount -t cgroup -o pids"),
        "{msg}"
    );
    // Without a pids limit the same layout is fine.
    let limits = CgroupLimits {
        pids: None,
        ..all_limits()
    };
    assert!(l.plan("x", &limits).is_ok());
}

#[test]
fn v2_delegated_enables_controllers_and_writes_v2_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let own = fake_v2(
        tmp.path(),
        "system.slice/carapace.service",
        "cpu io memory pids",
        "",
    );
    let cg = "0::/system.slice/carapace.service\n";
    let l = Layout::from_parts(tmp.path(), cg, V2_MOUNT).expect("layout");
    assert!(l.v1.is_empty());
    assert_eq!(l.unified.as_deref(), Some(own.as_path()));
    let p = l.plan("r", &all_limits()).expect("plan");
    assert_eq!(p.leaves.len(), 1);
    let leaf = &p.leaves[0];
    assert_eq!(leaf.dir, own.join("carapace/r"));
    assert_eq!(
        writes(leaf),
        vec![
            ("memory.max", "67108864"),
            ("memory.swap.max", "0"),
            ("memory.oom.group", "1"),
            ("pids.max", "16"),
            ("cpu.max", "50000 100000")
        ]
    );
    assert_eq!(
        p.enable,
        vec![
            (
                own.join("cgroup.subtree_control"),
                vec!["memory", "pids", "cpu"]
            ),
            (
                own.join("carapace/cgroup.subtree_control"),
                vec!["memory", "pids", "cpu"]
            )
        ]
    );
    assert!(p.move_self.is_none());
    assert!(p.freezer_fallback.is_none());

    // Already enabled: nothing to enable again.
    put(&own.join("cgroup.subtree_control"), "cpu memory pids\n");
    put(
        &own.join("carapace/cgroup.subtree_control"),
        "memory pids cpu\n",
    );
    let p = l.plan("r", &all_limits()).expect("plan");
    assert!(p.enable.is_empty());
}

#[test]
fn v2_missing_controller_fails_closed_with_delegate_hint() {
    let tmp = tempfile::tempdir().expect("tmp");
    fake_v2(tmp.path(), "user.slice", "cpu", "");
    let l = Layout::from_parts(tmp.path(), "0::/user.slice\n", V2_MOUNT).expect("layout");
    let e = l.plan("r", &all_limits()).expect_err("memory missing");
    let msg = e.to_string();
    assert!(matches!(
        e,
        CgroupError::ControllerUnavailable {
            controller: "memory",
            ..
        }
    ));
    assert!(
        msg.contains("Delegate=yes") && msg.contains("cgroup.controllers"),
        "{msg}"
    );
    // Only a cpu limit: fine, and memory (unavailable) is simply not used for stats.
    let limits = CgroupLimits {
        cpu_millis: Some(1000),
        ..Default::default()
    };
    let p = l.plan("r", &limits).expect("plan");
    assert_eq!(p.leaves[0].controllers, vec![Controller::Cpu]);
}

#[test]
fn v2_own_cgroup_with_only_ourselves_moves_us_into_supervisor_leaf() {
    let tmp = tempfile::tempdir().expect("tmp");
    let me = std::process::id().to_string();
    let own = fake_v2(tmp.path(), "svc", "memory pids cpu", &format!("{me}\n"));
    let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
    let p = l.plan("r", &all_limits()).expect("plan");
    assert_eq!(p.move_self, Some(own.join("carapace/supervisor")));
    // After the move, /proc/self/cgroup names the supervisor leaf; the base stays `svc`.
    let l2 =
        Layout::from_parts(tmp.path(), "0::/svc/carapace/supervisor\n", V2_MOUNT).expect("layout");
    assert_eq!(l2.unified.as_deref(), Some(own.as_path()));
}

#[test]
fn v2_own_cgroup_with_our_companion_moves_both_and_a_stranger_is_still_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let me = std::process::id();
    // A pid no test process has: the companion registry is process-wide.
    let companion = 999_991;
    super::add_companion(companion);
    let own = fake_v2(
        tmp.path(),
        "svc",
        "memory pids cpu",
        &format!("{me}\n{companion}\n"),
    );
    let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
    let p = l
        .plan("r", &all_limits())
        .expect("our companion is not foreign");
    assert_eq!(p.move_self, Some(own.join("carapace/supervisor")));
    fake_v2(
        tmp.path(),
        "svc",
        "memory pids cpu",
        &format!("{me}\n{companion}\n7\n"),
    );
    let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
    match l.plan("r", &all_limits()) {
        Err(CgroupError::ForeignProcesses { pids, .. }) => assert_eq!(pids, vec![7]),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn v2_own_cgroup_with_foreign_processes_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let me = std::process::id();
    fake_v2(tmp.path(), "svc", "memory pids cpu", &format!("{me}\n1\n"));
    let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
    let e = l.plan("r", &all_limits()).expect_err("foreign process");
    match &e {
        CgroupError::ForeignProcesses { pids, .. } => assert_eq!(pids, &vec![1]),
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("Delegate=yes"));
}

#[test]
fn owner_pid_reads_unique_names_only() {
    let n = unique_name("exec");
    assert_eq!(owner_pid(&n), Some(std::process::id()));
    assert_eq!(owner_pid("t-tag-123-4"), Some(123));
    for bad in [
        "supervisor",
        "exec-12",
        "exec--3",
        "-12-3",
        "exec-0-1",
        "exec-x1-2",
        "exec-1-",
        "ex.c-1-2",
        "exec-99999999999-1",
    ] {
        assert_eq!(owner_pid(bad), None, "{bad}");
    }
}

/// Only empty run cgroups of dead supervisors (not ours, not alive), old enough, directly
/// beneath `carapace/`, are removed; files, other names, busy and young ones stay.
#[test]
fn stale_cgroups_removed_only_when_dead_empty_and_old() {
    let tmp = tempfile::tempdir().expect("tmp");
    let parent = tmp.path().join(PARENT_DIR);
    let mk = |name: &str, procs: &str| {
        let d = parent.join(name);
        fs::create_dir_all(&d).expect("mkdir");
        fs::write(d.join("cgroup.procs"), procs).expect("write");
        d
    };
    let dead_empty = mk("exec-111-0", "");
    let dead_busy = mk("exec-112-0", "4242\n");
    let alive_empty = mk("exec-113-0", "");
    let mine = mk("exec-114-0", "");
    let other = mk("supervisor", "");
    let no_procs_file = parent.join("exec-115-0");
    fs::create_dir_all(&no_procs_file).expect("mkdir");
    fs::write(parent.join("exec-116-0"), "").expect("a file, not a dir");
    let alive = |pid: u32| pid == 113;
    let parents = [parent.clone(), tmp.path().join("missing")];
    // Too young: nothing chosen.
    let young = remove_stale_in(&parents, 114, alive, Duration::from_secs(3600), |_| true);
    assert!(young.is_empty(), "{young:?}");
    let mut tried = Vec::new();
    let removed = remove_stale_in(&parents, 114, alive, Duration::ZERO, |d| {
        tried.push(d.to_path_buf());
        true
    });
    assert_eq!(removed, vec![dead_empty.clone()]);
    assert_eq!(tried, vec![dead_empty]);
    // A failed rmdir (the kernel's EBUSY) is not reported as removed.
    let failed = remove_stale_in(&parents, 114, alive, Duration::ZERO, |_| false);
    assert!(failed.is_empty());
    for d in [&dead_busy, &alive_empty, &mine, &other, &no_procs_file] {
        assert!(d.exists(), "{} touched", d.display());
    }
}

#[test]
fn v2_real_root_is_exempt_from_no_internal_processes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let own = fake_v2(tmp.path(), "", "memory pids cpu", "1\n2\n");
    fs::remove_file(own.join("cgroup.type")).expect("rm");
    let l = Layout::from_parts(tmp.path(), "0::/\n", V2_MOUNT).expect("layout");
    let p = l.plan("r", &all_limits()).expect("plan");
    assert!(p.move_self.is_none());
    assert_eq!(p.enable[0].0, own.join("cgroup.subtree_control"));
}

#[test]
fn pure_v1_and_comounted_cpu_cpuacct() {
    let cg = "4:memory:/a\n3:cpu,cpuacct:/b\n2:pids:/\n1:freezer:/\n";
    let mi = "\
1 0 0:1 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
2 0 0:2 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
4 0 0:4 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
";
    let l = Layout::from_parts(Path::new("/r"), cg, mi).expect("layout");
    assert!(l.unified.is_none());
    let p = l.plan("n", &all_limits()).expect("plan");
    assert_eq!(p.leaves.len(), 3, "{p:?}");
    let cpu = &p.leaves[2];
    assert_eq!(
        cpu.dir,
        Path::new("/r/sys/fs/cgroup/cpu,cpuacct/b/carapace/n")
    );
    assert_eq!(cpu.controllers, vec![Controller::Cpu, Controller::Cpuacct]);
    assert_eq!(
        p.freezer_fallback.as_deref(),
        Some(Path::new("/r/sys/fs/cgroup/freezer/carapace/n"))
    );
}

#[test]
fn mount_root_is_stripped_and_invisible_cgroups_are_refused() {
    let mi = "1 0 0:1 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    let l = Layout::from_parts(Path::new("/r"), "0::/docker/abc/sub\n", mi).expect("layout");
    assert_eq!(
        l.unified.as_deref(),
        Some(Path::new("/r/sys/fs/cgroup/sub"))
    );
    let e = Layout::from_parts(Path::new("/r"), "0::/docker/abcdef\n", mi)
        .expect_err("not beneath the mount root");
    assert!(matches!(e, CgroupError::NoHierarchy { .. }), "{e}");
    let e = Layout::from_parts(
        Path::new("/r"),
        "0::/x/../y\n",
        "1 0 0:1 / /c rw - cgroup2 cgroup2 rw\n",
    )
    .expect_err("dot-dot");
    assert!(matches!(e, CgroupError::NoHierarchy { .. }));
    assert!(matches!(
        Layout::from_parts(
            Path::new("/r"),
            "0::/\n",
            "1 0 0:1 / / rw - ext4 /dev/sda rw\n"
        ),
        Err(CgroupError::NoHierarchy { .. })
    ));
}

#[test]
fn mountinfo_escapes_and_garbage() {
    assert_eq!(unescape_mount("/a\\040b\\134"), "/a b\\");
    assert_eq!(unescape_mount("/a\\04"), "/a\\04");
    assert_eq!(unescape_mount("/a\\777"), "/a\\777");
    let l = Layout::from_parts(
        Path::new("/r"),
        "garbage\n0::/\n::\n",
        "junk\n1 0 0:1 / /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n- - -\n",
    )
    .expect("layout");
    assert_eq!(l.unified.as_deref(), Some(Path::new("/r/sys/fs/cgroup x")));
}

#[test]
fn names_are_validated() {
    let (cg, mi) = hybrid_texts();
    let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
    let long = "a".repeat(65);
    for bad in [
        "",
        "a/b",
        "..",
        ".",
        "supervisor",
        "a b",
        "x\0",
        long.as_str(),
        "cgroup.procs",
    ] {
        assert!(
            matches!(
                l.plan(bad, &all_limits()),
                Err(CgroupError::InvalidName { .. })
            ),
            "{bad:?} accepted"
        );
    }
    let n1 = unique_name("exec/../x");
    let n2 = unique_name("exec/../x");
    assert_ne!(n1, n2);
    assert!(l.plan(&n1, &all_limits()).is_ok(), "{n1}");
    assert!(l.plan(&unique_name(""), &all_limits()).is_ok());
}

#[test]
fn cpu_quota_conversion() {
    assert_eq!(cfs_quota(500).expect("q"), (50_000, 100_000));
    assert_eq!(cfs_quota(2000).expect("q"), (200_000, 100_000));
    assert_eq!(cfs_quota(10).expect("q"), (1_000, 100_000));
    assert_eq!(cfs_quota(5).expect("q"), (5_000, 1_000_000));
    assert_eq!(cfs_quota(1).expect("q"), (1_000, 1_000_000));
    assert!(cfs_quota(0).is_err());
    assert!(cfs_quota(u64::MAX).is_err());
}

#[test]
fn limits_that_cannot_work_are_rejected() {
    let (cg, mi) = hybrid_texts();
    let l = Layout::from_parts(Path::new("/f"), &cg, &mi).expect("layout");
    for limits in [
        CgroupLimits {
            pids: Some(0),
            ..Default::default()
        },
        CgroupLimits {
            memory_bytes: Some(100),
            ..Default::default()
        },
        CgroupLimits {
            cpu_millis: Some(0),
            ..Default::default()
        },
    ] {
        assert!(matches!(
            l.plan("x", &limits),
            Err(CgroupError::InvalidLimit { .. })
        ));
    }
}

fn fake_cgroup(leaves: Vec<Leaf>) -> Cgroup {
    Cgroup {
        name: "fake".into(),
        leaves,
        removed: false,
    }
}

#[test]
fn stats_from_v1_and_v2_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (m, a, u) = (
        tmp.path().join("m"),
        tmp.path().join("a"),
        tmp.path().join("u"),
    );
    put(&m.join("memory.max_usage_in_bytes"), "1234\n");
    put(
        &m.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    );
    put(&a.join("cpuacct.usage"), "999\n");
    put(&u.join("memory.peak"), "4096\n");
    put(
        &u.join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\noom_group_kill 0\n",
    );
    put(
        &u.join("cpu.stat"),
        "usage_usec 7\nuser_usec 5\nsystem_usec 2\n",
    );
    let mut v1 = fake_cgroup(vec![
        Leaf {
            dir: m.clone(),
            version: Version::V1,
            controllers: vec![Controller::Memory],
        },
        Leaf {
            dir: a.clone(),
            version: Version::V1,
            controllers: vec![Controller::Cpuacct],
        },
    ]);
    assert_eq!(
        v1.stats(),
        CgroupStats {
            peak_memory_bytes: Some(1234),
            cpu_usage_ns: Some(999),
            oom_killed: true
        }
    );
    let mut v2 = fake_cgroup(vec![Leaf {
        dir: u.clone(),
        version: Version::V2,
        controllers: vec![Controller::Memory],
    }]);
    assert_eq!(
        v2.stats(),
        CgroupStats {
            peak_memory_bytes: Some(4096),
            cpu_usage_ns: Some(7000),
            oom_killed: false
        }
    );
    // Nothing to report: all None.
    let mut none = fake_cgroup(vec![Leaf {
        dir: tmp.path().join("nothing"),
        version: Version::V1,
        controllers: vec![Controller::Memory],
    }]);
    assert_eq!(none.stats(), CgroupStats::default());
    for c in [&mut v1, &mut v2, &mut none] {
        c.removed = true; // fake dirs are not cgroups; do not let Drop touch them
    }
}

#[test]
fn apply_on_a_non_cgroup_tree_fails_and_cleans_up() {
    let tmp = tempfile::tempdir().expect("tmp");
    let own = fake_v2(tmp.path(), "svc", "memory pids cpu", "");
    put(&own.join("cgroup.subtree_control"), "memory pids cpu");
    put(
        &own.join("carapace/cgroup.subtree_control"),
        "memory pids cpu",
    );
    let l = Layout::from_parts(tmp.path(), "0::/svc\n", V2_MOUNT).expect("layout");
    // A required limit file that is not there (not a real cgroupfs): error naming it, and
    // the directory made so far is removed again.
    let e = l
        .plan("r", &all_limits())
        .expect("plan")
        .apply()
        .expect_err("no memory.max");
    match &e {
        CgroupError::Io {
            op: "open", path, ..
        } => assert!(path.ends_with("carapace/r/memory.max")),
        other => panic!("unexpected {other:?}"),
    }
    assert!(!own.join("carapace/r").exists());
    // No limits: only mkdir; remove() takes it away again.
    let cg = l
        .plan("r2", &CgroupLimits::default())
        .expect("plan")
        .apply()
        .expect("apply");
    assert!(own.join("carapace/r2").is_dir());
    assert!(cg.add_process(1).is_err(), "no cgroup.procs in a fake tree");
    cg.remove().expect("remove");
    assert!(!own.join("carapace/r2").exists());
}

// ----- privileged tests on the real hierarchy -----

#[test]
fn rootless_delegation_needs_pure_v2_and_a_writable_own_cgroup() {
    let v2 = Layout {
        v1: vec![],
        unified: Some(PathBuf::from("/sys/fs/cgroup/user.slice/u")),
        invisible: vec![],
    };
    assert_eq!(
        delegation_of(&v2, |_| true).ok(),
        Some(PathBuf::from("/sys/fs/cgroup/user.slice/u"))
    );
    let e = delegation_of(&v2, |p| !p.ends_with("cgroup.subtree_control")).unwrap_err();
    assert!(
        matches!(&e, NoDelegation::NotWritable { path } if path.ends_with("cgroup.subtree_control")),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("cgroup.subtree_control is not writable"),
        "{e}"
    );
    let hybrid = Layout {
        v1: vec![V1Hierarchy {
            controllers: vec!["memory".into()],
            own: PathBuf::from("/sys/fs/cgroup/memory"),
        }],
        ..v2.clone()
    };
    let e = delegation_of(&hybrid, |_| true).unwrap_err();
    assert!(
        matches!(&e, NoDelegation::V1InUse { controllers } if controllers == &["memory"]),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("v1 controllers in use (memory)"),
        "{e}"
    );
    let none = Layout {
        unified: None,
        ..v2
    };
    let e = delegation_of(&none, |_| true).unwrap_err();
    assert!(matches!(e, NoDelegation::NoV2), "{e:?}");
    assert!(e.to_string().contains("no cgroup v2"), "{e}");
    // This machine (hybrid, see the module docs): never delegated.
    if Layout::cached().is_ok_and(|l| !l.v1.is_empty()) {
        assert!(rootless_delegation().is_err());
    }
}

#[test]
fn for_run_falls_back_to_rlimits_rootless_and_creates_as_root() {
    let policy = carapace_policy::Policy::parse(crate::DEFAULT_POLICY, "default").unwrap();
    let compiled = policy
        .compile("tool", &carapace_policy::Target { landlock_abi: 6 })
        .unwrap();
    // Rootless on this hybrid machine: never delegated, so no cgroup and rlimits instead.
    if Layout::cached().is_ok_and(|l| !l.v1.is_empty()) {
        let mut plan = compiled.clone();
        let l = for_run(
            &unique_name("test"),
            &mut plan,
            crate::Privilege::Rootless(crate::namespaces::own_ids()),
        )
        .unwrap();
        let RunLimits::Rlimits { why, added } = l else {
            panic!("a cgroup delegated on a host with v1 controllers: {l:?}");
        };
        assert!(matches!(why, NoDelegation::V1InUse { .. }), "{why:?}");
        assert!(why.to_string().contains("v1"), "{why}");
        assert_eq!(added.len(), 3);
        assert_eq!(plan.cgroup, CgroupLimits::default());
        assert!(plan
            .rlimits
            .iter()
            .any(|r| r.resource == carapace_policy::plan::RlimitResource::As));
    }
    if !privileged() {
        return;
    }
    let mut plan = compiled.clone();
    let l = for_run(&unique_name("test"), &mut plan, crate::Privilege::Root).unwrap();
    let RunLimits::Cgroup(cg) = l else {
        panic!("root mode without a cgroup: {l:?}");
    };
    assert_eq!(plan, compiled, "root mode leaves the plan alone");
    cg.remove().unwrap();
}

fn privileged() -> bool {
    crate::privileged("cgroup")
}

fn test_name(tag: &str) -> String {
    unique_name(&format!("t-{tag}"))
}

/// Start `sh -c 'read _; exec <script>'`: it waits on stdin so it can be put into the
/// cgroup before it does anything; `go` releases it.
fn held(script: &str) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("read _; exec {script}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh")
}

fn go(child: &mut Child) {
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"\n").expect("release child");
}

fn read_limit(cg: &Cgroup, c: Controller, v1_file: &str, v2_file: &str) -> String {
    let (dir, v) = cg.controller_dir(c).expect("controller dir");
    let f = if v == Version::V1 { v1_file } else { v2_file };
    fs::read_to_string(dir.join(f))
        .expect("read limit")
        .trim()
        .to_string()
}

#[test]
fn real_create_limits_kill_stats_remove() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::create(&test_name("life"), &all_limits()).expect("create");
    assert_eq!(
        read_limit(
            &cg,
            Controller::Memory,
            "memory.limit_in_bytes",
            "memory.max"
        ),
        "67108864"
    );
    assert_eq!(
        read_limit(&cg, Controller::Pids, "pids.max", "pids.max"),
        "16"
    );
    let cpu = read_limit(&cg, Controller::Cpu, "cpu.cfs_quota_us", "cpu.max");
    assert!(cpu == "50000" || cpu == "50000 100000", "{cpu}");
    // Every directory is beneath our own cgroup of its hierarchy, under carapace/.
    let layout = Layout::detect().expect("layout");
    for d in cg.dirs() {
        let beneath = layout
            .v1
            .iter()
            .map(|h| h.own.as_path())
            .chain(layout.unified.as_deref());
        assert!(
            beneath
                .into_iter()
                .any(|o| d.parent() == Some(&o.join(PARENT_DIR))),
            "{} not beneath an own cgroup",
            d.display()
        );
        assert!(d.is_dir());
    }

    let mut child = held("sleep 30");
    let pid = child.id() as libc::pid_t;
    cg.add_process(pid).expect("add");
    assert_eq!(cg.pids().expect("pids"), vec![pid]);
    go(&mut child);
    std::thread::sleep(Duration::from_millis(50));
    cg.kill_all().expect("kill_all");
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(cg.pids().expect("pids").is_empty());
    let st = cg.stats();
    assert!(st.cpu_usage_ns.is_some_and(|n| n > 0), "{st:?}");
    assert!(st.peak_memory_bytes.is_some_and(|n| n > 0), "{st:?}");
    assert!(!st.oom_killed);
    let dirs: Vec<PathBuf> = cg.dirs().iter().map(|d| d.to_path_buf()).collect();
    cg.remove().expect("remove");
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn real_drop_kills_and_removes() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::create(&test_name("drop"), &CgroupLimits::default()).expect("create");
    let dirs: Vec<PathBuf> = cg.dirs().iter().map(|d| d.to_path_buf()).collect();
    let mut child = held("sleep 30");
    cg.add_process(child.id() as libc::pid_t).expect("add");
    drop(cg);
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn real_remove_of_a_busy_cgroup_fails() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::create(&test_name("busy"), &CgroupLimits::default()).expect("create");
    let dirs: Vec<PathBuf> = cg.dirs().iter().map(|d| d.to_path_buf()).collect();
    let mut child = held("sleep 30");
    cg.add_process(child.id() as libc::pid_t).expect("add");
    let e = cg.remove().expect_err("busy cgroup removed");
    assert!(matches!(e, CgroupError::Io { op: "rmdir", .. }), "{e}");
    // The failed remove dropped the Cgroup, which killed the child and cleaned up.
    assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

/// In a cgroup made from `layout`, start a child that forks a grandchild, kill them all with
/// `kill_all` starting at mechanism `first`, check that both died, the cgroup is empty and a
/// freezer used is thawed again; returns the mechanism that emptied the cgroup.
fn kill_tree(layout: &Layout, tag: &str, first: KillPath) -> KillPath {
    let cg = layout
        .plan(&test_name(tag), &CgroupLimits::default())
        .expect("plan")
        .apply()
        .expect("apply");
    let mut child = held("sh -c 'sleep 30 & sleep 30; wait'");
    cg.add_process(child.id() as libc::pid_t).expect("add");
    go(&mut child);
    assert!(poll(Duration::from_secs(5), || cg
        .pids()
        .map(|p| p.len())
        .unwrap_or(0)
        >= 3));
    let used = cg.kill_all_from(first).expect("kill_all");
    assert!(cg.pids().expect("pids").is_empty());
    assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
    if let Some((d, _)) = cg.controller_dir(Controller::Freezer) {
        let state = fs::read_to_string(d.join("freezer.state")).expect("state");
        assert_eq!(state.trim(), "THAWED");
    }
    cg.remove().expect("remove");
    used
}

/// `kill_all`'s paths depend on the host's cgroup layout, and a test that returns early
/// where its path is missing passes without testing anything. So none of these returns
/// early: each either runs its path and asserts (through [`KillPath`]) that this path, not a
/// fallback, emptied the cgroup, or panics naming what the host lacks.
/// * `cgroup.kill` is the path of every host with a v2 hierarchy (pure v2 in production,
///   hybrid on the build machines); a host without one fails.
/// * Signals are the last resort on every layout; tested everywhere.
/// * The v1 freezer can only exist where v1 is mounted; that test is chosen by the layout
///   (see `real_kill_all_v1_freezer_path_per_layout`).
#[test]
fn real_kill_all_via_cgroup_kill() {
    if !privileged() {
        return;
    }
    let layout = Layout::detect().expect("layout");
    assert!(
        layout.unified.is_some(),
        "no cgroup v2 hierarchy visible: kill_all's cgroup.kill path cannot run here"
    );
    assert_eq!(
        kill_tree(&layout, "v2kill", KillPath::CgroupKill),
        KillPath::CgroupKill,
        "a v2 leaf without cgroup.kill (Linux < 5.14?)"
    );
}

/// The signal fallback, on the detected layout and, where v1 hierarchies exist, on them
/// alone without a freezer (what a pure-v1 host without freezer has).
#[test]
fn real_kill_all_via_signals() {
    if !privileged() {
        return;
    }
    let layout = Layout::detect().expect("layout");
    assert_eq!(
        kill_tree(&layout, "signals", KillPath::Signals),
        KillPath::Signals
    );
    let mut v1_only = layout;
    v1_only.unified = None;
    v1_only
        .v1
        .retain(|h| !h.controllers.iter().any(|c| c == "freezer"));
    if !v1_only.v1.is_empty() {
        assert_eq!(
            kill_tree(&v1_only, "signals-v1", KillPath::CgroupKill),
            KillPath::Signals
        );
    }
}

/// The v1 freezer path, chosen by the detected layout (never a silent return):
/// * a v1 freezer is mounted (hybrid build machines): with the v2 hierarchy hidden, as on a
///   pure-v1 host, `kill_all` must empty the cgroup through the freezer;
/// * no v1 hierarchy at all (pure v2, production): the freezer path is unreachable, and the
///   test asserts exactly that — a cgroup made here has no v1 leaf and `kill_all` takes
///   `cgroup.kill` — which is why its name does not claim the freezer ran;
/// * v1 hierarchies but no v1 freezer: a layout this test does not know; it fails.
#[test]
fn real_kill_all_v1_freezer_path_per_layout() {
    if !privileged() {
        return;
    }
    let mut layout = Layout::detect().expect("layout");
    if layout.v1.is_empty() {
        eprintln!("pure cgroup v2: asserting the v1 freezer path is unreachable");
        let cg = Cgroup::create(&test_name("nofreezer"), &CgroupLimits::default()).expect("create");
        assert!(cg.leaf(Version::V1, None).is_none(), "{:?}", cg.dirs());
        drop(cg);
        assert_eq!(
            kill_tree(&layout, "nofreezer", KillPath::CgroupKill),
            KillPath::CgroupKill
        );
        return;
    }
    assert!(
        layout.v1_own(Controller::Freezer).is_some(),
        "v1 hierarchies {:?} but no v1 freezer: the freezer path cannot run here",
        layout.v1
    );
    layout.unified = None;
    assert_eq!(
        kill_tree(&layout, "freezer", KillPath::CgroupKill),
        KillPath::Freezer
    );
}

use crate::namespaces::{CloneArgs, CLONE_INTO_CGROUP};

#[test]
fn real_child_born_in_cgroup_via_clone3_and_v1_self_join() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::create(&test_name("born"), &all_limits()).expect("create");
    let join = cg.join_fds().expect("join fds");
    let v1 = join.v1_raw();
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    let r = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0);
    let mut args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(d) = &join.v2_dir {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = d.as_raw_fd() as u64;
    }
    // SAFETY: clone3 without CLONE_VM behaves like fork. The child runs only
    // async-signal-safe code (write, pause, _exit) on its private copy of memory; `v1` was
    // allocated before the clone.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        let code = match join_self_v1(&v1) {
            Ok(()) => 0u8,
            Err(_) => 1u8,
        };
        // SAFETY: write/pause/_exit are async-signal-safe; the buffer is on our stack.
        unsafe {
            libc::write(pipe[1], (&code as *const u8).cast(), 1);
            libc::pause();
            libc::_exit(0);
        }
    }
    assert!(pid > 0, "clone3: {}", io::Error::last_os_error());
    let pid = pid as libc::pid_t;
    let mut code = 9u8;
    // SAFETY: closing our copy of the write end, then reading one byte into a local.
    unsafe {
        libc::close(pipe[1]);
        assert_eq!(libc::read(pipe[0], (&mut code as *mut u8).cast(), 1), 1);
        libc::close(pipe[0]);
    }
    assert_eq!(code, 0, "join_self_v1 failed in the child");
    for d in cg.dirs() {
        let procs = read_pids(&d.join("cgroup.procs")).expect("procs");
        assert_eq!(procs, vec![pid], "{} does not hold the child", d.display());
    }
    cg.kill_all().expect("kill_all");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    drop(join);
    cg.remove().expect("remove");
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run_python_in(
    limits: &CgroupLimits,
    tag: &str,
    code: &str,
) -> (std::process::Output, CgroupStats) {
    let cg = Cgroup::create(&test_name(tag), limits).expect("create");
    let mut child = held(&format!("{} -c '{code}'", python()));
    cg.add_process(child.id() as libc::pid_t).expect("add");
    go(&mut child);
    let out = child.wait_with_output().expect("wait");
    let st = cg.stats();
    cg.kill_all().expect("kill_all");
    cg.remove().expect("remove");
    (out, st)
}

#[test]
fn real_memory_hog_is_oom_killed() {
    if !privileged() {
        return;
    }
    let limits = CgroupLimits {
        memory_bytes: Some(64 << 20),
        ..Default::default()
    };
    let (out, st) = run_python_in(
        &limits,
        "oom",
        "b = bytearray(300 << 20); b[::4096] = b\"x\" * len(b[::4096])",
    );
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    assert!(st.oom_killed, "{st:?}");
    assert!(
        st.peak_memory_bytes.is_some_and(|p| p <= 64 << 20),
        "{st:?}"
    );
    // Other direction: 16 MiB fits in 64 MiB.
    let (out, st) = run_python_in(&limits, "fits", "b = bytearray(16 << 20); print(len(b))");
    assert!(out.status.success(), "{out:?}");
    assert!(!st.oom_killed, "{st:?}");
}

const FORKER: &str = "
import os, sys, time
n = 0
try:
    for i in range(40):
        if os.fork() == 0:
            os.close(1)
            os.close(2)
            time.sleep(20)
            os._exit(0)
        n += 1
    print(\"ok\", n)
except OSError as e:
    print(\"fail\", e.errno, n)
sys.stdout.flush()
";

#[test]
fn real_pids_limit_makes_fork_fail() {
    if !privileged() {
        return;
    }
    let limited = CgroupLimits {
        pids: Some(8),
        ..Default::default()
    };
    let (out, _) = run_python_in(&limited, "pids", FORKER);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("fail 11 "),
        "fork did not fail with EAGAIN: {text:?} {out:?}"
    );
    let n: u32 = text
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    assert!((1..8).contains(&n), "{n} forks under pids.max=8");
    let free = CgroupLimits {
        pids: Some(64),
        ..Default::default()
    };
    let (out, _) = run_python_in(&free, "pids-ok", FORKER);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok 40",
        "{out:?}"
    );
}
