//! What the broker keeps of each channel beyond the policy, in `<state>/channels.jsonl` (a
//! [`Journal`]): senders an operator admitted for good, the reply addresses of messages queued
//! from admitted senders (for `reply_to_senders`), the message ids delivered (idempotency of
//! `deliver`) and the idempotency keys of sends, the last [`RECENT_CAP`] of each per channel;
//! and the inbound queue's acknowledged seq (so seqs continue after a restart). In memory
//! only: what the adapter last said (`channel_state`) and when messages last went in and out,
//! for [`ChannelStats`].
//!
//! Ids and keys are recorded after the message was stored (queue, held, outbox): a crash in
//! between leaves the message stored and the id unrecorded, and the stores' own entries (which
//! carry the id or key) are added back when the broker starts, so a repeat is still known.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::durable::{Journal, JournalError};

use super::{now_rfc3339, Ops};
use crate::sync::lock;

/// Ids, keys and reply addresses kept per channel.
pub const RECENT_CAP: usize = 10_000;

/// One channel as `carapace status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStats {
    pub channel: String,
    /// What the adapter last said (`channel_state`); None: it has said nothing yet.
    pub connected: Option<bool>,
    /// The adapter's last error, when not connected.
    pub error: Option<String>,
    /// When a message last came in (queued or held), RFC 3339 UTC.
    pub last_in: Option<String>,
    /// When a message last went out (the adapter confirmed it, or a file channel took it),
    /// RFC 3339 UTC.
    pub last_out: Option<String>,
    /// Inbound messages waiting for the gateway.
    pub queued: u64,
    /// Inbound messages held for the operator.
    pub held: u64,
    /// Outbound messages waiting in the outbox.
    pub outbox: u64,
    /// Dead letters of this channel.
    pub dead_lettered: u64,
}

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Admit { channel: String, sender: String },
    Reply { channel: String, address: String },
    Seen { channel: String, id: String },
    Key { channel: String, key: String },
    Acked { seq: u64 },
}

/// A set that keeps its last `RECENT_CAP` members.
#[derive(Debug, Default)]
struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Recent {
    fn contains(&self, s: &str) -> bool {
        self.set.contains(s)
    }

    /// Adds `s`; false when it was there already.
    fn insert(&mut self, s: &str) -> bool {
        if !self.set.insert(s.to_string()) {
            return false;
        }
        self.order.push_back(s.to_string());
        while self.order.len() > RECENT_CAP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[derive(Debug, Default)]
struct ChannelMem {
    admitted: BTreeSet<String>,
    replies: Recent,
    seen: Recent,
    keys: Recent,
    /// Ids and keys of deliveries and sends in progress.
    pending: HashSet<(bool, String)>,
    connected: Option<bool>,
    error: Option<String>,
    last_in: Option<String>,
    last_out: Option<String>,
}

#[derive(Debug)]
struct Book {
    journal: Journal,
    channels: HashMap<String, ChannelMem>,
    acked: u64,
    /// Lines beyond twice the live records the journal may grow to before it is compacted.
    slack: usize,
}

/// See [`Book::slack`].
const COMPACT_SLACK: usize = 1024;

impl Book {
    fn mem(&mut self, channel: &str) -> &mut ChannelMem {
        self.channels.entry(channel.to_string()).or_default()
    }

    fn live_records(&self) -> Vec<Record> {
        let mut out = vec![Record::Acked { seq: self.acked }];
        for (c, m) in &self.channels {
            let channel = || c.clone();
            out.extend(m.admitted.iter().map(|s| Record::Admit {
                channel: channel(),
                sender: s.clone(),
            }));
            out.extend(m.replies.order.iter().map(|a| Record::Reply {
                channel: channel(),
                address: a.clone(),
            }));
            out.extend(m.seen.order.iter().map(|i| Record::Seen {
                channel: channel(),
                id: i.clone(),
            }));
            out.extend(m.keys.order.iter().map(|k| Record::Key {
                channel: channel(),
                key: k.clone(),
            }));
        }
        out
    }

    /// Appends `r`; compacts when the journal has grown well past what is live.
    fn append(&mut self, r: &Record) -> Result<(), JournalError> {
        self.journal.append(r)?;
        let live: usize = self
            .channels
            .values()
            .map(|m| {
                m.admitted.len() + m.replies.order.len() + m.seen.order.len() + m.keys.order.len()
            })
            .sum();
        if self.journal.lines() > 2 * live + self.slack {
            let records = self.live_records();
            self.journal.compact(&records)?;
        }
        Ok(())
    }

    fn apply(&mut self, r: Record) {
        match r {
            Record::Admit { channel, sender } => {
                self.mem(&channel).admitted.insert(sender);
            }
            Record::Reply { channel, address } => {
                self.mem(&channel).replies.insert(&address);
            }
            Record::Seen { channel, id } => {
                self.mem(&channel).seen.insert(&id);
            }
            Record::Key { channel, key } => {
                self.mem(&channel).keys.insert(&key);
            }
            Record::Acked { seq } => self.acked = self.acked.max(seq),
        }
    }
}

/// Whether an id (or key) may be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Not seen: claimed; call [`ChannelBook::finish`] when done.
    Fresh,
    /// Already taken.
    Seen,
    /// Another request with it is in progress.
    InProgress,
}

/// Errors opening the channel book.
#[derive(Debug, thiserror::Error)]
#[error("channel state: {0}")]
pub struct BookError(#[from] JournalError);

/// The channel state of one broker.
#[derive(Debug)]
pub(crate) struct ChannelBook {
    book: Mutex<Book>,
}

impl ChannelBook {
    /// Opens `<state_dir>/channels.jsonl`, or keeps everything in memory.
    pub(crate) fn open(state_dir: Option<&Path>) -> Result<ChannelBook, BookError> {
        Self::open_with(state_dir, COMPACT_SLACK)
    }

    fn open_with(state_dir: Option<&Path>, slack: usize) -> Result<ChannelBook, BookError> {
        let mut book = Book {
            journal: Journal::memory(),
            channels: HashMap::new(),
            acked: 0,
            slack,
        };
        if let Some(dir) = state_dir {
            let path = dir.join("channels.jsonl");
            let (journal, contents) = Journal::open::<Record>(&path)?;
            for (line, why) in &contents.skipped {
                tracing::warn!(file = %path.display(), line, error = %why, "channel state: line skipped");
            }
            book.journal = journal;
            for r in contents.records {
                book.apply(r);
            }
        }
        Ok(ChannelBook {
            book: Mutex::new(book),
        })
    }

    /// Whether an operator admitted `sender` on `channel` for good.
    pub(crate) fn admitted(&self, channel: &str, sender: &str) -> bool {
        lock(&self.book)
            .channels
            .get(channel)
            .is_some_and(|m| m.admitted.contains(sender))
    }

    /// Admit `sender` on `channel` for good (persisted).
    pub(crate) fn admit(&self, channel: &str, sender: &str) -> Result<(), JournalError> {
        let mut b = lock(&self.book);
        if b.mem(channel).admitted.contains(sender) {
            return Ok(());
        }
        b.append(&Record::Admit {
            channel: channel.into(),
            sender: sender.into(),
        })?;
        b.mem(channel).admitted.insert(sender.into());
        Ok(())
    }

    /// Whether `address` is the reply address of a message queued from an admitted sender.
    pub(crate) fn is_reply_address(&self, channel: &str, address: &str) -> bool {
        lock(&self.book)
            .channels
            .get(channel)
            .is_some_and(|m| m.replies.contains(address))
    }

    /// Record a reply address (persisted).
    pub(crate) fn add_reply_address(
        &self,
        channel: &str,
        address: &str,
    ) -> Result<(), JournalError> {
        let mut b = lock(&self.book);
        if b.mem(channel).replies.contains(address) {
            return Ok(());
        }
        b.append(&Record::Reply {
            channel: channel.into(),
            address: address.into(),
        })?;
        b.mem(channel).replies.insert(address);
        Ok(())
    }

    /// Claim a delivered message id (`key = false`) or a send key (`key = true`).
    pub(crate) fn claim(&self, channel: &str, key: bool, value: &str) -> Claim {
        let mut b = lock(&self.book);
        let m = b.mem(channel);
        let known = if key {
            m.keys.contains(value)
        } else {
            m.seen.contains(value)
        };
        if known {
            Claim::Seen
        } else if !m.pending.insert((key, value.to_string())) {
            Claim::InProgress
        } else {
            Claim::Fresh
        }
    }

    /// End a [`Claim::Fresh`]: `taken` records it for good (persisted), else it is released.
    pub(crate) fn finish(
        &self,
        channel: &str,
        key: bool,
        value: &str,
        taken: bool,
    ) -> Result<(), JournalError> {
        let mut b = lock(&self.book);
        b.mem(channel).pending.remove(&(key, value.to_string()));
        if !taken {
            return Ok(());
        }
        let r = if key {
            Record::Key {
                channel: channel.into(),
                key: value.into(),
            }
        } else {
            Record::Seen {
                channel: channel.into(),
                id: value.into(),
            }
        };
        b.append(&r)?;
        let m = b.mem(channel);
        if key {
            m.keys.insert(value);
        } else {
            m.seen.insert(value);
        }
        Ok(())
    }

    /// Remember an id or key found in a store at start (not journaled again).
    pub(crate) fn remember(&self, channel: &str, key: bool, value: &str) {
        let mut b = lock(&self.book);
        let m = b.mem(channel);
        if key {
            m.keys.insert(value);
        } else {
            m.seen.insert(value);
        }
    }

    /// The highest inbound seq the gateway acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        lock(&self.book).acked
    }

    /// Record that the gateway acknowledged every inbound seq up to `seq` (persisted).
    pub(crate) fn set_acked(&self, seq: u64) -> Result<(), JournalError> {
        let mut b = lock(&self.book);
        if seq <= b.acked {
            return Ok(());
        }
        b.append(&Record::Acked { seq })?;
        b.acked = seq;
        Ok(())
    }

    /// What the adapter says of its service.
    pub(crate) fn set_state(&self, channel: &str, connected: bool, error: Option<String>) {
        let mut b = lock(&self.book);
        let m = b.mem(channel);
        m.connected = Some(connected);
        m.error = error;
    }

    /// A message came in now.
    pub(crate) fn note_in(&self, channel: &str) {
        lock(&self.book).mem(channel).last_in = Some(now_rfc3339());
    }

    /// A message went out now.
    pub(crate) fn note_out(&self, channel: &str) {
        lock(&self.book).mem(channel).last_out = Some(now_rfc3339());
    }

    fn stats(&self, channel: &str) -> ChannelStats {
        let b = lock(&self.book);
        let mut s = ChannelStats {
            channel: channel.to_string(),
            ..ChannelStats::default()
        };
        if let Some(m) = b.channels.get(channel) {
            s.connected = m.connected;
            s.error = m.error.clone();
            s.last_in = m.last_in.clone();
            s.last_out = m.last_out.clone();
        }
        s
    }
}

impl Ops {
    /// Every channel of the policy in force, with its figures. Blocking (reads the
    /// dead-letter queue).
    pub fn channel_stats(&self) -> Vec<ChannelStats> {
        let letters = self.dlq.list().map(|l| l.letters).unwrap_or_default();
        let queued = self.inbound.per_channel();
        let held = self.held.per_channel();
        self.policy()
            .channels()
            .map(|c| {
                let mut s = self.book.stats(&c.name);
                s.queued = queued.get(&c.name).copied().unwrap_or(0);
                s.held = held.get(&c.name).copied().unwrap_or(0);
                s.outbox = self.outbox.len(&c.name);
                s.dead_lettered =
                    letters.iter().filter(|l| l.entry.channel == c.name).count() as u64;
                s
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_book_survives_a_reopen_and_forgets_beyond_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = ChannelBook::open(Some(dir.path())).unwrap();
            b.admit("tg", "42").unwrap();
            b.add_reply_address("tg", "-100").unwrap();
            assert_eq!(b.claim("tg", false, "update:1"), Claim::Fresh);
            assert_eq!(b.claim("tg", false, "update:1"), Claim::InProgress);
            b.finish("tg", false, "update:1", true).unwrap();
            assert_eq!(b.claim("tg", false, "update:1"), Claim::Seen);
            assert_eq!(
                b.claim("tg", true, "update:1"),
                Claim::Fresh,
                "keys are apart"
            );
            b.finish("tg", true, "update:1", false).unwrap();
            assert_eq!(b.claim("tg", true, "update:1"), Claim::Fresh, "released");
            b.finish("tg", true, "update:1", true).unwrap();
            b.set_acked(7).unwrap();
            b.set_acked(3).unwrap();
        }
        let b = ChannelBook::open(Some(dir.path())).unwrap();
        assert!(b.admitted("tg", "42"));
        assert!(!b.admitted("tg", "43"));
        assert!(!b.admitted("mail", "42"), "per channel");
        assert!(b.is_reply_address("tg", "-100"));
        assert!(!b.is_reply_address("tg", "-101"));
        assert_eq!(b.claim("tg", false, "update:1"), Claim::Seen);
        assert_eq!(b.claim("tg", true, "update:1"), Claim::Seen);
        assert_eq!(b.claim("mail", false, "update:1"), Claim::Fresh);
        assert_eq!(b.acked(), 7);
    }

    #[test]
    fn the_last_ids_are_kept_and_compaction_keeps_the_state_whole() {
        // In memory: the last RECENT_CAP ids are kept.
        let b = ChannelBook::open(None).unwrap();
        for i in 0..RECENT_CAP + 5 {
            let id = format!("m{i}");
            assert_eq!(b.claim("big", false, &id), Claim::Fresh);
            b.finish("big", false, &id, true).unwrap();
        }
        assert_eq!(b.claim("big", false, "m4"), Claim::Fresh, "forgotten");
        assert_eq!(b.claim("big", false, "m5"), Claim::Seen);
        // On disk, with little slack: the journal is compacted and reads back whole.
        let dir = tempfile::tempdir().unwrap();
        let b = ChannelBook::open_with(Some(dir.path()), 4).unwrap();
        b.admit("tg", "42").unwrap();
        b.finish("tg", false, "update:1", true).unwrap();
        for seq in 1..=40 {
            b.set_acked(seq).unwrap();
        }
        drop(b);
        let lines = std::fs::read_to_string(dir.path().join("channels.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * 2 + 4 + 1, "not compacted: {lines} lines");
        let b = ChannelBook::open(Some(dir.path())).unwrap();
        assert!(b.admitted("tg", "42"));
        assert_eq!(b.claim("tg", false, "update:1"), Claim::Seen);
        assert_eq!(b.acked(), 40);
    }

    #[test]
    fn a_garbage_journal_line_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("channels.jsonl"),
            b"{\"t\":\"admit\",\"channel\":\"tg\",\"sender\":\"1\"}\n\xff garbage\n{\"t\":\"adm",
        )
        .unwrap();
        let b = ChannelBook::open(Some(dir.path())).unwrap();
        assert!(b.admitted("tg", "1"));
        b.admit("tg", "2").unwrap();
        drop(b);
        let b = ChannelBook::open(Some(dir.path())).unwrap();
        assert!(b.admitted("tg", "2"));
    }
}
