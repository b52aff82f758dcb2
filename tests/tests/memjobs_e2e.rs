//! Memory that fits the model, and scheduled jobs, end to end: the real `carapace run` (as
//! root) with `carapace-gateway` confined under it and a fake OpenAI-compatible model on
//! loopback. Compaction of a long session into a summary the next prompt uses, `sessions.reset`
//! archiving and `sessions.restore`; `[[jobs]]` running on schedule, `carapace jobs run`, and
//! exactly one catch-up run after the supervisor was down across a due time.
//!
//! Every test runs as root (CI); it fails, never skips, when not root unless
//! CARAPACE_ALLOW_SKIP=1.

use std::fs;
use std::path::Path;
use std::time::Duration;

use carapace_tests::agent::{config as agent_config, ws};
use carapace_tests::fake_llm::{FakeLlm, RecordedRequest, Scripted};
use carapace_tests::rpc::RpcClient;
use carapace_tests::service::{http_bearer, Service, StartOpts};
use carapace_tests::*;
use serde_json::{json, Value};

/// The default policy with the fake model's address, its API key and an outbound channel
/// `outbox` (a file, recipients `#ops` only) in the gateway profile.
fn agent_policy(dir: &Path, llm_port: u16) -> String {
    carapace_tests::agent::policy_with_outbox(dir, llm_port, "sk-test-memjobs")
}

/// Every message's text content of a request the model received, in order.
fn texts(q: &RecordedRequest) -> Vec<String> {
    q.body["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["content"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn mentions(q: &RecordedRequest, needle: &str) -> bool {
    texts(q).iter().any(|t| t.contains(needle))
}

/// A long user message (about 280 estimated tokens) tagged `marker`.
fn long(marker: &str) -> String {
    format!("{marker} {}", "lorem ipsum ".repeat(90))
}

/// `agent.run` with a long message tagged `marker`: its result and its `agent.step` events.
fn run(c: &mut RpcClient, session: &str, marker: &str) -> (Value, Vec<Value>) {
    let r = c.call_timeout(
        "agent.run",
        json!({"session": session, "message": long(marker)}),
        Duration::from_secs(120),
    );
    let res = r.expect_ok().clone();
    let steps: Vec<Value> = r
        .events_named("agent.step")
        .into_iter()
        .map(|e| e["params"].clone())
        .collect();
    (res, steps)
}

#[test]
fn a_long_session_is_compacted_and_archived_without_losing_a_line() {
    if !privileged() {
        return;
    }
    let llm = FakeLlm::start(vec![]);
    let port = llm.addr().port();
    let dir = tempdir("carapace-memjobs-compact-");
    // A short system prompt and a budget of 1000 tokens (compaction above 800): two long
    // turns fit, the third does not.
    let svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), port)),
        extra_config: agent_config(
            port,
            "system_prompt = \"be brief\"\ncontext_budget = 1000\n",
        ),
        ..StartOpts::default()
    });
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    llm.push_all([Scripted::text("reply one"), Scripted::text("reply two")]);
    let (_, s1) = run(&mut c, "long", "old-turn-1");
    let (_, s2) = run(&mut c, "long", "old-turn-2");
    assert!(s1.iter().chain(&s2).all(|s| s["kind"] != "compacted"));
    assert_eq!(llm.requests().len(), 2, "no summary request yet");

    // The third turn: the oldest two are summarised first, then the run goes on.
    llm.push_all([
        Scripted::text("SUMMARY-7f3a: the user sent two notes"),
        Scripted::text("reply three"),
    ]);
    let (res, s3) = run(&mut c, "long", "new-turn-3");
    assert_eq!(res["reply"], "reply three", "{res}");
    let compacted: Vec<&Value> = s3.iter().filter(|s| s["kind"] == "compacted").collect();
    assert_eq!(compacted.len(), 1, "{s3:?}");
    assert_eq!(compacted[0]["covers"], json!([1, 5]), "{s3:?}");
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 4);
    // The summary request: no tools, the summarise instruction, the two old turns only.
    let sum = &reqs[2];
    assert!(sum.body.get("tools").is_none(), "{}", sum.body);
    assert!(texts(sum)[0].starts_with("You summarise"), "{}", sum.body);
    assert!(mentions(sum, "old-turn-1") && mentions(sum, "old-turn-2"));
    assert!(!mentions(sum, "new-turn-3"));
    // The next prompt: the summary, the new turn, none of the old turns.
    let next = &reqs[3];
    assert!(texts(next)[0].contains("SUMMARY-7f3a"), "{}", next.body);
    assert!(mentions(next, "new-turn-3"));
    assert!(!mentions(next, "old-turn-1") && !mentions(next, "old-turn-2"));

    // The turn after it still starts from the summary (no second summary request).
    llm.push(Scripted::text("reply four"));
    let (_, s4) = run(&mut c, "long", "new-turn-4");
    assert!(s4.iter().all(|s| s["kind"] != "compacted"), "{s4:?}");
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 5);
    let q = &reqs[4];
    assert!(texts(q)[0].contains("SUMMARY-7f3a"));
    assert!(mentions(q, "new-turn-3") && mentions(q, "new-turn-4"));
    assert!(!mentions(q, "old-turn-1"));

    // Nothing was cut from the session: every message, and the summary line marked as such.
    let h = c
        .call("sessions.history", json!({"session": "long"}))
        .expect_ok()
        .clone();
    let lines = h["messages"].as_array().cloned().unwrap_or_default();
    let msgs: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "message").collect();
    assert_eq!(msgs.len(), 8, "{h}");
    assert!(msgs[0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .starts_with("old-turn-1"));
    let sums: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "summary").collect();
    assert_eq!(sums.len(), 1);
    assert_eq!(sums[0]["covers"], json!([1, 5]));
    assert_eq!(sums[0]["summary"], "SUMMARY-7f3a: the user sent two notes");

    // A failed summary: the run goes on with the whole history and says so.
    llm.push_all([Scripted::text("b1"), Scripted::text("b2")]);
    run(&mut c, "other", "b-turn-1");
    run(&mut c, "other", "b-turn-2");
    llm.push_all([
        Scripted::http_error(500, "{\"error\":\"overloaded\"}"),
        Scripted::text("b3"),
    ]);
    let (res, s) = run(&mut c, "other", "b-turn-3");
    assert_eq!(res["reply"], "b3", "{res}");
    assert!(
        s.iter()
            .any(|x| x["kind"] == "notice" && x["notice"] == "compaction_failed"),
        "{s:?}"
    );
    let reqs = llm.requests();
    let last = reqs.last().unwrap_or_else(|| panic!("no request"));
    assert!(mentions(last, "b-turn-1") && mentions(last, "b-turn-3"));
    assert!(svc
        .log_text()
        .contains("summarising the oldest turns failed"));

    // Reset archives the session; the archive is listed, holds every line, and comes back.
    let r = c
        .call("sessions.reset", json!({"session": "long"}))
        .expect_ok()
        .clone();
    assert_eq!(r["removed"], true);
    let id = r["archive"]
        .as_str()
        .unwrap_or_else(|| panic!("no archive in {r}"))
        .to_string();
    assert!(id.starts_with("long."), "{id}");
    let e = c.call("sessions.history", json!({"session": "long"}));
    assert_eq!(e.expect_err().kind(), Some("not_found"));
    let listed = c.call("sessions.archived", json!({})).expect_ok().clone();
    let entry = listed["archived"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["archive"] == id.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{id} not listed: {listed}"));
    assert_eq!(entry["session"], "long");
    assert_eq!(entry["messages"], 8);
    let archived = c
        .call("sessions.archived", json!({"archive": id}))
        .expect_ok()
        .clone();
    assert_eq!(
        archived["messages"], h["messages"],
        "the archive holds every line"
    );
    // Over REST too.
    let rest = http_bearer(svc.addr, "GET", "/v1/archive", &client, None);
    assert_eq!(rest.status, 200, "{}", rest.body);
    assert!(rest.body.contains(&id));

    // A live session of the same name is never overwritten by a restore.
    llm.push(Scripted::text("fresh"));
    run(&mut c, "long", "fresh-start");
    let e = c.call("sessions.restore", json!({"archive": id}));
    assert_eq!(e.expect_err().kind(), Some("invalid_params"), "{e:?}");
    let fresh = c
        .call("sessions.reset", json!({"session": "long"}))
        .expect_ok()
        .clone();
    assert_ne!(fresh["archive"], id.as_str());
    let rest = http_bearer(
        svc.addr,
        "POST",
        &format!("/v1/archive/{id}/restore"),
        &client,
        None,
    );
    assert_eq!(rest.status, 200, "{}", rest.body);
    let back = c
        .call("sessions.history", json!({"session": "long"}))
        .expect_ok()
        .clone();
    assert_eq!(back["messages"], h["messages"], "restored intact");
    let e = c.call("sessions.restore", json!({"archive": id}));
    assert_eq!(e.expect_err().kind(), Some("not_found"));
    let e = c.call("sessions.restore", json!({"archive": "../../etc/passwd"}));
    assert_eq!(e.expect_err().kind(), Some("invalid_params"));
}

/// `carapace jobs history --json` (every job, the last 1000 runs).
fn job_runs(svc: &Service) -> Vec<Value> {
    let o = svc.ctl(&["jobs", "history", "--limit", "1000", "--json"]);
    assert!(
        o.status.success(),
        "carapace jobs history: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
    v["runs"].as_array().cloned().unwrap_or_default()
}

fn ended<'a>(runs: &'a [Value], job: &str, trigger: &str) -> Vec<&'a Value> {
    runs.iter()
        .filter(|r| r["job"] == job && r["trigger"] == trigger && r.get("ended").is_some())
        .collect()
}

/// Wait until `pred` holds of the job history.
fn wait_runs(
    svc: &Service,
    limit: Duration,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let runs = job_runs(svc);
        if pred(&runs) {
            return runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {limit:?}: {runs:#?}\n{}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn jobs_run_on_schedule_on_demand_and_once_after_downtime() {
    if !privileged() {
        return;
    }
    let llm = FakeLlm::start(vec![]);
    llm.echo_when_exhausted();
    let port = llm.addr().port();
    let dir = tempdir("carapace-memjobs-jobs-");
    let jobs = r##"
[[jobs]]
name = "tick"
every = "2s"
prompt = "tick-prompt: how is the weather?"

[[jobs]]
name = "yearly"
cron = "0 0 1 1 *"
prompt = "yearly-prompt: happy new year"
session = "new-year"
deliver_to = { channel = "outbox", conversation = "#ops" }
"##;
    let mut svc = Service::start_opts(StartOpts {
        policy: Some(agent_policy(dir.path(), port)),
        extra_config: format!("{}{jobs}", agent_config(port, "")),
        ..StartOpts::default()
    });

    // The interval job runs on its schedule, through the agent, and every run is recorded.
    let runs = wait_runs(
        &svc,
        Duration::from_secs(30),
        "two scheduled runs of tick",
        |r| ended(r, "tick", "schedule").len() >= 2,
    );
    for r in ended(&runs, "tick", "schedule") {
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["session"], "job-tick");
        assert_eq!(r["reply"], "echo: tick-prompt: how is the weather?", "{r}");
    }
    assert!(
        runs.iter().all(|r| r["trigger"] != "catch_up"),
        "nothing to catch up on a first start: {runs:#?}"
    );
    assert!(llm
        .requests()
        .iter()
        .any(|q| mentions(q, "tick-prompt") && q.body.get("tools").is_some()));
    // The job's session is the job's: an operator reads it, a client token does not.
    let client = svc.token("client");
    let mut c = ws(&svc, &client);
    let r = c.call("sessions.history", json!({"session": "job-tick"}));
    assert_eq!(r.expect_err().kind(), Some("not_found"));
    let operator = svc.token("operator");
    let mut op = ws(&svc, &operator);
    let h = op
        .call("sessions.history", json!({"session": "job-tick"}))
        .expect_ok()
        .clone();
    assert!(h["messages"]
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x["job"]["name"] == "tick")));

    // The yearly job runs only when asked.
    assert!(ended(&runs, "yearly", "schedule").is_empty());
    let o = svc.ctl(&["jobs", "run", "yearly"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("yearly") && out.contains("manual") && out.contains("ok"),
        "{out}"
    );
    let runs = job_runs(&svc);
    let manual = ended(&runs, "yearly", "manual");
    assert_eq!(manual.len(), 1, "{runs:#?}");
    assert_eq!(manual[0]["session"], "new-year");
    let h = op
        .call("sessions.history", json!({"session": "new-year"}))
        .expect_ok()
        .clone();
    assert!(h.to_string().contains("echo: yearly-prompt"), "{h}");
    // Its answer went to the channel conversation, through the broker's `send`.
    assert_eq!(
        manual[0]["delivered"]["status"], "delivered",
        "{}",
        manual[0]
    );
    let outbox = fs::read_to_string(dir.path().join("outbox.log")).unwrap_or_default();
    assert!(
        outbox.contains("echo: yearly-prompt: happy new year"),
        "{outbox}"
    );
    assert!(outbox.contains("#ops"), "{outbox}");
    assert!(
        !outbox.contains("tick-prompt"),
        "tick keeps its answers: {outbox}"
    );
    // An unknown job is refused.
    let o = svc.ctl(&["jobs", "run", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no job \"nope\""));
    let o = svc.ctl(&["jobs", "list", "--json"]);
    let list: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let names: Vec<&str> = list["jobs"]
        .as_array()
        .map(|a| a.iter().filter_map(|j| j["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["tick", "yearly"], "{list}");
    assert_eq!(list["jobs"][0]["schedule"], "every 2s");
    drop(c);

    // Down across several due times of tick: exactly one catch-up run after the start, then
    // the schedule again; yearly was not due, so it does not run.
    svc.stop();
    let (before, started_before) = job_runs_offline(&svc);
    std::thread::sleep(Duration::from_secs(7));
    svc.restart();
    let runs = wait_runs(
        &svc,
        Duration::from_secs(30),
        "a catch-up run of tick and a scheduled one after it",
        |r| !ended(r, "tick", "catch_up").is_empty() && ended(r, "tick", "schedule").len() > before,
    );
    std::thread::sleep(Duration::from_secs(3));
    let runs_later = job_runs(&svc);
    assert_eq!(
        runs_later
            .iter()
            .filter(|r| r["job"] == "tick" && r["trigger"] == "catch_up")
            .count(),
        1,
        "{runs_later:#?}"
    );
    assert!(ended(&runs, "tick", "catch_up")[0]["outcome"] == "ok");
    assert!(
        runs_later
            .iter()
            .all(|r| !(r["job"] == "yearly" && r["trigger"] == "catch_up")),
        "{runs_later:#?}"
    );
    // Every run started before the stop has ended (a run the stop interrupted is recorded
    // as `interrupted`), none is left `running`.
    for id in &started_before {
        let r = runs_later
            .iter()
            .find(|r| r["run"] == id.as_str())
            .unwrap_or_else(|| panic!("run {id} lost: {runs_later:#?}"));
        assert_ne!(r["outcome"], "running", "{r}");
        assert!(r.get("ended").is_some(), "{r}");
    }
}

/// Read from the gateway's workspace while the supervisor is stopped: how many scheduled tick
/// runs ended, and the id of every run started.
fn job_runs_offline(svc: &Service) -> (usize, Vec<String>) {
    let path = svc.state_dir().join("gateway/jobs/history.jsonl");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let ended = lines
        .iter()
        .filter(|l| l["job"] == "tick" && l["trigger"] == "schedule" && l["event"] == "ended")
        .count();
    let started = lines
        .iter()
        .filter(|l| l["event"] == "started")
        .filter_map(|l| l["run"].as_str().map(str::to_string))
        .collect();
    (ended, started)
}
