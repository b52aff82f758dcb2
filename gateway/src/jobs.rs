//! Scheduled jobs (`[[jobs]]` of `carapace.toml`, passed in the settings): at a cron expression's
//! times or every interval, a prompt is run through the agent (the same loop, tools, policy and
//! approvals as `agent.run`) in the job's session, and the final answer is sent to a channel
//! conversation when the job says so.
//!
//! Everything lives in `<state_dir>/jobs/`:
//! - `state.json` (written with `durable::write_atomic`): per job, `last_ms`, when its last run
//!   started (or, before the first one, when the job was first seen);
//! - `history.jsonl` (appended, `fdatasync`ed; at [`HISTORY_ROTATE_AT`] bytes renamed to
//!   `history.1.jsonl`, replacing the one before, so at most twice that is kept): a `started`
//!   and an `ended` line per run:
//!   `{"ts","job","run","trigger","event":"started"}` and `{..,"event":"ended","outcome":
//!   "ok"|"failed"|"interrupted","stopped","reply","delivered","error"}`; a run a crash left
//!   without its `ended` line gets one (`interrupted`) at the next start;
//! - `requests/<job>.<run>.json`: a run asked for now (`carapace jobs run`, written by the
//!   supervisor); taken within a second and removed.
//!
//! **Missed runs** ([`on_start`]): at start, a job whose next time after its last run has
//! passed (the gateway or the supervisor was down) runs once (`trigger: catch_up`), however
//! many times were missed, then follows its schedule. A run still going when its next time
//! comes delays it: the next run starts when it ends, once. Cron expressions are evaluated in
//! UTC.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use carapace_broker::sync::lock;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::{App, Emitter};
use crate::methods::agent::{converse, store, Model};
use crate::rpc::RpcError;
use crate::settings::JobSettings;

/// The directory beneath the state directory.
pub const JOBS_DIR: &str = "jobs";
pub const STATE_FILE: &str = "state.json";
pub const HISTORY_FILE: &str = "history.jsonl";
/// The history before the last rotation.
pub const HISTORY_OLD_FILE: &str = "history.1.jsonl";
/// Size at which the history is rotated (before the next line is appended).
pub const HISTORY_ROTATE_AT: u64 = 4 << 20;
pub const REQUESTS_DIR: &str = "requests";
/// Bytes read from the end of the history (for the runs a stop interrupted).
const HISTORY_TAIL: u64 = 4 << 20;
/// Characters of the answer kept in the history.
const REPLY_IN_HISTORY: usize = 500;
/// How often due jobs and requests are looked for.
const TICK: Duration = Duration::from_secs(1);

/// What the system prompt gains for a job's run.
const JOB_PROMPT: &str = "This turn was started by a scheduled job of the operator, not by a \
person waiting for the answer. Your final answer is the job's result.";

/// When a job runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron(Box<croner::Cron>),
    Every(Duration),
}

impl Schedule {
    /// From a job's settings: exactly one of a cron expression (5 fields, or 6 with seconds
    /// first) and an interval of at least one second.
    pub fn of(job: &JobSettings) -> Result<Schedule, String> {
        match (&job.cron, job.every_ms) {
            (Some(c), None) => parse_cron(c).map(|c| Schedule::Cron(Box::new(c))),
            (None, Some(ms)) if ms >= 1000 => Ok(Schedule::Every(Duration::from_millis(ms))),
            (None, Some(_)) => Err("`every` must be at least 1s".into()),
            (Some(_), Some(_)) => Err("give `cron` or `every`, not both".into()),
            (None, None) => Err("give `cron` or `every`".into()),
        }
    }

    /// The first time strictly after `t` (ms since the epoch); None when there is none.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Schedule::Every(d) => t.checked_add(i64::try_from(d.as_millis()).ok()?),
            Schedule::Cron(c) => {
                let ts = jiff::Timestamp::from_millisecond(t).ok()?;
                let z = ts.to_zoned(jiff::tz::TimeZone::UTC);
                let next = c.find_next_occurrence(&z, false).ok()?;
                Some(next.timestamp().as_millisecond())
            }
        }
    }
}

/// A cron expression as croner reads it (5 fields, or 6 with seconds first), or why not.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::new()
        .parse(expr)
        .map_err(|e| format!("cron expression {expr:?}: {e}"))
}

/// What a job does when the gateway starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Run once now: one or more times passed since its last run.
    pub catch_up: bool,
    /// Its next time (when it does not run now; when it does, the next after that run).
    pub next: Option<i64>,
    /// The `last_ms` to record now: the job was never seen (its schedule starts now).
    pub anchor: Option<i64>,
}

/// The missed-run rule: `last` is when the job's last run started (or it was first seen), `now`
/// the clock. A job seen for the first time starts its schedule now; one whose next time after
/// `last` is not after `now` runs once now, then follows its schedule from there.
pub fn on_start(s: &Schedule, last: Option<i64>, now: i64) -> Start {
    match last {
        None => Start {
            catch_up: false,
            next: s.next_after(now),
            anchor: Some(now),
        },
        Some(l) => match s.next_after(l) {
            Some(n) if n <= now => Start {
                catch_up: true,
                next: s.next_after(now),
                anchor: None,
            },
            next => Start {
                catch_up: false,
                next,
                anchor: None,
            },
        },
    }
}

/// Why the jobs' files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the jobs' state: {0}")]
    State(#[from] carapace_broker::durable::DurableError),
}

fn jobs_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JobsError + 'a {
    move |source| JobsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct JobState {
    last_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default)]
    jobs: BTreeMap<String, JobState>,
}

/// The JSON object lines of the last [`HISTORY_TAIL`] bytes of `path` (none if it is missing).
fn tail_lines(path: &Path) -> Result<Vec<Value>, JobsError> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(jobs_err("reading", path)(e)),
    };
    let len = f.metadata().map_err(jobs_err("reading", path))?.len();
    if len > HISTORY_TAIL {
        f.seek(io::SeekFrom::Start(len - HISTORY_TAIL))
            .map_err(jobs_err("reading", path))?;
    }
    let mut text = Vec::new();
    f.take(HISTORY_TAIL)
        .read_to_end(&mut text)
        .map_err(jobs_err("reading", path))?;
    Ok(text
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(Value::is_object)
        .collect())
}

/// The jobs' directory: state and history.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: Mutex<StateFile>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    carapace_broker::audit::rfc3339_utc(t)
}

impl Store {
    /// The store beneath `state_dir`; an unreadable state file is logged and read as empty
    /// (each job then starts its schedule anew: nothing runs twice, a missed run may be lost).
    pub fn open(state_dir: &Path) -> Result<Store, JobsError> {
        let dir = state_dir.join(JOBS_DIR);
        carapace_broker::durable::ensure_dir(&dir.join(REQUESTS_DIR))
            .map_err(jobs_err("creating", &dir))?;
        let path = dir.join(STATE_FILE);
        let state = match carapace_broker::durable::read_capped(&path, 1 << 20) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "the jobs' state is unreadable; every job starts its schedule now");
                StateFile::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(jobs_err("reading", &path)(e)),
        };
        Ok(Store {
            dir,
            state: Mutex::new(state),
        })
    }

    pub fn last(&self, job: &str) -> Option<i64> {
        lock(&self.state).jobs.get(job).map(|j| j.last_ms)
    }

    /// Record `last_ms` of `job` durably.
    pub fn set_last(&self, job: &str, ms: i64) -> Result<(), JobsError> {
        let bytes = {
            let mut s = lock(&self.state);
            s.jobs.insert(job.to_string(), JobState { last_ms: ms });
            serde_json::to_vec_pretty(&*s).unwrap_or_default()
        };
        carapace_broker::durable::write_atomic(&self.dir.join(STATE_FILE), &bytes)?;
        Ok(())
    }

    /// Append one history line (and `fdatasync`), rotating the history first when it has
    /// reached [`HISTORY_ROTATE_AT`].
    pub fn record(&self, line: &Value) -> Result<(), JobsError> {
        let path = self.dir.join(HISTORY_FILE);
        if fs::metadata(&path).is_ok_and(|m| m.len() >= HISTORY_ROTATE_AT) {
            let old = self.dir.join(HISTORY_OLD_FILE);
            fs::rename(&path, &old).map_err(jobs_err("rotating", &path))?;
            carapace_broker::durable::sync_dir(&self.dir)
                .map_err(jobs_err("syncing", &self.dir))?;
        }
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(jobs_err("opening", &path))?;
        f.write_all(&bytes)
            .map_err(jobs_err("appending to", &path))?;
        f.sync_data().map_err(jobs_err("syncing", &path))
    }

    /// The history's lines (unreadable ones skipped), oldest first: the last [`HISTORY_TAIL`]
    /// bytes of the rotated file, then of the current one (a run that started before the
    /// rotation is found with its end).
    pub fn history(&self) -> Result<Vec<Value>, JobsError> {
        let mut lines = tail_lines(&self.dir.join(HISTORY_OLD_FILE))?;
        lines.extend(tail_lines(&self.dir.join(HISTORY_FILE))?);
        Ok(lines)
    }

    /// Give every run that started and never ended an `ended` line, `interrupted`.
    pub fn close_interrupted(&self) -> Result<usize, JobsError> {
        let lines = self.history()?;
        let ended: HashSet<&str> = lines
            .iter()
            .filter(|l| l["event"] == "ended")
            .filter_map(|l| l["run"].as_str())
            .collect();
        let open: Vec<&Value> = lines
            .iter()
            .filter(|l| l["event"] == "started")
            .filter(|l| l["run"].as_str().is_some_and(|r| !ended.contains(r)))
            .collect();
        for l in &open {
            self.record(&json!({
                "ts": rfc3339(now_ms()), "job": l["job"], "run": l["run"], "trigger": l["trigger"],
                "event": "ended", "outcome": "interrupted",
                "error": "the gateway stopped before the run ended",
            }))?;
        }
        Ok(open.len())
    }

    /// Take the run requests waiting: (job, run id), oldest first. Each is removed.
    pub fn take_requests(&self, busy: &HashSet<String>) -> Vec<(String, String)> {
        let dir = self.dir.join(REQUESTS_DIR);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut found: Vec<(SystemTime, String, String, PathBuf)> = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some((job, run)) = name.strip_suffix(".json").and_then(|n| n.split_once('.'))
            else {
                continue;
            };
            if busy.contains(job) {
                continue;
            }
            let at = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            found.push((at, job.to_string(), run.to_string(), e.path()));
        }
        found.sort();
        let mut out = Vec::new();
        for (_, job, run, path) in found {
            match fs::remove_file(&path) {
                Ok(()) => out.push((job, run)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot take a job run request")
                }
            }
        }
        out
    }
}

/// The id of a run started by the schedule: its start time and a counter.
fn run_id(now: i64) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{now}-{n}")
}

/// Run the jobs of the settings for as long as the gateway runs.
pub async fn run_jobs(app: Arc<App>) {
    let jobs: Vec<(JobSettings, Schedule)> = app
        .settings
        .jobs
        .iter()
        .filter_map(|j| match Schedule::of(j) {
            Ok(s) => Some((j.clone(), s)),
            Err(e) => {
                tracing::error!(job = %j.name, "job not scheduled: {e}");
                None
            }
        })
        .collect();
    if jobs.is_empty() {
        return;
    }
    let state_dir = PathBuf::from(&app.settings.state_dir);
    let store = match Store::open(&state_dir) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "jobs cannot run: their state is not usable");
            return;
        }
    };
    match store.close_interrupted() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(runs = n, "job runs interrupted by a stop were recorded"),
        Err(e) => tracing::warn!(error = %e, "cannot record interrupted job runs"),
    }
    let now = now_ms();
    let mut next: BTreeMap<String, Option<i64>> = BTreeMap::new();
    let mut due: Vec<(String, String, &'static str)> = Vec::new();
    for (j, s) in &jobs {
        let st = on_start(s, store.last(&j.name), now);
        if let Some(a) = st.anchor {
            if let Err(e) = store.set_last(&j.name, a) {
                tracing::warn!(job = %j.name, error = %e, "cannot record the job's schedule start");
            }
        }
        if st.catch_up {
            tracing::info!(job = %j.name, "a run was missed while the gateway was down: running once now");
            due.push((j.name.clone(), run_id(now), "catch_up"));
        }
        next.insert(j.name.clone(), st.next);
    }
    tracing::info!(jobs = jobs.len(), "jobs scheduled");
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = now_ms();
        let busy = lock(&running).clone();
        for (job, run) in store.take_requests(&busy) {
            if jobs.iter().any(|(j, _)| j.name == job) {
                due.push((job, run, "manual"));
            } else {
                tracing::warn!(%job, %run, "a run was asked for a job that is not configured");
            }
        }
        for (j, _) in &jobs {
            let at = next.get(&j.name).copied().flatten();
            if at.is_some_and(|t| t <= now)
                && !busy.contains(&j.name)
                && !due.iter().any(|(n, _, _)| *n == j.name)
            {
                due.push((j.name.clone(), run_id(now), "schedule"));
            }
        }
        let mut later = Vec::new();
        for (name, run, trigger) in due.drain(..) {
            let Some((job, sched)) = jobs.iter().find(|(j, _)| j.name == name) else {
                continue;
            };
            if !lock(&running).insert(name.clone()) {
                // One run of a job at a time: a request waits for the run before it.
                later.push((name, run, trigger));
                continue;
            }
            let start = now_ms();
            if let Err(e) = store.set_last(&name, start) {
                tracing::warn!(job = %name, error = %e, "cannot record the job's last run");
            }
            next.insert(name.clone(), sched.next_after(start));
            let (app, store, running, job) =
                (app.clone(), store.clone(), running.clone(), job.clone());
            tokio::spawn(async move {
                execute(&app, &store, &job, &run, trigger).await;
                lock(&running).remove(&job.name);
            });
        }
        due = later;
        tick.tick().await;
    }
}

/// One run of `job`: recorded as started, run through the agent, delivered, recorded as ended.
async fn execute(app: &Arc<App>, store: &Store, job: &JobSettings, run: &str, trigger: &str) {
    let started = now_ms();
    let head = json!({"job": job.name, "run": run, "trigger": trigger, "session": job.session});
    let mut line = head.clone();
    line["ts"] = rfc3339(started).into();
    line["event"] = "started".into();
    if let Err(e) = store.record(&line) {
        tracing::warn!(job = %job.name, error = %e, "cannot record the job's run");
    }
    tracing::info!(job = %job.name, run, trigger, session = %job.session, "job run started");
    let result = run_once(app, job, run).await;
    let mut line = head;
    line["ts"] = rfc3339(now_ms()).into();
    line["event"] = "ended".into();
    line["started"] = rfc3339(started).into();
    match result {
        Ok(done) => {
            let ok = done.stopped == "done" && done.delivery_error.is_none();
            line["outcome"] = if ok { "ok" } else { "failed" }.into();
            line["stopped"] = done.stopped.into();
            line["reply"] = done.reply.map_or(Value::Null, |r| clipped(&r).into());
            line["delivered"] = done.delivered;
            line["error"] = done.delivery_error.map_or(Value::Null, Value::from);
            line["usage"] = json!(done.usage);
        }
        Err(e) => {
            line["outcome"] = "failed".into();
            line["error"] = format!("{}: {}", e.kind.as_str(), e.message).into();
        }
    }
    tracing::info!(job = %job.name, run, outcome = %line["outcome"], "job run ended");
    if let Err(e) = store.record(&line) {
        tracing::warn!(job = %job.name, error = %e, "cannot record the job's run");
    }
}

fn clipped(s: &str) -> String {
    match s.char_indices().nth(REPLY_IN_HISTORY) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

struct Done {
    stopped: &'static str,
    reply: Option<String>,
    delivered: Value,
    delivery_error: Option<String>,
    usage: crate::sessions::Usage,
}

async fn run_once(app: &Arc<App>, job: &JobSettings, run: &str) -> Result<Done, RpcError> {
    // The job owns its session and its tools' workspace, like a client token its own.
    crate::owner::scope(crate::owner::of_job(&job.name), run_as_job(app, job, run)).await
}

async fn run_as_job(app: &Arc<App>, job: &JobSettings, run: &str) -> Result<Done, RpcError> {
    let model = Model::load(app).await?;
    let _guard = app.sessions.lock(&job.session).await;
    {
        let (app, session, owner) = (
            app.clone(),
            job.session.clone(),
            crate::owner::of_job(&job.name),
        );
        crate::methods::blocking(move || match app.sessions.claim(&session, &owner)? {
            crate::sessions::Claim::Mine => Ok(()),
            crate::sessions::Claim::Taken => Err(RpcError::invalid_params(format!(
                "session {session:?} belongs to another owner: give the job a session of its own"
            ))),
        })
        .await?;
    }
    let mut tag = serde_json::Map::new();
    tag.insert("job".into(), json!({"name": job.name, "run": run}));
    store(
        app,
        &job.session,
        json!({"role": "user", "content": job.prompt}),
        Some(tag),
    )
    .await?;
    let system = model.system_prompt(Some(JOB_PROMPT));
    let end = converse(app, &model, &job.session, system, &Emitter::none(), None).await?;
    let reply = crate::sessions::content_text(&end.last).filter(|t| !t.trim().is_empty());
    let mut done = Done {
        stopped: end.stopped,
        reply: reply.clone(),
        delivered: Value::Null,
        delivery_error: None,
        usage: end.usage,
    };
    if let (Some(to), Some(text), "done") = (&job.deliver_to, reply, end.stopped) {
        match app
            .broker
            .send_with(
                to.channel.clone(),
                to.conversation.clone(),
                text,
                None,
                Some(format!("job:{}:{run}", job.name)),
            )
            .await
        {
            Ok(r) => {
                done.delivered = json!({"channel": to.channel, "conversation": to.conversation, "status": r.status, "dlq_id": r.dlq_id, "outbox_id": r.outbox_id});
            }
            Err(e) => done.delivery_error = Some(format!("sending the answer: {e}")),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests;
