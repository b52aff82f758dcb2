//! `[[jobs]]`: scheduled agent runs. Each has a `name`, a schedule (`cron`, a cron expression
//! evaluated in UTC, or `every`, an interval: exactly one), a `prompt`, a `session` (default
//! `job-NAME`) and optionally `deliver_to = { channel, conversation }` (a channel of the policy
//! the gateway's profile may send on: checked against the policy in `wiring.rs`). They are run
//! by the gateway (its agent), which gets them in its settings.

use carapace_policy::toml_schema::Kind::{self, IntOrStr, Str};

use super::document::*;
use super::*;

const DELIVER_TO: Kind = Kind::Table(&[("channel", Str), ("conversation", Str)]);
/// One `[[jobs]]` table.
pub(super) const JOB: Kind = Kind::Table(&[
    ("name", Str),
    ("cron", Str),
    ("every", IntOrStr),
    ("prompt", Str),
    ("session", Str),
    ("deliver_to", DELIVER_TO),
]);

const NAME_EXPECTED: &str = "1 to 64 characters among A-Z, a-z, 0-9, `_` and `-`";
const CRON_EXPECTED: &str =
    "a cron expression: 5 fields (minute hour day month weekday) or 6 with seconds first, e.g. \"0 7 * * *\"";
const SCHEDULE_EXPECTED: &str = "either `cron = \"0 7 * * *\"` or `every = \"15m\"`";

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The `[[jobs]]` of `root`; `has_agent`: whether `[gateway.agent]` is configured (jobs need
/// it).
pub(super) fn jobs(cx: &mut Sink<'_>, root: &Table, has_agent: bool) -> Vec<JobConfig> {
    let Some(e) = root.get("jobs") else {
        return Vec::new();
    };
    let Val::Array(items) = &e.node.val else {
        return Vec::new();
    };
    if !has_agent && !items.is_empty() {
        cx.err(
            &e.key_span,
            "[[jobs]] are run by the agent, but there is no [gateway.agent]",
            "a [gateway] with a [gateway.agent] table naming the model",
        );
    }
    let mut out: Vec<JobConfig> = Vec::new();
    for n in items {
        let Val::Table(t) = &n.val else { continue };
        if let Some(j) = job(cx, t, &n.span) {
            if out.iter().any(|o| o.name == j.name) {
                let span = t
                    .get("name")
                    .map_or(n.span.clone(), |e| e.node.span.clone());
                cx.err(
                    &span,
                    format!("a second job named {:?}", j.name),
                    "a name of its own for each job",
                );
                continue;
            }
            out.push(j);
        }
    }
    out
}

fn job(cx: &mut Sink<'_>, t: &Table, span: &Range<usize>) -> Option<JobConfig> {
    let name = match get_str(t, "name") {
        Some((s, e)) if !valid_name(s) => {
            cx.err(
                &e.node.span,
                format!("invalid job name {s:?}"),
                NAME_EXPECTED,
            );
            None
        }
        Some((s, _)) => Some(s.to_string()),
        None => {
            if t.get("name").is_none() {
                cx.err(span, "a job without a `name`", NAME_EXPECTED);
            }
            None
        }
    };
    let schedule = match (t.get("cron"), t.get("every")) {
        (Some(_), Some(e)) => {
            cx.err(
                &e.key_span,
                "a job has `cron` or `every`, not both",
                SCHEDULE_EXPECTED,
            );
            None
        }
        (None, None) => {
            cx.err(span, "a job without a schedule", SCHEDULE_EXPECTED);
            None
        }
        (Some(_), None) => match get_str(t, "cron") {
            Some((s, e)) => match croner::parser::CronParser::new().parse(s) {
                Ok(_) => Some(JobSchedule::Cron(s.to_string())),
                Err(why) => {
                    cx.err(
                        &e.node.span,
                        format!("`cron` = {s:?}: {why}"),
                        CRON_EXPECTED,
                    );
                    None
                }
            },
            None => None,
        },
        (None, Some(e)) => {
            let d = get_duration(cx, t, "every", Duration::ZERO);
            if d < Duration::from_secs(1) {
                if parse_duration(&e.node.val).is_ok() {
                    cx.err(
                        &e.node.span,
                        "`every` is shorter than a second",
                        "an interval of 1s to 24h (use `cron` for longer ones)",
                    );
                }
                None
            } else {
                Some(JobSchedule::Every(d))
            }
        }
    };
    let prompt = match get_str(t, "prompt") {
        Some(("", e)) => {
            cx.err(
                &e.node.span,
                "`prompt` is empty",
                "what the agent is asked at each run",
            );
            None
        }
        Some((s, _)) => Some(s.to_string()),
        None => {
            if t.get("prompt").is_none() {
                cx.err(
                    span,
                    "a job without a `prompt`",
                    "what the agent is asked at each run",
                );
            }
            None
        }
    };
    let session = match get_str(t, "session") {
        Some((s, e)) if !valid_name(s) => {
            cx.err(
                &e.node.span,
                format!("invalid session name {s:?}"),
                NAME_EXPECTED,
            );
            None
        }
        Some((s, _)) => Some(s.to_string()),
        None => name.as_ref().map(|n| {
            let s = format!("job-{n}");
            if s.len() > 64 {
                s[..64].to_string()
            } else {
                s
            }
        }),
    };
    let deliver_to = match get_table(t, "deliver_to") {
        None => None,
        Some(d) => {
            let e = t
                .get("deliver_to")
                .map_or(span.clone(), |e| e.key_span.clone());
            let channel = match get_str(d, "channel") {
                Some(("", ce)) => {
                    cx.err(
                        &ce.node.span,
                        "`deliver_to.channel` is empty",
                        "the name of a [channels.NAME] of the policy",
                    );
                    None
                }
                Some((c, _)) => Some(c.to_string()),
                None => {
                    cx.err(
                        &e,
                        "`deliver_to` without a `channel`",
                        "deliver_to = { channel = \"tg\", conversation = \"111\" }",
                    );
                    None
                }
            };
            let conversation = match get_str(d, "conversation") {
                Some(("", ce)) => {
                    cx.err(
                        &ce.node.span,
                        "`deliver_to.conversation` is empty",
                        "the conversation (chat id, address) the answer goes to",
                    );
                    None
                }
                Some((c, _)) => Some(c.to_string()),
                None => {
                    cx.err(
                        &e,
                        "`deliver_to` without a `conversation`",
                        "deliver_to = { channel = \"tg\", conversation = \"111\" }",
                    );
                    None
                }
            };
            match (channel, conversation) {
                (Some(c), Some(v)) => Some(Some((c, v))),
                _ => None,
            }?
        }
    };
    Some(JobConfig {
        name: name?,
        schedule: schedule?,
        prompt: prompt?,
        session: session?,
        deliver_to,
    })
}

/// The jobs as the gateway's settings read them (`jobs` of gateway/src/settings.rs).
pub(super) fn settings_json(jobs: &[JobConfig]) -> serde_json::Value {
    jobs.iter()
        .map(|j| {
            let mut o =
                serde_json::json!({"name": j.name, "prompt": j.prompt, "session": j.session});
            match &j.schedule {
                JobSchedule::Cron(c) => o["cron"] = c.clone().into(),
                JobSchedule::Every(d) => {
                    o["every_ms"] = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).into();
                }
            }
            if let Some((c, v)) = &j.deliver_to {
                o["deliver_to"] = serde_json::json!({"channel": c, "conversation": v});
            }
            o
        })
        .collect()
}
