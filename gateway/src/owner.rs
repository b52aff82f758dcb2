//! Who a request acts for: the *owner* of the tools it runs. A client's calls belong to its
//! token (`token:<id>`), an answer to a channel message to its conversation
//! (`channel:<name>:<conversation>`), a scheduled job to the job (`job:<name>`). The broker
//! gives each owner a tools workspace of its own, so tools run for one never see the files of
//! another's.
//!
//! The same owner owns the sessions it makes (`crate::sessions`: a client token sees only its
//! own).
//!
//! The owner of the current task is the task-local [`OWNER`], set around each client call
//! ([`crate::methods::dispatch`], the OpenAI-compatible endpoint), each answered channel message
//! and each job run; a task outside these (the gateway's own work) has none and its tools get
//! the shared workspace.

use std::fmt;
use std::future::Future;

use crate::auth::Caller;

/// Who a request acts for: the owner of its tools' workspace and of the sessions it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A client token, by its id (`token:<id>`).
    Token(String),
    /// A channel conversation (`channel:<channel>:<conversation>`).
    Channel {
        channel: String,
        conversation: String,
    },
    /// A scheduled job, by its name (`job:<name>`).
    Job(String),
}

impl Owner {
    /// The owner as stored (session meta files) and sent to the broker (`exec`'s `owner`).
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Token(id) => write!(f, "token:{id}"),
            Owner::Channel {
                channel,
                conversation,
            } => write!(f, "channel:{channel}:{conversation}"),
            Owner::Job(name) => write!(f, "job:{name}"),
        }
    }
}

tokio::task_local! {
    /// The owner of the current task's tool runs.
    pub static OWNER: Owner;
}

/// The owner of a client's calls: its token.
pub fn of_caller(caller: &Caller) -> Owner {
    Owner::Token(caller.token_id.clone())
}

/// The owner of the answer to a message of `conversation` on `channel`.
pub fn of_conversation(channel: &str, conversation: &str) -> Owner {
    Owner::Channel {
        channel: channel.to_string(),
        conversation: conversation.to_string(),
    }
}

/// The owner of a scheduled job's runs.
pub fn of_job(name: &str) -> Owner {
    Owner::Job(name.to_string())
}

/// The current task's owner, if any.
pub fn current() -> Option<Owner> {
    OWNER.try_with(Clone::clone).ok()
}

/// Run `f` as `owner`.
pub async fn scope<F: Future>(owner: Owner, f: F) -> F::Output {
    OWNER.scope(owner, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn owner_is_task_local() {
        assert_eq!(current(), None);
        let got = scope(of_conversation("tg", "42"), async { current() }).await;
        assert_eq!(got.map(|o| o.key()).as_deref(), Some("channel:tg:42"));
        assert_eq!(of_job("nightly").key(), "job:nightly");
        assert_eq!(of_conversation("tg", "a:b").key(), "channel:tg:a:b");
        assert_eq!(current(), None);
    }
}
