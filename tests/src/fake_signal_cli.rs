//! A fake signal-cli for the Signal adapter's tests: the program `fake-signal-cli`
//! (tests/src/bin/) speaks signal-cli's JSON-RPC exactly as `signal-cli --config DIR -a ACCOUNT
//! jsonRpc` does on stdin and stdout (signal-cli-jsonrpc(5)), and is run by `carapace run`
//! confined, as the daemon of a `kind = "signal"` channel. Signal's servers are replaced by its
//! workspace (the `--config` directory), which the test drives through [`FakeSignal`]:
//!
//! | file | what the daemon does |
//! |---|---|
//! | `inbox/NAME.json` | an envelope: sent as a `receive` notification, then the file is removed (taken in name order) |
//! | `inbox/NAME.raw` | a line written as it is (a malformed frame), then removed |
//! | `sent.jsonl` | each `send` it answered: `{"params": ..., "timestamp": N}` |
//! | `ratelimit` | a number N: the next N sends fail with error -5 and a `RATE_LIMIT_FAILURE` result (`retryAfterSeconds` 1) |
//! | `crash` | removed, then half a notification is written and the daemon exits 3 |
//! | `started` | one line per start |
//!
//! Answers: `send` → `{"timestamp":N,"results":[{"recipientAddress":{...},"type":"SUCCESS"}]}`,
//! `version` → `{"version":"0.13.0-fake"}`, anything else → -32601; a line that is not JSON →
//! -32700 with `"id":null`, like signal-cli.

use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// The daemon: `--config DIR -a ACCOUNT jsonRpc`, nothing else.
pub fn daemon_main(args: Vec<String>) -> ExitCode {
    let (dir, account) = match args.as_slice() {
        [c, dir, a, account, cmd] if c == "--config" && a == "-a" && cmd == "jsonRpc" => {
            (PathBuf::from(dir), account.clone())
        }
        _ => {
            eprintln!("fake-signal-cli: usage: --config DIR -a ACCOUNT jsonRpc (got {args:?})");
            return ExitCode::from(1);
        }
    };
    let _ = fs::create_dir_all(dir.join("inbox"));
    append(&dir.join("started"), "started\n");
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let clock = Arc::new(AtomicU64::new(now_ms()));
    {
        let (dir, out, clock) = (dir.clone(), out.clone(), clock.clone());
        std::thread::spawn(move || serve_requests(&dir, &out, &clock));
    }
    loop {
        if fs::remove_file(dir.join("crash")).is_ok() {
            let mut o = out
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = o.write_all(br#"{"jsonrpc":"2.0","method":"receive","params":{"envel"#);
            let _ = o.flush();
            eprintln!("fake-signal-cli: crashing as asked");
            return ExitCode::from(3);
        }
        let mut names: Vec<PathBuf> = fs::read_dir(dir.join("inbox"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for p in names {
            let Ok(text) = fs::read_to_string(&p) else {
                continue;
            };
            let line = match p.extension().and_then(|e| e.to_str()) {
                Some("raw") => text.trim_end_matches('\n').to_string(),
                Some("json") => match serde_json::from_str::<Value>(&text) {
                    Ok(env) => format!(
                        r#"{{"jsonrpc":"2.0","method":"receive","params":{{"envelope":{env},"account":{}}}}}"#,
                        Value::from(account.as_str())
                    ),
                    Err(_) => continue,
                },
                _ => continue,
            };
            write_line(&out, &line);
            let _ = fs::remove_file(&p);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn append(path: &Path, text: &str) {
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(text.as_bytes());
    }
}

fn write_line(out: &Mutex<std::io::Stdout>, line: &str) {
    let mut o = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = o.write_all(format!("{line}\n").as_bytes());
    let _ = o.flush();
}

/// A response line as signal-cli (Jackson) writes it: `jsonrpc`, then `result` or `error`,
/// then `id`.
fn response(outcome: Result<Value, Value>, id: &Value) -> String {
    match outcome {
        Ok(r) => format!(r#"{{"jsonrpc":"2.0","result":{r},"id":{id}}}"#),
        Err(e) => format!(r#"{{"jsonrpc":"2.0","error":{e},"id":{id}}}"#),
    }
}

fn error(code: i64, message: &str, data: Value) -> Value {
    json!({"code": code, "message": message, "data": data})
}

fn serve_requests(dir: &Path, out: &Mutex<std::io::Stdout>, clock: &AtomicU64) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                write_line(
                    out,
                    &response(
                        Err(error(-32700, &e.to_string(), Value::Null)),
                        &Value::Null,
                    ),
                );
                continue;
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let method = req.get("method").and_then(Value::as_str).unwrap_or("");
        let params = req.get("params").cloned().unwrap_or(Value::Null);
        let answer = match method {
            "version" => Ok(json!({"version": "0.13.0-fake"})),
            "send" => send(dir, &params, clock),
            "" => Err(error(-32600, "method field must be set", Value::Null)),
            _ => Err(error(-32601, "Method not implemented", Value::Null)),
        };
        write_line(out, &response(answer, &id));
    }
}

fn send(dir: &Path, params: &Value, clock: &AtomicU64) -> Result<Value, Value> {
    let ts = clock.fetch_add(1, Ordering::SeqCst).max(now_ms());
    let address = match params.get("recipient") {
        Some(Value::Array(r)) => {
            json!({"uuid": null, "number": r.first().cloned().unwrap_or(Value::Null)})
        }
        Some(r) => json!({"uuid": null, "number": r}),
        None => json!({"uuid": null, "number": null}),
    };
    if params
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        return Err(error(-1, "Sending empty message is not allowed, either a message, attachment or sticker must be given.", Value::Null));
    }
    let limit = dir.join("ratelimit");
    if let Some(n) = fs::read_to_string(&limit)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        if n > 0 {
            let _ = fs::write(&limit, (n - 1).to_string());
            let result = json!({"timestamp": ts, "results": [{"recipientAddress": address,
                "type": "RATE_LIMIT_FAILURE", "token": "challenge-token", "retryAfterSeconds": 1}]});
            return Err(error(
                -5,
                "Failed to send message due to rate limiting",
                json!({ "response": result }),
            ));
        }
    }
    append(
        &dir.join("sent.jsonl"),
        &format!("{}\n", json!({"params": params, "timestamp": ts})),
    );
    let mut result = json!({"recipientAddress": address, "type": "SUCCESS"});
    if let Some(g) = params.get("groupId") {
        result["groupId"] = g.clone();
    }
    Ok(json!({"timestamp": ts, "results": [result]}))
}

/// The test's side: the daemon's workspace.
#[derive(Debug)]
pub struct FakeSignal {
    dir: PathBuf,
    seq: AtomicU64,
}

impl FakeSignal {
    /// Over the daemon workspace `dir` (created with its inbox).
    pub fn new(dir: &Path) -> FakeSignal {
        fs::create_dir_all(dir.join("inbox")).unwrap_or_else(|e| panic!("inbox: {e}"));
        FakeSignal {
            dir: dir.to_path_buf(),
            seq: AtomicU64::new(0),
        }
    }

    fn drop_in(&self, ext: &str, text: &str) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let tmp = self.dir.join(format!(".in-{n}"));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("{e}"));
        fs::rename(&tmp, self.dir.join("inbox").join(format!("{n:06}.{ext}")))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A text message from `number` (uuid `uuid`) with `timestamp`, in a group when `group`.
    pub fn push_text(
        &self,
        number: &str,
        uuid: &str,
        timestamp: u64,
        text: &str,
        group: Option<&str>,
    ) {
        let mut data = json!({"timestamp": timestamp, "message": text, "expiresInSeconds": 0,
            "viewOnce": false, "mentions": [], "attachments": [], "contacts": []});
        if let Some(g) = group {
            data["groupInfo"] = json!({"groupId": g, "type": "DELIVER"});
        }
        let env = json!({"source": number, "sourceNumber": number, "sourceUuid": uuid,
            "sourceName": "name", "sourceDevice": 1, "timestamp": timestamp, "dataMessage": data});
        self.drop_in("json", &env.to_string());
    }

    /// A line as it is.
    pub fn push_raw(&self, line: &str) {
        self.drop_in("raw", line);
    }

    /// The next `n` sends are rate-limited.
    pub fn rate_limit(&self, n: u32) {
        fs::write(self.dir.join("ratelimit"), n.to_string()).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Rate limits not yet answered (None: none was asked for).
    pub fn rate_limits_left(&self) -> Option<u32> {
        fs::read_to_string(self.dir.join("ratelimit"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Make the daemon die (mid-line).
    pub fn crash(&self) {
        fs::write(self.dir.join("crash"), "").unwrap_or_else(|e| panic!("{e}"));
    }

    /// How often the daemon started.
    pub fn starts(&self) -> usize {
        fs::read_to_string(self.dir.join("started"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Messages still waiting in the inbox.
    pub fn pending(&self) -> usize {
        fs::read_dir(self.dir.join("inbox")).map_or(0, |rd| rd.count())
    }

    /// The `send` params answered so far.
    pub fn sent(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.join("sent.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["params"].clone())
            .collect()
    }

    /// Wait until at least `n` sends were answered.
    pub fn wait_sent(&self, n: usize, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.sent();
            if s.len() >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} sends: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
