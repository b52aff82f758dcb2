//! Held inbound messages: from senders a channel does not admit, kept for the operator.

use crate::protocol::HeldMessage;

use super::Ops;

impl Ops {
    /// The held messages, oldest first.
    pub fn held_messages(&self) -> Vec<HeldMessage> {
        Vec::new()
    }

    /// The operator admits held message `id`: it is queued for the agent (its seq returned);
    /// `always` admits its sender on that channel for good. Audited. Blocking.
    pub fn admit_held(&self, id: &str, always: bool, by: Option<&str>) -> Result<u64, String> {
        let _ = (id, always, by);
        Err("not yet".into())
    }

    /// The operator drops held message `id`. Audited. Blocking.
    pub fn drop_held(&self, id: &str, by: Option<&str>) -> Result<(), String> {
        let _ = (id, by);
        Err("not yet".into())
    }
}
