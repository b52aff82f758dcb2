//! The operator's view of `[[jobs]]` (`carapace jobs list | run NAME | history [NAME]`).
//!
//! The gateway runs the jobs and keeps their state in its workspace (gateway/src/jobs.rs):
//! `jobs/state.json`, `jobs/history.jsonl`, and `jobs/requests/`, where a run asked for now is a
//! file `<job>.<run>.json`. The workspace is the gateway's to write, so everything here is
//! reached beneath it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a link planted by
//! the sandbox leads nowhere, and what is read is only shown, as the gateway recorded it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde_json::{json, Value};

use super::config::{Config, JobConfig, JobSchedule};

const JOBS_DIR: &str = "jobs";
const STATE_FILE: &str = "jobs/state.json";
const HISTORY_FILE: &str = "jobs/history.jsonl";
/// The history before the gateway's last rotation of it.
const HISTORY_OLD_FILE: &str = "jobs/history.1.jsonl";
const REQUESTS_DIR: &str = "jobs/requests";
/// Most bytes read from the end of the history.
const MAX_HISTORY_BYTES: u64 = 8 << 20;
/// Runs `history` returns when not told.
pub const DEFAULT_HISTORY_RUNS: usize = 20;

/// Why a jobs request failed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("no job {0:?} in the configuration (`carapace jobs list` shows them)")]
    Unknown(String),
    #[error("no gateway is configured: jobs are run by the gateway's agent")]
    NoGateway,
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the run request: {0}")]
    Request(#[from] carapace_broker::durable::DurableError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JobsError + 'a {
    move |source| JobsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Open `rel` beneath the directory `ws` without following any symbolic link.
fn open_beneath(ws: &Path, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let dir = rustix::fs::open(
        ws,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(rustix::fs::openat2(
        &dir,
        rel,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// The text of a regular file `rel` beneath `ws` (at most the last `max` bytes); None when
/// it does not exist.
fn read_beneath(ws: &Path, rel: &str, max: u64) -> Result<Option<Vec<u8>>, JobsError> {
    let path = ws.join(rel);
    let fd = match open_beneath(ws, rel, OFlags::RDONLY) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening", &path)(e)),
    };
    let mut f = File::from(fd);
    let meta = f.metadata().map_err(io_err("reading", &path))?;
    if !meta.is_file() {
        return Err(io_err("reading", &path)(io::Error::other(
            "not a regular file",
        )));
    }
    let len = meta.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))
            .map_err(io_err("reading", &path))?;
    }
    let mut buf = Vec::new();
    f.take(max)
        .read_to_end(&mut buf)
        .map_err(io_err("reading", &path))?;
    if len > max {
        // The first line is likely cut: drop it.
        let start = buf
            .iter()
            .position(|b| *b == b'\n')
            .map_or(buf.len(), |i| i + 1);
        buf.drain(..start);
    }
    Ok(Some(buf))
}

fn gateway_workspace(cfg: &Config) -> Result<&Path, JobsError> {
    cfg.gateway
        .as_ref()
        .map(|g| g.workspace.as_path())
        .ok_or(JobsError::NoGateway)
}

fn rfc3339_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    carapace_broker::audit::rfc3339_utc(t)
}

/// The next time of `schedule` after `last_ms` (ms since the epoch).
fn next_after(schedule: &JobSchedule, last_ms: i64) -> Option<i64> {
    match schedule {
        JobSchedule::Every(d) => last_ms.checked_add(i64::try_from(d.as_millis()).ok()?),
        JobSchedule::Cron(c) => {
            let cron = croner::parser::CronParser::new().parse(c).ok()?;
            let z = jiff::Timestamp::from_millisecond(last_ms)
                .ok()?
                .to_zoned(jiff::tz::TimeZone::UTC);
            let n = cron.find_next_occurrence(&z, false).ok()?;
            Some(n.timestamp().as_millisecond())
        }
    }
}

/// Every run in the history (a `started` and an `ended` line merged), oldest first.
fn runs(cfg: &Config) -> Result<Vec<Value>, JobsError> {
    let ws = gateway_workspace(cfg)?;
    let mut text = read_beneath(ws, HISTORY_OLD_FILE, MAX_HISTORY_BYTES)?.unwrap_or_default();
    if !text.is_empty() && !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    text.extend(read_beneath(ws, HISTORY_FILE, MAX_HISTORY_BYTES)?.unwrap_or_default());
    let mut order: Vec<String> = Vec::new();
    let mut by_run: BTreeMap<String, Value> = BTreeMap::new();
    for line in text.split(|b| *b == b'\n') {
        let Ok(Value::Object(l)) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let Some(run) = l.get("run").and_then(Value::as_str).map(str::to_string) else {
            continue;
        };
        let entry = by_run.entry(run.clone()).or_insert_with(|| {
            order.push(run.clone());
            json!({"run": run, "outcome": "running"})
        });
        let is_end = l.get("event").and_then(Value::as_str) == Some("ended");
        for (k, v) in l {
            match k.as_str() {
                "event" => {}
                "ts" if is_end => entry["ended"] = v,
                "ts" => entry["started"] = v,
                _ => entry[k.as_str()] = v,
            }
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|r| by_run.remove(&r))
        .collect())
}

/// `jobs_history`: the last `limit` runs (of job `name`, or of all), oldest first.
pub fn history(cfg: &Config, name: Option<&str>, limit: usize) -> Result<Value, JobsError> {
    if let Some(n) = name {
        if !cfg.jobs.iter().any(|j| j.name == n) {
            return Err(JobsError::Unknown(n.to_string()));
        }
    }
    let mut all: Vec<Value> = runs(cfg)?
        .into_iter()
        .filter(|r| name.is_none_or(|n| r["job"] == n))
        .collect();
    let skip = all.len().saturating_sub(limit);
    all.drain(..skip);
    Ok(json!({ "runs": all }))
}

/// `jobs_list`: every configured job, with its last run and its next time.
pub fn list(cfg: &Config) -> Result<Value, JobsError> {
    if cfg.jobs.is_empty() {
        return Ok(json!({ "jobs": [] }));
    }
    let ws = gateway_workspace(cfg)?;
    let state: Value = read_beneath(ws, STATE_FILE, 1 << 20)?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let all = runs(cfg)?;
    let jobs: Vec<Value> = cfg
        .jobs
        .iter()
        .map(|j| {
            let last_ms = state["jobs"][&j.name]["last_ms"].as_i64();
            let last = all.iter().rev().find(|r| r["job"] == j.name.as_str());
            json!({
                "name": j.name,
                "schedule": j.schedule.to_string(),
                "session": j.session,
                "deliver_to": j.deliver_to.as_ref().map(|(c, v)| json!({"channel": c, "conversation": v})),
                "last_run": last,
                "next": last_ms.and_then(|l| next_after(&j.schedule, l)).map(rfc3339_ms),
            })
        })
        .collect();
    Ok(json!({ "jobs": jobs }))
}

fn job<'c>(cfg: &'c Config, name: &str) -> Result<&'c JobConfig, JobsError> {
    cfg.jobs
        .iter()
        .find(|j| j.name == name)
        .ok_or_else(|| JobsError::Unknown(name.to_string()))
}

/// `jobs_run`: ask the gateway to run `name` now (it takes the request within a second when
/// it runs, else when it starts). The run's id.
pub fn request_run(cfg: &Config, name: &str) -> Result<Value, JobsError> {
    job(cfg, name)?;
    let ws = gateway_workspace(cfg)?;
    let dir_path = ws.join(REQUESTS_DIR);
    // The directories, made beneath the workspace without following links.
    for rel in [JOBS_DIR, REQUESTS_DIR] {
        let parent = open_beneath(
            ws,
            rel.rsplit_once('/').map_or(".", |(p, _)| p),
            OFlags::DIRECTORY | OFlags::RDONLY,
        )
        .map_err(io_err("opening", &dir_path))?;
        let leaf = rel.rsplit('/').next().unwrap_or(rel);
        match rustix::fs::mkdirat(&parent, leaf, Mode::from_raw_mode(0o755)) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::EXIST => {}
            Err(e) => return Err(io_err("creating", &dir_path)(e.into())),
        }
    }
    let dir = open_beneath(ws, REQUESTS_DIR, OFlags::DIRECTORY | OFlags::RDONLY)
        .map_err(io_err("opening", &dir_path))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let run = format!("m{}-{}-{n}", now.as_millis(), std::process::id());
    let body = json!({"job": name, "run": run, "asked": carapace_broker::audit::rfc3339_utc(SystemTime::now())});
    // Through the opened directory, so no link in the workspace can move where it lands.
    let target = PathBuf::from(format!(
        "/proc/self/fd/{}/{name}.{run}.json",
        dir.as_raw_fd()
    ));
    carapace_broker::durable::write_atomic(&target, body.to_string().as_bytes())?;
    Ok(json!({"job": name, "run": run}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_in(ws: &Path) -> Config {
        let text = format!(
            "[gateway]\nworkspace = \"{}\"\n[gateway.agent]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n\n[[jobs]]\nname = \"tick\"\nevery = \"2s\"\nprompt = \"p\"\n",
            ws.display()
        );
        Config::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn history_merges_runs_and_run_requests_land_beneath_the_workspace() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ws = d.path().join("gw");
        std::fs::create_dir_all(ws.join("jobs")).unwrap_or_else(|e| panic!("{e}"));
        let cfg = cfg_in(&ws);
        assert_eq!(history(&cfg, None, 10).ok(), Some(json!({"runs": []})));
        // Run 1 started before the gateway rotated the history (the rotated file ends
        // without a newline) and ended after.
        std::fs::write(
            ws.join(HISTORY_OLD_FILE),
            r#"{"ts":"a","job":"tick","run":"1","trigger":"schedule","event":"started"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            ws.join(HISTORY_FILE),
            concat!(
                r#"{"ts":"b","job":"tick","run":"1","trigger":"schedule","event":"ended","outcome":"ok"}"#, "\n",
                "not json\n",
                r#"{"ts":"c","job":"tick","run":"2","trigger":"catch_up","event":"started"}"#, "\n",
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let h = history(&cfg, Some("tick"), 10).unwrap_or_else(|e| panic!("{e}"));
        let runs = h["runs"].as_array().cloned().unwrap_or_default();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (&runs[0]["started"], &runs[0]["ended"]),
            (&json!("a"), &json!("b"))
        );
        assert_eq!(runs[0]["outcome"], "ok");
        assert_eq!(runs[1]["outcome"], "running");
        assert_eq!(runs[1]["trigger"], "catch_up");
        assert_eq!(
            history(&cfg, None, 1)
                .map(|h| h["runs"][0]["run"].clone())
                .ok(),
            Some(json!("2"))
        );
        assert!(matches!(
            history(&cfg, Some("nope"), 1),
            Err(JobsError::Unknown(_))
        ));

        let r = request_run(&cfg, "tick").unwrap_or_else(|e| panic!("{e}"));
        let run = r["run"].as_str().unwrap_or_default().to_string();
        assert!(ws.join(format!("jobs/requests/tick.{run}.json")).is_file());
        // Two requests at once are two runs.
        let again = request_run(&cfg, "tick").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(again["run"], r["run"]);
        assert_eq!(
            std::fs::read_dir(ws.join("jobs/requests"))
                .map(Iterator::count)
                .ok(),
            Some(2)
        );
        assert!(matches!(
            request_run(&cfg, "nope"),
            Err(JobsError::Unknown(_))
        ));
    }

    #[test]
    fn links_planted_in_the_workspace_lead_nowhere() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ws = d.path().join("gw");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&ws).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(outside.join("requests")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(outside.join("history.jsonl"), "{\"run\":\"secret\"}\n")
            .unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&outside, ws.join("jobs")).unwrap_or_else(|e| panic!("{e}"));
        let cfg = cfg_in(&ws);
        assert!(history(&cfg, None, 10).is_err(), "read through a link");
        assert!(request_run(&cfg, "tick").is_err(), "written through a link");
        assert_eq!(
            std::fs::read_dir(outside.join("requests"))
                .map(Iterator::count)
                .ok(),
            Some(0)
        );
    }

    #[test]
    fn next_times() {
        assert_eq!(
            next_after(&JobSchedule::Every(Duration::from_secs(2)), 1000),
            Some(3000)
        );
        // 2026-12-07T10:00:00Z -> 11:00.
        let t0 = 1_796_637_600_000;
        assert_eq!(
            next_after(&JobSchedule::Cron("0 * * * *".into()), t0),
            Some(t0 + 3_600_000)
        );
    }
}
