//! Unit tests of `adapter`.

use carapace_broker::protocol::DeliverStatus;

use super::*;
use crate::broker::fake::FakeBroker;

#[test]
fn backoff_doubles_to_its_cap_and_resets() {
    let mut b = Backoff::new(Duration::from_secs(5));
    let got: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 5, 5]);
    b.reset();
    assert_eq!(b.next_delay(), Duration::from_secs(1));
}

#[test]
fn retry_follows_the_kind() {
    assert!(ServiceError::new(FailureKind::Unreachable, "x").retry());
    assert!(ServiceError::new(FailureKind::Throttled, "x").retry());
    assert!(!ServiceError::new(FailureKind::Rejected, "x").retry());
}

fn ctx(broker: FakeBroker) -> Ctx<FakeBroker> {
    Ctx::new("c".into(), "/nonexistent".into(), Arc::new(broker))
}

fn msg(id: &str, text: &str) -> Inbound {
    Inbound {
        id: id.into(),
        sender: "s".into(),
        conversation: "s".into(),
        reply_to: "s".into(),
        text: text.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn deliver_retries_busy_replaces_too_large_and_skips_bad_requests() {
    let c = ctx(FakeBroker::default());
    c.broker.st().deliver_script.extend([
        Err(ErrorCode::Busy),
        Err(ErrorCode::Unavailable),
        Err(ErrorCode::Denied),
    ]);
    let r = deliver(&c, &msg("1", "hi")).await;
    assert_eq!(r.map(|r| r.status).ok(), Some(DeliverStatus::Queued));
    assert_eq!(c.broker.st().attempts, 4);
    // Too large: a note with the same id instead.
    c.broker
        .st()
        .deliver_script
        .push_back(Err(ErrorCode::TooLarge));
    let r = deliver(&c, &msg("2", &"x".repeat(5000))).await;
    assert!(r.is_ok());
    let last = c.broker.st().delivered.last().cloned();
    assert_eq!(last.as_ref().map(|m| m.id.as_str()), Some("2"));
    assert_eq!(last.map(|m| m.text), Some(too_large_note(5000)));
    // A note that is still too large: skipped.
    c.broker
        .st()
        .deliver_script
        .extend([Err(ErrorCode::TooLarge), Err(ErrorCode::TooLarge)]);
    let r = deliver(&c, &msg("2b", "[carapace: looks like a note]")).await;
    assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::TooLarge));
    // Refused for good: skipped (Err), not retried.
    c.broker
        .st()
        .deliver_script
        .push_back(Err(ErrorCode::BadRequest));
    let before = c.broker.st().attempts;
    let r = deliver(&c, &msg("3", "x")).await;
    assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::BadRequest));
    assert_eq!(c.broker.st().attempts, before + 1);
}

#[tokio::test]
async fn reports_only_changes() {
    let c = ctx(FakeBroker::default());
    c.report(true, None).await;
    c.report(true, None).await;
    c.report(false, Some("down".into())).await;
    c.report(false, Some("down".into())).await;
    c.report(false, Some("other".into())).await;
    c.report(true, None).await;
    assert_eq!(
        c.broker.st().states,
        [
            (true, None),
            (false, Some("down".into())),
            (false, Some("other".into())),
            (true, None)
        ]
    );
}

type Answer = Result<Option<String>, ServiceError>;

/// Answers from a script, by message id.
struct Scripted(Mutex<Vec<(String, Answer)>>);

impl Outlet for Scripted {
    async fn send(&self, m: &OutboundMessage) -> Result<Option<String>, ServiceError> {
        let mut s = carapace_broker::sync::lock(&self.0);
        let i = s.iter().position(|(id, _)| *id == m.id).unwrap_or(0);
        s.remove(i).1
    }
}

fn out(id: &str) -> OutboundMessage {
    OutboundMessage {
        id: id.into(),
        recipient: "r".into(),
        body: "b".into(),
        in_reply_to: None,
        attempt: 1,
        buttons: Vec::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn the_outbound_loop_acknowledges_each_outcome() {
    let c = ctx(FakeBroker::default());
    let mut throttled = ServiceError::new(FailureKind::Throttled, "429");
    throttled.retry_after = Some(Duration::from_secs(2));
    let outlet = Scripted(Mutex::new(vec![
        ("a".into(), Ok(Some("77".into()))),
        (
            "b".into(),
            Err(ServiceError::new(FailureKind::Unreachable, "net")),
        ),
        ("c".into(), Err(throttled)),
        (
            "d".into(),
            Err(ServiceError::new(FailureKind::Rejected, "400")),
        ),
    ]));
    c.broker
        .st()
        .outbox
        .extend([out("a"), out("b"), out("c"), out("d")]);
    tokio::select! {
        () = run_outbound(&c, &outlet) => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
    let acks = c.broker.st().acks.clone();
    assert_eq!(
        acks,
        [
            (
                "a".into(),
                SendOutcome::Sent {
                    service_id: Some("77".into())
                }
            ),
            (
                "b".into(),
                SendOutcome::Failed {
                    error: "net".into(),
                    retry: true
                }
            ),
            (
                "c".into(),
                SendOutcome::Failed {
                    error: "429".into(),
                    retry: true
                }
            ),
            (
                "d".into(),
                SendOutcome::Failed {
                    error: "400".into(),
                    retry: false
                }
            ),
        ]
    );
    // Unreachable made it disconnected; the answers after it connected again.
    assert_eq!(
        c.broker.st().states,
        [(true, None), (false, Some("net".into())), (true, None)]
    );
}
