//! The operator's conversation on a channel: approvals and held messages announced there, and
//! answered from there.
//!
//! A channel whose policy names an `operator` (`[channels.NAME] operator = "111"`, adapter
//! channels only) gets, in its durable outbox, a short message for every approval that starts
//! waiting and every message that is held: what is asked (program, argv, profile, the rule's
//! `why`, who asked) or who wrote (and the start of what they wrote), and a number. The
//! operator answers `allow N`, `always N`, `deny N` (approvals) or `admit N`, `drop N` (held
//! messages); services with buttons (Telegram) show them too, and pressing one answers the same.
//!
//! **Where the answer is recognised.** In `deliver` ([`Ops::deliver_message`]), in the broker:
//! the message's channel and the sender the adapter reports are compared with the channel's
//! `operator`; only then is the text read as an answer ([`parse_answer`]). A recognised answer
//! is audited (op `operator_answer`, target `CHANNEL:IDENTITY`, the answer's words), acted on,
//! confirmed in the conversation, and never queued for the agent. Anyone else's `allow 7` is
//! an ordinary message (queued or held as its sender is). The gateway and the agent only ever
//! `send`, which writes to an outbox and never reaches `deliver`: nothing they write answers
//! anything.
//!
//! **Numbers.** Each announced thing gets a number from the desk (`<state>/operator.json`,
//! written with [`write_atomic`]), never reused, so an old announcement cannot answer a newer
//! approval after a restart renumbered the broker's own approval ids. An approval is known by
//! what it asks (program, content hash, argv, profile, when it was asked), which survives a
//! restart; a held message by its held id.
//!
//! **Not doubled.** An announcement is an outbox entry with the send key `operator:N`; a key
//! already taken on the channel is not queued again, and the desk records per number which
//! channels were told. After a restart the approvals that still wait keep their numbers and
//! are not announced again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use carapace_policy::broker::{ChannelKind, ChannelSpec};
use serde::{Deserialize, Serialize};

use crate::approvals::{Pending, Resolution};
use crate::audit::{RuleRef, Who};
use crate::client::DeliverArgs;
use crate::durable::{read_capped, write_atomic};
use crate::protocol::{Button, DeliverStatus, ErrorCode, InboundMessage, OkReply};
use crate::redact::Redactor;
use crate::server::{Identity, Response};
use crate::sync::lock;

use super::channels::{ChannelBook, Claim};
use super::held::{Admitter, HeldStore};
use super::inbound::ClaimGuard;
use super::outbox::{OutboxEntry, Outboxes};
use super::{now_rfc3339, shown, Approver, Audited, Ops};

/// The desk's file in the state directory.
pub const DESK_FILE: &str = "operator.json";
const MAX_DESK_BYTES: u64 = 8 << 20;
/// Longest command line shown in an announcement (characters).
const MAX_SHOWN_ARGV: usize = 600;
/// Longest excerpt of a held message shown (characters).
const MAX_EXCERPT: usize = 200;
/// Longest `why` shown (characters).
const MAX_WHY: usize = 300;
/// How often the desk looks again without being told of a change.
const TICK: Duration = Duration::from_secs(2);

/// What an answer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Allow the approval once.
    Allow,
    /// Allow it, and the same request from now on.
    Always,
    /// Refuse the approval.
    Deny,
    /// Queue the held message for the agent.
    Admit,
    /// Delete the held message unread.
    Drop,
}

impl Verb {
    const ALL: [Verb; 5] = [
        Verb::Allow,
        Verb::Always,
        Verb::Deny,
        Verb::Admit,
        Verb::Drop,
    ];

    /// The word the operator writes.
    pub fn word(self) -> &'static str {
        match self {
            Verb::Allow => "allow",
            Verb::Always => "always",
            Verb::Deny => "deny",
            Verb::Admit => "admit",
            Verb::Drop => "drop",
        }
    }

    fn parse(w: &str) -> Option<Verb> {
        Verb::ALL
            .into_iter()
            .find(|v| v.word().eq_ignore_ascii_case(w))
    }

    /// The approval's resolution, for the verbs that answer approvals.
    fn resolution(self) -> Option<Resolution> {
        match self {
            Verb::Allow => Some(Resolution::AllowOnce),
            Verb::Always => Some(Resolution::AllowAlways),
            Verb::Deny => Some(Resolution::Deny),
            Verb::Admit | Verb::Drop => None,
        }
    }
}

/// An operator's answer: a verb and the number of what it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub verb: Verb,
    pub number: u64,
}

impl Answer {
    /// As the operator would write it.
    pub fn text(self) -> String {
        format!("{} {}", self.verb.word(), self.number)
    }
}

/// The answer the first non-blank line of `text` gives: exactly a verb (`allow`, `always`,
/// `deny`, `admit`, `drop`, any case) and a number (1 to `u64::MAX`, optionally after `#`),
/// separated by whitespace. A first line `Subject: ...` (the e-mail adapter puts the subject
/// there) is passed over. Anything else is not an answer (None): it is an ordinary message.
pub fn parse_answer(text: &str) -> Option<Answer> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines.next()?;
    if line
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("subject:"))
    {
        line = lines.next()?;
    }
    let mut words = line.split_whitespace();
    let verb = Verb::parse(words.next()?)?;
    let n = words.next()?;
    if words.next().is_some() {
        return None;
    }
    let digits = n.strip_prefix('#').unwrap_or(n);
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = digits.parse::<u64>().ok().filter(|n| *n > 0)?;
    Some(Answer { verb, number })
}

/// Whether `sender`, as the adapter of `spec` reports it, is that channel's operator: an
/// adapter channel with an `operator`, and exactly that identity.
pub fn is_operator(spec: &ChannelSpec, sender: &str) -> bool {
    spec.kind == ChannelKind::Adapter && spec.operator.as_deref().is_some_and(|op| op == sender)
}

/// Something the desk numbered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Item {
    /// A waiting approval, known by what it asks.
    Approval {
        program: PathBuf,
        sha256: String,
        argv: Vec<String>,
        profile: String,
        created: String,
        /// Channels it was announced on.
        #[serde(default)]
        announced: BTreeSet<String>,
        /// Answered from a chat (its end needs no notice).
        #[serde(default)]
        settled: bool,
    },
    /// A held message, by its held id.
    Held {
        id: String,
        #[serde(default)]
        announced: BTreeSet<String>,
        #[serde(default)]
        settled: bool,
    },
}

impl Item {
    fn of_approval(p: &Pending) -> Item {
        Item::Approval {
            program: p.program.clone(),
            sha256: p.program_sha256.clone(),
            argv: p.argv.clone(),
            profile: p.profile.clone(),
            created: p.created.clone(),
            announced: BTreeSet::new(),
            settled: false,
        }
    }

    fn is_approval(&self, p: &Pending) -> bool {
        matches!(self, Item::Approval { program, sha256, argv, profile, created, .. }
            if *program == p.program && *sha256 == p.program_sha256 && *argv == p.argv
                && *profile == p.profile && *created == p.created)
    }

    fn is_held(&self, held_id: &str) -> bool {
        matches!(self, Item::Held { id, .. } if id == held_id)
    }

    fn announced(&mut self) -> &mut BTreeSet<String> {
        match self {
            Item::Approval { announced, .. } | Item::Held { announced, .. } => announced,
        }
    }

    fn settled(&mut self) -> &mut bool {
        match self {
            Item::Approval { settled, .. } | Item::Held { settled, .. } => settled,
        }
    }

    /// The notice that it ended without an answer from a chat.
    fn ended_text(&self, n: u64) -> String {
        match self {
            Item::Approval { .. } => format!(
                "Approval {n} no longer waits: answered elsewhere, withdrawn, or timed out (denied)."
            ),
            Item::Held { .. } => {
                format!("Held message {n} is no longer held: admitted or dropped elsewhere.")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeskFile {
    version: u32,
    /// The number the next item gets.
    next: u64,
    items: BTreeMap<u64, Item>,
}

impl Default for DeskFile {
    fn default() -> Self {
        DeskFile {
            version: 1,
            next: 1,
            items: BTreeMap::new(),
        }
    }
}

/// The numbers of what was announced, and the reasons of the asks waiting now.
#[derive(Debug)]
pub(crate) struct Desk {
    /// `<state>/operator.json`, or None: in memory.
    path: Option<PathBuf>,
    state: Mutex<DeskFile>,
    /// Woken when something may need announcing (a message held, an answer given).
    wake: tokio::sync::Notify,
    /// The deciding rule's `why` of each ask waiting now, by (asking identity, argv).
    reasons: Mutex<HashMap<(u64, Vec<String>), String>>,
}

impl Desk {
    /// The desk in `state_dir` (None: in memory). An unreadable file is logged and replaced
    /// at the next change.
    pub(crate) fn open(state_dir: Option<&Path>) -> Desk {
        let path = state_dir.map(|d| d.join(DESK_FILE));
        let state = match &path {
            None => DeskFile::default(),
            Some(p) => match read_capped(p, MAX_DESK_BYTES) {
                Ok(data) => match serde_json::from_slice::<DeskFile>(&data) {
                    Ok(f) if f.version == 1 => f,
                    Ok(f) => {
                        tracing::error!(file = %p.display(), version = f.version, "operator desk: unknown version; starting afresh");
                        DeskFile::default()
                    }
                    Err(e) => {
                        tracing::error!(file = %p.display(), error = %e, "operator desk unreadable; starting afresh");
                        DeskFile::default()
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => DeskFile::default(),
                Err(e) => {
                    tracing::error!(file = %p.display(), error = %e, "operator desk unreadable; starting afresh");
                    DeskFile::default()
                }
            },
        };
        Desk {
            path,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            reasons: Mutex::new(HashMap::new()),
        }
    }

    /// Something may need announcing (or forgetting): look now.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Remember why `who` is asked about `argv` (until [`Desk::forget_reason`]).
    pub(crate) fn note_reason(&self, who: u64, argv: &[String], why: &str) {
        lock(&self.reasons).insert((who, argv.to_vec()), why.to_string());
    }

    pub(crate) fn forget_reason(&self, who: u64, argv: &[String]) {
        lock(&self.reasons).remove(&(who, argv.to_vec()));
    }

    /// Number `n` is being answered from a chat: its end needs no notice.
    fn settle(&self, n: u64) {
        if let Some(it) = lock(&self.state).items.get_mut(&n) {
            *it.settled() = true;
        }
    }

    pub(crate) fn reason(&self, p: &Pending) -> Option<String> {
        lock(&self.reasons)
            .get(&(p.identity.id, p.argv.clone()))
            .cloned()
    }

    fn persist(&self, st: &DeskFile) {
        let Some(path) = &self.path else { return };
        match serde_json::to_vec_pretty(st) {
            Ok(data) => {
                if let Err(e) = write_atomic(path, &data) {
                    tracing::error!(error = %e, "operator desk not written");
                }
            }
            Err(e) => tracing::error!(error = %e, "operator desk not encoded"),
        }
    }
}

/// A command line as shown to the operator: printable, bounded.
fn shown_argv(argv: &[String]) -> String {
    let line = argv.join(" ");
    let mut out: String = line
        .chars()
        .take(MAX_SHOWN_ARGV)
        .flat_map(char::escape_default)
        .collect();
    if line.chars().count() > MAX_SHOWN_ARGV {
        out.push('…');
    }
    out
}

/// Untrusted text as shown to the operator: one line, printable, bounded.
fn excerpt(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = flat.chars().take(max).collect();
    if flat.chars().count() > max {
        out.push('…');
    }
    out
}

fn approval_text(n: u64, p: &Pending, why: Option<&str>) -> String {
    let mut s = format!(
        "Approval {n}: a tool wants to run\n{}\n",
        shown_argv(&p.argv)
    );
    let _ = writeln!(s, "profile: {}", p.profile);
    let _ = writeln!(
        s,
        "why asked: {}",
        why.map_or_else(
            || "(not known after a restart)".to_string(),
            |w| excerpt(w, MAX_WHY)
        )
    );
    let _ = writeln!(
        s,
        "asked by: {} ({}, id {})",
        p.identity.role, p.identity.profile, p.identity.id
    );
    let _ = write!(
        s,
        "Answer: allow {n} (this once), always {n} (this program, arguments and profile from now on), deny {n}"
    );
    s
}

fn approval_buttons(n: u64) -> Vec<Button> {
    vec![
        Button {
            label: "Allow".into(),
            data: format!("allow {n}"),
        },
        Button {
            label: "Always".into(),
            data: format!("always {n}"),
        },
        Button {
            label: "Deny".into(),
            data: format!("deny {n}"),
        },
    ]
}

fn held_text(n: u64, m: &InboundMessage) -> String {
    format!(
        "Held message {n} on {} from {} (a sender the channel does not admit):\n\"{}\"\n\
         Answer: admit {n} (the agent answers it), drop {n}",
        m.channel,
        excerpt(&m.sender, 64),
        excerpt(&m.body, MAX_EXCERPT)
    )
}

fn held_buttons(n: u64) -> Vec<Button> {
    vec![
        Button {
            label: "Admit".into(),
            data: format!("admit {n}"),
        },
        Button {
            label: "Drop".into(),
            data: format!("drop {n}"),
        },
    ]
}

/// The author of what the broker itself writes to an outbox.
fn broker_who() -> Who {
    Who {
        id: 0,
        role: "broker".into(),
        profile: String::new(),
    }
}

/// What the desk's work needs, for a blocking thread.
struct DeskCtx {
    desk: Arc<Desk>,
    approver: Option<Arc<dyn Approver>>,
    held: Arc<HeldStore>,
    outbox: Arc<Outboxes>,
    book: Arc<ChannelBook>,
    redactor: Arc<Redactor>,
    /// The adapter channels with an operator, in the policy in force.
    operators: Vec<ChannelSpec>,
}

impl DeskCtx {
    fn pending(&self) -> Vec<Pending> {
        self.approver
            .as_ref()
            .map(|a| a.pending())
            .unwrap_or_default()
    }

    /// Put `text` (redacted) into the outbox of `spec` for its operator. With `key`, only
    /// once: Ok(false) when that key was taken already. Blocking.
    fn post(
        &self,
        spec: &ChannelSpec,
        text: &str,
        buttons: Vec<Button>,
        key: Option<String>,
    ) -> Result<bool, String> {
        let Some(recipient) = spec.operator.clone() else {
            return Ok(false);
        };
        let text = String::from_utf8_lossy(&self.redactor.redact(text.as_bytes())).into_owned();
        let (text, _) = spec.redact_patterns(&text);
        let claim = match ClaimGuard::claim(&self.book, &spec.name, true, key.as_deref()) {
            Ok(c) => c,
            Err(Claim::Seen) => return Ok(false),
            Err(_) => return Err("the same announcement is being queued".into()),
        };
        let entry = OutboxEntry {
            recipient,
            body: text,
            in_reply_to: None,
            key,
            failures: 0,
            due_ms: 0,
            who: broker_who(),
            ts: now_rfc3339(),
            last_error: None,
            buttons,
        };
        self.outbox
            .enqueue(&spec.name, &entry)
            .map_err(|e| e.to_string())?;
        claim.taken();
        Ok(true)
    }

    /// What the answer's number names now; Err: the words for the operator. Blocking.
    fn named(&self, a: Answer) -> Result<Named, String> {
        let st = lock(&self.desk.state);
        let Some(item) = st.items.get(&a.number) else {
            return Err(format!(
                "Nothing waits as number {} (answered, ended or never announced).",
                a.number
            ));
        };
        match item {
            Item::Approval { .. } => {
                if a.verb.resolution().is_none() {
                    return Err(format!(
                        "{} is an approval: answer allow {n}, always {n} or deny {n}.",
                        a.number,
                        n = a.number
                    ));
                }
                let p = self
                    .pending()
                    .into_iter()
                    .find(|p| item.is_approval(p))
                    .ok_or_else(|| format!("Approval {} no longer waits.", a.number))?;
                Ok(Named::Approval {
                    id: p.id,
                    argv: shown_argv(&p.argv),
                })
            }
            Item::Held { id, .. } => {
                if !matches!(a.verb, Verb::Admit | Verb::Drop) {
                    return Err(format!(
                        "{} is a held message: answer admit {n} or drop {n}.",
                        a.number,
                        n = a.number
                    ));
                }
                let m = self
                    .held
                    .get(id)
                    .ok_or_else(|| format!("Held message {} is no longer held.", a.number))?;
                Ok(Named::Held {
                    id: id.clone(),
                    sender: m.sender,
                })
            }
        }
    }

    /// Number what waits, forget what ended, announce what was not announced. Blocking.
    fn sync(&self) {
        if self.operators.is_empty() {
            return;
        }
        let pending = self.pending();
        let held = self.held.ids();
        let mut st = lock(&self.desk.state);
        let before = st.clone();
        let ended: Vec<u64> = st
            .items
            .iter()
            .filter(|(_, it)| match it {
                Item::Approval { .. } => !pending.iter().any(|p| it.is_approval(p)),
                Item::Held { id, .. } => !held.contains(id),
            })
            .map(|(n, _)| *n)
            .collect();
        for n in ended {
            let Some(mut it) = st.items.remove(&n) else {
                continue;
            };
            if *it.settled() {
                continue;
            }
            // Announced and ended without an answer from a chat: say so where it was announced.
            let told = it.announced().clone();
            let text = it.ended_text(n);
            for spec in self.operators.iter().filter(|s| told.contains(&s.name)) {
                if let Err(e) =
                    self.post(spec, &text, Vec::new(), Some(format!("operator-end:{n}")))
                {
                    tracing::warn!(channel = %spec.name, number = n, error = %e, "the end of an announced item was not told");
                }
            }
        }
        for p in &pending {
            if !st.items.values().any(|it| it.is_approval(p)) {
                let n = st.next;
                st.next = n.saturating_add(1);
                st.items.insert(n, Item::of_approval(p));
            }
        }
        for id in &held {
            if !st.items.values().any(|it| it.is_held(id)) {
                let n = st.next;
                st.next = n.saturating_add(1);
                st.items.insert(
                    n,
                    Item::Held {
                        id: id.clone(),
                        announced: BTreeSet::new(),
                        settled: false,
                    },
                );
            }
        }
        for (n, it) in st.items.iter_mut() {
            let todo: Vec<&ChannelSpec> = self
                .operators
                .iter()
                .filter(|s| !it.announced().contains(&s.name))
                .collect();
            if todo.is_empty() {
                continue;
            }
            let (text, buttons) = match &*it {
                Item::Approval { .. } => {
                    let Some(p) = pending.iter().find(|p| it.is_approval(p)) else {
                        continue;
                    };
                    let why = self.desk.reason(p);
                    (approval_text(*n, p, why.as_deref()), approval_buttons(*n))
                }
                Item::Held { id, .. } => {
                    let Some(m) = self.held.get(id) else {
                        continue;
                    };
                    (held_text(*n, &m), held_buttons(*n))
                }
            };
            for spec in todo {
                match self.post(spec, &text, buttons.clone(), Some(format!("operator:{n}"))) {
                    Ok(_) => {
                        tracing::info!(channel = %spec.name, number = n, "announced to the channel's operator");
                        it.announced().insert(spec.name.clone());
                    }
                    Err(e) => {
                        tracing::warn!(channel = %spec.name, number = n, error = %e, "not announced to the channel's operator; trying again");
                    }
                }
            }
        }
        if *st != before {
            self.desk.persist(&st);
        }
    }
}

/// What an answer's number names now.
enum Named {
    Approval { id: u64, argv: String },
    Held { id: String, sender: String },
}

impl Ops {
    fn desk_ctx(&self) -> DeskCtx {
        let loaded = self.state();
        DeskCtx {
            desk: self.desk.clone(),
            approver: self.approver.clone(),
            held: self.held.clone(),
            outbox: self.outbox.clone(),
            book: self.book.clone(),
            redactor: loaded.redactor.clone(),
            operators: loaded
                .policy
                .channels()
                .filter(|c| c.kind == ChannelKind::Adapter && c.operator.is_some())
                .cloned()
                .collect(),
        }
    }

    /// Start announcing to the channels' operators (on the current tokio runtime): a task
    /// that looks whenever an approval starts or ends, a message is held or an answer is
    /// given, and every 2 s. It ends when the operations are dropped.
    pub fn start_operator_desk(self: &Arc<Self>) {
        let weak: Weak<Ops> = Arc::downgrade(self);
        let mut changes = self.approver.as_ref().and_then(|a| a.subscribe());
        let desk = self.desk.clone();
        tokio::spawn(async move {
            loop {
                let Some(ops) = weak.upgrade() else { return };
                let ctx = ops.desk_ctx();
                drop(ops);
                if let Err(e) = tokio::task::spawn_blocking(move || ctx.sync()).await {
                    tracing::error!(error = %e, "operator desk task failed");
                }
                let approvals = async {
                    match changes.as_mut() {
                        Some(rx) => {
                            if rx.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    () = desk.wake.notified() => {}
                    () = approvals => {}
                    () = tokio::time::sleep(TICK) => {}
                }
            }
        });
    }

    /// Announce now (for tests and callers that cannot wait for the desk's task). Blocking.
    pub fn operator_sync(&self) {
        self.desk_ctx().sync();
    }

    /// A `deliver` from the channel's operator whose text is an answer: audited, acted on,
    /// confirmed in the conversation, never queued for the agent.
    pub(crate) async fn operator_answer(
        &self,
        who: &Identity,
        spec: &ChannelSpec,
        d: &DeliverArgs,
        answer: Answer,
        rule: Option<RuleRef>,
    ) -> Response {
        let target = format!("{}:{}", spec.name, shown(&d.sender));
        let words = answer.text();
        let claim = match ClaimGuard::claim(&self.book, &spec.name, false, d.id.as_deref()) {
            Ok(c) => c,
            Err(Claim::InProgress) => {
                return Response::err(
                    ErrorCode::Busy,
                    format!(
                    "deliver on {}: a delivery of this message id is in progress; try again later",
                    spec.name
                ),
                )
            }
            Err(_) => {
                return self
                    .duplicate_delivery(
                        who,
                        Audited::of("operator_answer", target)
                            .by(rule)
                            .allow("duplicate", format!("{words:?}: message id already taken")),
                    )
                    .await;
            }
        };
        let ctx = Arc::new(self.desk_ctx());
        let by = format!(
            "{words:?} from the operator of {} ({})",
            spec.name,
            shown(&d.sender)
        );
        let looked = {
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || ctx.named(answer)).await
        };
        let named = match looked {
            Ok(n) => n,
            Err(e) => return Response::err(ErrorCode::Internal, format!("operator answer: {e}")),
        };
        let reply = match named {
            Err(why) => {
                if let Err(resp) = self
                    .allow(
                        who,
                        Audited::of("operator_answer", target)
                            .by(rule)
                            .deny("nothing answered", format!("{by}: {why}")),
                    )
                    .await
                {
                    return resp;
                }
                why
            }
            Ok(Named::Approval { id, argv }) => {
                let Some(res) = answer.verb.resolution() else {
                    return Response::err(ErrorCode::Internal, "operator answer: no resolution");
                };
                if let Err(resp) = self
                    .allow(
                        who,
                        Audited::of("operator_answer", target.clone())
                            .by(rule.clone())
                            .allow(
                                format!("approval {}: {res}", answer.number),
                                format!("{by}: broker approval {id}: {argv}"),
                            ),
                    )
                    .await
                {
                    return resp;
                }
                self.desk.settle(answer.number);
                let approver = ctx.approver.clone();
                let done = tokio::task::spawn_blocking(move || match approver {
                    Some(a) => a.resolve(id, res).map_err(|e| e.to_string()),
                    None => Err("no approvals service".to_string()),
                })
                .await
                .unwrap_or_else(|e| Err(format!("approval task: {e}")));
                match done {
                    Ok(decision) => format!(
                        "Approval {}: {} ({argv}).",
                        answer.number,
                        decision.as_str()
                    ),
                    Err(e) => {
                        let _ = self
                            .audit(
                                who,
                                Audited::of("operator_answer", target)
                                    .by(rule)
                                    .error("not answered", format!("{by}: {e}")),
                            )
                            .await;
                        format!("Approval {}: not answered: {e}.", answer.number)
                    }
                }
            }
            Ok(Named::Held { id, sender }) => {
                let admit = answer.verb == Verb::Admit;
                if let Err(resp) = self
                    .allow(
                        who,
                        Audited::of("operator_answer", target.clone())
                            .by(rule.clone())
                            .allow(
                                format!(
                                    "held message {}: {}",
                                    answer.number,
                                    if admit { "admitted once" } else { "dropped" }
                                ),
                                format!("{by}: held {id} from {}", shown(&sender)),
                            ),
                    )
                    .await
                {
                    return resp;
                }
                self.desk.settle(answer.number);
                let admitter: Admitter = self.admitter();
                let held = self.held.clone();
                let hid = id.clone();
                let done = tokio::task::spawn_blocking(move || {
                    if admit {
                        admitter
                            .admit(&hid, false)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    } else {
                        held.remove(&hid).map_err(|e| e.to_string())
                    }
                })
                .await
                .unwrap_or_else(|e| Err(format!("held task: {e}")));
                match done {
                    Ok(()) if admit => format!(
                        "Held message {} from {}: admitted; the agent answers it.",
                        answer.number,
                        excerpt(&sender, 64)
                    ),
                    Ok(()) => format!(
                        "Held message {} from {}: dropped.",
                        answer.number,
                        excerpt(&sender, 64)
                    ),
                    Err(e) => {
                        let _ = self
                            .audit(
                                who,
                                Audited::of("operator_answer", target)
                                    .by(rule)
                                    .error("not answered", format!("{by}: {e}")),
                            )
                            .await;
                        format!("Held message {}: not answered: {e}.", answer.number)
                    }
                }
            }
        };
        self.desk.wake();
        let key = d.id.as_deref().map(|i| format!("answer:{i}"));
        let spec2 = spec.clone();
        let posted = tokio::task::spawn_blocking(move || {
            let r = ctx.post(&spec2, &reply, Vec::new(), key);
            claim.taken();
            r
        })
        .await;
        match posted {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(channel = %spec.name, error = %e, "the answer's confirmation was not queued")
            }
            Err(e) => tracing::error!(error = %e, "operator answer task failed"),
        }
        Response::ok(OkReply::Deliver {
            seq: 0,
            status: DeliverStatus::Answered,
            held: None,
        })
    }
}

#[cfg(test)]
mod tests;
