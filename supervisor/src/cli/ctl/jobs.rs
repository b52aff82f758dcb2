//! `carapace jobs list | run NAME | history [NAME]`: the scheduled jobs of `[[jobs]]`, run by
//! the gateway's agent, seen and started through the control socket.

use std::time::{Duration, Instant};

use super::*;

/// `carapace jobs`.
#[derive(Debug, Args)]
#[command(
    long_about = "Scheduled jobs ([[jobs]] in carapace.toml): a prompt the agent runs at a cron \
                  expression's times (UTC) or every interval, in the job's session, its answer \
                  sent to a channel conversation or kept in the session. A run missed while the \
                  service was down is made once when it starts again. Every run is recorded \
                  with its outcome.",
    after_help = "Exit status: 0 ok, 1 the supervisor refused (no such job, ...) or the run \
                  failed, 2 usage, 3 no supervisor is running.\n\nExamples:\n  carapace jobs \
                  list\n  carapace jobs run daily-news\n  carapace jobs history daily-news \
                  --limit 5"
)]
pub struct JobsArgs {
    #[command(flatten)]
    pub opts: CtlOpts,
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// The configured jobs, their last run and next time
    List,
    /// Run a job now (and wait for its outcome)
    Run {
        #[arg(value_name = "NAME")]
        name: String,
        /// Return once the gateway was asked, without waiting for the run to end
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the run to end
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        timeout: u64,
    },
    /// The last runs, oldest first, with their outcome
    History {
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// How many runs
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
    },
}

/// `carapace jobs ...`.
pub fn jobs(a: JobsArgs) -> i32 {
    on_terminal(|t| jobs_to(&a, t))
}

pub fn jobs_to(a: &JobsArgs, t: &mut Term<'_>) -> i32 {
    let socket = a.opts.socket();
    let json = a.opts.json;
    match &a.command {
        JobsCommand::List => match control::call(&socket, &Request::JobsList) {
            Ok(v) if json => {
                t.json(&v);
                EXIT_OK
            }
            Ok(v) => {
                t.out(&format_jobs(&v));
                EXIT_OK
            }
            Err(e) => t.fail(&e),
        },
        JobsCommand::History { name, limit } => {
            let req = Request::JobsHistory {
                name: name.clone(),
                limit: Some(*limit),
            };
            match control::call(&socket, &req) {
                Ok(v) if json => {
                    t.json(&v);
                    EXIT_OK
                }
                Ok(v) => {
                    t.out(&format_runs(&v));
                    EXIT_OK
                }
                Err(e) => t.fail(&e),
            }
        }
        JobsCommand::Run {
            name,
            no_wait,
            timeout,
        } => {
            let asked = match control::call(&socket, &Request::JobsRun { name: name.clone() }) {
                Ok(v) => v,
                Err(e) => return t.fail(&e),
            };
            let run = asked["run"].as_str().unwrap_or_default().to_string();
            if *no_wait {
                if json {
                    t.json(&asked);
                } else {
                    t.out(&format!("asked: job {} run {}\n", clean(name), clean(&run)));
                }
                return EXIT_OK;
            }
            let deadline = Instant::now() + Duration::from_secs(*timeout);
            loop {
                let req = Request::JobsHistory {
                    name: Some(name.clone()),
                    limit: Some(1000),
                };
                let h = match control::call(&socket, &req) {
                    Ok(v) => v,
                    Err(e) => return t.fail(&e),
                };
                let found = h["runs"]
                    .as_array()
                    .and_then(|r| r.iter().find(|x| x["run"] == run.as_str()))
                    .filter(|x| x.get("ended").is_some())
                    .cloned();
                if let Some(r) = found {
                    if json {
                        t.json(&r);
                    } else {
                        t.out(&format_runs(&serde_json::json!({"runs": [r]})));
                    }
                    return if r["outcome"] == "ok" {
                        EXIT_OK
                    } else {
                        EXIT_FAILED
                    };
                }
                if Instant::now() >= deadline {
                    t.err(&format!(
                        "job {} run {} did not end within {timeout} s (is the gateway running? \
                         `carapace jobs history {}` shows it when it does)",
                        clean(name),
                        clean(&run),
                        clean(name)
                    ));
                    return EXIT_FAILED;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| "-".to_string(), clean)
}

/// The jobs, for people.
pub fn format_jobs(v: &Value) -> String {
    let mut out = String::new();
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        out.push_str("no jobs configured ([[jobs]] in carapace.toml)\n");
    }
    for j in &jobs {
        let to = match j["deliver_to"].as_object() {
            Some(d) => format!(
                "answer to {} conversation {}",
                text(&d["channel"]),
                text(&d["conversation"])
            ),
            None => "answer kept in the session".to_string(),
        };
        let _ = writeln!(
            out,
            "{}  {}  session {}  {}",
            text(&j["name"]),
            text(&j["schedule"]),
            text(&j["session"]),
            to
        );
        let last = &j["last_run"];
        let _ = writeln!(
            out,
            "    last run: {}    next: {}",
            if last.is_object() {
                format!(
                    "{} ({}, {})",
                    text(&last["started"]),
                    text(&last["trigger"]),
                    text(&last["outcome"])
                )
            } else {
                "none".to_string()
            },
            text(&j["next"])
        );
    }
    out
}

/// Runs, for people.
pub fn format_runs(v: &Value) -> String {
    let mut out = String::new();
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        out.push_str("no runs recorded\n");
    }
    for r in &runs {
        let _ = writeln!(
            out,
            "{}  {}  run {}  {}  {}",
            text(&r["started"]),
            text(&r["job"]),
            text(&r["run"]),
            text(&r["trigger"]),
            text(&r["outcome"]),
        );
        if let Some(e) = r["error"].as_str() {
            let _ = writeln!(out, "    error: {}", clean(e));
        }
        if let Some(reply) = r["reply"].as_str() {
            let _ = writeln!(out, "    answer: {}", body_preview(reply));
        }
        if let Some(d) = r["delivered"].as_object() {
            let _ = writeln!(
                out,
                "    sent to {} conversation {}: {}",
                text(&d["channel"]),
                text(&d["conversation"]),
                text(&d["status"])
            );
        }
    }
    out
}
