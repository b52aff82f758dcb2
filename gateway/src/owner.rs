//! Who a request acts for: the *owner* of the tools it runs. A client's calls belong to its
//! token (`token:<id>`), an answer to a channel message to its conversation
//! (`channel:<name>:<conversation>`), a scheduled job to the job (`job:<name>`). The broker
//! gives each owner a tools workspace of its own, so tools run for one never see the files of
//! another's.
//!
//! The owner of the current task is the task-local [`OWNER`], set around each client call
//! ([`crate::methods::dispatch`]) and each answered channel message; a task outside both (the
//! gateway's own work) has none and its tools get the shared workspace.

use std::future::Future;

use crate::auth::Caller;

tokio::task_local! {
    /// The owner of the current task's tool runs.
    pub static OWNER: String;
}

/// The owner of a client's calls: its token.
pub fn of_caller(caller: &Caller) -> String {
    format!("token:{}", caller.token_id)
}

/// The owner of the answer to a message of `conversation` on `channel`.
pub fn of_conversation(channel: &str, conversation: &str) -> String {
    format!("channel:{channel}:{conversation}")
}

/// The owner of a scheduled job's runs.
pub fn of_job(name: &str) -> String {
    format!("job:{name}")
}

/// The current task's owner, if any.
pub fn current() -> Option<String> {
    OWNER.try_with(Clone::clone).ok()
}

/// Run `f` as `owner`.
pub async fn scope<F: Future>(owner: String, f: F) -> F::Output {
    OWNER.scope(owner, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn owner_is_task_local() {
        assert_eq!(current(), None);
        let got = scope(of_conversation("tg", "42"), async { current() }).await;
        assert_eq!(got.as_deref(), Some("channel:tg:42"));
        assert_eq!(of_job("nightly"), "job:nightly");
        assert_eq!(current(), None);
    }
}
