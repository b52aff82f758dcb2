//! Unit tests of `jobs`: the schedule, the missed-run rule (a clock passed in), the store.

use super::*;

fn every(secs: u64) -> Schedule {
    Schedule::Every(Duration::from_secs(secs))
}

fn cron(expr: &str) -> Schedule {
    Schedule::Cron(Box::new(parse_cron(expr).unwrap_or_else(|e| panic!("{e}"))))
}

/// 2026-12-07T10:00:00Z in ms.
const T0: i64 = 1_796_637_600_000;

fn job(name: &str, cron: Option<&str>, every_ms: Option<u64>) -> JobSettings {
    JobSettings {
        name: name.into(),
        cron: cron.map(str::to_string),
        every_ms,
        prompt: "p".into(),
        session: "s".into(),
        deliver_to: None,
    }
}

#[test]
fn schedules_and_their_next_time() {
    assert_eq!(every(2).next_after(T0), Some(T0 + 2000));
    // Every full hour: from 10:00:00 the next is 11:00:00, from 10:30 too.
    let hourly = cron("0 * * * *");
    assert_eq!(hourly.next_after(T0), Some(T0 + 3_600_000));
    assert_eq!(hourly.next_after(T0 + 1_800_000), Some(T0 + 3_600_000));
    // Six fields: seconds first.
    assert_eq!(cron("*/10 * * * * *").next_after(T0 + 1), Some(T0 + 10_000));
    assert!(Schedule::of(&job("a", Some("0 7 * * *"), None)).is_ok());
    assert!(Schedule::of(&job("a", None, Some(1000))).is_ok());
    for bad in [
        job("a", None, None),
        job("a", Some("* * * * *"), Some(5000)),
        job("a", None, Some(999)),
        job("a", Some("61 * * * *"), None),
        job("a", Some("every day"), None),
        job("a", Some(""), None),
    ] {
        assert!(Schedule::of(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_new_job_starts_its_schedule_without_running() {
    let s = on_start(&every(60), None, T0);
    assert_eq!(
        s,
        Start {
            catch_up: false,
            next: Some(T0 + 60_000),
            anchor: Some(T0)
        }
    );
}

#[test]
fn a_job_not_yet_due_waits() {
    let s = on_start(&every(60), Some(T0), T0 + 59_999);
    assert_eq!(
        s,
        Start {
            catch_up: false,
            next: Some(T0 + 60_000),
            anchor: None
        }
    );
}

#[test]
fn missed_runs_are_run_once_however_many_were_missed() {
    // One missed tick, or a thousand: one catch-up run now, then the schedule from now.
    for down_for in [60_000, 61_000, 60_000 * 1000] {
        let now = T0 + down_for;
        let s = on_start(&every(60), Some(T0), now);
        assert!(s.catch_up, "down for {down_for} ms");
        assert_eq!(s.next, Some(now + 60_000));
        assert_eq!(s.anchor, None);
    }
    // A daily job last run yesterday at 07:00, started today at 10:00 after its 07:00 passed.
    let daily = cron("0 7 * * *");
    let yesterday_7 = T0 - 27 * 3_600_000;
    let s = on_start(&daily, Some(yesterday_7), T0);
    assert!(s.catch_up);
    assert_eq!(s.next, Some(T0 + 21 * 3_600_000), "tomorrow at 07:00");
    // Today's 07:00 run was made: nothing to catch up.
    let today_7 = T0 - 3 * 3_600_000;
    assert!(!on_start(&daily, Some(today_7), T0).catch_up);
}

#[test]
fn the_store_keeps_state_and_closes_interrupted_runs() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Store::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.last("a"), None);
    s.set_last("a", 42).unwrap_or_else(|e| panic!("{e}"));
    let s = Store::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.last("a"), Some(42), "kept across a restart");

    let rec = |run: &str, event: &str| {
        s.record(&json!({"job": "a", "run": run, "trigger": "schedule", "event": event}))
            .unwrap_or_else(|e| panic!("{e}"));
    };
    rec("1", "started");
    rec("1", "ended");
    rec("2", "started");
    assert_eq!(s.close_interrupted().ok(), Some(1));
    assert_eq!(s.close_interrupted().ok(), Some(0), "only once");
    let h = s.history().unwrap_or_default();
    assert_eq!(h.len(), 4);
    assert_eq!(h[3]["run"], "2");
    assert_eq!(h[3]["outcome"], "interrupted");

    // Requests: taken once, removed; a busy job's request waits.
    let req = d.path().join("jobs/requests");
    fs::write(req.join("a.r1.json"), "{}").unwrap_or_else(|e| panic!("{e}"));
    fs::write(req.join("b.r2.json"), "{}").unwrap_or_else(|e| panic!("{e}"));
    fs::write(req.join("junk"), "{}").unwrap_or_else(|e| panic!("{e}"));
    let busy: HashSet<String> = ["b".to_string()].into();
    assert_eq!(s.take_requests(&busy), vec![("a".into(), "r1".into())]);
    assert!(s.take_requests(&busy).is_empty());
    assert_eq!(
        s.take_requests(&HashSet::new()),
        vec![("b".into(), "r2".into())]
    );
}

#[test]
fn the_history_is_rotated_and_read_across_the_rotation() {
    let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = Store::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let rec = |run: &str, event: &str| {
        s.record(&json!({"job": "a", "run": run, "trigger": "schedule", "event": event}))
            .unwrap_or_else(|e| panic!("{e}"));
    };
    rec("1", "started");
    // A history at the rotation size: the next line starts a new file.
    let current = d.path().join("jobs").join(HISTORY_FILE);
    let old = d.path().join("jobs").join(HISTORY_OLD_FILE);
    let fill = || {
        fs::OpenOptions::new()
            .append(true)
            .open(&current)
            .and_then(|f| f.set_len(HISTORY_ROTATE_AT))
            .unwrap_or_else(|e| panic!("{e}"));
    };
    fill();
    rec("1", "ended");
    rec("2", "started");
    assert!(old.exists(), "rotated");
    let len = fs::metadata(&current).map(|m| m.len()).unwrap_or(0);
    assert!(len < 1024, "a new history: {len} bytes");
    // Run 1 started before the rotation and ended after it: not interrupted; run 2 is.
    assert_eq!(s.close_interrupted().ok(), Some(1));
    let h = s.history().unwrap_or_default();
    let runs: Vec<(&str, &str)> = h
        .iter()
        .map(|l| {
            (
                l["run"].as_str().unwrap_or(""),
                l["event"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            ("1", "started"),
            ("1", "ended"),
            ("2", "started"),
            ("2", "ended")
        ]
    );
    // The next rotation replaces the old file: at most two files.
    fill();
    rec("3", "started");
    let files = fs::read_dir(d.path().join("jobs"))
        .map(|r| {
            r.filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(
        files, 2,
        "history.jsonl and history.1.jsonl only (no state.json yet)"
    );
}
